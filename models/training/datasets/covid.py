"""The COVID-19 image data collection (Cohen et al. 2020; ``metadata.csv``) as study records.

Columns used: the image (``file`` relative to the CSV's folder, else ``filename`` under
``images/``), ``view`` (PA, AP, AP Supine, AP Erect = frontal; L = lateral; blank or ``?`` = view
unknown: the row is skipped, since a lateral read as a frontal would poison training),
``finding`` and ``patientid``. Each frontal is its own study (the collection has no study ids);
laterals are not paired with a frontal and are left to the view classifier.

Findings -> CheXpert observations (only what the finding implies; everything else stays blank and
is masked out of the loss):

* ``No Finding`` -> No Finding 1 and every pathology 0 (Support Devices blank);
* a pneumonia (COVID-19, SARS, MERS, bacterial/viral/fungal organisms such as Streptococcus,
  Klebsiella, Pneumocystis, Legionella, ..., or "Pneumonia") -> Pneumonia 1, Lung Opacity 1,
  No Finding 0;
* ARDS -> Lung Opacity 1, No Finding 0;
* ``todo`` (not yet read), blank or ``Unknown`` -> the row is skipped.

A row with a missing patient id or image file is an error naming the CSV and line.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from models.labels import OBSERVATIONS, PATHOLOGIES
from models.training.datasets.chexpert import DatasetError, StudyRecord, frontal_only

FRONTAL_VIEWS = {"PA", "AP", "AP SUPINE", "AP ERECT"}
LATERAL_VIEWS = {"L", "LATERAL", "LL", "RL"}
UNREAD = {"", "todo", "unknown"}
NON_PNEUMONIA = {"ards": ("Lung Opacity",), "no finding": ()}


def covid_raw(finding: str) -> np.ndarray | None:
    """Finding cell -> raw 14-observation vector, or None when the image is not read (todo)."""
    idx = {o: i for i, o in enumerate(OBSERVATIONS)}
    raw = np.full(len(OBSERVATIONS), math.nan, dtype=np.float32)
    parts = [p.strip().lower() for p in (finding or "").split(",") if p.strip()]
    if not parts or all(p in UNREAD for p in parts):
        return None
    if parts == ["no finding"]:
        raw[idx["No Finding"]] = 1.0
        for o in PATHOLOGIES:
            raw[idx[o]] = 0.0
        return raw
    raw[idx["No Finding"]] = 0.0
    for p in parts:
        if p in UNREAD or p == "no finding":
            continue
        for o in NON_PNEUMONIA.get(p, ("Pneumonia", "Lung Opacity")):
            raw[idx[o]] = 1.0
    return raw


def read_covid(csv_path: Path) -> list[StudyRecord]:
    """Frontal images of the collection with a read finding, one study each."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        csv_path = csv_path / "metadata.csv"
    if not csv_path.is_file():
        raise DatasetError(f"COVID-19 collection metadata {csv_path} not found")
    base = csv_path.parent
    out: list[StudyRecord] = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
        need = [c for c in ("view", "finding", "patientid") if c not in cols]
        if need or ("file" not in cols and "filename" not in cols):
            raise DatasetError(
                f"{csv_path}: needs columns file (or filename), view, finding, patientid; "
                f"found {cols}"
            )
        for line, r in enumerate(reader, start=2):
            view = (r.get("view") or "").strip().upper()
            if view not in FRONTAL_VIEWS:
                if view not in LATERAL_VIEWS and view not in ("", "?"):
                    raise DatasetError(f"{csv_path}:{line}: unknown view {r.get('view')!r}")
                continue
            raw = covid_raw(r.get("finding") or "")
            if raw is None:
                continue
            patient = (r.get("patientid") or "").strip()
            if not patient:
                raise DatasetError(f"{csv_path}:{line}: empty patientid")
            rel = (r.get("file") or "").strip()
            path = base / rel if rel else base / "images" / (r.get("filename") or "").strip()
            if not path.is_file():
                raise DatasetError(f"{csv_path}:{line}: image {path} not found")
            out.append(frontal_only("covid", patient, path, raw))
    return out
