"""Merging the stores of several processes (torchrun) into one."""
from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..runtime.atomicfile import atomic_write
from .format import FAILURES, FINGERPRINT, INDEX, META, RESERVED_META, _write_json
from .reader import FeatureStore


def merge_stores(target: str | os.PathLike, parts: Sequence[str | os.PathLike],
                 meta: dict | None = None) -> FeatureStore:
    """One store at ``target`` whose rows are the rows of ``parts`` in order.

    Shards are not copied: the merged ``meta.json`` lists the parts' shard files (relative
    to ``target``, so parts must lie below it), and ``index.csv``/``failures.csv`` are
    concatenated. The result reads exactly like a store written by a single process.
    """
    target = Path(target)
    stores = [FeatureStore.open(p) for p in parts]
    if not stores:
        raise StoreError("merge_stores needs at least one part")
    first = stores[0].meta
    for store in stores[1:]:
        if store.meta["fingerprint"] != first["fingerprint"] or store.dtype != stores[0].dtype:
            raise StoreError(f"cannot merge {store.dir}: written with another configuration "
                             f"than {stores[0].dir}")
    dims = {s.meta["dim"] for s in stores if s.meta.get("dim")}
    shards = [{"file": (s.dir / sh["file"]).relative_to(target).as_posix(), "rows": sh["rows"]}
              for s in stores for sh in s.meta["shards"]]
    keys = [k for s in stores for k in s.keys]
    atomic_write(target / INDEX, lambda f: _write_merged_index(f, stores))
    failures = [item for s in stores for item in s.failures]
    atomic_write(target / FAILURES, lambda f: csv.writer(f, lineterminator="\n").writerows(
        [["key", "reason"], *failures]))
    _write_json(target / FINGERPRINT, {"fingerprint": first["fingerprint"],
                                       "dtype": first["dtype"]})
    own = {**{k: first[k] for k in RESERVED_META if k in first},
           "dim": dims.pop() if dims else None, "rows": len(keys), "num_keys": len(set(keys)),
           "num_failures": len(failures), "shards": shards,
           "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(target / META, {**{k: v for k, v in (meta or {}).items()
                                   if k not in RESERVED_META}, **own})
    return FeatureStore.open(target)


def _write_merged_index(f: Any, stores: Sequence[FeatureStore]) -> None:
    out = csv.writer(f, lineterminator="\n")
    out.writerow(["key", "label", "row", "view"])
    row = 0
    for store in stores:
        for key, label, view in zip(store.keys, store.labels.tolist(), store.views.tolist()):
            out.writerow([key, label, row, view])
            row += 1

