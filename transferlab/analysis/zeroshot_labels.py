"""Zero-shot labels of a CLIP-family store, and text queries.

Each class name is written into every template (``"a photo of a {}."``), embedded with the
text tower the store records (``meta.json`` ``text_tower``), the template vectors of a class
L2-normalised and averaged, the mean normalised again (CLIP's prompt ensembling); an image
gets the class of highest cosine similarity. On a labelled store the accuracy is reported
on every labelled image and on the probe's validation split, beside the linear probe's
accuracy on that split (the same split as ``transferlab probe`` with the same seed).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, SettingError
from ..extract.queries import embed_texts
from ..store.rows import load_features, views_of
from .splits import split_by_key

# CLIP's seven-template ensemble for ImageNet (Radford et al., the prompt-engineering notebook)
DEFAULT_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                     "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                     "a photo of the small {}.")
MAX_CLASSES_ZEROSHOT = 100_000
MAX_TEMPLATES = 1_000


@dataclass
class ZeroShotResult:
    """Per-row predictions (plain views) and, for a labelled store, accuracies."""

    classes: list[str]
    templates: list[str]
    rows: np.ndarray  # store rows predicted (plain views)
    keys: list[str]
    predicted: np.ndarray  # index into ``classes`` per row
    scores: np.ndarray  # (rows, classes) cosine similarities
    true: list[str | None]  # the stored label's class name (None: unlabelled)
    accuracy: float | None = None  # over rows whose true class is among ``classes``
    n_scored: int = 0
    val_accuracy: float | None = None  # zero-shot on the probe's validation split
    probe_accuracy: float | None = None  # the linear probe's, same split
    n_val: int = 0
    extra: dict = field(default_factory=dict)


def parse_classes(classes: str | Sequence[str] | None, store: Any) -> list[str]:
    """Class names from a comma-separated string or a list; None: the store's own names."""
    if classes is None:
        names = list(getattr(store, "class_names", None) or [])
        if not names:
            raise SettingError("classes", "must be given: the store has no class names (it was "
                               "not extracted from labelled data); e.g. cat,dog,bird")
    else:
        items = classes.split(",") if isinstance(classes, str) else list(classes)
        names = [str(c).strip() for c in items if str(c).strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise SettingError("classes", f"needs at least two distinct class names, got {names[:5]}")
    if len(names) > MAX_CLASSES_ZEROSHOT:
        raise SettingError("classes", f"lists {len(names):,} classes; at most "
                           f"{MAX_CLASSES_ZEROSHOT:,}")
    return names


def read_templates(templates: str | Sequence[str] | None) -> list[str]:
    """``None`` / ``"DEFAULT"``: CLIP's ensemble; a list; or a text file, one template a line
    (blank lines and lines starting with # skipped). Each holds ``{}`` once."""
    if templates is None or templates == "DEFAULT":
        return list(DEFAULT_TEMPLATES)
    if isinstance(templates, str):
        path = Path(templates)
        if not path.is_file():
            raise SettingError("templates", f"is neither DEFAULT nor a file: {templates}")
        from ..runtime.untrusted import read_bounded

        text = read_bounded(path, 1 << 20, "templates file", DataError).decode("utf-8", "replace")
        items = [t.strip() for t in text.splitlines() if t.strip() and not t.startswith("#")]
    else:
        items = [str(t) for t in templates]
    bad = [t for t in items if t.count("{}") != 1]
    if not items or bad or len(items) > MAX_TEMPLATES:
        raise SettingError("templates", f"needs 1 to {MAX_TEMPLATES} templates each holding {{}} "
                           f"once (where the class name goes); got {bad[:2] or len(items)}")
    return items


def class_vectors(text_vectors: np.ndarray, n_classes: int, n_templates: int) -> np.ndarray:
    """(C, D): per class, the mean of its L2-normalised template vectors, normalised.
    ``text_vectors`` rows are class-major (class 0's templates first)."""
    t = torch.as_tensor(text_vectors, dtype=torch.float64)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-30)
    mean = t.reshape(n_classes, n_templates, -1).mean(1)
    return (mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-30)).float().numpy()


