"""What every object this node derives from a source image shares (the report and the key image).

- **deterministic UIDs** (:func:`deterministic_uid`, :func:`report_uid`, :func:`report_series_uid`,
  :func:`key_image_series_uid`): the same analysis always yields the same UIDs, so a resend never
  creates a second document;
- a **PHI-safe copy of the source header** (:func:`source_header`) and a repair of the copied
  values that break their VR (:func:`sanitize_copied_attributes`); neither logs a value;
- the refusal to mix patients or studies (:func:`check_same_patient_and_study`);
- the one **atomic write** (:func:`atomic_write`): a reader never sees half a file;
- the small records both objects are built from: :class:`FindingResult`, :class:`AlgorithmInfo`,
  :class:`DeviceInfo`, :class:`CropInfo`, :class:`MaskQualityInfo`, :class:`CtrInfo`;
- the one definition of a finding's **hot region** (:func:`hot_region`): the box around the
  strongest area of its heat map, which the report marks and the key image outlines.
"""

from __future__ import annotations

import copy
import logging
import math
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import cv2
import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

log = logging.getLogger(__name__)

#: Namespace of this project's name-based UUIDs (a fixed, random UUID; never change it).
_UID_NAMESPACE = uuid.UUID("8f4c1e0a-3b7d-5c21-9a6e-2f1d0c4b7a93")

#: Type 2 patient/study attributes highdicom reads from a source: present (maybe empty) in a copy.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_KEEP_AS_IS = frozenset(
    {
        "PatientID",
        "IssuerOfPatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
    }
)


# --- checks shared by the records ---------------------------------------------------------------


def require_str(value: object, what: str) -> str:
    """``value`` when it is a ``str``; else ``TypeError`` naming ``what``."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__} {value!r}")
    return value


def require_probability(value: object, what: str) -> float:
    """``value`` as a float in [0, 1]; ``TypeError`` for a non-number, ``ValueError`` outside."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{what} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise ValueError(
            f"{what} = {value!r} is not a probability in [0, 1]; pass the model's sigmoid output "
            "(not a logit or a percentage)"
        )
    return v


def require_number(value: object, what: str) -> float:
    """``value`` as a float; ``TypeError`` for a non-number or NaN."""
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def require_str_fields(record: object, *attrs: str) -> None:
    """``TypeError`` naming the first of ``record``'s ``attrs`` that is not a ``str``."""
    for attr in attrs:
        require_str(getattr(record, attr), f"{type(record).__name__}.{attr}")


def require_int(value: object, what: str, *, minimum: int = 0) -> int:
    """``value`` as an int of at least ``minimum``; ``TypeError``/``ValueError`` saying which."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{what} = {value!r} must be at least {minimum}")
    return int(value)


# --- shared records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FindingResult:
    """One model output: the probability of ``label`` and the model card's threshold for it."""

    label: str
    probability: float
    threshold: float
    threshold_validated: bool = True  # False: no or too few held-out cases set it

    def __post_init__(self) -> None:
        if not require_str(self.label, "FindingResult.label").strip():
            raise ValueError("FindingResult.label is empty: name the model card's label")
        require_probability(self.probability, f"{self.label} probability")
        require_probability(self.threshold, f"{self.label} threshold")

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold

    @property
    def threshold_text(self) -> str:
        """``threshold 0.97``, with ``, unvalidated`` after it where no held-out data could set
        it: the wording the SR summary and the key image share."""
        text = f"threshold {self.threshold:.2f}"
        return text if self.threshold_validated else text + ", unvalidated"


@dataclass(frozen=True)
class AlgorithmInfo:
    """A model's identity, for TID 4019 Algorithm Identification."""

    name: str
    version: str
    sha256: str
    architecture: str = ""

    def __post_init__(self) -> None:
        require_str_fields(self, "name", "version", "sha256", "architecture")

    @property
    def key(self) -> str:
        """What identifies the model in derived UIDs: name, version and weights."""
        return f"{self.name}|{self.version}|{self.sha256}"


