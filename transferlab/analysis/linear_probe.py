"""The linear probe: how much of a task does a linear classifier on frozen features solve?

``fit_logistic`` trains one multinomial logistic regression per L2 strength, all together in
one batched pass (one weight tensor of shape (n_l2, D, C)) with full-batch L-BFGS; each
strength keeps its own line search and curvature history, so the sweep gives what fitting
each strength alone gives. Features are standardised with the training mean and std.
The objective per strength is ``mean cross-entropy + l2 / 2 * ||W||^2`` (bias not penalised).
The kNN probe beside it is ``neighbors.knn_accuracy``; a store's probe is ``probe_report``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import DataError, SettingError
from ..runtime.device import exact_fp32, resolve_device

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


def _as_tensor(x: Any, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(dev, dtype)


def _check_l2s(l2s: Sequence[float], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    if len(l2s) == 0 or any(not np.isfinite(v) or v < 0 for v in l2s):
        raise SettingError("l2s", f"must be a non-empty list of values >= 0, got {list(l2s)}; "
                           "e.g. 1e-4 1e-3 1e-2")
    return torch.tensor([float(v) for v in l2s], dtype=dtype, device=dev)


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise DataError(f"features must be (N, D) and labels (N,), got {tuple(x.shape)} and "
                        f"{tuple(y.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise DataError("features contain NaN or infinity; re-extract them (check fp16 overflow)")
