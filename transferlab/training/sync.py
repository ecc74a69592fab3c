"""Several processes (torchrun): gradient sums, broadcasts, weight digests."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..models.classifier import Classifier
from ..runtime.distributed import dist_info

# ---------------------------------------------------------------------------------------
# Several processes (torchrun)
# ---------------------------------------------------------------------------------------


def trainable_modules(net: Classifier) -> list[nn.Module]:
    """The modules training changes (weights, and buffers such as BatchNorm statistics)."""
    return [net.head, *(net.unfrozen if net.base is not None and net.base_trainable else [])]


class GradSync:
    """Sums the gradients of ``params`` over every process, in buckets of at most
    ``bucket`` elements, and scales them to the gradient of the mean loss over the global batch.

    Each process backpropagates the *sum* of its items' losses divided by ``norm`` (the same
    constant everywhere, for a gradient scale like a mean's); the item counts travel in the
    same all-reduce as the gradients, so uneven or empty shares weigh exactly right.
    """

    def __init__(self, params: Sequence[torch.Tensor], norm: float, bucket: int = 1 << 24):
        self.params = [p for p in params if p.requires_grad]
        self.norm, self.bucket = norm, bucket

    def __call__(self, count: int, check_empty: bool = False) -> bool:
        """All-reduce after this process's backward (``count`` items, maybe 0). Returns
        False when no process had an item (then there is nothing to step)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        groups: list[list[torch.Tensor]] = [[]]
        size = 0
        for p in self.params:
            if groups[-1] and (size + p.numel() > self.bucket
                               or p.grad.dtype != groups[-1][0].dtype):
                groups.append([])
                size = 0
            groups[-1].append(p.grad)
            size += p.numel()
        last = groups[-1][0] if groups[-1] else None
        counter = torch.tensor([float(count)], device=last.device if last is not None else
                               "cpu", dtype=last.dtype if last is not None else torch.float32)
        flats = [torch.cat([g.reshape(-1) for g in grads]) for grads in groups if grads]
        flats[-1:] = [torch.cat([flats[-1], counter])] if flats else [counter]
        for flat in flats:
            dist.all_reduce(flat)
        total = flats[-1][-1:].clone()
        if check_empty and float(total) == 0:
            return False
        for grads, flat in zip(groups, flats):
            flat.mul_(self.norm / total.clamp(min=1.0).to(flat.dtype))
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return True


def broadcast_trainable(net: Classifier, params: Sequence[torch.Tensor]) -> None:
    """Rank 0's trained parameters and buffers everywhere: every process starts alike."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, 0)
        for module in trainable_modules(net):
            for b in module.buffers():
                dist.broadcast(b, 0)


def average_buffers(net: Classifier) -> None:
    """Mean of the floating buffers (BatchNorm running statistics) of the trained modules over
    the processes, each having seen its own batches; integer counters come from rank 0."""
    world = dist_info().world_size
    with torch.no_grad():
        for module in trainable_modules(net):
            for b in module.buffers():
                if b.is_floating_point():
                    dist.all_reduce(b)
                    b.div_(world)
                else:
                    dist.broadcast(b, 0)


def state_digest(module: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A short hash of a module's weights (or of a state dict): cached features belong to
    exactly these weights; processes that trained together hold the same ones."""
    h = hashlib.sha256()
    state = module.state_dict() if isinstance(module, nn.Module) else module
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