@dataclass(frozen=True)
class CropInfo:
    """The lung crop in frontal-image pixels: rows [y0, y1), columns [x0, x1)."""

    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = (
            require_int(getattr(self, a), f"CropInfo.{a}") for a in "x0 y0 x1 y1".split()
        )
        if x1 < x0 or y1 < y0:
            raise ValueError(
                f"CropInfo x0={x0} y0={y0} x1={x1} y1={y1}: x1/y1 must not be left of/above x0/y0"
            )


@dataclass(frozen=True)
class MaskQualityInfo:
    """Plausibility of the lung mask; ``ok`` False means the full image was analysed.

    ``rule`` names the first check that failed (e.g. ``touches_border``), ``reason`` says it in
    words; both are empty when the mask is acceptable and never hold patient data."""

    area_fraction: float
    components: int
    left_right_balance: float
    ok: bool
    reason: str = ""
    rule: str = ""

    def __post_init__(self) -> None:
        require_number(self.area_fraction, "MaskQualityInfo.area_fraction")
        require_number(self.left_right_balance, "MaskQualityInfo.left_right_balance")
        require_int(self.components, "MaskQualityInfo.components")
        require_str_fields(self, "reason", "rule")

    @property
    def state(self) -> str:
        """``acceptable`` or ``REJECTED (<rule>: <reason>)``, as the report and key image say it."""
        if self.ok:
            return "acceptable"
        rule, reason = self.rule.strip(), self.reason.strip()
        if rule and reason.startswith(rule):  # the reason already names its check
            rule = ""
        why = ": ".join(x for x in (rule, reason) if x) or "no reason given"
        return f"REJECTED ({why})"


@dataclass(frozen=True)
class LineInfo:
    """A segment in frontal-image pixel coordinates (column x, row y)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        for a in ("x0", "y0", "x1", "y1"):
            if not math.isfinite(require_number(getattr(self, a), f"LineInfo.{a}")):
                raise ValueError(f"LineInfo.{a} = {getattr(self, a)!r} is not finite")

    @property
    def length(self) -> float:
        return float(math.hypot(self.x1 - self.x0, self.y1 - self.y0))


@dataclass(frozen=True)
class CtrInfo:
    """The cardiothoracic ratio and the two widths it was measured from.

    ``interpretable`` False (AP film, rejected lung mask) means the ratio must not be read: the
    report and key image then say ``reason`` instead of drawing the lines."""

    ratio: float
    cardiac: LineInfo
    thoracic: LineInfo
    interpretable: bool = True
    reason: str = ""

    def __post_init__(self) -> None:
        r = require_number(self.ratio, "CtrInfo.ratio")
        if not (math.isfinite(r) and r >= 0):
            raise ValueError(f"CtrInfo.ratio = {self.ratio!r} is not a ratio (>= 0)")
        for a in ("cardiac", "thoracic"):
            if not isinstance(getattr(self, a), LineInfo):
                raise TypeError(f"CtrInfo.{a} must be a LineInfo, got {type(getattr(self, a))}")
        require_str_fields(self, "reason")

    @property
    def shown(self) -> bool:
        """Whether the lines and the ratio are reported (the measurement is interpretable)."""
        return bool(self.interpretable) and self.thoracic.length > 0


@dataclass(frozen=True)
class DeviceInfo:
    """The worker as the observer device and equipment of what it derives."""

    name: str = "cxr-pacs-worker"
    version: str = "0.1.0"
    ae_title: str = "CXR_WORKER"
    manufacturer: str = "cxr-pacs-worker project"

    def __post_init__(self) -> None:
        require_str_fields(self, "name", "version", "ae_title", "manufacturer")

    @property
    def uid(self) -> str:
        """A stable Device Observer UID for this worker identity."""
        return deterministic_uid("cxr-device", self.name, self.ae_title)


#: a heat map's hot region: where it reaches this fraction of its maximum
HOT_LEVEL = 0.8


def hot_region(
    heatmap: np.ndarray, shape: tuple[int, int], level: float = HOT_LEVEL
) -> CropInfo | None:
    """The box, in pixels of an image of ``shape`` (rows, columns), around the largest connected
    area where ``heatmap`` (any resolution, values >= 0) reaches ``level`` of its maximum.

    ``None`` when the map is empty, flat or not finite: the caller falls back to the lung box.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2 or heat.size == 0 or not np.isfinite(heat).all():
        return None
    top, low = float(heat.max()), float(heat.min())
    if top <= 0 or top - low < 1e-6:
        return None
    hot = (heat >= low + level * (top - low)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(hot, connectivity=8)
    if count < 2:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[best, :4])
    rows, cols = shape
    sy, sx = rows / heat.shape[0], cols / heat.shape[1]
    x0, y0 = int(math.floor(x * sx)), int(math.floor(y * sy))
    x1, y1 = int(math.ceil((x + w) * sx)), int(math.ceil((y + h) * sy))
    return CropInfo(max(0, x0), max(0, y0), min(cols, max(x1, x0 + 1)), min(rows, max(y1, y0 + 1)))


