"""NIH ChestX-ray14 (``Data_Entry_2017.csv`` or a ``labels.csv`` in the same spirit) as study
records over the 14 CheXpert observations.

Accepted columns: the image (``file`` relative to the CSV's folder, else ``Image Index`` /
``image_index`` looked up under ``images/`` and the folder itself), the findings (``Finding
Labels`` / ``finding_labels``, NIH's labels joined with ``|`` or ``No Finding``), the patient
(``Patient ID`` / ``patient_id``) and optionally the view (``View Position`` / ``view``; only PA
and AP frontals are read, other views are skipped).

Mapping (Wang et al. 2017 labels -> CheXpert observations, where the meaning matches):

* Cardiomegaly, Edema, Consolidation, Pneumonia, Atelectasis, Pneumothorax -> the same name;
  Effusion -> Pleural Effusion; Mass, Nodule -> Lung Lesion; Pleural_Thickening -> Pleural
  Other (roughly);
* Lung Opacity is 1 with Infiltration (roughly) or any of its CheXpert children (Edema,
  Consolidation, Pneumonia, Atelectasis, Lung Lesion), else 0;
* Fibrosis, Emphysema, Hernia have no CheXpert observation: they only make the study abnormal;
* NIH labels every one of its 14 findings in every image, so a mapped observation not listed is
  a negative (0) and No Finding is 1 exactly when the cell is ``No Finding``;
* Enlarged Cardiomediastinum, Fracture and Support Devices are **not labelled** by NIH: they stay
  blank (NaN) and are masked out of the loss and the evaluation, never called negative.

A row with an unknown finding, a missing column value or a missing image file is an error naming
the CSV and its line.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from models.labels import OBSERVATIONS
from models.training.datasets.chexpert import DatasetError, StudyRecord, frontal_only

#: NIH finding -> CheXpert observation (None: abnormal, but no matching observation)
NIH_TO_CHEXPERT: dict[str, str | None] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Emphysema": None,
    "Fibrosis": None,
    "Hernia": None,
    "Infiltration": "Lung Opacity",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pleural_Thickening": "Pleural Other",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
#: CheXpert observations NIH does not label: always blank (masked)
NIH_UNLABELLED: tuple[str, ...] = ("Enlarged Cardiomediastinum", "Fracture", "Support Devices")
#: children of Lung Opacity in CheXpert's label hierarchy
OPACITY_CHILDREN: tuple[str, ...] = (
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Lung Lesion",
)

_COLUMNS = {
    "file": ("file", "path"),
    "index": ("Image Index", "image_index"),
    "findings": ("Finding Labels", "finding_labels"),
    "patient": ("Patient ID", "patient_id"),
    "view": ("View Position", "view"),
}


def nih_raw(cell: str) -> np.ndarray:
    """NIH findings cell -> raw 14-observation vector (1/0, NaN for what NIH does not label).

    Raises :class:`DatasetError` on an empty cell or an unknown finding."""
    tokens = [t.strip() for t in (cell or "").split("|") if t.strip()]
    if not tokens:
        raise DatasetError("empty finding labels")
    idx = {o: i for i, o in enumerate(OBSERVATIONS)}
    raw = np.zeros(len(OBSERVATIONS), dtype=np.float32)
    for o in NIH_UNLABELLED:
        raw[idx[o]] = math.nan
    if tokens == ["No Finding"]:
        raw[idx["No Finding"]] = 1.0
        return raw
    for t in tokens:
        if t not in NIH_TO_CHEXPERT:
            raise DatasetError(
                f"finding {t!r} is not an NIH ChestX-ray14 label ({', '.join(NIH_TO_CHEXPERT)} "
                f"or 'No Finding' alone)"
            )
        obs = NIH_TO_CHEXPERT[t]
        if obs is not None:
            raw[idx[obs]] = 1.0
    if any(raw[idx[o]] == 1 for o in OPACITY_CHILDREN):
        raw[idx["Lung Opacity"]] = 1.0
    raw[idx["No Finding"]] = 0.0
    return raw


def _column(cols: list[str], what: str) -> str | None:
    return next((c for c in _COLUMNS[what] if c in cols), None)


def read_nih(csv_path: Path, image_dir: Path | None = None) -> list[StudyRecord]:
    """NIH ChestX-ray14 frontals as study records (one image = one study, frontal only).

    ``image_dir`` defaults to the CSV's folder. Patients are keyed ``nih:<patient id>`` so the
    same patient from another NIH-derived folder lands on the same side of a split."""
    csv_path = Path(csv_path)
    base = Path(image_dir) if image_dir is not None else csv_path.parent
    if not csv_path.is_file():
        raise DatasetError(f"NIH label CSV {csv_path} not found")
    out: list[StudyRecord] = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
        file_col, index_col = _column(cols, "file"), _column(cols, "index")
        find_col, pat_col = _column(cols, "findings"), _column(cols, "patient")
        view_col = _column(cols, "view")
        if find_col is None or pat_col is None or (file_col is None and index_col is None):
            raise DatasetError(
                f"{csv_path}: needs an image column (file or 'Image Index'), 'Finding Labels' "
                f"and 'Patient ID' (or finding_labels, patient_id); found columns {cols}"
            )
        for line, r in enumerate(reader, start=2):
            view = (r.get(view_col) or "").strip().upper() if view_col else "PA"
            if view not in ("PA", "AP"):
                continue
            try:
                raw = nih_raw(r.get(find_col) or "")
            except DatasetError as exc:
                raise DatasetError(f"{csv_path}:{line}: {exc}") from None
            patient = (r.get(pat_col) or "").strip()
            if not patient:
                raise DatasetError(f"{csv_path}:{line}: empty patient id")
            patient = str(int(patient)) if patient.isdigit() else patient
            if file_col is not None and (r.get(file_col) or "").strip():
                cands = [base / r[file_col].strip()]
            elif index_col is not None and (r.get(index_col) or "").strip():
                name = r[index_col].strip()
                cands = [base / "images" / name, base / name]
            else:
                raise DatasetError(f"{csv_path}:{line}: no image file named")
            path = next((c for c in cands if c.is_file()), None)
            if path is None:
                raise DatasetError(f"{csv_path}:{line}: image {cands[0]} not found")
            out.append(frontal_only("nih", patient, path, raw))
    return out
