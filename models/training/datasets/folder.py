"""A plain folder of images with a CSV of labels, for a site's local data.

The CSV has a file column (``file`` or ``path``; or any column through a file template such as
``CXR_png/{id}.png``), a label column (``label``, ``labels`` or ``finding``), and optionally
``view`` (frontal/lateral, AP/PA/LL...) and ``patient`` (for patient-level splits; one patient
per row when absent) and ``study`` (rows of one study are grouped into frontal + lateral).

A label cell is one or more findings separated by ``|`` or ``;``. Findings are mapped onto the 14
CheXpert observations by name (case-insensitive, with a few common aliases). Normal words
(``No Finding``, ``none``, ``normal``, ``0``) make the study normal: No Finding = 1 and the other
pathologies 0. Known findings are positive and set No Finding = 0; other observations stay blank
(not mentioned, masked out of the loss). Findings outside the 14 (e.g. COVID-19, Tuberculosis)
still make the study abnormal (No Finding = 0) without inventing an observation. ``Inconclusive``,
``uncertain`` or an empty cell leaves the study unlabelled.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np

from models.labels import OBSERVATIONS, PATHOLOGIES
from models.training.datasets.chexpert import (
    DatasetError,
    StudyRecord,
    ViewImage,
    group_views,
    view_images,
)

NORMAL_WORDS = {"no finding", "none", "normal", "0", "negative", "healthy"}
UNKNOWN_WORDS = {"", "inconclusive", "uncertain", "unknown", "?"}
ALIASES = {
    "effusion": "Pleural Effusion",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "abnormal": None,
    "1": None,
    "opacity": "Lung Opacity",
    "enlarged cardiomediastinum": "Enlarged Cardiomediastinum",
}


def parse_findings(cell: str) -> np.ndarray:
    """Map a label cell to a raw 14-observation vector (CheXpert coding, NaN = blank)."""
    raw = np.full(len(OBSERVATIONS), math.nan, dtype=np.float32)
    idx = {o.lower(): i for i, o in enumerate(OBSERVATIONS)}
    tokens = [t.strip().lower() for t in re.split(r"[|;]", cell or "")]
    tokens = [t for t in tokens if t not in UNKNOWN_WORDS]
    if not tokens:
        return raw
    if all(t in NORMAL_WORDS for t in tokens):
        raw[idx["no finding"]] = 1.0
        for p in PATHOLOGIES:
            raw[idx[p.lower()]] = 0.0
        return raw
    raw[idx["no finding"]] = 0.0
    for t in tokens:
        if t in NORMAL_WORDS:
            continue
        name = ALIASES.get(t, t)
        if name is not None and name.lower() in idx:
            raw[idx[name.lower()]] = 1.0
    return raw


def parse_spec(spec: str) -> tuple[Path, Path, str | None]:
    """``CSV:DIR[:TEMPLATE]`` -> (csv path, image folder, file template or None)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ValueError(
            f"--folder {spec!r}: expected CSV:DIR or CSV:DIR:TEMPLATE, e.g. "
            f"labels.csv:images or jsrt/labels.csv:jsrt:CXR_png/{{id}}.png"
        )
    return Path(parts[0]), Path(parts[1]), (parts[2] if len(parts) == 3 else None)


def read_folder(
    csv_path: Path, image_dir: Path, file_template: str | None = None, *, source: str | None = None
) -> list[StudyRecord]:
    """Read a folder + CSV into study records (see the module docstring for the CSV layout)."""
    rows, src = _folder_rows(csv_path, image_dir, file_template, source)
    return group_views(rows, src)


def folder_view_images(
    csv_path: Path, image_dir: Path, file_template: str | None = None, *, source: str | None = None
) -> list[ViewImage]:
    """Every image of a folder CSV with its view (``view`` column; frontal when absent)."""
    rows, src = _folder_rows(csv_path, image_dir, file_template, source)
    return view_images(rows, src)


def _folder_rows(
    csv_path: Path, image_dir: Path, file_template: str | None, source: str | None
) -> tuple[list[tuple[str, str, Path, str, np.ndarray]], str]:
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    if not csv_path.exists():
        raise DatasetError(f"label CSV {csv_path} not found")
    src = source or f"folder:{csv_path.parent.name}/{csv_path.name}"
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        file_col = next((c for c in ("file", "path", "filename") if c in cols), None)
        label_col = next((c for c in ("label", "labels", "finding", "findings") if c in cols), None)
        if label_col is None or (file_col is None and file_template is None):
            raise DatasetError(
                f"{csv_path}: needs a file column (file/path) or a file template, and a label "
                f"column (label/labels/finding); found columns {cols}"
            )
        rows = []
        for line, r in enumerate(reader, start=2):
            try:
                rel = file_template.format(**r) if file_template else r[file_col]
            except KeyError as exc:
                raise DatasetError(
                    f"{csv_path}:{line}: file template names unknown column {exc}"
                ) from None
            path = image_dir / rel
            if not path.is_file():
                raise DatasetError(f"{csv_path}:{line}: image {path} not found")
            name = Path(rel).stem
            patient = (r.get("patient") or "").strip() or name
            study = (r.get("study") or "").strip() or name
            view = (r.get("view") or "frontal").strip()
            if view.upper() in ("AP", "PA", "FRONTAL", ""):
                view = "frontal"
            rows.append((patient, study, path, view, parse_findings(r[label_col])))
    return rows, src
