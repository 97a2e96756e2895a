"""Measures shared by training and evaluation: AUROC with bootstrap CIs (overall and per source),
Youden's J threshold, and Dice/IoU of lung masks.

Per label, only studies labelled 1 or 0 count (uncertain and blank are left out). CIs are the
2.5/97.5 percentiles of a study-level bootstrap (resamples with a single class are skipped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.labels import COMPETITION


def _auc_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC of each row of (k, n) labels/scores (ties count one half)."""
    from scipy.stats import rankdata  # type: ignore[import-untyped]

    ranks: np.ndarray = rankdata(p, axis=-1)
    n1 = y.sum(axis=-1)
    n0 = y.shape[-1] - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        auc: np.ndarray = ((ranks * y).sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return auc


def bootstrap_auroc(
    y: np.ndarray, p: np.ndarray, *, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(AUROC, CI low, CI high); NaNs when y has one class only."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return float("nan"), float("nan"), float("nan")
    auc = float(_auc_rows(y[None], p[None])[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), (n_boot, len(y)))
    yb = y[idx]
    ok = yb.min(axis=1) != yb.max(axis=1)  # resamples with a single class have no AUROC
    if not ok.any():
        return auc, float("nan"), float("nan")
    stats = _auc_rows(yb[ok], p[idx[ok]])
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return auc, float(lo), float(hi)


def rounded(x: float | None) -> float | None:
    """``x`` to 4 decimals for a JSON report; None for a missing or non-finite value."""
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def auroc_report(
    labels: Sequence[str], raw: np.ndarray, probs: np.ndarray, *, seed: int = 0, n_boot: int = 2000
) -> dict[str, Any]:
    """Per-label AUROC with 95% CIs plus the mean over the CheXpert competition labels present."""
    per: dict[str, Any] = {}
    for j, lab in enumerate(labels):
        keep = (raw[:, j] == 0) | (raw[:, j] == 1)
        y, p = raw[keep, j].astype(int), probs[keep, j]
        auc, lo, hi = bootstrap_auroc(y, p, n_boot=n_boot, seed=seed)
        per[lab] = {
            "auroc": rounded(auc),
            "ci95": [rounded(lo), rounded(hi)],
            "positives": int(y.sum()),
            "negatives": int(len(y) - y.sum()),
        }
    out: dict[str, Any] = {"per_label": per}
    comp = [per[c]["auroc"] for c in COMPETITION if c in per and per[c]["auroc"] is not None]
    if comp:
        out["mean_competition_auroc"] = rounded(float(np.mean(comp)))
        out["competition_labels_evaluable"] = len(comp)
    return out


def per_source_auroc(
    labels: Sequence[str],
    raw: np.ndarray,
    probs: np.ndarray,
    sources: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, dict[str, Any]] | None:
    """Each source's per-label AUROC (labels it can evaluate only), keyed by source name; None
    when every study comes from one source. A pooled AUROC can hide a per-site confound."""
    names = sorted(set(sources))
    if len(names) < 2:
        return None
    src = np.array(sources)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        sel = src == name
        sub = auroc_report(labels, raw[sel], probs[sel], seed=seed)["per_label"]
        out[name] = {lab: v for lab, v in sub.items() if v["auroc"] is not None}
    return out


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float | None:
    """Threshold maximising sensitivity + specificity - 1; None when y has one class only."""
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thr[best], 1e-4), 1 - 1e-4))


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks; both 1.0 when both masks are empty."""
    p, t = pred.astype(bool), truth.astype(bool)
    inter = float(np.logical_and(p, t).sum())
    s = float(p.sum() + t.sum())
    union = float(np.logical_or(p, t).sum())
    return (2 * inter / s if s else 1.0), (inter / union if union else 1.0)


def batch_dice(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Per-image Dice of binary tensors (N x 1 x H x W); 1.0 when both are empty."""
    inter = (pred * target).sum(dim=(1, 2, 3))
    denom = pred.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    d = torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))
    return [float(v) for v in d]