# --- UIDs ---------------------------------------------------------------------------------------


def deterministic_uid(*parts: str) -> str:
    """A UID that is a function of ``parts``: ``2.25.`` + a name-based (version 5) UUID.

    ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores its entropy and returns a
    random UID, and a prefixed one is not a valid ``2.25`` UUID-derived UID; so the UUID is made
    here, as ISO/IEC 9834-8 describes.
    """
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def report_uid(sources: Sequence[Dataset | str], algorithms: Sequence[AlgorithmInfo]) -> str:
    """The SOP Instance UID of the report on ``sources`` by ``algorithms`` (order-independent)."""
    uids = sorted({str(s.SOPInstanceUID) if isinstance(s, Dataset) else str(s) for s in sources})
    algos = sorted(a.key for a in algorithms)
    return deterministic_uid("cxr-sr-v1", *uids, "--", *algos)


def report_series_uid(study_instance_uid: str, device: DeviceInfo) -> str:
    """One series per study and worker for all its reports, so re-analyses stay together."""
    return deterministic_uid("cxr-sr-series", study_instance_uid, device.name, device.ae_title)


def key_image_series_uid(study_instance_uid: str, device: DeviceInfo) -> str:
    """One series per study and worker for all its key images."""
    return deterministic_uid("cxr-key-series", study_instance_uid, device.name, device.ae_title)


# --- identity and header copies -----------------------------------------------------------------


#: The attributes a report's images must agree on (after :func:`patient_identity`'s
#: normalisation) before one report may weigh them together.
IDENTITY_KEYWORDS = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
)


class IdentityUnreadable(ValueError):
    """An identity attribute cannot be decoded (wrong VR, bad bytes); the message names the
    keyword, never the value."""


def _norm(keyword: str, value: object) -> str:
    text = str(value if value is not None else "")
    if keyword == "PatientName":
        # case, runs of spaces and trailing "^" padding do not make another person
        groups = []
        for group in text.split("="):
            parts = [" ".join(p.split()).upper() for p in group.split("^")]
            while parts and not parts[-1]:
                parts.pop()
            groups.append("^".join(parts))
        while groups and not groups[-1]:
            groups.pop()
        return "=".join(groups)
    return " ".join(text.split()).upper()


def patient_identity(ds: Dataset) -> tuple[str, ...]:
    """The normalised values of :data:`IDENTITY_KEYWORDS`, in that order; raises
    :class:`IdentityUnreadable` naming the attribute that cannot be decoded."""
    out = []
    for kw in IDENTITY_KEYWORDS:
        try:
            value = ds.get(kw, "")
            if value is not None and not isinstance(value, (str, bytes)) and kw != "PatientName":
                raise TypeError(type(value).__name__)
            out.append(_norm(kw, value))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types; never show text
            raise IdentityUnreadable(
                f"{kw} cannot be decoded ({type(exc).__name__}); the image is not analysed"
            ) from None
    return tuple(out)


