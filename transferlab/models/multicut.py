"""Many cut points in one forward pass (#13 item 2).

``model.cut`` as a list (``[stage:1, stage:3, head]``) or a named set (``all-stages``,
``all-blocks`` for timm models) gives one feature vector per cut from a single pass of the
base: forward hooks capture each cut module's output (pooled at once, as the single-cut
extractor pools it), and the pass stops after the deepest cut with the ``StopForward`` of
``TapModule``. Every per-cut output equals, bit for bit in fp32 eval, the single-cut
``make_extractor`` output for the same weights: the cut bodies are built by ``build_body``
itself and only read here to see where each cut's value comes from.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, CutError
from .cuts import (
    POOLS,
    CutOutput,
    CutSpec,
    Features,
    FxNode,
    Pool,
    StopForward,
    TapModule,
    TimmHead,
    build_body,
    dummy_input,
    model_device_dtype,
    parse_cut,
)

CUT_SETS = ("all-stages", "all-blocks")
CutLike = str | dict | CutSpec


def is_multi_cut(cut: Any) -> bool:
    """True for a list of cuts or a named set: the runner writes one store per cut."""
    return isinstance(cut, (list, tuple)) or (isinstance(cut, str) and cut.strip() in CUT_SETS)


# ---------------------------------------------------------------------------------------
# Which cuts: lists and named sets, one directory per cut
# ---------------------------------------------------------------------------------------


def expand_cuts(model: nn.Module, cuts: CutLike | Sequence[CutLike],
                model_name: str = "") -> list[CutSpec]:
    """``cuts`` (one cut, a list, ``all-stages`` / ``all-blocks``, or a list mixing them) as
    the ordered list of CutSpecs; a set expands in the model's call order, in place."""
    items = [cuts] if isinstance(cuts, (str, dict, CutSpec)) else list(cuts)
    if not items:
        raise ConfigError("model.cut is an empty list; name at least one cut, e.g. "
                          "[stage:1, head], or all-stages")
    out: list[CutSpec] = []
    for item in items:
        name = item.strip() if isinstance(item, str) else None
        if name in CUT_SETS:
            out.extend(named_cuts(model, name, model_name))
        elif name is not None and name.startswith("all"):
            close = difflib.get_close_matches(name, CUT_SETS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown cut set '{name}': {hint}use all-stages, all-blocks or "
                              "a list of cuts such as [stage:1, head]")
        else:
            out.append(parse_cut(item))
    seen: set[str] = set()
    for spec in out:
        if str(spec) in seen:
            raise ConfigError(f"cut '{spec}' is listed twice in model.cut; list each cut once")
        seen.add(str(spec))
    return out


def named_cuts(model: nn.Module, name: str, model_name: str = "") -> list[CutSpec]:
    """``all-stages``: stage:0..N-1 of timm's ``feature_info``; ``all-blocks``: every
    block of those stages (``block_names``) as layer:NAME cuts."""
    info = getattr(model, "feature_info", None)
    label = model_name or type(model).__name__
    if not info:
        raise ConfigError(f"model.cut '{name}' needs a timm model with feature_info; {label} "
                          "has none: list the cuts instead, e.g. [first:3, first:7, head] "
                          f"(python -m transferlab.inspect {model_name or 'MODEL'} lists them)")
    if name == "all-stages":
        return [CutSpec("stage", i) for i in range(len(info))]
    # a wrapped tower (Transformers) lists its own blocks
    blocks = model.cut_blocks() if hasattr(model, "cut_blocks") else block_names(model)
    if not blocks:
        raise ConfigError(f"model.cut 'all-blocks': {label} has no blocks in its stages; use "
                          "all-stages or list the cuts (python -m transferlab.inspect lists them)")
    return [CutSpec("layer", b) for b in blocks]


def block_names(model: nn.Module) -> list[str]:
    """The blocks of a timm model's feature stages, in module order.

    A stage named by ``feature_info`` that sits in a Sequential/ModuleList (ViT
    ``blocks.3``, EfficientNet ``blocks.2``) brings all its siblings, so stages that
    ``feature_info`` skips are kept. A stage that is a Sequential (ResNet ``layer1``) or has
    a Sequential ``blocks`` (ConvNeXt ``stages.0``) gives its children; a sibling that is
    neither (a ViT ``Block``) is itself a block; stems, final convs and activations are not.
    """
    modules = dict(model.named_modules())
    candidates: list[tuple[str, bool]] = []  # (name, came from a container of stages)
    for entry in model.feature_info:
        parent_name = entry["module"].rpartition(".")[0]
        parent = modules.get(parent_name) if parent_name else None
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):
            candidates += [(f"{parent_name}.{c}", True) for c, _ in parent.named_children()]
        else:
            candidates.append((entry["module"], False))
    out: list[str] = []
    for name, sibling in dict.fromkeys(candidates):
        module = modules[name]
        inner = getattr(module, "blocks", None)
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            out += [f"{name}.{c}" for c, _ in module.named_children()]
        elif isinstance(inner, (nn.Sequential, nn.ModuleList)):
            out += [f"{name}.blocks.{c}" for c, _ in inner.named_children()]
        elif sibling and any(True for _ in module.children()):
            out.append(name)
    return list(dict.fromkeys(out))


