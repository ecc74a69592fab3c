"""Compare representations of the same images: linear CKA and RSA between feature stores.

Command line::

    transferlab compare STORE_A STORE_B [STORE_C ...] [--batch-size 1024] [--biased]
        [--rsa-sample 1000] [--seed 0] [--min-keys 20] [--csv FILE] [--plot FILE]
        [--overwrite]

Each STORE is a feature store or a multi-cut extraction's ``output.dir`` (a directory of
per-cut stores). Several stores: the table of every pair. Two arguments of which one or
both hold several cuts: the layer x layer matrices (``--csv``, and ``--plot`` a heatmap).
"""
from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence

from ..analysis.similarity import (
    DEFAULT_CKA_BATCH,
    DEFAULT_RSA_SAMPLE,
    MIN_SHARED_KEYS,
    SimilarityResult,
    compare_stores,
    open_representations,
)
from ..errors import ConfigError
from ..runtime.userfiles import check_output, write_output
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab compare",
                                description="Linear CKA and RSA between feature stores of the "
                                            "same images.")
    p.add_argument("stores", nargs="+", metavar="STORE",
                   help="feature stores, or multi-cut output directories (per-cut stores)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=DEFAULT_CKA_BATCH,
                   help="rows per CKA minibatch (memory is bounded by it)")
    p.add_argument("--biased", action="store_true",
                   help="the plain (biased) HSIC instead of the unbiased estimator")
    p.add_argument("--rsa-sample", dest="rsa_sample_size", type=int, default=DEFAULT_RSA_SAMPLE,
                   help="images in the RSA sample (0: skip RSA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and the RSA sample")
    p.add_argument("--min-keys", type=int, default=MIN_SHARED_KEYS,
                   help="refuse stores sharing fewer keys")
    p.add_argument("--csv", metavar="FILE", help="write the CKA (and RSA) matrix as CSV")
    p.add_argument("--plot", metavar="FILE", help="write the CKA heatmap as PNG")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing --csv/--plot files (default: refuse them)")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, compare, print; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    if len(args.stores) < 2:
        reps = open_representations(args.stores[0])
        if len(reps) < 2:
            raise ConfigError("compare needs two stores (or a multi-cut directory): "
                              "transferlab compare STORE_A STORE_B")
    if args.rsa_sample_size < 0 or 0 < args.rsa_sample_size < 3:
        raise ConfigError("--rsa-sample must be 0 (skip) or at least 3, got "
                          f"{args.rsa_sample_size}")
    if args.min_keys < 4:
        raise ConfigError(f"--min-keys must be at least 4, got {args.min_keys}")
    if args.csv:
        check_output(args.csv, args.overwrite, "--csv")
    if args.plot:
        from ..analysis.plots import png_path

        check_output(png_path(args.plot), args.overwrite, "--plot")
    opened = named(args.stores, [open_representations(s) for s in args.stores])
    if len(opened) == 1:  # one multi-cut directory: its layers against each other
        a = b = opened[0]
    elif len(opened) == 2:
        a, b = opened
    else:  # several: every store against every store
        a = b = {k: v for o in opened for k, v in o.items()}
    result = compare_stores(a, b, batch_size=args.batch_size, unbiased=not args.biased,
                            rsa_sample_size=args.rsa_sample_size, seed=args.seed,
                            minimum=args.min_keys)
    print(similarity_table(result))
    if args.csv:
        write_output(args.csv, lambda f: f.write(similarity_csv(result)),
                     overwrite=args.overwrite, what="--csv")
        print(f"wrote {args.csv}")
    if args.plot:
        from ..analysis.plots import plot_similarity

        png = plot_similarity(result.cka, result.names_a, result.names_b, args.plot,
                              title=cka_title(result))
        print(f"wrote {png}")


def named(args: Sequence[str], opened: list[dict]) -> list[dict]:
    """Each argument's stores under names unique across the arguments: the cut names (a
    single store's directory name), or, when two arguments share one, the argument as typed
    (plus '/cut' for a multi-cut directory)."""
    plain = [k for o in opened for k in o]
    if len(set(plain)) == len(plain):
        return opened
    out = [{(f"{s}/{k}" if len(o) > 1 else s): v for k, v in o.items()}
           for s, o in zip(args, opened)]
    full = [k for o in out for k in o]
    if len(set(full)) != len(full):
        raise ConfigError("a store is named twice; name each store once")
    return out


def cka_title(result: SimilarityResult) -> str:
    return (f"linear CKA ({'unbiased' if result.unbiased else 'biased'} HSIC, "
            f"{result.n_keys} images)")


def similarity_table(result: SimilarityResult) -> str:
    """One line per (a, b) pair (each unordered pair once when both sides are the same)."""
    same = result.symmetric
    wa = max(len(n) for n in result.names_a + ["A"])
    wb = max(len(n) for n in result.names_b + ["B"])
    rsa_note = f", RSA on {result.rsa_n} of them" if result.rsa is not None else ""
    lines = [f"{cka_title(result)}{rsa_note}",
             f"{'A':<{wa}}  {'B':<{wb}}  {'CKA':>7}" + ("  {:>7}".format("RSA")
                                                      if result.rsa is not None else "")]
    for i, na in enumerate(result.names_a):
        for j, nb in enumerate(result.names_b):
            if same and j <= i:
                continue
            line = f"{na:<{wa}}  {nb:<{wb}}  {result.cka[i, j]:>7.4f}"
            if result.rsa is not None:
                line += f"  {result.rsa[i, j]:>7.4f}"
            lines.append(line)
    return "\n".join(lines)


def similarity_csv(result: SimilarityResult) -> str:
    """Long format: a, b, cka[, rsa], n_keys: every cell of the matrix."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["a", "b", "cka", *(["rsa"] if result.rsa is not None else []), "n_keys"])
    for i, na in enumerate(result.names_a):
        for j, nb in enumerate(result.names_b):
            w.writerow([na, nb, f"{result.cka[i, j]:.6f}",
                        *([f"{result.rsa[i, j]:.6f}"] if result.rsa is not None else []),
                        result.n_keys])
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())
