"""Merging the stores of several processes (torchrun) into one."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import StoreError
from .files import finished_meta, write_failures, write_index
from .format import FAILURES, FINGERPRINT, INDEX, META, _write_json
from .owner import fingerprint_record
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
    write_index(target / INDEX, ((key, label, view) for s in stores
                                 for key, label, view in zip(s.keys, s.labels.tolist(),
                                                             s.views.tolist())))
    failures = [item for s in stores for item in s.failures]
    write_failures(target / FAILURES, failures)
    _write_json(target / FINGERPRINT, fingerprint_record(first["fingerprint"], first["dtype"]))
    own = {**{k: first[k] for k in ("fingerprint", "dtype", "shard_size") if k in first},
           "dim": dims.pop() if dims else None, "rows": len(keys), "num_keys": len(set(keys)),
           "num_failures": len(failures), "shards": shards}
    _write_json(target / META, finished_meta(meta or {}, own))
    return FeatureStore.open(target)