def cut_dir(cut: CutLike) -> str:
    """A file-system-safe directory name for one cut: 'stage:1' -> 'stage-1'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(parse_cut(cut)).replace(":", "-"))


def cut_dirs(cuts: Sequence[CutLike]) -> list[str]:
    """One directory name per cut, unique also on case-insensitive file systems (a clash
    of two different cuts gets '-2', '-3' ...)."""
    out: list[str] = []
    taken: set[str] = set()
    for cut in cuts:
        base = name = cut_dir(cut)
        n = 1
        while name.lower() in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name.lower())
        out.append(name)
    return out


def cut_pools(cuts: Sequence[CutSpec],
              pool: str | None | Sequence[str | None] | Mapping[str, str | None]
              ) -> list[str | None]:
    """The pool of each cut: one for all, a list aligned with ``cuts``, or a mapping from
    cut string to pool (cuts it does not name: None, the single-cut default)."""
    names = [str(c) for c in cuts]
    if pool is None or isinstance(pool, str):
        pools: list[str | None] = [pool] * len(cuts)
    elif isinstance(pool, Mapping):
        keys = {str(parse_cut(k)): v for k, v in pool.items()}
        unknown = sorted(set(keys) - set(names))
        if unknown:
            raise ConfigError(f"model.pool names cut(s) {', '.join(unknown)} that model.cut "
                              f"does not have (cuts: {', '.join(names)})")
        pools = [keys.get(n) for n in names]
    else:
        pools = list(pool)
        if len(pools) != len(cuts):
            raise ConfigError(f"model.pool lists {len(pools)} pools for {len(cuts)} cuts "
                              f"({', '.join(names)}); give one pool per cut, or one for all")
    for p in pools:
        if p is not None and p not in POOLS:
            raise ConfigError(f"unknown pool '{p}' (choose one of: {', '.join(POOLS)})")
    return pools


# ---------------------------------------------------------------------------------------
# Where each cut's value comes from in the one pass
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CutSource:
    """``tap``: output of module ``where``; ``seq``: output of child ``where`` of a
    Sequential model; ``features``: timm ``forward_features``; ``prelogits``: timm
    ``forward_head(pre_logits=True)``; ``output``: the model's own output."""

    kind: str
    where: str | int | None = None


def cut_source(model: nn.Module, spec: CutSpec, body: nn.Module) -> CutSource:
    """Read the body ``build_body`` made for ``spec``: which value of the base it returns."""
    if isinstance(body, TapModule) and body.model is model:
        return CutSource("tap", body.module_name)
    if isinstance(body, TimmHead) and body.model is model:
        return CutSource("prelogits")
    if isinstance(body, Features) and body.model is model:
        return CutSource("features")
    if isinstance(body, nn.Sequential) and isinstance(model, nn.Sequential) and \
            0 < len(body) <= len(model) and all(a is b for a, b in zip(body, model)):
        return CutSource("seq", len(body) - 1)
    if body is model:
        return CutSource("output")
    if isinstance(body, FxNode):
        raise CutError(f"cut '{spec}' is a torch.fx graph node, not a module: cuts taken in "
                       "one pass hook modules; choose a module (python -m transferlab.inspect "
                       "MODEL --all) or extract this cut alone")
    raise CutError(f"cut '{spec}' cannot be taken in a pass shared with other cuts; "
                   "extract it alone")


def cut_sources(model: nn.Module, specs: Sequence[CutSpec], pools: Sequence[str | None],
                input_size: Sequence[int], model_name: str = ""
                ) -> tuple[list[CutSource], list[str]]:
    """(source, pool applied after it) of each cut. The head cut may change the model's
    classifier (as the single-cut head does), so it is built last and a tap on a module it
    replaced is refused (its single-cut value would come from the original module)."""
    order = sorted(range(len(specs)), key=lambda i: specs[i].kind == "head")
    sources: list[CutSource | None] = [None] * len(specs)
    pool_names: list[str] = [""] * len(specs)
    tapped: dict[str, nn.Module] = {}
    for i in order:
        body, pool_names[i] = build_body(model, specs[i], pools[i], input_size, model_name)
        sources[i] = cut_source(model, specs[i], body)
        if sources[i].kind == "tap":
            tapped[str(sources[i].where)] = model.get_submodule(str(sources[i].where))
    for name, module in tapped.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            current = None
        if current is not module:
            raise CutError(f"the cut at '{name}' is a module the head cut replaces; extract "
                           "it in a run of its own, or drop 'head' from model.cut")
    return [s for s in sources if s is not None], pool_names


# ---------------------------------------------------------------------------------------
# The extractor
# ---------------------------------------------------------------------------------------


