"""Cut points: turn a backbone into a frozen feature extractor.

One spec string selects where the network is cut (negative numbers count from the end,
as in timm):

- ``head``      classifier removed, features pooled (Keras ``include_top=False, pooling='avg'``)
- ``first:N``   output of the first N layers (Mathematica ``Take[net, {1, N}]``)
- ``drop:N``    all layers but the last N
- ``layer:NAME`` output of a named module (or a torchvision FX graph node)
- ``stage:I``   output of timm feature stage I

"Layers" are the model's top-level children in the order its forward pass calls them.
Every cut is validated with one dummy forward pass before any data is read;
``list_cut_points(model)`` lists the valid ones with their output shapes.
"""
from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CutError

CUT_KINDS = ("head", "first", "drop", "layer", "stage")
POOLS = ("avg", "max", "avgmax", "token", "tokenavg", "none", "grid2", "grid4")
# gridG: the average of each cell of a G x G grid over the feature map, concatenated
# (C*G*G values, channel-major): keeps where things are (near-duplicate search: BENCHMARKS.md)
GRID_POOLS = {"grid2": 2, "grid4": 4}
CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head", "last_linear")
HEAD_LAYER_TYPES = (nn.Linear, nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Dropout,
                    nn.Softmax, nn.LogSoftmax, nn.Identity)


@dataclass(frozen=True)
class CutSpec:
    kind: str
    value: int | str | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value}"


