"""Evaluate Model 1 / Model 2 (AUROC with bootstrap 95% CIs) and the view classifier (accuracy).

    cxr-worker evaluate classifier --card models/weights/model2.json \
        --chexpert-test DATA/chexpert_sample --out report.json --roc roc.png
    cxr-worker evaluate classifier --card models/weights/model1.json --held-out \
        --chexpert DATA/chexpert_sample --folder ... --out report.json
    cxr-worker evaluate viewclassifier --card models/weights/view_classifier.json \
        --chexpert DATA/chexpert_sample --out view.json

Per label, only studies labelled 1 or 0 count (uncertain and blank are left out). CIs are the
2.5/97.5 percentiles of a study-level bootstrap (resamples with a single class are skipped); with
tens of studies they are wide, and the report says how many positives and negatives each rests on.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from models.classifiers import load_classifier
from models.common import set_threads
from models.labels import MODEL1_LABELS
from models.registry import read_card
from models.training.datasets.chexpert import StudyRecord, load_image
from models.training.datasets.sources import as_items, read_studies, read_view_images
from models.training.images import ImageCache
from models.training.metrics import auroc_report, per_source_auroc, rounded
from models.training.studies import StudyDataset, predict, record_raw
from models.view_classifier import ARCHITECTURE as VIEW_ARCHITECTURE
from models.view_classifier import ViewClassifier

log = logging.getLogger(__name__)


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
    card, model = load_classifier(card_path, device)
    kind = "model1" if card.labels == list(MODEL1_LABELS) else "model2"
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
            acc[lab] = rounded(float(np.mean(pred == raw[keep, j].astype(bool))))
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
    per_source = per_source_auroc(card.labels, raw, probs, [r.source for r in recs], seed=seed)
    if per_source is not None:
        rep["per_source"] = per_source
    if roc_png is not None:
        roc_figure(
            card.labels, raw, probs, roc_png, f"{card.name} {card.version} ({len(recs)} studies)"
        )
    return rep


def evaluate_view(
    card_path: Path, items: Sequence[tuple[Path, int]], *, device: str = "cpu", batch_size: int = 32
) -> dict[str, Any]:
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
        "accuracy": rounded(float(np.mean(pred == y))) if len(y) else None,
        "errors": len(wrong),
    }


class _Sourced(Protocol):
    @property
    def source(self) -> str: ...


S = TypeVar("S", bound=_Sourced)


def _held_out(
    args: argparse.Namespace, items: list[S], field: str, key: Callable[[S], str]
) -> list[S]:
    """With ``--held-out``, the items whose ``key`` is in the split file's ``field`` (split file:
    ``--split`` or the one beside the card), plus CheXpert test; else all of them."""
    if not args.held_out:
        return items
    split = Path(args.split) if args.split else Path(args.card).with_suffix(".split.json")
    keep = set(json.loads(split.read_text(encoding="utf-8"))[field])
    return [it for it in items if key(it) in keep or it.source == "chexpert-test"]


def _records(args: argparse.Namespace) -> list[StudyRecord]:
    """Every study of the given sources; ``--held-out``: only the card's held-out studies."""
    recs = read_studies(
        chexpert_test=args.chexpert_test or [],
        chexpert=args.chexpert or [],
        mimic=args.mimic or [],
        folder=args.folder or [],
    )
    return _held_out(args, recs, "held_out_keys", lambda r: r.key)


def _view_images(args: argparse.Namespace) -> list[tuple[Path, int]]:
    """Every image (with its view) of the given sources; ``--held-out``: only the card's held-out
    patients' images."""
    imgs = read_view_images(
        chexpert_test=args.chexpert_test or [],
        chexpert=args.chexpert or [],
        folder=args.folder or [],
    )
    return as_items(_held_out(args, imgs, "held_out_patients", lambda im: im.patient))


def run(args: argparse.Namespace) -> int:
    """``evaluate classifier|viewclassifier``: the card says which kind of model it is, so both
    take the same arguments. Prints the JSON report (and writes it to ``--out``)."""
    set_threads(args.threads)
    if read_card(args.card).architecture != VIEW_ARCHITECTURE:
        rep = evaluate_classifier(
            args.card,
            _records(args),
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
