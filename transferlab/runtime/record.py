"""What stored feature rows depend on: one rule for extraction stores and the fine-tune
feature cache (a store or cache with another fingerprint is not reused)."""
from __future__ import annotations

from ..config import DataConfig
from ..data.fingerprint import data_fingerprint
from .device import Runtime


def compute_record(rt: Runtime, fold_bn: bool = False, backend: str = "eager",
                   calibration: dict | None = None) -> dict:
    """The compute settings rows depend on beyond their dtype's rounding: resolved values
    (precision 'auto' is recorded as what it chose, ``backend`` is the engine's resolved
    one), the device's type only: cuda:0 and cuda:1 compute alike, a CPU and a GPU do not.
    The backend is recorded only when it is not eager, so stores written before backends
    existed keep their fingerprint (and resume). ``calibration`` (precision int8: the
    calibration images' count and digest) likewise only when given."""
    return {"precision": rt.precision, "fold_bn": bool(fold_bn),
            "channels_last": bool(rt.channels_last), "device": rt.device.type,
            **({"backend": backend} if backend != "eager" else {}),
            **({"calibration": calibration} if calibration else {})}


def rows_fingerprint(model: dict, data: DataConfig | None, compute: dict) -> dict:
    """``model`` (what the caller computes the rows with: weights, cut, pooling,
    preprocessing ...), the images the keys name (``data_fingerprint``; None: rows not tied
    to a data source) and the computation (``compute_record``).

    Weights are named by content, never by how they were asked for: a store names them
    with ``models.provenance.weights_record`` (the digest of each file read, or the seed of
    random initial weights), the fine-tune feature cache with the digest of the base's
    tensors, so rows of other weights never join a store or a cache."""
    return {**model, **({"data": data_fingerprint(data)} if data is not None else {}),
            "compute": compute}