def zero_shot_scores(features: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(N, C) cosine similarity of each image vector to each class vector."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (x @ torch.as_tensor(classes, dtype=torch.float64).T).float().numpy()


def run_zeroshot(store: Any, classes: str | Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None, trust_code: bool = False,
                 probe: bool = True, val_fraction: float = 0.2, seed: int = 0,
                 device: str | torch.device | None = None) -> ZeroShotResult:
    """Zero-shot predictions of every plain row of ``store`` (see the module docstring);
    ``probe``: fit the linear probe on the same split for comparison (labelled stores)."""
    names = parse_classes(classes, store)
    tmpl = read_templates(templates)
    prompts = [t.replace("{}", c) for c in names for t in tmpl]
    text = embed_texts(store.meta, prompts, root=getattr(store, "dir", None),
                       trust_code=trust_code)
    vectors = class_vectors(text, len(names), len(tmpl))
    views = views_of(store)
    rows = np.flatnonzero(views == 0)
    if len(rows) == 0:
        raise DataError("the store is empty; extract features into it first")
    feats = load_features(store, rows)
    scores = zero_shot_scores(feats, vectors)
    predicted = scores.argmax(1)
    labels = np.asarray(store.labels, dtype=np.int64)
    stored_names = list(getattr(store, "class_names", None) or [])
    true = [stored_names[v] if 0 <= v < len(stored_names) else None for v in labels[rows]]
    keys = [store.keys[r] for r in rows]
    result = ZeroShotResult(names, tmpl, rows, keys, predicted, scores, true)
    position = {c: i for i, c in enumerate(names)}
    target = np.array([position.get(t, -1) if t is not None else -1 for t in true])
    scored = target >= 0
    if scored.any():
        result.n_scored = int(scored.sum())
        result.accuracy = float((predicted[scored] == target[scored]).mean())
    if probe and scored.any():
        add_probe(result, store, names, vectors, val_fraction, seed, device)
    return result


def add_probe(result: ZeroShotResult, store: Any, names: list[str], vectors: np.ndarray,
              val_fraction: float, seed: int, device: Any) -> None:
    """Zero-shot and linear-probe accuracy on the probe's validation split (``run_probe``'s
    split: seeded, stratified over keys, plain views)."""
    from .linear_probe import DEFAULT_L2, fit_logistic

    labels = np.asarray(store.labels, dtype=np.int64)
    keep = np.flatnonzero(labels >= 0)
    y, views = labels[keep], views_of(store)[keep]
    keys = np.asarray(store.keys, dtype=object)[keep]
    if len(np.unique(y)) < 2:
        return
    try:
        tr, va = split_by_key(y, keys, views, val_fraction, seed)
    except (DataError, ValueError):
        return
    if len(va) == 0 or len(np.unique(y[tr])) < 2:
        return
    x = load_features(store, keep)
    fit = fit_logistic(x[tr], y[tr], DEFAULT_L2, val_features=x[va], val_labels=y[va],
                       device=device)
    stored = list(store.class_names)
    position = {c: i for i, c in enumerate(names)}
    target = np.array([position.get(stored[v], -1) for v in y[va]])
    ok = target >= 0
    pred = zero_shot_scores(x[va], vectors).argmax(1)
    result.n_val = int(ok.sum())
    result.val_accuracy = float((pred[ok] == target[ok]).mean()) if ok.any() else None
    result.probe_accuracy = float(fit.val_acc[fit.best]) if fit.val_acc else None


def write_predictions(result: ZeroShotResult, file: Any) -> None:
    """CSV: key, predicted class, its cosine score, the true class (empty: unlabelled)."""
    import csv

    out = csv.writer(file)
    out.writerow(["key", "predicted", "score", "true"])
    for i, key in enumerate(result.keys):
        p = int(result.predicted[i])
        out.writerow([key, result.classes[p], f"{result.scores[i, p]:.6f}",
                      result.true[i] or ""])


def zeroshot_report(result: ZeroShotResult) -> str:
    """The summary lines a command prints."""
    lines = [f"zero-shot over {len(result.classes)} classes, {len(result.templates)} "
             f"template(s), {len(result.keys)} images"]
    if result.accuracy is not None:
        lines.append(f"zero-shot accuracy (all {result.n_scored} labelled images): "
                     f"{result.accuracy:.4f}")
    if result.val_accuracy is not None:
        lines.append(f"validation split ({result.n_val} images): zero-shot "
                     f"{result.val_accuracy:.4f}  linear probe "
                     + (f"{result.probe_accuracy:.4f}" if result.probe_accuracy is not None
                        else "n/a"))
    return "\n".join(lines)
