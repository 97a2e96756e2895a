"""Calibration, operating points and the report every classifier evaluation writes.

* Calibration: per-label Platt scaling ``sigmoid(a * logit + b)`` fitted on the validation split
  (labels with fewer than ``MIN_PER_CLASS`` positives or negatives there keep a = 1, b = 0), and
  the expected calibration error (ECE: 10 equal-width bins, |mean p - positive rate| weighted by
  the bin's share) before and after.
* Operating point: per label, the threshold at which ``specificity`` of the validation negatives
  are called absent (needs negatives only, so every label with validation negatives gets a
  validated threshold). Model 1 (``Abnormal`` = 1 - P(No Finding)) takes its threshold from
  No Finding's.
* Report: AUROC with bootstrap 95% CIs per label, the 5-label competition mean, Model 1's AUROC,
  ECE, and the mean number of pathologies called Present on No Finding studies (with a
  bootstrap CI), overall and per source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.labels import PATHOLOGIES
from models.training.metrics import auroc_report, bootstrap_auroc, rounded

MIN_PER_CLASS = 5
NO_FINDING = "No Finding"


def _labelled(raw: np.ndarray, j: int) -> np.ndarray:
    keep: np.ndarray = (raw[:, j] == 0) | (raw[:, j] == 1)
    return keep


def sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return out


def fit_platt(
    labels: Sequence[str], raw: np.ndarray, logits: np.ndarray
) -> dict[str, tuple[float, float]]:
    """Per-label (a, b) maximising the validation likelihood of sigmoid(a * logit + b)."""
    from sklearn.linear_model import LogisticRegression

    out: dict[str, tuple[float, float]] = {}
    for j, lab in enumerate(labels):
        keep = _labelled(raw, j)
        y = raw[keep, j].astype(int)
        if y.sum() < MIN_PER_CLASS or (len(y) - y.sum()) < MIN_PER_CLASS:
            continue
        lr = LogisticRegression(C=1e4, max_iter=1000).fit(logits[keep, j, None], y)
        a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        if a > 0:  # a negative slope would invert the ranking: keep the raw output instead
            out[lab] = (round(a, 5), round(b, 5))
    return out


def apply_platt(
    labels: Sequence[str], logits: np.ndarray, params: dict[str, tuple[float, float]]
) -> np.ndarray:
    a = np.array([params.get(lab, (1.0, 0.0))[0] for lab in labels], dtype=np.float32)
    b = np.array([params.get(lab, (1.0, 0.0))[1] for lab in labels], dtype=np.float32)
    return sigmoid(logits * a + b).astype(np.float32)


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float | None:
    """Expected calibration error over equal-width probability bins; None without data."""
    if len(y) == 0:
        return None
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for k in range(bins):
        sel = idx == k
        if sel.any():
            total += sel.mean() * abs(float(p[sel].mean()) - float(y[sel].mean()))
    return total


def specificity_threshold(y: np.ndarray, p: np.ndarray, specificity: float) -> float | None:
    """The smallest threshold that calls at least ``specificity`` of the negatives absent
    (present = p >= threshold); None without negatives."""
    neg = np.sort(p[y == 0])
    if len(neg) == 0:
        return None
    k = int(np.ceil(specificity * len(neg))) - 1
    k = min(max(k, 0), len(neg) - 1)
    t = float(neg[k])
    return float(np.nextafter(np.float32(t), np.float32(2.0)))


def operating_thresholds(
    labels: Sequence[str],
    raw: np.ndarray,
    probs: np.ndarray,
    specificity: float,
    *,
    min_negatives: int | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Per-label thresholds at ``specificity`` on (validation) negatives; No Finding's threshold
    is set for the same specificity on abnormal studies (its own negatives). Returns the
    thresholds and the labels whose threshold is **not validated**: those without validation
    negatives (threshold 0.5) and those with fewer than ``min_negatives`` of them (default
    ``ceil(1 / (1 - specificity))``, 20 at 0.95: with fewer, one negative more or less moves the
    specificity by more than the operating point's own margin, so the threshold the few
    negatives give is kept but reported as unvalidated)."""
    if min_negatives is None:
        min_negatives = int(np.ceil(1.0 / max(1e-6, 1.0 - specificity) - 1e-9))
    out: dict[str, float] = {}
    missing: list[str] = []
    for j, lab in enumerate(labels):
        keep = _labelled(raw, j)
        t = specificity_threshold(raw[keep, j], probs[keep, j], specificity)
        negatives = int(np.sum(raw[keep, j] == 0))
        if t is None or negatives < min_negatives:
            missing.append(lab)
        out[lab] = 0.5 if t is None else round(min(max(t, 1e-4), 1 - 1e-4), 6)
    return out, missing


