"""Read the data sources named on the command line (``--chexpert-test``, ``--chexpert``,
``--mimic``, ``--folder``) into study records or view-labelled images, in that order."""

from __future__ import annotations

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
from models.training.datasets.folder import folder_view_images, parse_spec, read_folder

T = TypeVar("T")
Sources = Sequence[str | Path]
Reader = Callable[[str | Path], list[T]]


def _read_all(sources: Sequence[tuple[Sources, Reader[T]]]) -> list[T]:
    return [item for given, read in sources for s in given for item in read(s)]


def read_studies(
    *,
    chexpert_test: Sources = (),
    chexpert: Sources = (),
    mimic: Sources = (),
    folder: Sources = (),
) -> list[StudyRecord]:
    """Studies of CheXpert ``test_labels.csv`` folders, CheXpert ``train.csv`` folders,
    MIMIC-CXR-JPG folders and ``CSV:DIR[:TEMPLATE]`` folder specs."""
    return _read_all(
        [
            (chexpert_test, lambda d: read_chexpert(Path(d), "test")),
            (chexpert, lambda d: read_chexpert(Path(d), "train")),
            (mimic, lambda d: read_mimic(Path(d))),
            (folder, lambda spec: read_folder(*parse_spec(str(spec)))),
        ]
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
