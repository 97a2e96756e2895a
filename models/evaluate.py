"""Evaluate Model 1 / Model 2 (AUROC with bootstrap 95% CIs) and the view classifier (accuracy).

    python -m models.evaluate --card models/weights/model2.json \
        --chexpert-test DATA/chexpert_sample --out report.json --roc roc.png
    python -m models.evaluate --card models/weights/model1.json --held-out \
        --chexpert DATA/chexpert_sample --folder ... --out report.json
    python -m models.evaluate --card models/weights/view_classifier.json \
        --chexpert DATA/chexpert_sample --out view.json

Per label, only studies labelled 1 or 0 count (uncertain and blank are left out). CIs are the
2.5/97.5 percentiles of a study-level bootstrap (resamples with a single class are skipped); with
tens of studies they are wide, and the report says how many positives and negatives each rests on.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.datasets.chexpert import COMPETITION, StudyRecord, read_chexpert

log = logging.getLogger(__name__)


def _auc_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC of each row of (k, n) labels/scores (ties count one half)."""
    from scipy.stats import rankdata

    ranks = rankdata(p, axis=-1)
    n1 = y.sum(axis=-1)
    n0 = y.shape[-1] - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((ranks * y).sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


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
            "auroc": _r(auc),
            "ci95": [_r(lo), _r(hi)],
            "positives": int(y.sum()),
            "negatives": int(len(y) - y.sum()),
        }
    out: dict[str, Any] = {"per_label": per}
    comp = [per[c]["auroc"] for c in COMPETITION if c in per and per[c]["auroc"] is not None]
    if comp:
        out["mean_competition_auroc"] = _r(float(np.mean(comp)))
        out["competition_labels_evaluable"] = len(comp)
    return out


def _r(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def roc_figure(
    labels: Sequence[str], raw: np.ndarray, probs: np.ndarray, path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(6, 6))
    for j, lab in enumerate(labels):
        keep = (raw[:, j] == 0) | (raw[:, j] == 1)
        y = raw[keep, j].astype(int)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, probs[keep, j])
        ax.plot(fpr, tpr, label=f"{lab} ({roc_auc_score(y, probs[keep, j]):.2f}, n={len(y)})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def evaluate_classifier(
    card_path: Path,
    records: Sequence[StudyRecord],
    *,
    device: str = "cpu",
    batch_size: int = 8,
    seed: int = 0,
    roc_png: Path | None = None,
    use_lateral: bool = True,
) -> dict[str, Any]:
    from models.classifiers import load_classifier
    from models.train_classifier import ImageCache, StudyDataset, predict, record_raw

    card, model = load_classifier(card_path, device)
    kind = "model1" if card.labels == ["Abnormal"] else "model2"
    recs = [r for r in records if not np.all(np.isnan(record_raw(r, kind)))]
    if not recs:
        raise ValueError("no labelled studies to evaluate")
    ds = StudyDataset(recs, kind, "u-ignore", ImageCache(card.input_size), card.normalisation, seed)
    probs = predict(model, ds, torch.device(device), batch_size, use_lateral=use_lateral)
    raw = np.stack([record_raw(r, kind) for r in recs])
    rep = auroc_report(card.labels, raw, probs, seed=seed)
    acc = {}
    for j, lab in enumerate(card.labels):
        keep = (raw[:, j] == 0) | (raw[:, j] == 1)
        if keep.any():
            pred = probs[keep, j] >= card.threshold(lab)
            acc[lab] = _r(float(np.mean(pred == raw[keep, j].astype(bool))))
    rep.update(
        {
            "model": card.name,
            "version": card.version,
            "sha256": card.sha256,
            "studies": len(recs),
            "with_lateral": sum(r.lateral is not None for r in recs),
            "used_lateral": use_lateral,
            "accuracy_at_card_thresholds": acc,
            "sources": sorted({r.source for r in recs}),
        }
    )
    sources = sorted({r.source for r in recs})
    if len(sources) > 1:  # a pooled AUROC can hide a per-site confound: report each source too
        src = np.array([r.source for r in recs])
        rep["per_source"] = {}
        for sname in sources:
            sel = src == sname
            sub = auroc_report(card.labels, raw[sel], probs[sel], seed=seed)["per_label"]
            rep["per_source"][sname] = {lab: v for lab, v in sub.items() if v["auroc"] is not None}
    if roc_png is not None:
        roc_figure(
            card.labels, raw, probs, roc_png, f"{card.name} {card.version} ({len(recs)} studies)"
        )
    return rep


