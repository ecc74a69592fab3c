"""Find the stored images closest to query images.

Query images are embedded through the store's own backbone, cut and preprocessing (read
from its metadata); a query may also be a key of the store, whose stored vector is used.

Command line::

    python -m transferlab.search STORE QUERY_IMAGE... [-k 5] [--metric cosine] [--plot out.png]
        [--exact]

With a FAISS index built for the metric (``python -m transferlab.index STORE``) the search
goes through it while the store is unchanged; ``--exact`` scans every row instead.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cli import run_cli
from .models.recorded import escapes
from .neighbors import METRICS, check_k, query_vectors, store_search
from .store.reader import FeatureStore


def data_root(meta: dict) -> Path | None:
    """The data root that a store's keys are relative to, if its metadata records one."""
    root = meta.get("data_root") or (meta.get("config") or {}).get("data", {}).get("root")
    return Path(root) if root else None


def format_hits(store: Any, query: str, hits: list[tuple[int, float]]) -> str:
    """One query's table: rank, distance, key (and class when known)."""
    labels = np.asarray(store.labels)
    names = getattr(store, "class_names", None)
    lines = [f"query: {query}", f"{'rank':>6}  {'distance':>10}  key"]
    for rank, (row, dist) in enumerate(hits, 1):
        label = int(labels[row])
        cls = "" if label < 0 else f"  [{names[label] if names and label < len(names) else label}]"
        lines.append(f"{rank:>6}  {dist:>10.5f}  {store.keys[row]}{cls}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab search",
                                description="Nearest stored images of query images (exact scan, "
                                "or the store's FAISS index when built).")
    p.add_argument("store", help="feature store directory")
    p.add_argument("queries", nargs="+", metavar="QUERY_IMAGE",
                   help="image files (or keys of the store)")
    p.add_argument("-k", type=int, default=5, help="neighbours per query")
    p.add_argument("--metric", choices=METRICS, default="cosine")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--plot", metavar="PNG", help="write a grid of queries and neighbours")
    p.add_argument("--exact", action="store_true",
                   help="scan every row even when the store has a FAISS index")
    p.add_argument("--trust-code", action="store_true",
                   help="let a trusted store's metadata name a module:callable to run")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, run, print; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    check_k(args.k)
    store = FeatureStore.open(args.store)
    vectors = query_vectors(store, args.queries, args.trust_code)
    hits = store_search(store, vectors, args.k, args.metric, device=args.device,
                        exact=args.exact)
    print("\n\n".join(format_hits(store, q, h) for q, h in zip(args.queries, hits)))
    if args.plot:
        print(f"wrote {plot_search(store, args.queries, hits, args.plot)}")


def plot_search(store: Any, queries: Sequence[str], hits: list[list[tuple[int, float]]],
                out: str | Path) -> Path:
    """Grid of each query and its neighbours; keys are resolved inside the data root."""
    from .plots import plot_neighbors

    root = data_root(store.meta)
    keys = store.keys
    query_paths = [Path(q) if Path(q).is_file() else key_path(root, q) for q in queries]
    return plot_neighbors(query_paths, [[key_path(root, keys[r]) for r, _ in h] for h in hits],
                          [[d for _, d in h] for h in hits], out,
                          names=[[keys[r] for r, _ in h] for h in hits])


def key_path(root: Path | None, key: str) -> Path | None:
    """The file of a store key, or None when the key (read from the store, so written by
    anyone) would leave the data root: absolute, a drive, '..', or a link out of it."""
    base = (root if root is not None else Path.cwd()).resolve()
    if escapes(key):
        return None
    path = base / key
    return path if path.resolve().is_relative_to(base) else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
