"""Classifier heads trained on top of a frozen base: linear, MLP, or the model's own layers.

``build_head`` makes a new head from a ``HeadConfig``; ``keep_head`` reuses the layers the
cut removed (``model[N:]`` of a Sequential model such as LeNet, or a timm/torchvision
classifier) with the final Linear re-initialised to the new class count. ``check_head_fits``
runs one dummy forward so a head that does not match the cut fails before any training.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import HeadConfig, check_range
from ..errors import HeadError
from .cuts import (
    CLASSIFIER_ATTRS,
    CutSpec,
    FrozenExtractor,
    is_timm_model,
    make_extractor,
    parse_cut,
)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def build_head(cfg: HeadConfig, in_features: int, num_classes: int) -> nn.Sequential:
    """``linear``: Flatten, [Dropout], Linear. ``mlp``: Flatten, then per hidden size
    [Dropout], Linear, activation; then [Dropout], Linear to ``num_classes``."""
    if cfg.type not in ("linear", "mlp"):
        raise HeadError(f"build_head makes linear or mlp heads, not '{cfg.type}'; "
                        "use keep_head for head.type=keep")
    if cfg.in_features is not None and cfg.in_features != in_features:
        raise HeadError(f"head.in_features={cfg.in_features} does not fit the cut's output of "
                        f"{in_features} features; remove head.in_features or change model.cut")
    check_range(HeadConfig, "head.dropout", cfg.dropout)
    hidden = list(cfg.hidden) if cfg.type == "mlp" else []
    if cfg.type == "mlp" and not hidden:
        raise HeadError("head.type=mlp needs head.hidden sizes, e.g. [500]; or use type linear")
    check_range(HeadConfig, "head.hidden", hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for i, size in enumerate(hidden + [num_classes]):
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        layers.append(nn.Linear(width, size))
        if i < len(hidden):  # no activation after the output layer
            layers.append(ACTIVATIONS[cfg.activation]())
        width = size
    return nn.Sequential(*layers)


def keep_head(model: nn.Module, cut: CutSpec, base_layers: int | None,
              num_classes: int) -> nn.Module:
    """The model's own layers after the cut, copied, with the last Linear re-initialised.

    ``base_layers`` is how many top-level layers the base keeps (for Sequential models cut
    with first:N / drop:N). Call it before cutting: the head cut removes classifiers.
    """
    if isinstance(model, nn.Sequential) and cut.kind in ("first", "drop"):
        if base_layers is None or base_layers >= len(model):
            raise HeadError(f"head.type=keep: the cut '{cut}' keeps every layer of the model, "
                            "so no layers are left for the head; cut earlier or use linear")
        tail = copy.deepcopy(model[base_layers:])
    elif cut.kind == "head":
        tail = copy.deepcopy(own_classifier(model))
    else:
        raise HeadError(f"head.type=keep needs a Sequential model cut with first:N or drop:N, or "
                        f"the head cut; cut '{cut}' of {type(model).__name__} has no well-defined "
                        "'layers after the cut': use head.type linear or mlp")
    return reinit_last_linear(tail, num_classes)


def own_classifier(model: nn.Module) -> nn.Module:
    if is_timm_model(model) and hasattr(model, "get_classifier"):
        return model.get_classifier()
    for attr in CLASSIFIER_ATTRS:
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise HeadError(f"{type(model).__name__} has no classifier to keep "
                    f"({', '.join(CLASSIFIER_ATTRS)}); use head.type linear or mlp")


def reinit_last_linear(head: nn.Module, num_classes: int) -> nn.Module:
    """Replace the last ``nn.Linear`` by a freshly initialised one with ``num_classes`` outputs."""
    last = None
    for name, module in head.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise HeadError(f"the kept layers ({type(head).__name__}) contain no Linear layer to "
                        "re-initialise; use head.type linear or mlp")
    old = head.get_submodule(last) if last else head
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if not last:
        return new
    parent_name, _, child = last.rpartition(".")
    parent = head.get_submodule(parent_name) if parent_name else head
    setattr(parent, child, new)
    return head


@torch.no_grad()
def check_head_fits(head: nn.Module, base: FrozenExtractor, num_classes: int) -> None:
    """One dummy forward: the head must map the base's output to ``num_classes`` logits."""
    x = torch.zeros(2, *base.output_shape)
    was_training = head.training
    head.eval()
    try:
        out = head(x)
    except Exception as exc:  # any shape or type failure of user-chosen layers
        raise HeadError(f"the head does not fit the cut's output of shape "
                        f"{tuple(base.output_shape)} (model.cut={base.cut}, pool="
                        f"{base.pool_name}): {type(exc).__name__}: {exc}. Change model.cut / "
                        "model.pool or use head.type linear") from None
    finally:
        head.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise HeadError(f"the head maps the cut's output {tuple(base.output_shape)} to {shape}, "
                        f"not (batch, {num_classes}) class scores; change model.cut or "
                        "head.type")


def head_description(head: nn.Module) -> str:
    """One line naming the head's layers, for logs and metrics."""
    return " -> ".join(type(m).__name__ if not isinstance(m, nn.Linear)
                       else f"Linear({m.in_features}, {m.out_features})"
                       for m in head.modules() if not list(m.children()))


def sequential_split(model: nn.Module, cut: CutSpec) -> int | None:
    """How many top-level layers a first:N / drop:N cut keeps of a Sequential model."""
    if not isinstance(model, nn.Sequential) or cut.kind not in ("first", "drop"):
        return None
    return int(cut.value) if cut.kind == "first" else len(model) - int(cut.value)


def cut_with_head(model: nn.Module, cut: str | CutSpec, pool: str | None,
                  input_size: tuple[int, ...], cfg: HeadConfig, num_classes: int,
                  model_name: str = "") -> tuple[FrozenExtractor, nn.Module]:
    """The frozen base at ``cut`` and a head for ``num_classes`` that fits its output.

    A kept head is copied before the model is cut (the head cut removes the classifier).
    """
    spec = parse_cut(cut)
    if num_classes < 2:
        raise HeadError(f"a classifier head needs at least 2 classes, got {num_classes}")
    kept = None
    if cfg.type == "keep":
        kept = keep_head(model, spec, sequential_split(model, spec), num_classes)
    base = make_extractor(model, spec, pool, input_size, model_name)
    head = kept if kept is not None else build_head(cfg, base.feature_dim, num_classes)
    if kept is not None and cfg.in_features is not None and cfg.in_features != base.feature_dim:
        raise HeadError(f"head.in_features={cfg.in_features} does not fit the cut's output of "
                        f"{base.feature_dim} features; remove head.in_features or change "
                        "model.cut")
    check_head_fits(head, base, num_classes)
    return base, head
