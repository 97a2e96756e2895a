"""CheXpert-style study records, uncertainty policies, and readers for CheXpert and MIMIC-CXR-JPG.

Every training source is turned into :class:`StudyRecord`: one study, a frontal image path, an
optional lateral image path and a raw label vector over the 14 CheXpert observations using
CheXpert's own coding (1 positive, 0 negative, -1 uncertain, NaN blank / not mentioned). The
uncertainty policy (:func:`apply_policy`) turns raw labels into a training target and a loss mask,
so blank labels never reach the loss.

The observation names (:mod:`models.labels`) are CheXpert's column names: they describe the
*data format*; the labels a trained model predicts are stored in, and read from, its model card.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import cv2
import numpy as np

from models.labels import OBSERVATIONS, PATHOLOGIES, POLICIES

log = logging.getLogger(__name__)

# Pham et al. 2019 (arXiv:1911.06475): uncertain labels drawn uniformly from these ranges.
LSR_ONES_RANGE = (0.55, 0.85)
LSR_ZEROS_RANGE = (0.0, 0.30)


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class StudyRecord:
    """One study for training or evaluation."""

    key: str  # unique, e.g. "chexpert:patient00001/study1"
    patient: str  # for patient-level splits, e.g. "chexpert:patient00001"
    source: str  # e.g. "chexpert", "mimic", "folder:labels.csv"
    frontal: Path
    lateral: Path | None
    raw: np.ndarray  # float32 (14,), CheXpert coding: 1, 0, -1, NaN (blank)


def frontal_only(source: str, patient: str, path: Path, raw: np.ndarray) -> StudyRecord:
    """A one-image study of a frontal-only source: key ``<source>:<file stem>``, patient
    ``<source>:<patient>``."""
    return StudyRecord(
        key=f"{source}:{path.stem}",
        patient=f"{source}:{patient}",
        source=source,
        frontal=path,
        lateral=None,
        raw=raw,
    )


def csv_rows(
    path: Path, error: type[ValueError] = DatasetError
) -> list[tuple[int, dict[str, str]]]:
    """Every row of a CSV file with its line number; ``error`` when the file is missing or a row
    has the wrong number of fields."""
    if not path.is_file():
        raise error(f"{path}: missing")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        out = []
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise error(f"{path}:{reader.line_num}: wrong number of fields")
            out.append((reader.line_num, row))
    return out


def load_image(path: Path) -> np.ndarray:
    """Read an image file as a 2-D float32 array in [0, 1] (0 = black).

    8- and 16-bit greyscale or colour files are accepted (colour is converted to grey)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"cannot read image {path}: missing file or unsupported format")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return (img.astype(np.float32) / scale).clip(0.0, 1.0)


def parse_label(value: str | None) -> float:
    """CheXpert CSV cell -> 1.0, 0.0, -1.0 or NaN (blank)."""
    v = (value or "").strip()
    if v == "":
        return math.nan
    try:
        f = float(v)
    except ValueError:
        raise DatasetError(f"label value {value!r} is not one of 1, 0, -1 or blank") from None
    if f not in (1.0, 0.0, -1.0):
        raise DatasetError(f"label value {value!r} is not one of 1, 0, -1 or blank")
    return f


def complete_no_finding(raw: np.ndarray) -> np.ndarray:
    """Fill a blank "No Finding" the way the CheXpert labeller defines it.

    The labeller only ever writes No Finding = 1 (no pathology mentioned as positive or
    uncertain) or leaves it blank, so a blank there is not "unmentioned": with a positive
    pathology it is a certain 0, with only uncertain ones it is uncertain (-1). Without this a
    model trained with blanks masked sees No Finding only as positive and learns nothing."""
    out = np.array(raw, dtype=np.float32, copy=True)
    i = OBSERVATIONS.index("No Finding")
    if np.isnan(out[i]):
        path = np.array([out[OBSERVATIONS.index(o)] for o in PATHOLOGIES])
        if np.any(path == 1):
            out[i] = 0.0
        elif np.any(path == -1):
            out[i] = -1.0
    return out