def check_same_patient_and_study(datasets: Sequence[Dataset]) -> None:
    """Raise ``ValueError`` unless every dataset has the same patient identity
    (:data:`IDENTITY_KEYWORDS`, normalised) and study: the last line before a report is built.

    The message names SOP Instance UIDs and which attribute differs, never the values (PHI).
    """
    if not datasets:
        raise ValueError("no source images: a report needs at least the frontal image")
    first = datasets[0]
    for kw in ("PatientID", "StudyInstanceUID"):
        if not str(first.get(kw, "") or "").strip():
            raise ValueError(
                f"source image {first.get('SOPInstanceUID', '?')} has no {kw}: refusing to write a "
                "report that cannot be filed to a patient and study"
            )
    ref = patient_identity(first)
    for ds in datasets[1:]:
        other = patient_identity(ds)
        for kw, a, b in zip(IDENTITY_KEYWORDS, ref, other, strict=True):
            if a != b:
                raise ValueError(
                    f"source images {first.get('SOPInstanceUID', '?')} and "
                    f"{ds.get('SOPInstanceUID', '?')} have different {kw}: refusing to write one "
                    "report over two patients; check the study's instances"
                )
        if (
            str(first.get("StudyInstanceUID", "")).strip()
            != str(ds.get("StudyInstanceUID", "")).strip()
        ):
            raise ValueError(
                f"source images {first.get('SOPInstanceUID', '?')} and "
                f"{ds.get('SOPInstanceUID', '?')} have different StudyInstanceUID: refusing to "
                "write one report over two studies; check the study's instances"
            )


def source_header(ds: Dataset) -> Dataset:
    """A header-only copy with every type 2 patient/study attribute highdicom reads present."""
    out = Dataset()
    for elem in ds:
        if (
            elem.keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
            or elem.tag.group == 0x7FE0
        ):
            continue
        out.add(copy.deepcopy(elem))
    for kw in TYPE2_PATIENT_STUDY:
        if kw not in out:
            setattr(out, kw, "")
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    return out


def sanitize_copied_attributes(derived: Dataset) -> None:
    """Repair or drop copied top-level values that break their VR (a source's ``PatientAge`` of
    ``62`` instead of ``062Y``), so a sloppy modality cannot make our object invalid.

    Identity attributes are never touched; type 2 attributes are emptied, others removed. The log
    names the attribute only (the value may be PHI).
    """
    for elem in list(derived):
        if elem.VR == "SQ" or elem.keyword in _KEEP_AS_IS or elem.value in (None, ""):
            continue
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        try:
            for v in values:
                if isinstance(v, str | bytes):  # numbers and person names were parsed already
                    validate_value(elem.VR, v, pydicom_config.RAISE)
            continue
        except ValueError:
            pass
        text = str(elem.value).strip()
        if elem.VR == "AS" and text.isdigit() and len(text) <= 3:
            elem.value = f"{int(text):03d}Y"
            action = "repaired as years"
        elif elem.keyword in TYPE2_PATIENT_STUDY:
            elem.value = ""
            action = "emptied"
        else:
            del derived[elem.tag]
            action = "dropped"
        log.warning(
            "report %s: source attribute %s had an invalid %s value; %s",
            derived.get("SOPInstanceUID", "?"),
            elem.keyword or elem.tag,
            elem.VR,
            action,
        )


@contextmanager
def no_person_name_warnings() -> Iterator[None]:
    """Silence highdicom's person-name format warning, which quotes the patient's name (PHI)
    into warnings and logs. Local to the calls that copy patient data; nothing global."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The string .* unlikely to represent the intended person name"
        )
        yield


# --- files --------------------------------------------------------------------------------------


def atomic_write(content: Dataset | bytes, path: str | Path) -> Path:
    """Write ``content`` to ``path`` through a temporary file and a rename: a reader sees the old
    file or the whole new one, never half a file. A dataset is written as DICOM Part 10."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, Dataset):
        content.save_as(tmp, enforce_file_format=True)
    else:
        tmp.write_bytes(content)
    tmp.replace(path)
    return path
