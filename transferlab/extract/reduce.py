"""``output.reduce``: bounded row size for huge layers (``srp:D`` or ``pca:D``).

- ``srp:D``: a very sparse random projection (Li, Hastie & Church 2006: density 1/sqrt(d_in),
  entries +-sqrt(s/D)), drawn from (seed, d_in, D) alone, so a resume, a query embedding or
  another machine rebuilds the same matrix; its SHA-256 in the fingerprint proves it.
  Never dense: a 802,816-d layer to 1024 dims holds ~0.9M nonzeros, not 822M floats.
- ``pca:D``: mean and D principal axes fitted once on the first rows of the run, saved in
  the store (``reduce-pca.npz``) and loaded, never refitted, on a resume.

Both run on the features' device in float32 (autocast off: the rows must not depend on
the AMP setting) after the model, before the rows go to the host.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ComputeError, ConfigError, DataError, StoreError
from ..runtime.atomicfile import atomic_write
from ..runtime.untrusted import claimed_size
from ..store.format import PCA_FILE, load_npz
from ..yamlsafe import shown

KINDS = ("srp", "pca")
PCA_FORMAT = "transferlab-pca-1"
PCA_MIN_SAMPLE = 1024  # rows fitted on at least (or every row, if fewer)
PCA_MAX_SAMPLE_BYTES = 4 << 30  # the float32 sample held in host memory
_RANK_TOL = 1e-10  # eigenvalues below this fraction of the largest are no direction
_CHUNK_FLOATS = 1 << 25  # float64 work arrays of at most 256 MiB while fitting
# srp: host bytes per nonzero while the matrix is drawn (int64 gaps, positions, flat
# indices, divmod and the stacked (2, nnz) indices, float64 coins, float32 values) and
# the most that drawing may take; what is kept is 20 bytes per nonzero
SRP_PEAK_BYTES_PER_NNZ = 64
SRP_MAX_BYTES = 8 << 30
MAX_REDUCE_WIDTH = 1 << 31  # d_in or D a store's record may claim at all


@dataclass(frozen=True)
class ReduceSpec:
    """A parsed ``output.reduce``: kind (srp or pca) and the output dims."""

    kind: str
    dim: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.dim}"


def parse_reduce(text: Any) -> ReduceSpec | None:
    """``"srp:D"`` / ``"pca:D"`` -> ReduceSpec; None (or ``"none"``) -> None."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "none", "null")):
        return None
    usage = "write output.reduce as srp:D or pca:D (D output dims, e.g. srp:1024) or null"
    if isinstance(text, ReduceSpec):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"output.reduce must be a string, got {text!r}; {usage}")
    kind, sep, dim = text.strip().partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS or not dim.strip().isdigit() or int(dim) < 1:
        raise ConfigError(f"output.reduce={text!r} is not understood; {usage}")
    return ReduceSpec(kind, int(dim))


def check_reduce_dims(spec: ReduceSpec, d_in: int) -> None:
    """ConfigError when D exceeds the layer's own width (the rows would grow, not shrink)."""
    if spec.dim > d_in:
        raise ConfigError(f"output.reduce={spec} asks for more dims than the cut gives "
                          f"({d_in}); choose {spec.kind}:{d_in} or fewer, or output.reduce=null")


def _no_autocast(x: torch.Tensor) -> Any:
    return torch.autocast(x.device.type, enabled=False)


def _check_width(x: torch.Tensor, d_in: int, what: str) -> torch.Tensor:
    x = x.flatten(1) if x.ndim > 2 else x
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ComputeError(f"{what} expects rows of {d_in} features, got shape "
                           f"{tuple(x.shape)}; the cut changed: set output.overwrite=true")
    return x.float()


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())  # little-endian marks in dtype.str
        h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Sparse random projection
# ---------------------------------------------------------------------------------------