class _Pass:
    """The values captured during one forward pass, pooled as they arrive."""

    def __init__(self, pools: nn.ModuleList):
        self.pools = pools
        self.out: list[torch.Tensor | None] = [None] * len(pools)
        self.left = len(pools)
        self.stop = False  # raise StopForward once every cut has its value

    def put(self, indices: Sequence[int], value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            raise CutError(f"the cut output is a {type(value).__name__}, not a tensor; "
                           "choose a layer whose output is a tensor")
        for i in indices:
            if self.out[i] is not None:
                continue  # a module called twice: the first call is the cut, as in TapModule
            pooled = self.pools[i](value)
            # later layers may change ``value`` in place (ReLU(inplace=True)): keep a copy
            if pooled.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
                pooled = pooled.clone()
            self.out[i] = pooled
            self.left -= 1
        if self.stop and self.left == 0:
            raise StopForward

    def hook(self, indices: list[int]):
        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            self.put(indices, output)
        return capture


class MultiCutExtractor(nn.Module):
    """One frozen base, several cuts: ``forward(x)`` runs the base once and returns one
    pooled tensor per cut, each equal to the single-cut extractor's output."""

    def __init__(self, model: nn.Module, cuts: Sequence[CutSpec], sources: Sequence[CutSource],
                 pool_names: Sequence[str], model_name: str = "",
                 asked_pools: Sequence[str | None] | None = None):
        super().__init__()
        self.model = model
        self.cuts = list(cuts)
        self.sources = list(sources)
        self.pool_names = list(pool_names)
        self.asked_pools = list(asked_pools or [None] * len(self.cuts))  # model.pool per cut
        self.model_name = model_name
        prefix = int(getattr(model, "num_prefix_tokens", 1) or 0)
        self.pools = nn.ModuleList(Pool(p, prefix) for p in pool_names)
        self.taps: dict[str, list[int]] = {}
        for i, s in enumerate(self.sources):
            if s.kind == "tap":
                self.taps.setdefault(str(s.where), []).append(i)
        kinds = {s.kind for s in self.sources}
        self.mode = ("seq" if isinstance(model, nn.Sequential) else
                     "timm" if kinds & {"features", "prelogits"} else "model")
        self.output_shapes: list[tuple[int, ...]] = []
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> MultiCutExtractor:
        """The base stays in eval mode (BatchNorm statistics and dropout frozen)."""
        return super().train(False)

    @property
    def outputs(self) -> list[CutOutput]:
        """One per cut, in cut order."""
        return [CutOutput(*c) for c in zip(self.cuts, self.asked_pools, self.pool_names,
                                           self.output_shapes)]

    @property
    def feature_dims(self) -> list[int]:
        """Length of each cut's flattened output vector, in cut order."""
        return [o.feature_dim for o in self.outputs]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        state = _Pass(self.pools)
        handles = [self.model.get_submodule(name).register_forward_hook(state.hook(idx))
                   for name, idx in self.taps.items()]
        try:
            self.run_base(x, state)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [str(self.cuts[i]) for i, v in enumerate(state.out) if v is None]
        if missing:
            raise CutError(f"cut(s) {', '.join(missing)} were not computed by the model's "
                           "forward pass; choose others (python -m transferlab.inspect MODEL)")
        return [v for v in state.out if v is not None]

    def indices(self, kind: str, where: Any = None) -> list[int]:
        return [i for i, s in enumerate(self.sources) if s.kind == kind and s.where == where]

    def run_base(self, x: torch.Tensor, state: _Pass) -> None:
        """The one pass. Sequential: its children in order (as ``Sequential.forward``);
        timm with a head cut: ``forward_features``, then the head on those features;
        otherwise ``model(x)``, stopped after the deepest tap (as ``TapModule``)."""
        model = self.model
        if self.mode == "seq":
            state.stop = True
            h = x
            for i, layer in enumerate(model):
                h = layer(h)
                state.put(self.indices("seq", i), h)
            return
        if self.mode == "timm":
            feats = model.forward_features(x)
            state.put(self.indices("features"), feats)
            if self.indices("prelogits"):
                state.put(self.indices("prelogits"), model.forward_head(feats, pre_logits=True))
            if state.left:  # taps inside the classifier: the rest of model(x)
                state.stop = True
                model.forward_head(feats)
            return
        state.stop = not self.indices("output")
        state.put(self.indices("output"), model(x))


def make_multi_extractor(model: nn.Module, cuts: CutLike | Sequence[CutLike],
                         pool: Any, input_size: Sequence[int],
                         model_name: str = "") -> MultiCutExtractor:
    """``make_extractor`` for several cuts: expand, build each cut as the single-cut
    extractor does, validate with one dummy pass (output shapes)."""
    specs = expand_cuts(model, cuts, model_name)
    pools = cut_pools(specs, pool)
    model.eval()
    sources, pool_names = cut_sources(model, specs, pools, input_size, model_name)
    extractor = MultiCutExtractor(model, specs, sources, pool_names, model_name, pools)
    device, dtype = model_device_dtype(model)
    try:
        with torch.no_grad():
            outs = extractor(dummy_input(input_size).to(device, dtype))
    except CutError:
        raise
    except Exception as exc:
        raise CutError(f"the cut model fails on a dummy input of shape {tuple(input_size)}: "
                       f"{type(exc).__name__}: {exc}") from None
    extractor.output_shapes = [tuple(o.shape[1:]) for o in outs]
    return extractor
