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
import csv
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from models.analyzer import Analyzer
from models.api import StudyInput
from models.classifiers import NO_FINDING, Classifier, DerivedModel1, derived_from
from models.common import set_threads
from models.labels import MODEL1_LABELS
from models.registry import ModelLoadError, read_card
from models.training.calibration import per_source, report
from models.training.datasets.chexpert import StudyRecord, load_image
from models.training.datasets.sources import as_items, read_view_images, studies_from_args
from models.training.metrics import rounded
from models.training.studies import record_raw
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


def served_analyzer(
    card_path: Path, *, lung_mask: Path, margin: float, device: str = "cpu"
) -> tuple[Analyzer, str]:
    """The Analyzer that serves ``card_path`` (with its Model 1 / Model 2 partner) and which of
    its outputs the card is: ``model1`` or ``model2``."""
    from models.lung_mask import LungMasker

    dev = torch.device(device)
    card = read_card(card_path)
    masker = LungMasker.from_card(lung_mask, dev)
    src = derived_from(card)
    if src is not None:
        model2 = Classifier.from_card(card_path.parent / src, dev)
        return Analyzer(masker, DerivedModel1(card, model2), model2, None, margin=margin), "model1"
    model = Classifier.from_card(card_path, dev)
    if card.labels == list(MODEL1_LABELS):  # a Model 1 with its own network
        return Analyzer(masker, model, model, None, margin=margin), "model1"
    if NO_FINDING not in card.labels:
        raise ValueError(f"{card_path}: a Model 2 card without '{NO_FINDING}' cannot be served")
    t_nf = card.threshold(NO_FINDING)
    card1 = card.model_copy(
        update={
            "name": "model1",
            "labels": list(MODEL1_LABELS),
            "thresholds": {"Abnormal": 1 - t_nf},
        }
    )
    return Analyzer(masker, DerivedModel1(card1, model), model, None, margin=margin), "model2"


def served_probabilities(
    analyzer: Analyzer, records: Sequence[StudyRecord], *, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Model 1 (studies,) and Model 2 (studies x labels) probabilities exactly as the service
    reports them (:meth:`models.analyzer.Analyzer.findings`), and the keys of studies that
    failed (their rows are NaN)."""
    n2 = len(analyzer.model2.card.labels)
    p1 = np.full(len(records), np.nan, dtype=np.float32)
    p2 = np.full((len(records), n2), np.nan, dtype=np.float32)
    failed: list[str] = []
    for s in range(0, len(records), batch_size):
        batch = records[s : s + batch_size]
        studies = [
            StudyInput(
                key=r.key,
                frontal=load_image(r.frontal),
                lateral=load_image(r.lateral) if r.lateral is not None else None,
            )
            for r in batch
        ]
        for i, res in enumerate(analyzer.findings(studies)):
            if isinstance(res, Exception):
                failed.append(batch[i].key)
                continue
            m1, m2 = res
            p1[s + i] = m1.probability
            p2[s + i] = [f.probability for f in m2]
        if (s // batch_size) % 25 == 0:
            log.info("evaluated %d/%d studies", min(s + batch_size, len(records)), len(records))
    return p1, p2, failed


def write_probabilities(
    path: Path,
    records: Sequence[StudyRecord],
    labels: Sequence[str],
    p1: np.ndarray,
    p2: np.ndarray,
) -> None:
    """Per-study probabilities as CSV: key, source, Model 1's Abnormal, then Model 2's labels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "source", "Abnormal", *labels])
        for r, a, row in zip(records, p1, p2, strict=True):
            w.writerow([r.key, r.source, f"{a:.6f}", *(f"{v:.6f}" for v in row)])