def srp_entries(d_in: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Nonzeros of the (d_in, dim) projection: (2, nnz) int64 [row, col] in row-major order
    and their float32 values. Each entry is nonzero independently with probability 1/s,
    s = sqrt(d_in): the gaps between nonzeros of the flattened matrix are geometric, so
    only the nonzeros are ever drawn; signs are fair coins."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % (1 << 64), d_in, dim]))
    s = math.sqrt(d_in)
    p, total = min(1.0, 1.0 / s), d_in * dim
    want = total * p
    draws, end = [], 0
    while end < total:  # almost always one round: the first draw overshoots by 6 sigma
        gaps = rng.geometric(p, int(want + 6 * math.sqrt(want) + 16))
        positions = end + np.cumsum(gaps) - 1
        draws.append(positions[positions < total])
        end = int(positions[-1]) + 1
    flat = np.concatenate(draws)
    scale = np.float32(math.sqrt(s / dim))
    values = np.where(rng.random(flat.size) < 0.5, scale, -scale).astype(np.float32)
    return np.stack(np.divmod(flat, dim)), values


def srp_nnz(d_in: int, dim: int) -> float:
    """Expected nonzeros of the (d_in, dim) projection: d_in * dim / sqrt(d_in)."""
    return d_in * dim * min(1.0, 1.0 / math.sqrt(d_in))


def available_memory() -> int | None:
    """Bytes of memory this machine has available now (MemAvailable, else the free pages
    ``os.sysconf`` reports); None where neither can be read."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f.read(1 << 16).splitlines():
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_srp_memory(d_in: int, dim: int) -> None:
    """ConfigError, before anything is drawn, when srp:dim on a d_in-d cut would need more
    host memory than ``SRP_MAX_BYTES`` or than the machine has available: the nonzeros
    grow as dim * sqrt(d_in) (srp:1605632 on a 1,605,632-d cut: 2e9 nonzeros, ~120 GiB)."""
    need = srp_nnz(d_in, dim) * SRP_PEAK_BYTES_PER_NNZ
    free = available_memory()
    limit = min(SRP_MAX_BYTES, free) if free is not None else SRP_MAX_BYTES
    if need <= limit:
        return
    per_dim = srp_nnz(d_in, 1) * SRP_PEAK_BYTES_PER_NNZ
    most = max(1, int(limit // per_dim))
    where = (f"the {SRP_MAX_BYTES / (1 << 30):.0f} GiB limit" if limit == SRP_MAX_BYTES else
             f"the {limit / (1 << 30):.1f} GiB this machine has available")
    raise ConfigError(f"output.reduce=srp:{dim} on a {d_in:,}-d cut needs ~"
                      f"{need / (1 << 30):,.1f} GiB to draw its {srp_nnz(d_in, dim):,.0f} "
                      f"nonzeros, more than {where}; choose srp:D with D <= {most:,} (or "
                      "pca:D, or a narrower cut)")


class SparseProjection(nn.Module):
    """``x (B, d_in) -> x @ W (B, D)`` with W the seeded very sparse random matrix;
    squared distances are kept in expectation (JL), each within a few percent for D ~ 1000.
    The memory it needs is checked before it is drawn (``check_srp_memory``).
    """

    def __init__(self, d_in: int, dim: int, seed: int = 0):
        super().__init__()
        if d_in < 1 or dim < 1:
            raise ConfigError(f"srp:{dim} on {d_in} features: both must be >= 1; "
                              "set output.reduce=srp:D with D >= 1")
        check_srp_memory(int(d_in), int(dim))
        self.d_in, self.dim, self.seed = int(d_in), int(dim), int(seed)
        indices, values = srp_entries(self.d_in, self.dim, self.seed)
        self.sha256 = _digest(np.array([self.d_in, self.dim], np.int64), indices, values)
        self.register_buffer("indices", torch.from_numpy(indices), persistent=False)
        self.register_buffer("values", torch.from_numpy(values), persistent=False)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def matrix(self) -> torch.Tensor:
        """W as a sparse COO tensor on the buffers' device (no copy)."""
        return torch.sparse_coo_tensor(self.indices, self.values, (self.d_in, self.dim),
                                       is_coalesced=True, check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_width(x, self.d_in, "output.reduce=srp")
        with _no_autocast(x):  # (W^T x^T)^T: torch.sparse.mm takes the sparse side first
            return torch.sparse.mm(self.matrix().t(), x.t()).t()

    def record(self) -> dict:
        """What the fingerprint and meta record: enough to rebuild it, and its hash."""
        return {"kind": "srp", "dims": [self.d_in, self.dim], "seed": self.seed,
                "nnz": self.nnz, "density": "1/sqrt(d_in)", "sha256": self.sha256}


# ---------------------------------------------------------------------------------------
# PCA
# ---------------------------------------------------------------------------------------


class PCAProjection(nn.Module):
    """``x (B, d_in) -> (x - mean) @ components.T (B, D)``; fitted by ``fit_pca``."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, sample_rows: int,
                 explained: float):
        super().__init__()
        components = components.detach().to("cpu", torch.float32).contiguous()
        mean = mean.detach().to("cpu", torch.float32).contiguous()
        if components.ndim != 2 or mean.shape != (components.shape[1],):
            raise StoreError(f"PCA mean {tuple(mean.shape)} and components "
                             f"{tuple(components.shape)} do not fit; set output.overwrite=true")
        self.dim, self.d_in = components.shape
        self.sample_rows, self.explained = int(sample_rows), float(explained)
        self.sha256 = _digest(mean.numpy(), components.numpy())
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("components", components, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_width(x, self.d_in, "output.reduce=pca")
        with _no_autocast(x):
            return (x - self.mean) @ self.components.t()

    def record(self) -> dict:
        return {"kind": "pca", "dims": [self.d_in, self.dim], "sample_rows": self.sample_rows,
                "explained_variance": round(self.explained, 6), "file": PCA_FILE,
                "sha256": self.sha256}

    def save(self, path: str | Path) -> None:
        """An .npz (no pickles), written atomically: a kill leaves the old file or none."""
        arrays = {"format": np.array(PCA_FORMAT), "mean": self.mean.cpu().numpy(),
                  "components": self.components.cpu().numpy(),
                  "sample_rows": np.array(self.sample_rows, np.int64),
                  "explained": np.array(self.explained, np.float64),
                  "sha256": np.array(self.sha256)}
        atomic_write(path, lambda f: np.savez(f, **arrays), "wb", root=Path(path).parent,
                     error=StoreError)

    @classmethod
    def load(cls, path: str | Path, dims: tuple[int, int] | None = None,
             root: str | Path | None = None) -> PCAProjection:
        """The projection ``save`` wrote; StoreError naming the fix if missing or damaged.

        ``dims`` (d_in, D): what the store records; every member's declared shape is
        checked against it, and its size against the file's, before anything is read (a
        small file claiming billions of floats is refused, not decompressed). ``root``: the
        store, which the file (a regular one, never a FIFO or device) must lie in."""
        fix = "set output.overwrite=true to rebuild the store (the PCA is refitted)"
        path = Path(path)
        d_in, dim = dims if dims is not None else (None, None)

        def text(shape: tuple[int, ...], dtype: np.dtype) -> bool:
            return dtype.kind == "U" and shape == () and dtype.itemsize <= 4 * 64

        def scalar(kind: str) -> Any:
            return lambda shape, dtype: dtype == np.dtype(kind) and shape == ()

        want = {"format": text, "sha256": text, "sample_rows": scalar("int64"),
                "explained": scalar("float64"),
                "mean": lambda shape, dtype: dtype == np.float32 and len(shape) == 1
                and d_in in (None, shape[0]),
                "components": lambda shape, dtype: dtype == np.float32 and len(shape) == 2
                and (d_in, dim) in ((None, None), shape[::-1])}
        limit = (1 << 16) + 4 * d_in * (dim + 1) if dims is not None else 4 << 30
        if not path.exists() and not path.is_symlink():
            raise StoreError(f"the PCA file {path} is missing; {fix}")
        try:
            fields = load_npz(path, Path(root) if root is not None else path.parent, want,
                              "the PCA file", limit)
        except StoreError as exc:
            raise StoreError(f"{exc}; {fix}") from None
        if str(fields["format"]) != PCA_FORMAT:
            raise StoreError(f"{path} is not a transferlab PCA file; {fix}")
        pca = cls(torch.from_numpy(fields["mean"]), torch.from_numpy(fields["components"]),
                  int(fields["sample_rows"]), float(fields["explained"]))
        if pca.sha256 != str(fields["sha256"]):
            raise StoreError(f"the PCA file {path} is damaged (its checksum differs); {fix}")
        return pca


def pca_sample_rows(available: int, dim: int, d_in: int) -> int:
    """K = min(rows available, max(4 D, 1024)); ConfigError when the float32 sample would
    exceed 4 GiB or when D > min(K, d_in)."""
    k = min(int(available), max(4 * dim, PCA_MIN_SAMPLE))
    if k * d_in * 4 > PCA_MAX_SAMPLE_BYTES:
        raise ConfigError(f"output.reduce=pca:{dim} would fit on a {k} x {d_in} sample "
                          f"({k * d_in * 4 / (1 << 30):.1f} GiB > 4 GiB in memory); use "
                          f"output.reduce=srp:{dim} for a layer this wide")
    if dim > min(k, d_in):
        raise ConfigError(f"output.reduce=pca:{dim} needs D <= min(sample rows {k}, features "
                          f"{d_in}) = {min(k, d_in)}; choose pca:{min(k, d_in)} or fewer, or "
                          f"srp:{dim}")
    return k


def fit_pca(sample: torch.Tensor, dim: int) -> PCAProjection:
    """Mean and the top ``dim`` principal axes of ``sample`` (K, d_in), in float64 on the CPU
    (deterministic). The smaller Gram matrix is decomposed (K x K for wide layers), column
    chunks keep the float64 work memory bounded; each axis is signed so that its largest
    entry is positive, so a refit on the same rows gives the same axes."""
    if sample.ndim != 2 or sample.shape[0] < 1:
        raise DataError(f"pca needs a (rows, features) sample, got shape {tuple(sample.shape)}; "
                        "check that the first items of data can be read")
    k, d_in = sample.shape
    if dim < 1 or dim > min(k, d_in):
        raise ConfigError(f"output.reduce=pca:{dim} needs 1 <= D <= min(sample rows {k}, "
                          f"features {d_in}); choose pca:{min(k, d_in)} or fewer, or srp:{dim}")
    x = sample.detach().to("cpu", torch.float32)
    fit = _axes_from_covariance if d_in <= k else _axes_from_gram
    mean, axes, evals, total = fit(x, dim)
    return PCAProjection(mean, axes, k, float(evals.sum() / total) if total > 0 else 0.0)


def _column_slices(k: int, d_in: int) -> Iterable[slice]:
    step = max(1, _CHUNK_FLOATS // max(k, 1))
    return (slice(a, min(a + step, d_in)) for a in range(0, d_in, step))


def _row_slices(k: int, d_in: int) -> Iterable[slice]:
    step = max(1, _CHUNK_FLOATS // max(d_in, 1))
    return (slice(a, min(a + step, k)) for a in range(0, k, step))


def _top(evals: torch.Tensor, vectors: torch.Tensor, dim: int, k: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``dim`` largest eigenpairs (eigh gives them ascending); DataError when the sample
    spans fewer than ``dim`` directions (duplicate or constant rows)."""
    evals, vectors = evals.flip(0), vectors.flip(1)
    rank = int((evals > _RANK_TOL * max(float(evals[0]), 0.0)).sum()) if evals[0] > 0 else 0
    if rank < dim:
        raise DataError(f"the first {k} rows span only {rank} directions, fewer than "
                        f"output.reduce=pca:{dim} (duplicate or constant images?); choose "
                        f"pca:{rank} or fewer, or srp:{dim}")
    return evals[:dim], vectors[:, :dim]


def _axes_from_covariance(x: torch.Tensor, dim: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Axes of a narrow sample (d_in <= K) from its d_in x d_in scatter matrix."""
    k, d_in = x.shape
    mean = sum(x[rows].double().sum(0) for rows in _row_slices(k, d_in)) / k
    scatter = torch.zeros(d_in, d_in, dtype=torch.float64)
    for rows in _row_slices(k, d_in):
        part = x[rows].double() - mean
        scatter += part.t() @ part
    evals, vectors = torch.linalg.eigh(scatter)
    total = float(evals.clamp(min=0).sum())
    evals, vectors = _top(evals, vectors, dim, x.shape[0])
    axes = vectors.t().contiguous()
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return mean, (axes * signs).float(), evals, total


def _axes_from_gram(x: torch.Tensor, dim: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Axes of a wide sample from its K x K Gram matrix: v_i = X^T u_i / sqrt(lambda_i)."""
    k, d_in = x.shape
    mean = torch.cat([x[:, cols].double().mean(0) for cols in _column_slices(k, d_in)])
    gram = torch.zeros(k, k, dtype=torch.float64)
    for cols in _column_slices(k, d_in):
        part = x[:, cols].double() - mean[cols]
        gram += part @ part.t()
    evals, vectors = torch.linalg.eigh(gram)
    total = float(evals.clamp(min=0).sum())
    evals, u = _top(evals, vectors, dim, k)
    scaled = u / evals.sqrt()  # (K, D)
    axes = torch.empty(dim, d_in, dtype=torch.float32)
    peak = torch.zeros(dim, dtype=torch.float64)  # signed entry of largest |value| so far
    for cols in _column_slices(k, d_in):
        block = scaled.t() @ (x[:, cols].double() - mean[cols])  # (D, chunk) float64
        top = block.gather(1, block.abs().argmax(1, keepdim=True))[:, 0]
        peak = torch.where(top.abs() > peak.abs(), top, peak)  # first maximum wins ties
        axes[:, cols] = block.float()
    return mean, axes.mul_(torch.sign(peak).float()[:, None]), evals, total  # in place: big


# ---------------------------------------------------------------------------------------
# What the runner calls
# ---------------------------------------------------------------------------------------


def collect_rows(batches: Iterable[Any], limit: int) -> torch.Tensor:
    """The first ``limit`` rows of an iterable of (B, d) arrays or tensors, on the CPU."""
    rows, n = [], 0
    for batch in batches:
        part = torch.as_tensor(np.asarray(batch) if not torch.is_tensor(batch) else batch)
        rows.append(part[: limit - n].flatten(1).to("cpu", torch.float32))
        n += rows[-1].shape[0]
        if n >= limit:
            break
    if not rows:
        raise DataError("no readable rows to fit output.reduce=pca on; check data (or use "
                        "output.reduce=srp:D)")
    return torch.cat(rows)


def reduce_fingerprint(spec: ReduceSpec | None, d_in: int, seed: int,
                       available: int) -> dict | None:
    """``fingerprint["reduce"]``, known before the store opens: srp's full record (its hash
    included); for pca the rule it is fitted by (the fit itself is the store's file)."""
    if spec is None:
        return None
    check_reduce_dims(spec, d_in)
    if spec.kind == "srp":
        return SparseProjection(d_in, spec.dim, seed).record()
    return {"kind": "pca", "dims": [d_in, spec.dim],
            "sample_rows": pca_sample_rows(available, spec.dim, d_in), "sample": "first rows"}


def open_pca(path: str | Path, spec: ReduceSpec, d_in: int, available: int,
             sample: Callable[[int], torch.Tensor], resuming: bool) -> PCAProjection:
    """The store's PCA. ``resuming`` (the store holds rows): loaded from ``path``, never
    refitted. Otherwise fitted on ``sample(K)`` (the first K rows) and saved at ``path``
    before any row is written, replacing a file an earlier run (killed before its first
    shard, or wiped by output.overwrite) left there."""
    path = Path(path)
    if not resuming:
        k = pca_sample_rows(available, spec.dim, d_in)
        pca = fit_pca(sample(k), spec.dim)
        pca.save(path)
        return pca
    if not path.exists():
        raise StoreError(f"the store has rows but its PCA file {path} is missing; restore it "
                         "or set output.overwrite=true to rebuild the store")
    pca = PCAProjection.load(path, (d_in, spec.dim), path.parent)
    if (pca.d_in, pca.dim) != (d_in, spec.dim):
        raise StoreError(f"{path} projects {pca.d_in} -> {pca.dim} dims, not {d_in} -> "
                         f"{spec.dim}; set output.overwrite=true to rebuild the store")
    return pca


def reduction_from_record(record: dict | None, root: str | Path | None,
                          d_in: int | None = None, dim: int | None = None
                          ) -> nn.Module | None:
    """The projection a store's meta (or fingerprint) records, rebuilt and checked against
    its hash: srp from (seed, dims), pca from the file in the store directory ``root``.

    The recorded dims are sizes a file claims: checked before anything is built against
    ``d_in`` (the width of the rebuilt model's cut) and ``dim`` (the width of the store's
    rows) where given, and bounded in any case."""
    if record is None:
        return None
    fix = "the store was written by another transferlab/numpy or edited; re-extract it"
    if not isinstance(record, dict):
        raise StoreError(f"the store's reduce record {shown(record)} is not understood; {fix}")
    try:
        kind, (d_in_rec, dim_rec) = record["kind"], record["dims"]
        claimed_size(d_in_rec, MAX_REDUCE_WIDTH, "the store's reduce record: input dims",
                     StoreError, 1)
        claimed_size(dim_rec, d_in_rec, "the store's reduce record: output dims", StoreError, 1)
        for what, recorded, actual in (("features of the model's cut", d_in_rec, d_in),
                                       ("dims of the store's rows", dim_rec, dim)):
            if actual is not None and recorded != actual:
                raise StoreError(f"the store's reduce record projects {d_in_rec:,} -> "
                                 f"{dim_rec:,} dims, but the {what} are {actual:,}; {fix}")
        if kind == "srp":
            module: nn.Module = SparseProjection(d_in_rec, dim_rec, int(record["seed"]))
        elif kind == "pca" and root is not None:
            module = PCAProjection.load(Path(root) / PCA_FILE, (d_in_rec, dim_rec), root)
        else:
            raise ValueError(kind)
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"the store's reduce record {shown(record)} is not understood; "
                         f"{fix}") from None
    if (module.d_in, module.dim) != (d_in_rec, dim_rec):
        raise StoreError(f"the store's {kind} projection maps {module.d_in:,} -> "
                         f"{module.dim:,} dims, its record {d_in_rec:,} -> {dim_rec:,}; {fix}")
    if module.sha256 != record.get("sha256", module.sha256):
        raise StoreError(f"the rebuilt {kind} projection differs from the one the store "
                         f"recorded (sha256); {fix}")
    return module
