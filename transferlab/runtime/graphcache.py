"""Exported graphs (ONNX files for ONNX Runtime and OpenVINO, issue #30) kept between runs in
this user's cache folder, and used only when this user's transferlab wrote them.

Layout: ``$XDG_CACHE_HOME/transferlab/graphs`` (else ``~/.cache/transferlab/graphs``;
``$TRANSFERLAB_GRAPH_CACHE`` names another folder), never inside a store, so a graph never
travels with one. Each entry is ``<key>.onnx`` and ``<key>.json``; the key is the SHA-256 of
everything the graph depends on (architecture and cut, input size, batch dimension, weights
digest, library versions), so other weights or versions look up another entry and the graph
is exported again. ``<key>.json`` records the key's fields, the graph's size and SHA-256,
the export's seconds, and an HMAC-SHA256 of all of it under this user's local key
(``runtime.localkey``, the key that marks FAISS indexes as ours). A graph is handed to a
runtime only as bytes that match a record with a valid tag: a file someone put there, a
truncated or altered one, a link, is never parsed; it is exported again and replaced.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import TransferlabError
from .atomicfile import atomic_write
from .localkey import local_key, tag, tagged
from .untrusted import read_bounded

_log = logging.getLogger(__name__)
CACHE_ENV = "TRANSFERLAB_GRAPH_CACHE"
_TAG_DOMAIN = b"transferlab-graph-cache-v1\n"
_RECORD_LIMIT = 1 << 16
_GRAPH_LIMIT = 1 << 33  # 8 GiB: larger than any model transferlab exports


class GraphCacheError(TransferlabError):
    """A cache file cannot be read (never raised to the caller: the graph is rebuilt)."""


@dataclass(frozen=True)
class CachedGraph:
    """A graph's bytes and how they were obtained."""

    data: bytes
    key: str
    seconds: float  # the export's time (of the run that exported it)
    cached: bool  # read from the cache (False: exported by this call)


def graph_cache_dir() -> Path:
    named = os.environ.get(CACHE_ENV)
    if named:
        return Path(named).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transferlab" / "graphs"


def cache_key(fields: dict) -> str:
    """The entry's name: SHA-256 of the fields' canonical JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _payload(record: dict) -> bytes:
    body = {k: v for k, v in record.items() if k != "tag"}
    return _TAG_DOMAIN + json.dumps(body, sort_keys=True).encode()


def load_graph(fields: dict, folder: Path | None = None) -> CachedGraph | None:
    """The cached graph for ``fields``, or None when there is none we wrote (missing,
    untagged, altered, a link or special file: logged once, then rebuilt by the caller)."""
    folder = folder or graph_cache_dir()
    key = cache_key(fields)
    meta, graph = folder / f"{key}.json", folder / f"{key}.onnx"
    if not os.path.lexists(meta):
        return None
    try:
        secret = local_key(create=False)
        record = json.loads(read_bounded(meta, _RECORD_LIMIT, "the graph record",
                                         GraphCacheError))
        if not (secret and isinstance(record, dict)
                and tagged(secret, _payload(record), record.get("tag"))):
            raise GraphCacheError(f"the graph record {meta} was not written by this user's "
                                  "transferlab")
        if record.get("fields") != json.loads(json.dumps(fields, default=str)):
            raise GraphCacheError(f"the graph record {meta} is for another graph")
        size = int(record["size"])
        data = read_bounded(graph, min(size, _GRAPH_LIMIT), "the cached graph", GraphCacheError)
        if len(data) != size or hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise GraphCacheError(f"the cached graph {graph} was altered or truncated")
    except (TransferlabError, ValueError, KeyError, TypeError) as exc:
        _log.warning("%s; exporting the graph again", exc)
        return None
    return CachedGraph(data, key, float(record.get("seconds", 0.0)), True)


def store_graph(fields: dict, data: bytes, seconds: float,
                folder: Path | None = None) -> CachedGraph:
    """Write ``data`` as the entry for ``fields`` (graph first, then its tagged record: a
    crash between the two leaves a graph no record vouches for, which is never read).
    A folder that cannot be written is logged and skipped: the run goes on uncached."""
    folder = folder or graph_cache_dir()
    key = cache_key(fields)
    record = {"format": "transferlab-graph", "fields": json.loads(json.dumps(fields, default=str)),
              "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "seconds": round(seconds, 3)}
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret = local_key(create=True)
        assert secret is not None
        record["tag"] = tag(secret, _payload(record))
        atomic_write(folder / f"{key}.onnx", lambda f: f.write(data), mode="wb", fsync=False,
                     error=GraphCacheError)
        atomic_write(folder / f"{key}.json", lambda f: f.write(json.dumps(record, indent=1)),
                     fsync=False, error=GraphCacheError)
    except (OSError, TransferlabError) as exc:
        _log.warning("the graph cache %s cannot be written (%s); the graph is not kept",
                     folder, exc)
    return CachedGraph(data, key, seconds, False)
