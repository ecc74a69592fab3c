"""Linear and k-nearest-neighbour probes: how much of a task do frozen features solve?

``fit_logistic`` trains one multinomial logistic regression per L2 strength, all together in
one batched pass (one weight tensor of shape (n_l2, D, C)) with full-batch L-BFGS; each
strength keeps its own line search and curvature history, so the sweep gives what fitting
each strength alone gives. Features are standardised with the training mean and std.
The objective per strength is ``mean cross-entropy + l2 / 2 * ||W||^2`` (bias not penalised).

Command line::

    python -m transferlab.probe STORE [--test STORE2] [--val-fraction 0.2]
        [--l2 1e-4 1e-3 ...] [--knn 5] [--plot DIR]
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import run_cli
from .errors import ConfigError, DataError, StoreError
from .neighbors import nearest
from .runtime.device import exact_fp32, resolve_device
from .store.reader import FeatureStore
from .store.rows import load_features, views_of

log = logging.getLogger(__name__)

DEFAULT_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_HISTORY = 10  # L-BFGS curvature pairs kept per strength
_MAX_LINE_SEARCH = 25
_BLOCK_ELEMENTS = 1 << 24  # (strengths x rows x classes) logits computed at once


# ---------------------------------------------------------------------------------------
# Batched logistic regression
# ---------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """A fitted sweep: one linear classifier per L2 strength, on standardised features."""

    l2s: list[float]
    weight: torch.Tensor  # (n_l2, D, C), acting on standardised features
    bias: torch.Tensor  # (n_l2, C)
    mean: torch.Tensor  # (D,) training mean
    std: torch.Tensor  # (D,) training std (1 where a feature is constant)
    classes: torch.Tensor  # (C,) original label of each output column
    train_acc: list[float]
    val_acc: list[float] | None
    best: int  # index of the best strength (validation accuracy when given, else train)
    n_iter: int
    converged: list[bool]

    @property
    def best_l2(self) -> float:
        return self.l2s[self.best]

    def logits(self, features: Any, index: int | None = None) -> torch.Tensor:
        """(N, C) logits of strength ``index`` (default: the best)."""
        i = self.best if index is None else index
        x = self._standardise(features)
        return x @ self.weight[i] + self.bias[i]

    def predict(self, features: Any, index: int | None = None) -> torch.Tensor:
        """Predicted original labels of strength ``index`` (default: the best)."""
        return self.classes[self.logits(features, index).argmax(1)].cpu()

    def accuracy(self, features: Any, labels: Any) -> list[float]:
        """Accuracy of every strength on (features, labels)."""
        x = self._standardise(features)
        y = _as_tensor(labels, torch.int64, x.device)
        correct = torch.zeros(len(self.l2s), dtype=torch.float64, device=x.device)
        rows = max(1, _BLOCK_ELEMENTS // (len(self.l2s) * len(self.classes)))
        for s in range(0, len(x), rows):
            logits = x[s:s + rows] @ self.weight + self.bias[:, None, :]
            correct += (self.classes[logits.argmax(2)] == y[s:s + rows]).sum(1)
        return (correct / max(1, len(x))).tolist()

    def _standardise(self, features: Any) -> torch.Tensor:
        x = _as_tensor(features, self.weight.dtype, self.weight.device)
        return (x - self.mean) / self.std


@exact_fp32()  # the solver's answer is the result: no TF32 on a GPU
def fit_logistic(features: Any, labels: Any, l2s: Sequence[float] = DEFAULT_L2, *,
                 val_features: Any = None, val_labels: Any = None, max_iter: int = 500,
                 tol: float = 1e-4, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> ProbeResult:
    """Fit multinomial logistic regression for every L2 strength at once.

    ``labels`` are any integers (e.g. digits 5-9); ``predict`` returns them. The best
    strength is the one with the highest validation accuracy (train accuracy without
    validation data); ties go to the first listed. A strength stops when its max |gradient|
    is below ``tol`` (as scikit-learn's lbfgs), its loss stops changing, or no step helps.
    """
    dev = resolve_device("auto" if device is None else str(device))
    x = _as_tensor(features, dtype, dev)
    y_raw = _as_tensor(labels, torch.int64, dev)
    l2 = _check_l2s(l2s, dtype, dev)
    _check_xy(x, y_raw)
    classes, y = torch.unique(y_raw, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"the probe needs at least two classes, found only {classes.tolist()}; "
                        "use a store with more classes")
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    xs = (x - mean) / std
    theta, n_iter, converged = _lbfgs(xs, y, len(classes), l2, max_iter, tol)
    d, c = x.shape[1], len(classes)
    result = ProbeResult([float(v) for v in l2s], theta[:, :d * c].reshape(-1, d, c),
                         theta[:, d * c:], mean, std, classes, [], None, 0, n_iter, converged)
    result.train_acc = result.accuracy(x, y_raw)
    if val_features is not None:
        result.val_acc = result.accuracy(val_features, val_labels)
    scores = result.val_acc if result.val_acc is not None else result.train_acc
    result.best = int(np.argmax(scores))
    return result


def _loss_grad(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n_classes: int,
               l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective and gradient of every strength; rows are processed in memory-sized blocks.

    All strengths share one GEMM per block: (rows, D) @ (D, n_l2 * C).
    """
    n, d = x.shape
    n_l2 = theta.shape[0]
    w = theta[:, :d * n_classes].reshape(n_l2, d, n_classes)
    b = theta[:, d * n_classes:]
    w_all = w.permute(1, 0, 2).reshape(d, n_l2 * n_classes)
    loss = theta.new_zeros(n_l2)
    grad_w, grad_b = theta.new_zeros(d, n_l2 * n_classes), torch.zeros_like(b)
    rows = max(1, _BLOCK_ELEMENTS // (n_l2 * n_classes))
    for s in range(0, n, rows):
        xb, yb = x[s:s + rows], y[s:s + rows]
        logits = (xb @ w_all).view(len(xb), n_l2, n_classes) + b  # (rows, n_l2, C)
        lse = logits.logsumexp(2)
        picked = logits.gather(2, yb.view(-1, 1, 1).expand(-1, n_l2, 1)).squeeze(2)
        loss += (lse - picked).sum(0)
        resid = (logits - lse[..., None]).exp()  # softmax minus one-hot
        resid[torch.arange(len(yb), device=x.device), :, yb] -= 1.0
        grad_w += xb.T @ resid.view(len(xb), -1)
        grad_b += resid.sum(0)
    loss = loss / n + 0.5 * l2 * (w * w).sum((1, 2))
    grad_w = grad_w.view(d, n_l2, n_classes).transpose(0, 1) / n + l2[:, None, None] * w
    return loss, torch.cat([grad_w.reshape(n_l2, -1), grad_b / n], 1)


def _lbfgs(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: torch.Tensor,
           max_iter: int, tol: float) -> tuple[torch.Tensor, int, list[bool]]:
    """Batched L-BFGS: every strength has its own history, step size and stopping test."""
    n_l2, p = len(l2), x.shape[1] * n_classes + n_classes
    theta = x.new_zeros(n_l2, p)
    loss, grad = _loss_grad(theta, x, y, n_classes, l2)
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    gamma = x.new_ones(n_l2)
    active = grad.abs().amax(1) > tol
    done_ok = ~active.clone()
    n_iter = 0
    while bool(active.any()) and n_iter < max_iter:
        n_iter += 1
        direction = -_two_loop(grad, hist, gamma)
        slope = (grad * direction).sum(1)
        uphill = slope >= 0
        direction[uphill] = -grad[uphill]
        direction[~active] = 0
        slope = (grad * direction).sum(1)
        step = torch.ones_like(loss)
        if n_iter == 1:
            step = (1.0 / grad.abs().sum(1).clamp_min(1e-30)).clamp(max=1.0)
        new_theta, new_loss, new_grad, moved = _backtrack(
            theta, loss, grad, direction, slope, step, active, (x, y, n_classes, l2))
        s, yv = new_theta - theta, new_grad - grad
        sy = (s * yv).sum(1)
        good = sy > 1e-10 * (yv * yv).sum(1).sqrt() * (s * s).sum(1).sqrt()
        rho = torch.where(good, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))
        gamma = torch.where(good, sy / (yv * yv).sum(1).clamp_min(1e-30), gamma)
        hist = (hist + [(s, yv, rho)])[-_HISTORY:]
        small_grad = new_grad.abs().amax(1) <= tol
        flat = (loss - new_loss).abs() <= 1e-12 * torch.maximum(loss.abs(), new_loss.abs())
        stop = small_grad | flat | ~moved  # ~moved: no decrease left at working precision
        done_ok |= active & stop
        active &= ~stop
        theta, loss, grad = new_theta, new_loss, new_grad
    if bool(active.any()):
        log.info("probe: %d of %d strengths hit max_iter=%d before converging",
                 int(active.sum()), n_l2, max_iter)
    return theta, n_iter, done_ok.tolist()


def _two_loop(grad: torch.Tensor, hist: list, gamma: torch.Tensor) -> torch.Tensor:
    """L-BFGS inverse-Hessian times gradient, per strength (rows are independent)."""
    q = grad.clone()
    alphas = []
    for s, yv, rho in reversed(hist):
        a = rho * (s * q).sum(1)
        q -= a[:, None] * yv
        alphas.append(a)
    r = gamma[:, None] * q
    for (s, yv, rho), a in zip(hist, reversed(alphas)):
        beta = rho * (yv * r).sum(1)
        r += s * (a - beta)[:, None]
    return r


def _backtrack(theta, loss, grad, direction, slope, step, active, problem):
    """Armijo backtracking for each active strength; evaluates only those still searching."""
    x, y, n_classes, l2 = problem
    theta, loss, grad = theta.clone(), loss.clone(), grad.clone()
    searching = active.clone()
    moved = torch.zeros_like(active)
    base_theta, base_loss = theta.clone(), loss.clone()
    for _ in range(_MAX_LINE_SEARCH):
        idx = searching.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        trial = base_theta[idx] + step[idx, None] * direction[idx]
        t_loss, t_grad = _loss_grad(trial, x, y, n_classes, l2[idx])
        ok = t_loss <= base_loss[idx] + 1e-4 * step[idx] * slope[idx]
        acc = idx[ok]
        theta[acc], loss[acc], grad[acc] = trial[ok], t_loss[ok], t_grad[ok]
        moved[acc] = True
        searching[acc] = False
        step[idx[~ok]] *= 0.5
    return theta, loss, grad, moved


# ---------------------------------------------------------------------------------------
# kNN probe, splits
# ---------------------------------------------------------------------------------------


@exact_fp32()
def knn_predict(train_features: Any, train_labels: Any, query_features: Any, k: int = 5,
                device: str | torch.device | None = None) -> np.ndarray:
    """Cosine k-nearest-neighbour majority vote.

    A tied vote goes to the tied class whose closest member ranks first (neighbours are
    ordered by distance, then by training row).
    """
    _, idx = nearest(train_features, query_features, k, "cosine", device=device)
    votes = _numpy(train_labels)[idx]  # (Q, k) in rank order
    classes, inv = np.unique(votes, return_inverse=True)
    inv = inv.reshape(votes.shape)
    q, kk = inv.shape
    rows = np.repeat(np.arange(q), kk)
    counts = np.zeros((q, len(classes)), dtype=np.int64)
    np.add.at(counts, (rows, inv.ravel()), 1)
    first = np.full((q, len(classes)), kk, dtype=np.int64)
    np.minimum.at(first, (rows, inv.ravel()), np.tile(np.arange(kk), q))
    return classes[(counts * (kk + 1) - first).argmax(1)]


def knn_accuracy(train_features: Any, train_labels: Any, query_features: Any,
                 query_labels: Any, k: int = 5, device: str | torch.device | None = None) -> float:
    """Accuracy of ``knn_predict`` on labelled queries."""
    pred = knn_predict(train_features, train_labels, query_features, k, device)
    return float((pred == _numpy(query_labels)).mean())


def stratified_split(labels: Any, val_fraction: float = 0.2, seed: int = 0, *,
                     setting: str = "val_fraction") -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into (train rows, validation rows), both sorted.

    Each class with at least two items puts ``round(n * val_fraction)`` of them (at least
    one, never all) into validation; single-item classes stay in training. ``setting``
    names the fraction in the error message (the caller's option or config key).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"{setting} must be between 0 and 1 (exclusive), got "
                          f"{val_fraction}; try 0.2")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        n_val = min(max(int(round(len(rows) * val_fraction)), 1), len(rows) - 1)  # noqa: RUF046
        val.append(rng.permutation(rows)[:n_val])
    val_rows = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), val_rows)
    return train_rows, val_rows


