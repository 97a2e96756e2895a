"""Read the data sources named on the command line (``--chexpert-test``, ``--chexpert``,
``--mimic``, ``--nih``, ``--covid``, ``--folder``) into study records or view-labelled images, in
that order; split studies by patient across every source.

Sources overlap: ``chexpert_sample`` holds the same CheXpert patients and studies as
``CheXpert-v1.0-small`` (at another resolution). Records are keyed by their dataset's own ids
(``chexpert:patient00001/study1`` from either folder), so :func:`read_studies` keeps the first
copy of a study and the patient-level split puts a patient on one side whatever folder it came
from.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from models.training.datasets.chexpert import (
    StudyRecord,
    ViewImage,
    chexpert_view_images,
    read_chexpert,
    read_mimic,
)
from models.training.datasets.covid import read_covid
from models.training.datasets.folder import folder_view_images, parse_spec, read_folder
from models.training.datasets.nih import read_nih

log = logging.getLogger(__name__)

T = TypeVar("T")
Sources = Sequence[str | Path]
Reader = Callable[[str | Path], list[T]]


def _read_all(sources: Sequence[tuple[Sources, Reader[T]]]) -> list[T]:
    return [item for given, read in sources for s in given for item in read(s)]


def dedupe(records: Sequence[StudyRecord]) -> list[StudyRecord]:
    """The first record of each study key (the same study read from two folders counts once)."""
    seen: set[str] = set()
    out = []
    for r in records:
        if r.key not in seen:
            seen.add(r.key)
            out.append(r)
    if len(out) < len(records):
        log.info("%d duplicate studies (same key in two sources) dropped", len(records) - len(out))
    return out


def read_studies(
    *,
    chexpert_test: Sources = (),
    chexpert: Sources = (),
    mimic: Sources = (),
    nih: Sources = (),
    covid: Sources = (),
    folder: Sources = (),
) -> list[StudyRecord]:
    """Studies of CheXpert ``test_labels.csv``/``valid.csv`` folders, CheXpert ``train.csv``
    folders, MIMIC-CXR-JPG folders, NIH label CSVs, COVID-19 collection ``metadata.csv`` files and
    ``CSV:DIR[:TEMPLATE]`` folder specs, duplicates (same study key) dropped."""
    return dedupe(
        _read_all(
            [
                (chexpert_test, lambda d: read_chexpert(Path(d), "test")),
                (chexpert, lambda d: read_chexpert(Path(d), "train")),
                (mimic, lambda d: read_mimic(Path(d))),
                (nih, lambda c: read_nih(Path(c))),
                (covid, lambda c: read_covid(Path(c))),
                (folder, lambda spec: read_folder(*parse_spec(str(spec)))),
            ]
        )
    )


def studies_from_args(args: argparse.Namespace, *, with_test: bool = False) -> list[StudyRecord]:
    """:func:`read_studies` of a CLI's source options (``--chexpert``, ``--mimic``, ``--nih``,
    ``--covid``, ``--folder`` and, with ``with_test``, ``--chexpert-test``)."""

    def given(name: str) -> Sources:
        return getattr(args, name, None) or []

    return read_studies(
        chexpert_test=given("chexpert_test") if with_test else (),
        chexpert=given("chexpert"),
        mimic=given("mimic"),
        nih=given("nih"),
        covid=given("covid"),
        folder=given("folder"),
    )


def read_view_images(
    *, chexpert_test: Sources = (), chexpert: Sources = (), folder: Sources = ()
) -> list[ViewImage]:
    """Every image (with its view) of CheXpert test and train folders and folder specs."""
    return _read_all(
        [
            (chexpert_test, lambda d: chexpert_view_images(Path(d), "test")),
            (chexpert, lambda d: chexpert_view_images(Path(d), "train")),
            (folder, lambda spec: folder_view_images(*parse_spec(str(spec)))),
        ]
    )


def as_items(images: Sequence[ViewImage]) -> list[tuple[Path, int]]:
    """(path, 1 for lateral / 0 for frontal) of each image."""
    return [(im.path, int(im.lateral)) for im in images]


SPLITS = ("train", "val", "test")


def patient_bucket(patient: str, seed: int) -> float:
    """A patient's place in [0, 1), from a hash of the seed and the patient key: the same patient
    always lands in the same split, whichever source or model reads it."""
    h = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_of(patient: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """``train``, ``val`` (calibration and thresholds) or ``test`` (reported) for a patient."""
    u = patient_bucket(patient, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def patient_split3(
    records: Sequence[StudyRecord], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[StudyRecord]]:
    """Patient-level train / val / test split over all sources together (see :func:`split_of`).
    Fractions are of patients, in expectation per source."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"validation {val_fraction} and test {test_fraction} fractions must be >= 0 and "
            f"leave some training data"
        )
    out: dict[str, list[StudyRecord]] = {s: [] for s in SPLITS}
    for r in records:
        out[split_of(r.patient, val_fraction, test_fraction, seed)].append(r)
    return out
