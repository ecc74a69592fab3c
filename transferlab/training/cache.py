"""The feature cache: the frozen base run once, in memory or on disk."""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from ..models.classifier import Classifier
from ..models.engine import FeatureComputer
from ..runtime.device import Runtime
from ..runtime.record import compute_record, rows_fingerprint
from ..store.writer import StoreWriter
from .feeds import ArraySource, LoaderSource, Source, TensorSource

# ---------------------------------------------------------------------------------------
# Feature cache
# ---------------------------------------------------------------------------------------


def available_ram() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def plan_cache(mode: str | bool, nbytes: int, rt: Runtime, max_gb: float | None,
               processes: int = 1) -> str:
    """Where cached features live: 'device' (GPU memory), 'cpu', 'disk' or 'off'.

    ``mode`` is ``train.cache``; YAML turns a bare ``off`` into False (and ``on`` into True).
    ``nbytes`` is this process's share; ``processes`` caching alike on this machine share its
    RAM (each has its own GPU).
    """
    mode = {False: "off", True: "auto"}.get(mode, mode) if isinstance(mode, bool) else mode
    if mode in ("off", "disk"):
        return mode
    budget = max_gb * 1e9 if max_gb is not None else None
    if rt.is_cuda:
        free, _ = torch.cuda.mem_get_info(rt.device)
        if nbytes <= (budget if budget is not None else 0.5 * free):
            return "device"
    ram = 0.25 * available_ram() / max(1, processes)
    if mode == "memory" or nbytes <= (budget if budget is not None else ram):
        return "cpu"
    return "disk"


def frozen_features(engine: FeatureComputer, src: Source, positions: torch.Tensor,
                    batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features on the device, positions) batches of the frozen base ``engine`` runs
    (``Classifier.base_engine``) over the images of ``src``.

    Images are decoded as extraction decodes them: without loader workers, each batch by
    the runtime's threads (the caching pass has no random transform to reorder)."""
    if isinstance(src, LoaderSource):
        src = src.with_decode_threads(engine.rt.threads)
    for x, _, pos in src.batches(positions, batch_size):
        yield engine.forward(x)[0], pos


def cache_features(net: Classifier, src: Source, where: str, rt: Runtime, batch_size: int,
                   feature_shape: Sequence[int], keys: Sequence[str] | None = None,
                   cache_dir: Path | None = None, fingerprint: dict | None = None,
                   progress: bool = False, fold_bn: bool = False,
                   data: DataConfig | None = None) -> Source:
    """Run the frozen base once over ``src``; a source of its features (same targets).

    Items that fail to decode are left out (the returned source is shorter); ``where`` is
    a ``plan_cache`` answer. 'disk' needs ``keys``, ``cache_dir`` and ``fingerprint``: what
    the rows depend on besides ``data`` (the images the keys name) and the computation,
    completed by ``runtime.record.rows_fingerprint`` as extraction completes a store's.
    ``fold_bn`` runs a copy of the base with its BatchNorms folded, as extraction does (the
    same function, one pass over the activations less); the network keeps its own base, to
    unfreeze and to save.
    """
    net.eval()
    engine = net.base_engine(rt, fold_bn)
    if where == "disk":
        return _cache_on_disk(engine, src, batch_size, feature_shape, keys, cache_dir,
                              fingerprint or {}, progress, data)
    device = rt.device if where == "device" else torch.device("cpu")
    buf = torch.empty((len(src), *feature_shape), dtype=torch.float32, device=device)
    done = torch.zeros(len(src), dtype=torch.bool)
    batches = frozen_features(engine, src, torch.arange(len(src)), batch_size)
    for feats, pos in _progress(batches, progress, "caching features", len(src), batch_size):
        buf[pos.to(device)] = feats.to(device)
        done[pos] = True
    targets = torch.as_tensor(src.targets)
    if bool(done.all()):
        return TensorSource(buf, targets, "features", rt.device)
    good = torch.nonzero(done).squeeze(1)
    return TensorSource(buf[good.to(device)], targets[good], "features", rt.device)


def _cache_on_disk(engine: FeatureComputer, src: Source, batch_size: int,
                   feature_shape: Sequence[int], keys: Sequence[str] | None,
                   cache_dir: Path | None, fingerprint: dict, progress: bool,
                   data: DataConfig | None) -> Source:
    if keys is None or cache_dir is None:
        raise ValueError("the disk cache needs keys and cache_dir")
    # rows of another precision, layout, folding or device type must not mix: rebuilt
    rt = engine.rt
    fingerprint = rows_fingerprint(fingerprint, data, compute_record(rt, engine.folded,
                                                                      engine.backend))
    writer = StoreWriter(cache_dir, fingerprint, dtype="float32", overwrite=True, fsync=False)
    try:
        done = writer.done_keys
        todo = torch.tensor([i for i, k in enumerate(keys) if k not in done], dtype=torch.int64)
        for feats, pos in _progress(frozen_features(engine, src, todo, batch_size),
                                    progress, "caching features", len(todo), batch_size):
            p = pos.numpy()
            writer.add([keys[i] for i in p], src.targets[p], feats.flatten(1))
        if isinstance(src, LoaderSource):
            writer.add_failures(list(src.failures.items()))
        store = writer.close({"purpose": "transferlab.finetune feature cache"})
    except BaseException:
        writer.abort()
        raise
    row_of = {k: i for i, k in enumerate(store.keys)}
    pos = np.array([i for i, k in enumerate(keys) if k in row_of and
                    k not in dict(store.failures)], np.int64)
    rows = np.array([row_of[keys[i]] for i in pos], np.int64)
    return ArraySource(store.features, rows, src.targets[pos], feature_shape, rt.device)


def _progress(it: Any, progress: bool, desc: str, items: int, batch_size: int) -> Any:
    if not progress:
        return it
    from ..runtime.progress import tqdm_bar

    return tqdm_bar(it, desc=desc, unit="batch", leave=False,
                    total=math.ceil(items / batch_size))