def parse_cut(cut: str | dict | CutSpec) -> CutSpec:
    """'head', 'first:7', 'drop:2', 'layer:layer3', 'stage:-1' (or {'first': 7}) -> CutSpec."""
    if isinstance(cut, CutSpec):
        return cut
    if isinstance(cut, dict) and len(cut) == 1:
        kind, value = next(iter(cut.items()))
    elif isinstance(cut, str):
        kind, _, value = cut.partition(":")
        kind, value = kind.strip(), value.strip() or None
    else:
        raise CutError(f"cut {cut!r} must be a string such as 'head' or 'first:7'")
    if kind not in CUT_KINDS:
        close = difflib.get_close_matches(str(kind), CUT_KINDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise CutError(f"unknown cut '{cut}'{hint} (use head, first:N, drop:N, layer:NAME "
                       "or stage:I)")
    if kind == "head":
        if value is not None:
            raise CutError(f"cut 'head' takes no value, got '{cut}'")
        return CutSpec("head")
    if value is None:
        example = "NAME" if kind == "layer" else 2
        raise CutError(f"cut '{kind}' needs a value, e.g. '{kind}:{example}'")
    if kind == "layer":
        return CutSpec("layer", str(value))
    try:
        return CutSpec(kind, int(value))
    except ValueError:
        raise CutError(f"cut '{kind}:{value}' needs an integer") from None


class Pool(nn.Module):
    """Pool a cut output to one vector per sample: NCHW maps and (B, tokens, C) sequences."""

    def __init__(self, kind: str = "avg", num_prefix_tokens: int = 1):
        super().__init__()
        if kind not in POOLS:
            raise CutError(f"unknown pool '{kind}' (choose one of: {', '.join(POOLS)})")
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none" or x.ndim == 2:
            return x
        if x.ndim == 4:
            return self.pool_map(x)
        if x.ndim == 3:
            return self.pool_tokens(x)
        raise CutError(f"cannot pool an output of shape {tuple(x.shape)}; use pool: none")

    def pool_map(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in GRID_POOLS:
            return nn.functional.adaptive_avg_pool2d(x, GRID_POOLS[self.kind]).flatten(1)
        if self.kind in ("token", "tokenavg"):
            raise CutError(f"pool '{self.kind}' needs a token sequence (ViT); this cut gives a "
                           "feature map: use avg, max or avgmax")
        avg = x.mean(dim=(2, 3)) if self.kind in ("avg", "avgmax") else None
        mx = x.amax(dim=(2, 3)) if self.kind in ("max", "avgmax") else None
        if self.kind == "avgmax":
            return 0.5 * (avg + mx)
        return avg if avg is not None else mx

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in GRID_POOLS:
            raise CutError(f"pool '{self.kind}' needs a feature map (a CNN's NCHW cut); this "
                           "cut gives a token sequence: use avg, max, avgmax or token")
        if self.kind == "token":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens:]
        if self.kind == "tokenavg":  # DINOv2's linear evaluation: class token | mean of patches
            return torch.cat([x[:, 0], patches.mean(dim=1)], dim=1)
        if self.kind == "avg":
            return patches.mean(dim=1)
        if self.kind == "max":
            return patches.amax(dim=1)
        return 0.5 * (patches.mean(dim=1) + patches.amax(dim=1))

    def extra_repr(self) -> str:
        return self.kind


class StopForward(Exception):
    """Raised by a hook to end the forward pass once the cut output is captured."""


class TapModule(nn.Module):
    """Runs the model but returns (and stops at) the output of one named module.

    The hook lives only during ``forward``, so the wrapped model is left untouched.
    """

    def __init__(self, model: nn.Module, module_name: str):
        super().__init__()
        self.model = model
        self.module_name = module_name
        model.get_submodule(module_name)  # fail early on a bad name

    def forward(self, x: torch.Tensor) -> Any:
        captured: list[Any] = []

        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            captured.append(output)
            raise StopForward

        handle = self.model.get_submodule(self.module_name).register_forward_hook(capture)
        try:
            self.model(x)
        except StopForward:
            return captured[0]
        finally:
            handle.remove()
        raise CutError(f"module '{self.module_name}' was not called by the model's forward "
                       "pass; choose another cut (python -m transferlab.inspect MODEL)")


class TimmHead(nn.Module):
    """timm's own pre-logits path: ``forward_head(forward_features(x), pre_logits=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class Features(nn.Module):
    """``forward_features`` only: the unpooled output of a timm model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@dataclass(frozen=True)
class CutOutput:
    """One output of an extractor: its cut, the pool as asked (None: the model's own) and
    as applied after the cut (a timm head pools inside the model: 'none' after it), and the
    shape of one sample's output."""

    cut: CutSpec
    pool: str | None
    pool_after_cut: str
    shape: tuple[int, ...]

    @property
    def feature_dim(self) -> int:
        """Length of the flattened output vector."""
        return int(torch.Size(self.shape).numel())


class FrozenExtractor(nn.Module):
    """A backbone cut at ``cut`` and pooled; parameters frozen and always in eval mode."""

    def __init__(self, body: nn.Module, pool: nn.Module, cut: CutSpec, pool_name: str,
                 model_name: str = "", asked_pool: str | None = None):
        super().__init__()
        self.body = body
        self.pool = pool
        self.cut = cut
        self.pool_name = pool_name
        self.asked_pool = asked_pool
        self.model_name = model_name
        self.output_shape: tuple[int, ...] = ()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenExtractor:
        """The base stays in eval mode (BatchNorm statistics and dropout frozen)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))

    @property
    def feature_dim(self) -> int:
        """Length of the flattened output vector."""
        return int(torch.Size(self.output_shape).numel())

    @property
    def outputs(self) -> list[CutOutput]:
        """Its one output (a ``MultiCutExtractor`` lists one per cut)."""
        return [CutOutput(self.cut, self.asked_pool, self.pool_name, self.output_shape)]

    @property
    def feature_dims(self) -> list[int]:
        """``[feature_dim]``: the width of each output (what the engine reads)."""
        return [self.feature_dim]

    def layers(self, input_size: Sequence[int]) -> list[tuple[str, nn.Module]] | None:
        """The top-level layers this cut keeps, in call order; None for a cut at an FX graph
        node (its layers are not modules of the model)."""
        body = self.body
        if isinstance(body, nn.Sequential):
            return list(body.named_children())
        if isinstance(body, FxNode):
            return None
        model = getattr(body, "model", body)  # TapModule / TimmHead / Features wrap a model
        names = top_level_layers(trace_modules(model, input_size))
        if isinstance(body, TapModule):  # layers up to the tapped one
            names = names[:names.index(body.module_name.split(".")[0]) + 1]
        return [(n, model.get_submodule(n)) for n in names]


# ---------------------------------------------------------------------------------------
# Tracing: which layers run, in which order, with which output shapes
# ---------------------------------------------------------------------------------------


def dummy_input(input_size: Sequence[int], batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, *input_size)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(iter(model.parameters()), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


@contextlib.contextmanager
def hooked_dummy_forward(model: nn.Module, hooks: Sequence[tuple[nn.Module, Callable]],
                         input_size: Sequence[int]) -> Iterator[Callable[[], Any]]:
    """Forward ``hooks`` registered on their modules and ``model`` in eval mode inside the
    block, which gets the dummy forward to call (one image, the model's device and dtype);
    the hooks removed and the mode restored after it, whatever happened."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    was_training = model.training
    model.eval()
    device, dtype = model_device_dtype(model)
    try:
        with torch.no_grad():
            yield lambda: model(dummy_input(input_size).to(device, dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def trace_modules(model: nn.Module, input_size: Sequence[int]) -> dict[str, tuple[int, ...] | None]:
    """Output shape of every module, in the order of first call in one dummy forward."""
    shapes: dict[str, tuple[int, ...] | None] = {}

    def hook_for(name: str) -> Callable:
        def hook(mod, inp, out) -> None:
            if name not in shapes:
                shapes[name] = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
        return hook

    hooks = [(module, hook_for(name)) for name, module in model.named_modules() if name]
    with hooked_dummy_forward(model, hooks, input_size) as forward:
        try:
            forward()
        except StopForward:
            pass
        except Exception as exc:
            raise CutError(f"the model fails on a dummy input of shape {tuple(input_size)}: "
                           f"{type(exc).__name__}: {exc}. Set preprocess.input_size to what the "
                           "model expects") from None
    return shapes


def activation_elements(model: nn.Module, input_size: Sequence[int]) -> int:
    """Elements of every leaf module's output for one image (every call counted), in one
    dummy forward: how much activation memory a model moves per image, which sets the
    automatic CPU batch size (``runtime.device.default_batch_size``); 0 when it fails."""
    total = 0

    def count(mod, inp, out) -> None:
        nonlocal total
        outs = out if isinstance(out, (list, tuple)) else [out]
        total += sum(o.numel() for o in outs if isinstance(o, torch.Tensor))

    leaves = [(m, count) for m in model.modules() if next(m.children(), None) is None]
    with hooked_dummy_forward(model, leaves, input_size) as forward:
        try:
            forward()
        except Exception:  # a cut that stops the forward early; a model the cut check refuses
            pass
    return total


def top_level_layers(shapes: dict[str, Any]) -> list[str]:
    """Top-level children in call order: the 'layers' counted by first:N and drop:N."""
    return [name for name in shapes if "." not in name]


# ---------------------------------------------------------------------------------------
# Building the extractor
# ---------------------------------------------------------------------------------------


def is_timm_model(model: nn.Module) -> bool:
    return hasattr(model, "forward_head") and hasattr(model, "forward_features")


def build_body(model: nn.Module, cut: CutSpec, pool: str | None, input_size: Sequence[int],
               model_name: str = "") -> tuple[nn.Module, str]:
    """The module computing the cut output, and the pooling that applies after it."""
    if cut.kind == "head":
        return head_body(model, pool, input_size)
    default_pool = pool or "none"
    if cut.kind == "layer":
        return layer_body(model, str(cut.value), model_name), default_pool
    if cut.kind == "stage":
        return TapModule(model, stage_module(model, int(cut.value), model_name)), default_pool
    layers = top_level_layers(trace_modules(model, input_size))
    count = int(cut.value) if cut.kind == "first" else len(layers) - int(cut.value)
    if not 1 <= count <= len(layers):
        raise CutError(f"cut '{cut}' is out of range: {model_name or 'the model'} has "
                       f"{len(layers)} layers ({', '.join(layers)}); use first:1..{len(layers)} "
                       f"or drop:0..{len(layers) - 1}")
    if isinstance(model, nn.Sequential):
        return model[:count], default_pool
    return TapModule(model, layers[count - 1]), default_pool


def head_body(model: nn.Module, pool: str | None,
              input_size: Sequence[int]) -> tuple[nn.Module, str]:
    """Remove the classifier. timm models use their own pre-logits path."""
    if is_timm_model(model):
        if pool is None:
            return TimmHead(model), "none"
        if pool == "none" or pool in GRID_POOLS:
            return Features(model), pool
        try:
            model.reset_classifier(0, global_pool="token" if pool == "token" else pool)
            return TimmHead(model), "none"
        except (TypeError, ValueError, AssertionError, KeyError, AttributeError):
            return Features(model), pool
    if isinstance(model, nn.Sequential):
        return sequential_head_body(model), pool or "avg"
    return replace_classifier(model, pool), "none"


def sequential_head_body(model: nn.Sequential) -> nn.Module:
    """Everything before the trailing run of Linear/activation/dropout layers."""
    end = len(model)
    while end > 0 and isinstance(model[end - 1], HEAD_LAYER_TYPES):
        end -= 1
    if end == len(model) or end == 0:
        raise CutError("cannot tell this model's classifier apart: use first:N, drop:N or "
                       "layer:NAME (python -m transferlab.inspect MODEL lists them)")
    return model[:end]


def replace_classifier(model: nn.Module, pool: str | None) -> nn.Module:
    """torchvision-style models: set the classifier attribute to Identity, keep the pooling."""
    attr = next((a for a in CLASSIFIER_ATTRS if isinstance(getattr(model, a, None), nn.Module)),
                None)
    if attr is None:
        raise CutError(f"{type(model).__name__} has no classifier attribute "
                       f"({', '.join(CLASSIFIER_ATTRS)}); use first:N, drop:N or layer:NAME")
    classifier = getattr(model, attr)
    if isinstance(classifier, nn.Sequential) and not isinstance(classifier[-1], HEAD_LAYER_TYPES):
        raise CutError(f"cannot find the classifier of {type(model).__name__}; use layer:NAME")
    if isinstance(classifier, nn.Sequential):
        keep = [m for m in classifier if not isinstance(m, HEAD_LAYER_TYPES)]  # e.g. norms
        setattr(model, attr, nn.Sequential(*keep) if keep else nn.Identity())
    else:
        setattr(model, attr, nn.Identity())
    set_global_pool(model, pool)
    return model


def set_global_pool(model: nn.Module, pool: str | None) -> None:
    """Make a torchvision model's ``avgpool`` a global pool of the requested kind.

    VGG/AlexNet pool to 7x7 before their classifier; with it removed, a global pool gives
    the Keras ``pooling='avg'`` vector (512-d for VGG16).
    """
    current = getattr(model, "avgpool", None)
    if isinstance(current, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = current.output_size
        if pool is None and size in (1, (1, 1)):
            return
        model.avgpool = GlobalPool(pool or "avg")
    elif pool not in (None, "avg", "token"):
        raise CutError(f"pool '{pool}' is not available for the head cut of "
                       f"{type(model).__name__}; use layer:NAME with pool: {pool}")


class GlobalPool(nn.Module):
    """Global pooling keeping NCHW (1x1), a drop-in for torchvision's ``avgpool``."""

    def __init__(self, kind: str):
        super().__init__()
        self.pool = Pool(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)[:, :, None, None] if self.pool.kind != "none" else x


def layer_body(model: nn.Module, name: str, model_name: str = "") -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules and name:
        return TapModule(model, name)
    nodes = graph_node_names(model)
    if name in nodes:
        from torchvision.models.feature_extraction import create_feature_extractor

        return FxNode(create_feature_extractor(model, {name: "out"}))
    candidates = [n for n in modules if n] + nodes
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise CutError(f"no layer named '{name}' in {model_name or type(model).__name__}.{hint} "
                   f"Valid layers include: {', '.join(candidates[:12])}... "
                   f"(python -m transferlab.inspect {model_name or 'MODEL'} --all lists them)")


def graph_node_names(model: nn.Module) -> list[str]:
    """torchvision FX node names, or [] for models FX cannot trace."""
    try:
        from torchvision.models.feature_extraction import get_graph_node_names

        _, eval_nodes = get_graph_node_names(model)
        return list(eval_nodes)
    except Exception:  # tracing fails for many dynamic models; then only module names count
        return []


class FxNode(nn.Module):
    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)["out"]


def stage_module(model: nn.Module, index: int, model_name: str = "") -> str:
    info = getattr(model, "feature_info", None)
    if not info:
        raise CutError(f"stage cuts need a timm model with feature_info; "
                       f"{model_name or type(model).__name__} has none: use first:N or layer:NAME")
    stages = [entry["module"] for entry in info]
    if not -len(stages) <= index < len(stages):
        raise CutError(f"stage:{index} is out of range: {model_name} has {len(stages)} stages "
                       f"(stage:0..{len(stages) - 1} or stage:-1..-{len(stages)}: "
                       f"{', '.join(stages)})")
    return stages[index]


def make_extractor(model: nn.Module, cut: str | dict | CutSpec, pool: str | None,
                   input_size: Sequence[int], model_name: str = "") -> FrozenExtractor:
    """Cut ``model`` at ``cut`` and pool; validated by a dummy forward pass."""
    spec = parse_cut(cut)
    if pool is not None and pool not in POOLS:
        raise CutError(f"unknown pool '{pool}' (choose one of: {', '.join(POOLS)})")
    model.eval()
    body, pool_name = build_body(model, spec, pool, input_size, model_name)
    prefix = int(getattr(model, "num_prefix_tokens", 1) or 0)
    extractor = FrozenExtractor(body, Pool(pool_name, prefix), spec, pool_name, model_name,
                                pool)
    extractor.output_shape = output_shape(extractor, input_size)
    return extractor


@torch.no_grad()
def output_shape(module: nn.Module, input_size: Sequence[int]) -> tuple[int, ...]:
    device, dtype = model_device_dtype(module)
    try:
        out = module(dummy_input(input_size).to(device, dtype))
    except CutError:
        raise
    except Exception as exc:
        raise CutError(f"the cut model fails on a dummy input of shape {tuple(input_size)}: "
                       f"{type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor):
        raise CutError(f"the cut output is a {type(out).__name__}, not a tensor; choose a "
                       "layer whose output is a tensor")
    return tuple(out.shape[1:])


@dataclass
class CutPoint:
    spec: str
    module: str
    shape: tuple[int, ...] | None


def list_cut_points(model: nn.Module, input_size: Sequence[int],
                    all_modules: bool = False) -> list[CutPoint]:
    """Valid cut points with output shapes: head, first:N (and drop:N), stage:I, layer:NAME.

    ``layer:`` entries are listed for every module with ``all_modules``, else down to depth 2.
    """
    shapes = trace_modules(model, input_size)
    layers = top_level_layers(shapes)
    points = [CutPoint(f"first:{i + 1}", name, shapes[name]) for i, name in enumerate(layers)]
    for i, entry in enumerate(getattr(model, "feature_info", None) or []):
        points.append(CutPoint(f"stage:{i}", entry["module"], shapes.get(entry["module"])))
    for name, shape in shapes.items():
        if all_modules or name.count(".") <= 1:
            points.append(CutPoint(f"layer:{name}", name, shape))
    return points
