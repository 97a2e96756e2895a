"""The public inference contract of :mod:`models`, used by the worker pipeline.

Images cross this boundary as 2-D ``float32`` numpy arrays in [0, 1], 0 = black, already decoded
and windowed (MONOCHROME1 inverted) by :mod:`dicom_node.pixels`, at their original resolution.
Grad-CAM maps come back small: uint8 at the network's input resolution with the box they cover
(:class:`Heatmap`). Nothing here knows about DICOM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class MaskQuality:
    """Plausibility checks of a lung mask. ``ok`` is False when the crop fell back to the full
    image."""

    area_fraction: float
    components: int
    left_right_balance: float  # smaller lung area / larger lung area, 0..1
    ok: bool
    reason: str = ""  # why the mask was rejected, empty when ok (no patient data)
    rule: str = ""  # the name of the first failing check (e.g. "touches_border"), empty when ok


@dataclass(frozen=True)
class CropBox:
    """Pixel box in the original image: rows [y0, y1), columns [x0, x1)."""

    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class LungMaskResult:
    mask: np.ndarray  # uint8 0/1 at the original resolution
    crop: CropBox  # lungs' bounding box + margin, or the full image when quality.ok is False
    quality: MaskQuality


@dataclass(frozen=True)
class LineSegment:
    """A segment in frontal-image pixel coordinates (column x, row y), original resolution."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def length(self) -> float:
        return float(np.hypot(self.x1 - self.x0, self.y1 - self.y0))


@dataclass(frozen=True)
class CardiothoracicRatio:
    """The cardiothoracic ratio measured on the lung mask: widest cardiac span between the lungs'
    medial borders (``cardiac``) over the widest inner thoracic span (``thoracic``).

    ``interpretable`` is False where the ratio must not be read (AP films, failed mask quality);
    ``reason`` then says why (no patient data)."""

    ratio: float
    cardiac: LineSegment
    thoracic: LineSegment
    interpretable: bool = True
    reason: str = ""


class ModelKind(StrEnum):
    """The role a model plays in the analysis (which slot of the Analyzer its card sits in)."""

    LUNG_MASK = "lung_mask"
    MODEL1 = "model1"
    MODEL2 = "model2"
    VIEW = "view"


@dataclass(frozen=True)
class ModelInfo:
    """What the Structured Report's Algorithm Identification needs about one model."""

    name: str
    version: str
    sha256: str
    architecture: str
    kind: ModelKind


@dataclass(frozen=True)
class Finding:
    label: str  # one of the model card's labels (the 14 CheXpert observations for Model 2)
    probability: float
    threshold: float
    threshold_validated: bool = True  # False: no or too few held-out cases set it

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class StudyInput:
    """One study to analyse: a frontal image and, when the study has one, a lateral image."""

    key: str  # caller's identifier, echoed back (e.g. the study's queue id)
    frontal: np.ndarray
    lateral: np.ndarray | None = None
    projection: str | None = None  # the frontal's projection when known: "PA" or "AP"


@dataclass(frozen=True)
class Heatmap:
    """A finding's Grad-CAM map as the model made it, kept small until it is drawn.

    ``values`` is uint8 (rows, cols) at the network's input resolution (e.g. 320 x 320, 100 KB;
    a float32 copy in a 2k frontal's frame would be ~16 MB): 0 is the map's minimum, 255 its
    maximum (all 0 when flat). It lies stretched over ``box`` of the original frontal image (the
    lung crop, or the whole image for a model trained on full images) and is zero outside it."""

    values: np.ndarray
    box: CropBox

    def __post_init__(self) -> None:
        v = self.values
        if not isinstance(v, np.ndarray) or v.dtype != np.uint8 or v.ndim != 2 or 0 in v.shape:
            got = f"{v.dtype} {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
            raise TypeError(f"Heatmap.values must be a non-empty 2-D uint8 array, got {got}")
        b = self.box
        if b.x1 <= b.x0 or b.y1 <= b.y0:
            raise ValueError(f"Heatmap.box {b} is empty")


@dataclass
class StudyAnalysis:
    key: str
    lung_mask: LungMaskResult
    model1: Finding  # label "Abnormal": probability that the study is not "No Finding"
    model2: list[Finding]  # in the model card's label order; labels the model lacks are absent
    models: list[ModelInfo]
    used_lateral: bool
    # label -> its Grad-CAM map (uint8, model resolution, placed by its box): Present findings
    heatmaps: dict[str, Heatmap] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    ctr: CardiothoracicRatio | None = None  # None when the models do not measure it


@dataclass(frozen=True)
class ViewPrediction:
    view: str  # "frontal" or "lateral"
    probability: float  # probability of the predicted view


class StudyAnalyzer(Protocol):
    """What the worker needs from the models (implemented by :class:`models.analyzer.Analyzer`).

    ``analyse`` returns one entry per study, in order: its analysis, or the exception that stopped
    that study alone."""

    def analyse(self, studies: Sequence[StudyInput]) -> list[StudyAnalysis | Exception]: ...

    def classify_views(self, images: Sequence[np.ndarray]) -> list[ViewPrediction]: ...

    def model_infos(self) -> list[ModelInfo]: ...