def evaluate_view(
    card_path: Path, items: Sequence[tuple[Path, int]], *, device: str = "cpu", batch_size: int = 32
) -> dict[str, Any]:
    from models.datasets.chexpert import load_image
    from models.view_classifier import ViewClassifier

    vc = ViewClassifier.from_card(card_path, device)
    probs: list[float] = []
    for i in range(0, len(items), batch_size):
        probs += list(vc.probabilities([load_image(p) for p, _ in items[i : i + batch_size]]))
    y = np.array([lab for _, lab in items])
    pred = np.array(probs) >= vc.card.threshold(vc.card.labels[1])
    wrong = [str(items[int(i)][0].name) for i in np.flatnonzero(pred != y)]
    return {
        "model": vc.card.name,
        "version": vc.card.version,
        "images": len(items),
        "frontal": int((y == 0).sum()),
        "lateral": int((y == 1).sum()),
        "accuracy": _r(float(np.mean(pred == y))) if len(y) else None,
        "errors": len(wrong),
    }


def _records(args: argparse.Namespace) -> list[StudyRecord]:
    from models.datasets.chexpert import read_mimic
    from models.datasets.folder import parse_spec, read_folder

    recs: list[StudyRecord] = []
    for d in args.chexpert_test or []:
        recs += read_chexpert(Path(d), "test")
    for d in args.chexpert or []:
        recs += read_chexpert(Path(d), "train")
    for d in args.mimic or []:
        recs += read_mimic(Path(d))
    for spec in args.folder or []:
        c, d, t = parse_spec(spec)
        recs += read_folder(c, d, t)
    if args.held_out:
        split = Path(args.split) if args.split else Path(args.card).with_suffix(".split.json")
        keys = set(json.loads(split.read_text(encoding="utf-8"))["held_out_keys"])
        recs = [r for r in recs if r.key in keys or r.source == "chexpert-test"]
    return recs


def _view_images(args: argparse.Namespace) -> list[tuple[Path, int]]:
    """Every image (with its view) of the given sources; ``--held-out``: only the card's held-out
    images (plus CheXpert test)."""
    from models.datasets.chexpert import chexpert_view_images
    from models.datasets.folder import folder_view_images, parse_spec

    imgs = []
    for d in args.chexpert_test or []:
        imgs += chexpert_view_images(Path(d), "test")
    for d in args.chexpert or []:
        imgs += chexpert_view_images(Path(d), "train")
    for spec in args.folder or []:
        c, d, t = parse_spec(spec)
        imgs += folder_view_images(c, d, t)
    if args.held_out:
        split = Path(args.split) if args.split else Path(args.card).with_suffix(".split.json")
        keep = set(json.loads(split.read_text(encoding="utf-8"))["held_out_patients"])
        imgs = [im for im in imgs if im.patient in keep or im.source == "chexpert-test"]
    return [(im.path, int(im.lateral)) for im in imgs]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--card", type=Path, required=True)
    p.add_argument("--chexpert", action="append", metavar="DIR", help="CheXpert train.csv studies")
    p.add_argument(
        "--chexpert-test", action="append", metavar="DIR", help="CheXpert test_labels.csv studies"
    )
    p.add_argument("--mimic", action="append", metavar="DIR")
    p.add_argument("--folder", action="append", metavar="CSV:DIR[:TEMPLATE]")
    p.add_argument(
        "--held-out",
        action="store_true",
        help="keep only the studies the card's <card>.split.json held out (plus CheXpert test)",
    )
    p.add_argument("--split", help="split file (default: beside the card)")
    p.add_argument("--frontal-only", action="store_true", help="ignore laterals (classifier)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON report")
    p.add_argument("--roc", type=Path, help="ROC curves PNG (classifier)")


def run(args: argparse.Namespace) -> int:
    from models.common import set_threads
    from models.registry import read_card
    from models.view_classifier import ARCHITECTURE as VIEW_ARCHITECTURE

    set_threads(args.threads)
    # the card says what kind of model it is (so `cxr-worker evaluate classifier|viewclassifier`
    # and `python -m models.evaluate` take the same arguments)
    if read_card(args.card).architecture != VIEW_ARCHITECTURE:
        recs = _records(args)
        rep = evaluate_classifier(
            args.card,
            recs,
            device=args.device,
            seed=args.seed,
            roc_png=args.roc,
            use_lateral=not args.frontal_only,
        )
    else:
        rep = evaluate_view(args.card, _view_images(args), device=args.device)
    text = json.dumps(rep, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)  # CLI entry point: the report is the output
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    p = argparse.ArgumentParser(
        prog="python -m models.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
