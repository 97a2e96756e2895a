"""How well the mask-based cardiothoracic ratio separates Cardiomegaly:
``cxr-worker evaluate ctr --card LUNG_MASK_CARD --chexpert DIR --nih DIR``.

Every frontal image of the given sets goes through the served path (the lung-mask generator,
:func:`models.crop.mask_and_crop`, :func:`models.ctr.measure`); the ratio is scored as a
Cardiomegaly score by AUROC with a 95% bootstrap CI, per source and pooled, for all films, PA
films only, and the films where the ratio is interpretable (PA or unknown projection and the mask
passed its quality checks). The CTR has no fitted parameters and the lung-mask generator never
saw CheXpert or NIH images, so every image is held out for it; ``--held-out SPLIT`` restricts
the studies to a classifier split file's ``test_keys`` (or ``held_out_keys``; CheXpert
``chexpert:patientNNNNN/studyN``, NIH ``nih:<image stem>``) to compare with that classifier on
the same studies.

Labels: CheXpert ``Cardiomegaly`` 1 positive, 0 negative, -1 (uncertain) left out; blank
(unmentioned) is left out in the ``strict`` figures and counted negative in the
``blank_negative`` ones. NIH: ``Cardiomegaly`` among ``finding_labels`` positive, otherwise
negative (NIH labels all 14 of its findings on every image).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.common import select_device, set_threads
from models.ctr import measure
from models.lung_mask import LungMasker
from models.training.datasets.chexpert import csv_rows
from models.training.datasets.masks import read_gray
from models.training.metrics import bootstrap_auroc

log = logging.getLogger(__name__)


class CtrDataError(ValueError):
    """A label file is missing, malformed or names a missing image (file and line given)."""


@dataclass
class CtrCase:
    source: str
    key: str  # chexpert: patientNNNNN/studyN/viewN; nih: image file name
    image: Path
    projection: str | None
    label: float | None  # 1, 0 or None (uncertain / unmentioned in strict terms)
    blank: bool  # CheXpert: unmentioned (counted negative in the blank_negative figures)
    patient: str = ""
    ratio: float | None = None
    interpretable: bool = False
    rule: str = ""


def chexpert_cases(root: Path, held_out: set[str] | None = None) -> list[CtrCase]:
    """Frontal images of a CheXpert(-small) folder (``CheXpert-v1.0-small/train.csv`` or
    ``CheXpert-v1.0/train.csv``)."""
    for name in ("CheXpert-v1.0-small", "CheXpert-v1.0"):
        csv_path = root / name / "train.csv"
        if csv_path.is_file():
            break
    else:
        raise CtrDataError(f"{root}: no CheXpert-v1.0-small/train.csv or CheXpert-v1.0/train.csv")
    cases = []
    for line, row in csv_rows(csv_path, CtrDataError):
        try:
            rel, view, raw = row["Path"], row["Frontal/Lateral"], row["Cardiomegaly"].strip()
        except KeyError as exc:
            raise CtrDataError(f"{csv_path}:{line}: no column {exc}") from None
        if view != "Frontal":
            continue
        parts = Path(rel).parts
        if len(parts) < 4:
            raise CtrDataError(f"{csv_path}:{line}: path {rel!r} is not <release>/<split>/...")
        key = "/".join(parts[-3:-1])
        if held_out is not None and f"chexpert:{key}" not in held_out:
            continue
        image = root / rel
        if not image.is_file():
            raise CtrDataError(f"{csv_path}:{line}: image {image} is missing")
        try:
            value = float(raw) if raw else None
        except ValueError:
            raise CtrDataError(
                f"{csv_path}:{line}: Cardiomegaly {raw!r} is not 1/0/-1/blank"
            ) from None
        label = value if value in (0.0, 1.0) else None
        proj = row.get("AP/PA", "").strip().upper() or None
        cases.append(
            CtrCase("chexpert", f"{key}/{parts[-1]}", image, proj, label, blank=value is None)
        )
    return cases


def nih_cases(root: Path, held_out: set[str] | None = None) -> list[CtrCase]:
    """Images of an NIH ChestX-ray14 folder with ``labels.csv`` (``file``, ``view``,
    ``finding_labels``); with ``held_out`` only the studies keyed ``nih:<image stem>`` in it."""
    csv_path = root / "labels.csv"
    cases = []
    for line, row in csv_rows(csv_path, CtrDataError):
        try:
            rel, view, findings = row["file"], row["view"], row["finding_labels"]
        except KeyError as exc:
            raise CtrDataError(f"{csv_path}:{line}: no column {exc}") from None
        if held_out is not None and f"nih:{Path(rel).stem}" not in held_out:
            continue
        image = root / rel
        if not image.is_file():
            raise CtrDataError(f"{csv_path}:{line}: image {image} is missing")
        label = 1.0 if "Cardiomegaly" in findings.split("|") else 0.0
        proj = view.strip().upper() or None
        patient = (row.get("patient_id") or "").strip()
        cases.append(
            CtrCase("nih", Path(rel).name, image, proj, label, blank=False, patient=patient)
        )
    return cases


def _auroc(cases: list[CtrCase], *, blank_negative: bool, seed: int) -> dict[str, Any]:
    ys: list[float] = []
    ps: list[float] = []
    for c in cases:
        if c.ratio is None:
            continue
        lab = c.label if c.label is not None else (0.0 if blank_negative and c.blank else None)
        if lab is None:
            continue
        ys.append(lab)
        ps.append(c.ratio)
    y, p = np.asarray(ys), np.asarray(ps)
    auc, lo, hi = bootstrap_auroc(y, p, seed=seed)
    out: dict[str, Any] = {"n": int(y.size), "positives": int(y.sum())}
    if np.isfinite(auc):
        out |= {"auroc": round(auc, 4), "ci95": [round(lo, 4), round(hi, 4)]}
        pos, neg = p[y == 1], p[y == 0]
        out |= {
            "ctr_median_pos": round(float(np.median(pos)), 3),
            "ctr_median_neg": round(float(np.median(neg)), 3),
            "sens_at_0.5": round(float((pos > 0.5).mean()), 3),
            "spec_at_0.5": round(float((neg <= 0.5).mean()), 3),
        }
    return out


def nih_dev_half(patient: str) -> bool:
    """The NIH patients whose PA films chose the CTR definition in :mod:`models.ctr` (a hash
    of the patient id); the other half never influenced it."""
    return hashlib.sha256(f"ctr:{patient}".encode()).digest()[0] < 128


def report(cases: list[CtrCase], seed: int = 0) -> dict[str, Any]:
    """AUROC tables: per source and pooled x (all, PA, interpretable) x (strict, blank_negative)."""
    subsets: dict[str, Callable[[CtrCase], bool]] = {
        "all": lambda c: True,
        "pa": lambda c: c.projection == "PA",
        "interpretable": lambda c: c.interpretable,
    }
    out: dict[str, Any] = {}
    groups = sorted({c.source for c in cases}) + ["pooled"]
    if any(c.source == "nih" for c in cases):
        groups += ["nih_dev_half", "nih_other_half", "chexpert+nih_other_half"]

    def member(c: CtrCase, group: str) -> bool:
        if group == "pooled":
            return True
        if group == "nih_dev_half":
            return c.source == "nih" and nih_dev_half(c.patient)
        if group == "nih_other_half":
            return c.source == "nih" and not nih_dev_half(c.patient)
        if group == "chexpert+nih_other_half":
            return c.source == "chexpert" or (c.source == "nih" and not nih_dev_half(c.patient))
        return c.source == group

    for source in groups:
        src = [c for c in cases if member(c, source)]
        out[source] = {
            name: {
                "strict": _auroc([c for c in src if keep(c)], blank_negative=False, seed=seed),
                "blank_negative": _auroc(
                    [c for c in src if keep(c)], blank_negative=True, seed=seed
                ),
            }
            for name, keep in subsets.items()
        }
        out[source]["images"] = len(src)
        out[source]["not_measured"] = sum(c.ratio is None for c in src)
    return out


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    device = select_device(args.device)
    held_out: set[str] | None = None
    if args.held_out:
        split = json.loads(Path(args.held_out).read_text(encoding="utf-8"))
        keys = split.get("test_keys") or split.get("held_out_keys")
        if not keys:
            raise CtrDataError(f"{args.held_out}: no test_keys or held_out_keys list")
        held_out = set(keys)
    cases: list[CtrCase] = []
    for d in args.chexpert or []:
        cases += chexpert_cases(Path(d), held_out)
    for d in args.nih or []:
        cases += nih_cases(Path(d), held_out)
    if not cases:
        raise CtrDataError("no images: give --chexpert and/or --nih")
    masker = LungMasker.from_card(args.card, device)
    t0 = time.monotonic()
    for i in range(0, len(cases), 16):
        batch = cases[i : i + 16]
        results = masker.predict([read_gray(c.image) for c in batch], margin=args.margin)
        for c, res in zip(batch, results, strict=True):
            ctr = measure(res, c.projection)
            c.rule = res.quality.rule
            if ctr is not None:
                c.ratio, c.interpretable = ctr.ratio, ctr.interpretable
        if (i // 16) % 10 == 0:
            log.info(
                "CTR: %d/%d images, %.1f min",
                i + len(batch),
                len(cases),
                (time.monotonic() - t0) / 60,
            )
    rep = {
        "card": str(args.card),
        "held_out_split": str(args.held_out) if args.held_out else None,
        "qc_flagged": sum(bool(c.rule) for c in cases),
        "results": report(cases, seed=args.seed),
    }
    text = json.dumps(rep, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    if args.per_image:
        args.per_image.parent.mkdir(parents=True, exist_ok=True)
        with args.per_image.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(
                ["source", "key", "projection", "label", "blank", "ctr", "interpretable", "qc_rule"]
            )
            for c in cases:
                d = asdict(c)
                w.writerow(
                    [
                        d["source"],
                        d["key"],
                        d["projection"] or "",
                        "" if c.label is None else int(c.label),
                        int(c.blank),
                        "" if c.ratio is None else c.ratio,
                        int(c.interpretable),
                        c.rule,
                    ]
                )
    return 0