def model1_raw(raw: np.ndarray) -> np.ndarray:
    """Derive Model 1's raw label ("Abnormal" = not No Finding) from a 14-observation raw vector.

    No Finding = 1 -> 0 (normal); No Finding = 0 or any pathology positive -> 1; otherwise any
    pathology uncertain -> -1 (left to the uncertainty policy); otherwise blank (masked)."""
    idx = {o: i for i, o in enumerate(OBSERVATIONS)}
    nf = raw[idx["No Finding"]]
    path = np.array([raw[idx[o]] for o in PATHOLOGIES])
    if nf == 1:
        v = 0.0
    elif nf == 0 or np.any(path == 1):
        v = 1.0
    elif np.any(path == -1):
        v = -1.0
    else:
        v = math.nan
    return np.array([v], dtype=np.float32)


def apply_policy(
    raw: np.ndarray, policy: str, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(target, mask)`` float32 arrays for a raw label vector under an uncertainty policy.

    Blank (NaN) is always masked out. Uncertain (-1): ``u-ignore`` masks it, ``u-zeros`` -> 0,
    ``u-ones`` -> 1, ``lsr-ones`` -> U(0.55, 0.85), ``lsr-zeros`` -> U(0, 0.3) (Pham et al. 2019;
    they also smooth nothing else). ``rng`` draws the smoothed values (seeded by the caller)."""
    if policy not in POLICIES:
        raise ValueError(f"uncertainty policy {policy!r} is not one of {', '.join(POLICIES)}")
    raw = np.asarray(raw, dtype=np.float32)
    blank = np.isnan(raw)
    unc = raw == -1
    target = np.where(blank | unc, 0.0, raw).astype(np.float32)
    mask = (~blank).astype(np.float32)
    if policy == "u-ignore":
        mask[unc] = 0.0
    elif policy == "u-ones":
        target[unc] = 1.0
    elif policy in ("lsr-ones", "lsr-zeros"):
        lo, hi = LSR_ONES_RANGE if policy == "lsr-ones" else LSR_ZEROS_RANGE
        r = rng if rng is not None else np.random.default_rng(0)
        target[unc] = r.uniform(lo, hi, size=int(unc.sum())).astype(np.float32)
    return target, mask


#: the release folder names a CheXpert CSV's paths start with (full and "small" releases)
CHEXPERT_DIRS = ("CheXpert-v1.0", "CheXpert-v1.0-small")
#: CSV of each split; ``test`` falls back to ``valid.csv`` (the official small release's
#: radiologist-labelled validation set) when ``test_labels.csv`` is absent
SPLIT_CSVS = {
    "train": ("train.csv",),
    "valid": ("valid.csv",),
    "test": ("test_labels.csv", "valid.csv"),
}


def _chexpert_base(directory: Path) -> tuple[Path, Path]:
    """(root, release folder): the release folder is ``CheXpert-v1.0`` or ``CheXpert-v1.0-small``
    (CSV paths are relative to the root that holds it, or to the release folder itself)."""
    d = Path(directory)
    for name in CHEXPERT_DIRS:
        if (d / name).is_dir():
            return d, d / name
    if d.name.startswith("CheXpert") and d.is_dir():
        return d.parent, d
    raise DatasetError(
        f"{d} is not a CheXpert folder: expected {d}/CheXpert-v1.0/train.csv or "
        f"{d}/CheXpert-v1.0-small/train.csv (give the folder that holds the release folder, or "
        f"the release folder itself)"
    )


def _chexpert_root(directory: Path) -> Path:
    """The folder that contains the release folder (CSV paths are relative to it)."""
    return _chexpert_base(directory)[0]


def _resolve(root: Path, csv_dir: Path, rel: str) -> Path:
    parts = Path(rel).parts
    tail = Path(*parts[1:]) if len(parts) > 1 and parts[0] in CHEXPERT_DIRS else Path(rel)
    for cand in (root / rel, csv_dir / rel, csv_dir / tail):
        if cand.exists():
            return cand
    return root / rel


@dataclass
class _Study:
    """A study being assembled from its image rows."""

    raw: np.ndarray
    frontal: Path | None = None
    lateral: Path | None = None


def group_views(
    rows: Iterable[tuple[str, str, Path, str, np.ndarray]], source: str
) -> list[StudyRecord]:
    """Group (patient, study, path, view, raw) rows into studies: the first frontal and the first
    lateral of each study. Studies without a frontal image are dropped (the models need one)."""
    studies: dict[tuple[str, str], _Study] = {}
    for patient, study, path, view, raw in rows:
        s = studies.setdefault((patient, study), _Study(raw=raw))
        if is_lateral(view):
            if s.lateral is None:
                s.lateral = path
        else:
            if s.frontal is None:
                s.frontal = path
            s.raw = raw  # the frontal row's labels define the study (CheXpert labels are per study)
    out: list[StudyRecord] = []
    dropped = 0
    for (patient, study), s in sorted(studies.items(), key=lambda kv: kv[0]):
        if s.frontal is None:
            dropped += 1
            continue
        out.append(
            StudyRecord(
                key=f"{source}:{patient}/{study}",
                patient=f"{source}:{patient}",
                source=source,
                frontal=s.frontal,
                lateral=s.lateral,
                raw=s.raw,
            )
        )
    if dropped:
        log.info("%s: %d studies have no frontal image and were skipped", source, dropped)
    return out


@dataclass(frozen=True)
class ViewImage:
    """One image and its view, for the view classifier."""

    path: Path
    patient: str
    source: str
    lateral: bool


def is_lateral(view: str) -> bool:
    v = view.strip().lower()
    return v.startswith("lat") or v in ("ll", "rl")


def view_images(
    rows: Iterable[tuple[str, str, Path, str, np.ndarray]], source: str
) -> list[ViewImage]:
    return [
        ViewImage(path=path, patient=f"{source}:{patient}", source=source, lateral=is_lateral(view))
        for patient, _study, path, view, _raw in rows
    ]


def _chexpert_rows(
    directory: Path, split: str
) -> tuple[list[tuple[str, str, Path, str, np.ndarray]], str]:
    root, base = _chexpert_base(directory)
    names = SPLIT_CSVS.get(split)
    if names is None:
        raise ValueError(f"CheXpert split {split!r} is not one of train, valid, test")
    csv_path = next((base / n for n in names if (base / n).exists()), base / names[0])
    if not csv_path.exists():
        raise DatasetError(f"CheXpert CSV {csv_path} not found (looked for {', '.join(names)})")
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [
            c
            for c in ("Path", "Frontal/Lateral", *OBSERVATIONS)
            if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {missing}")
        for line, r in enumerate(reader, start=2):
            rel = r["Path"]
            parts = Path(rel).parts
            try:
                i = next(k for k, p in enumerate(parts) if p.startswith("patient"))
                patient, study = parts[i], parts[i + 1]
            except (StopIteration, IndexError):
                raise DatasetError(
                    f"{csv_path}:{line}: path {rel!r} has no patientXXXX/studyN part"
                ) from None
            try:
                raw = complete_no_finding(
                    np.array([parse_label(r[o]) for o in OBSERVATIONS], dtype=np.float32)
                )
            except DatasetError as exc:
                raise DatasetError(f"{csv_path}:{line}: {exc}") from None
            path = _resolve(root, base, rel)
            if not path.is_file():
                raise DatasetError(f"{csv_path}:{line}: image {rel!r} not found (looked in {root})")
            rows.append((patient, study, path, r["Frontal/Lateral"], raw))
    return rows, (f"chexpert-{split}" if split != "train" else "chexpert")


def read_chexpert(directory: Path, split: str = "train") -> list[StudyRecord]:
    """Read CheXpert's ``train.csv``/``valid.csv``/``test_labels.csv`` into study records.

    ``split`` is ``train``, ``valid`` or ``test`` (``test_labels.csv``, radiologist labels)."""
    rows, source = _chexpert_rows(directory, split)
    return group_views(rows, source)


def chexpert_view_images(directory: Path, split: str = "train") -> list[ViewImage]:
    """Every image of a CheXpert CSV with its view (for the view classifier)."""
    rows, source = _chexpert_rows(directory, split)
    return view_images(rows, source)


def read_mimic(
    directory: Path,
    *,
    metadata: str = "mimic-cxr-2.0.0-metadata.csv",
    labels: str = "mimic-cxr-2.0.0-chexpert.csv",
) -> list[StudyRecord]:
    """Read MIMIC-CXR-JPG: the metadata CSV (dicom_id, subject_id, study_id, ViewPosition) joined
    with the CheXpert-labeller CSV on (subject_id, study_id); images at
    ``files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg``. Compressed ``.csv.gz`` is
    accepted."""
    d = Path(directory)

    def _open(name: str) -> tuple[Path, Iterable[dict[str, str]]]:
        import gzip

        for cand in (d / name, d / (name + ".gz")):
            if cand.exists():
                fh = (
                    gzip.open(cand, "rt", encoding="utf-8")
                    if cand.suffix == ".gz"
                    else open(cand, encoding="utf-8", newline="")
                )
                return cand, list(csv.DictReader(fh))
        raise DatasetError(
            f"MIMIC-CXR-JPG: {d / name} not found (give the folder that holds it and files/)"
        )

    lab_path, lab_rows = _open(labels)
    lab: dict[tuple[str, str], np.ndarray] = {}
    for line, r in enumerate(lab_rows, start=2):
        try:
            lab[(r["subject_id"], r["study_id"])] = complete_no_finding(
                np.array([parse_label(r.get(o)) for o in OBSERVATIONS], dtype=np.float32)
            )
        except (DatasetError, KeyError) as exc:
            raise DatasetError(f"{lab_path}:{line}: {exc}") from None
    meta_path, meta_rows = _open(metadata)
    rows = []
    for r in meta_rows:
        key = (r["subject_id"], r["study_id"])
        if key not in lab:
            continue
        vp = (r.get("ViewPosition") or "").upper()
        if vp in ("PA", "AP"):
            view = "frontal"
        elif vp in ("LATERAL", "LL", "RL"):
            view = "lateral"
        else:
            continue  # unknown or oblique views are not used
        s = r["subject_id"]
        path = d / "files" / f"p{s[:2]}" / f"p{s}" / f"s{r['study_id']}" / f"{r['dicom_id']}.jpg"
        rows.append((f"p{s}", f"s{r['study_id']}", path, view, lab[key]))
    return group_views(rows, "mimic")


class _HasPatient(Protocol):
    @property
    def patient(self) -> str: ...

    @property
    def source(self) -> str: ...


P = TypeVar("P", bound=_HasPatient)


def patient_split(records: Sequence[P], val_fraction: float, seed: int) -> tuple[list[P], list[P]]:
    """Split records by patient (no patient in both parts), per source, reproducibly from
    ``seed``."""
    by_source: dict[str, list[str]] = {}
    for r in records:
        pats = by_source.setdefault(r.source, [])
        if r.patient not in pats:
            pats.append(r.patient)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for source in sorted(by_source):
        pats = sorted(by_source[source])
        rng.shuffle(pats)
        n_val = int(round(len(pats) * val_fraction))
        if val_fraction > 0 and len(pats) >= 2:
            n_val = max(1, n_val)
        val_patients.update(pats[:n_val])
    train = [r for r in records if r.patient not in val_patients]
    val = [r for r in records if r.patient in val_patients]
    return train, val