def evaluate_classifier(
    card_path: Path,
    records: Sequence[StudyRecord],
    *,
    device: str = "cpu",
    batch_size: int = 8,
    seed: int = 0,
    roc_png: Path | None = None,
    use_lateral: bool = True,
    lung_mask: Path | None = None,
    margin: float = 0.05,
    probabilities: Path | None = None,
) -> dict[str, Any]:
    """Score a Model 1 or Model 2 card through the serving path: each study's images are
    decoded, masked, cropped, resized, normalised and calibrated by :class:`Analyzer`, as the
    worker does."""
    from models.config import BUNDLED_WEIGHTS

    analyzer, kind = served_analyzer(
        card_path,
        lung_mask=lung_mask or BUNDLED_WEIGHTS / "lung_mask.json",
        margin=margin,
        device=device,
    )
    card = read_card(card_path)
    recs = [r for r in records if not np.all(np.isnan(record_raw(r, kind)))]
    if not recs:
        raise ValueError("no labelled studies to evaluate")
    if not use_lateral:
        recs = [replace(r, lateral=None) for r in recs]
    p1, p2, failed = served_probabilities(analyzer, recs, batch_size=batch_size)
    labels2 = analyzer.model2.card.labels
    if probabilities is not None:
        write_probabilities(probabilities, recs, labels2, p1, p2)
    ok = ~np.isnan(p1)
    recs = [r for r, k in zip(recs, ok, strict=True) if k]
    p1, p2 = p1[ok], p2[ok]
    labels = card.labels
    raw = np.stack([record_raw(r, kind) for r in recs])
    probs = p1[:, None] if kind == "model1" else p2
    thresholds = {lab: card.threshold(lab) for lab in labels}
    rep = report(labels, raw, probs, thresholds, seed=seed)
    if kind == "model1" and analyzer.model2.card.labels != labels:
        full = np.stack([r.raw for r in recs])
        m2 = report(labels2, full, p2, analyzer.model2.card.thresholds, seed=seed)
        rep["present_on_no_finding"] = m2.get("present_on_no_finding")
    rep.update(
        {
            "model": card.name,
            "version": card.version,
            "sha256": card.sha256,
            "served_through": "models.analyzer.Analyzer.findings (lung mask, crop, resize, "
            f"normalisation, calibration); lung mask {analyzer.masker.card.name} "
            f"{analyzer.masker.card.version} sha256 {analyzer.masker.card.sha256[:12]}",
            "studies": len(recs),
            "failed": len(failed),
            "with_lateral": sum(r.lateral is not None for r in recs),
            "used_lateral": use_lateral,
            "sources": sorted({r.source for r in recs}),
        }
    )
    if len({r.source for r in recs}) > 1:
        rep["per_source"] = per_source(
            labels, raw, probs, thresholds, [r.source for r in recs], seed=seed
        )
    if roc_png is not None:
        roc_figure(labels, raw, probs, roc_png, f"{card.name} {card.version} ({len(recs)} studies)")
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
    recs = studies_from_args(args, with_test=True)
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
            lung_mask=args.lung_mask,
            margin=args.crop_margin,
            probabilities=args.probabilities,
        )
        if args.card_metrics:
            key = f"served_{args.card_metrics}"
            record_in_card(args.card, key, rep)
            for sibling in sorted(Path(args.card).parent.glob("*.json")):
                if sibling.name.endswith(".split.json") or sibling == Path(args.card):
                    continue
                try:
                    if derived_from(read_card(sibling)) == Path(args.card).name and "model1" in rep:
                        keep = ("model1", "present_on_no_finding", "studies", "served_through")
                        record_in_card(sibling, key, {k: rep[k] for k in keep if k in rep})
                except ModelLoadError:  # other JSON files beside the cards
                    continue
    else:
        rep = evaluate_view(args.card, _view_images(args), device=args.device)
    text = json.dumps(rep, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)  # CLI entry point: the report is the output
    return 0


def record_in_card(card_path: Path, key: str, rep: dict[str, Any]) -> None:
    """Store ``rep`` under ``metrics[key]`` of the card (the weights and their hash are not
    touched)."""
    data = json.loads(card_path.read_text(encoding="utf-8"))
    data.setdefault("metrics", {})[key] = rep
    card_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
