"""The compute settings stored rows depend on beyond their dtype's rounding."""
from __future__ import annotations

from .device import Runtime


def compute_record(rt: Runtime, fold_bn: bool = False) -> dict:
    """Resolved values (precision 'auto' is recorded as what it chose), the device's type
    only: cuda:0 and cuda:1 compute alike, a CPU and a GPU do not."""
    return {"precision": rt.precision, "fold_bn": bool(fold_bn),
            "channels_last": bool(rt.channels_last), "device": rt.device.type}