# ---------------------------------------------------------------------------------------
# Store level
# ---------------------------------------------------------------------------------------


@dataclass
class ProbeReport:
    """Outcome of ``run_probe``: linear sweep plus kNN, on a validation split or test store."""

    l2s: list[float]
    train_acc: list[float]
    test_acc: list[float]
    best: int
    knn_k: int
    knn_acc: float | None
    n_train: int
    n_test: int
    n_classes: int
    test_source: str  # "validation split" or the test store's directory
    result: ProbeResult


def load_labelled(store: Any, plain_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Labelled rows of a store as (float32 features, int64 labels).

    ``plain_only`` keeps only view 0 (the un-augmented image) of each key.
    """
    x, y, _, _ = _labelled(store, plain_only)
    return x, y


def _labelled(store: Any, plain_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                     np.ndarray]:
    labels = np.asarray(store.labels, dtype=np.int64)
    keep = labels >= 0
    if not keep.any():
        raise DataError(f"store {_store_name(store)} has no labels (every label is -1); the "
                        "probe needs labelled features: extract from class sub-folders "
                        "(data.source=folder), a list file with data.label_column, or a "
                        "labelled torchvision/mnist-5k dataset")
    if not keep.all():
        log.info("probe: ignoring %d unlabelled rows of %d", int((~keep).sum()), len(labels))
    views = views_of(store)
    if plain_only:
        keep &= views == 0
    rows = np.flatnonzero(keep)
    keys = np.asarray(store.keys, dtype=object)[rows]
    return load_features(store, rows), labels[rows], keys, views[rows]


def split_by_key(labels: np.ndarray, keys: np.ndarray, views: np.ndarray,
                 val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split over keys: training gets every view of its keys, validation only
    the plain view, so augmented copies of a validation image never leak into training."""
    plain = np.flatnonzero(views == 0)
    _, val = stratified_split(labels[plain], val_fraction, seed)
    val_keys = set(keys[plain[val]].tolist())
    in_val = np.fromiter((k in val_keys for k in keys), dtype=bool, count=len(keys))
    return np.flatnonzero(~in_val), plain[val]


def run_probe(store: Any, test_store: Any = None, *, val_fraction: float = 0.2,
              l2s: Sequence[float] = DEFAULT_L2, knn: int = 5, seed: int = 0,
              device: str | torch.device | None = None, max_iter: int = 500) -> ProbeReport:
    """Linear-probe sweep and kNN accuracy of a store (``knn=0`` skips kNN).

    Without ``test_store`` a seeded stratified validation split is held out. Training uses
    every view of its images; testing uses plain views only.
    """
    x, y, keys, views = _labelled(store, plain_only=False)
    if test_store is not None:
        tx, ty = load_labelled(test_store, plain_only=True)
        if tx.shape[1] != x.shape[1]:
            raise StoreError(f"test store {_store_name(test_store)} has {tx.shape[1]}-d features "
                             f"but {_store_name(store)} has {x.shape[1]}; use stores extracted "
                             "with the same backbone and cut")
        source = _store_name(test_store)
    else:
        tr, va = split_by_key(y, keys, views, val_fraction, seed)
        if len(va) == 0:
            raise DataError("too few labelled rows for a validation split (every class has one "
                            "item); pass --test STORE2 or extract more images")
        x, tx, y, ty = x[tr], x[va], y[tr], y[va]
        source = "validation split"
    res = fit_logistic(x, y, l2s, val_features=tx, val_labels=ty, device=device,
                       max_iter=max_iter)
    knn_acc = knn_accuracy(x, y, tx, ty, knn, device) if knn > 0 else None
    return ProbeReport(res.l2s, res.train_acc, res.val_acc or [], res.best, knn, knn_acc,
                       len(y), len(ty), len(res.classes), source, res)


def probe_report(report: ProbeReport) -> str:
    """The CLI's table: one line per strength, best marked, kNN line last."""
    lines = [(f"train {report.n_train} rows, test {report.n_test} rows "
              f"({report.test_source}), {report.n_classes} classes"),
             f"{'l2':>10}  {'train acc':>9}  {'test acc':>8}"]
    for i, l2 in enumerate(report.l2s):
        mark = "  <- best" if i == report.best else ""
        lines.append(f"{l2:>10.3g}  {report.train_acc[i]:>9.4f}  {report.test_acc[i]:>8.4f}{mark}")
    if report.knn_acc is not None:
        lines.append(f"kNN (k={report.knn_k}, cosine) test acc {report.knn_acc:.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab probe",
                                description="Linear (L2 sweep) and kNN probes on a feature store.")
    p.add_argument("store", help="feature store directory")
    p.add_argument("--test", metavar="STORE2", help="test store (default: a validation split)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share per class")
    p.add_argument("--l2", type=float, nargs="+", default=list(DEFAULT_L2),
                   help="L2 strengths, all trained together")
    p.add_argument("--knn", type=int, default=5, help="k of the kNN probe (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations at most")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--plot", metavar="DIR", help="write a map, class-column and sweep plots here")
    p.add_argument("--plot-method", choices=("pca", "tsne", "umap"), default="pca",
                   help="the 2-D map of --plot")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, run, print; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    if args.knn < 0:
        raise ConfigError(f"--knn must be 0 (skip) or more, got {args.knn}")
    if args.test is None:  # the split's rule, named as this command spells it
        stratified_split(np.zeros(0), args.val_fraction, setting="--val-fraction")
    store = FeatureStore.open(args.store)
    test = FeatureStore.open(args.test) if args.test else None
    report = run_probe(store, test, val_fraction=args.val_fraction, l2s=args.l2, knn=args.knn,
                       seed=args.seed, device=args.device, max_iter=args.max_iter)
    print(probe_report(report))
    if args.plot:
        for path in plot_probe(store, report, Path(args.plot), args.plot_method):
            print(f"wrote {path}")


def plot_probe(store: Any, report: ProbeReport, out_dir: Path, method: str = "pca") -> list[Path]:
    """A 2-D map (pca, tsne, umap), class columns and the accuracy-vs-L2 sweep of a store."""
    from . import plots

    x, y = load_labelled(store, plain_only=True)
    names = getattr(store, "class_names", None)
    sweep = [{"l2": l2, "train_acc": a, "test_acc": b}
             for l2, a, b in zip(report.l2s, report.train_acc, report.test_acc)]
    return [plots.plot_map(x, y, out_dir / f"{method}.png", method, class_names=names),
            plots.plot_class_columns(x, y, out_dir / "class_columns.png", class_names=names),
            plots.plot_training_curves(sweep, out_dir / "l2_sweep.png", x="l2", logx=True)]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv)


def _as_tensor(x: Any, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(dev, dtype)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_l2s(l2s: Sequence[float], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    if len(l2s) == 0 or any(not np.isfinite(v) or v < 0 for v in l2s):
        raise ConfigError(f"L2 strengths must be a non-empty list of values >= 0, got "
                          f"{list(l2s)}; e.g. --l2 1e-4 1e-3 1e-2")
    return torch.tensor([float(v) for v in l2s], dtype=dtype, device=dev)


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise DataError(f"features must be (N, D) and labels (N,), got {tuple(x.shape)} and "
                        f"{tuple(y.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise DataError("features contain NaN or infinity; re-extract them (check fp16 overflow)")


def _store_name(store: Any) -> str:
    return str(getattr(store, "dir", None) or getattr(store, "path", None) or "<store>")


if __name__ == "__main__":
    raise SystemExit(main())