def model1_from(
    labels: Sequence[str], raw: np.ndarray, probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Model 1's raw label and probability (1 - P(No Finding)) per study."""
    from models.training.datasets.chexpert import model1_raw

    j = list(labels).index(NO_FINDING)
    y = np.array([model1_raw(r)[0] for r in raw], dtype=np.float32)
    return y, (1.0 - probs[:, j]).astype(np.float32)


def present_on_normals(
    labels: Sequence[str],
    raw: np.ndarray,
    probs: np.ndarray,
    thresholds: dict[str, float],
    *,
    seed: int = 0,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """On studies labelled No Finding = 1: the mean number of pathologies (the 12 observations
    other than No Finding and Support Devices) called Present, with a bootstrap 95% CI, and the
    share of such studies with none Present."""
    j_nf = list(labels).index(NO_FINDING)
    cols = [j for j, lab in enumerate(labels) if lab in PATHOLOGIES]
    normal = raw[:, j_nf] == 1
    n = int(normal.sum())
    if n == 0:
        return {"studies": 0}
    t = np.array([thresholds.get(labels[j], 0.5) for j in cols])
    counts = (probs[normal][:, cols] >= t).sum(axis=1)
    rng = np.random.default_rng(seed)
    boot = counts[rng.integers(0, n, (n_boot, n))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "studies": n,
        "mean_present": rounded(float(counts.mean())),
        "ci95": [rounded(float(lo)), rounded(float(hi))],
        "share_with_none": rounded(float((counts == 0).mean())),
        "max_present": int(counts.max()),
    }


def report(
    labels: Sequence[str],
    raw: np.ndarray,
    probs: np.ndarray,
    thresholds: dict[str, float],
    *,
    logits: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything a classifier card and ``evaluate`` report on one set of studies."""
    rep = auroc_report(labels, raw, probs, seed=seed)
    cal: dict[str, Any] = {}
    for j, lab in enumerate(labels):
        keep = _labelled(raw, j)
        y = raw[keep, j]
        entry = {"ece": rounded(ece(y, probs[keep, j]))}
        if logits is not None:
            entry["ece_uncalibrated"] = rounded(ece(y, sigmoid(logits[keep, j])))
        if keep.any():
            pred = probs[keep, j] >= thresholds.get(lab, 0.5)
            yb = y.astype(bool)
            entry["sensitivity"] = rounded(float(pred[yb].mean())) if yb.any() else None
            entry["specificity"] = rounded(float((~pred[~yb]).mean())) if (~yb).any() else None
        cal[lab] = entry
    rep["calibration"] = cal
    eces = [v["ece"] for v in cal.values() if v["ece"] is not None]
    rep["mean_ece"] = rounded(float(np.mean(eces))) if eces else None
    if logits is not None:
        before = [
            v["ece_uncalibrated"] for v in cal.values() if v.get("ece_uncalibrated") is not None
        ]
        rep["mean_ece_uncalibrated"] = rounded(float(np.mean(before))) if before else None
    if NO_FINDING in labels:
        y1, p1 = model1_from(labels, raw, probs)
        keep = (y1 == 0) | (y1 == 1)
        auc, lo, hi = bootstrap_auroc(y1[keep], p1[keep], seed=seed)
        rep["model1"] = {
            "auroc": rounded(auc),
            "ci95": [rounded(lo), rounded(hi)],
            "positives": int(y1[keep].sum()),
            "negatives": int(keep.sum() - y1[keep].sum()),
            "ece": rounded(ece(y1[keep], p1[keep])),
        }
        rep["present_on_no_finding"] = present_on_normals(labels, raw, probs, thresholds, seed=seed)
    return rep


def per_source(
    labels: Sequence[str],
    raw: np.ndarray,
    probs: np.ndarray,
    thresholds: dict[str, float],
    sources: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`report` per source (labels a source cannot evaluate are dropped)."""
    src = np.array(sources)
    out: dict[str, Any] = {}
    for name in sorted(set(sources)):
        sel = src == name
        rep = report(labels, raw[sel], probs[sel], thresholds, seed=seed)
        rep["studies"] = int(sel.sum())
        rep["per_label"] = {k: v for k, v in rep["per_label"].items() if v["auroc"] is not None}
        rep.pop("calibration", None)
        out[name] = rep
    return out
