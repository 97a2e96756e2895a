"""Which view is this radiograph? Rules over the DICOM header, strongest evidence first.

:func:`view_from_headers` tries, in order, and returns the first attribute that decides:

1. **View Position** (0018,5101): ``PA``, ``AP`` -> frontal; ``LL``, ``RL``, ``LATERAL``, ``LAT``,
   ``LARGE LATERAL`` -> lateral; ``LLD``/``RLD`` (lateral decubitus: a horizontal-beam *frontal*
   projection with the patient lying on a side) -> frontal with projection ``LLD``/``RLD``, ranked
   below PA and AP by :func:`pick_pair`; obliques (``LAO``, ``RPO``...) -> a decided ``None``.
2. **View Code Sequence** (0054,0220): CID 4010 SNOMED CT codes and their retired SNOMED RT forms
   (``SRT``/``SNM3`` ``R-10214`` postero-anterior, ...), then the code meaning as text.
3. **Patient Orientation** (0020,0020): the row and column directions of the displayed image. A
   frontal chest is displayed with the patient's left-right across the rows (``L\\F`` or ``R\\F``),
   a lateral with anterior-posterior across (``A\\F`` or ``P\\F``). Ambiguities, by design:
   orientation cannot tell PA from AP (both are displayed as if facing the viewer), nor a left
   from a right lateral (``A\\F`` and ``P\\F`` only say which way the patient faces on screen; the
   IU X-ray headers have LL images with both), so the projection stays ``None``.
4. **Descriptions**: Series Description, Protocol Name, Acquisition Device Processing
   Description (series level, confidence 0.6), then Study Description, Requested / Performed
   Procedure descriptions and Procedure Code meanings (study level, 0.4: they describe the whole
   study, e.g. "CHEST PA AND LATERAL", so a text naming both a frontal and a lateral view decides
   nothing).

When nothing decides, the guess has ``view=None`` and ``source=""``: the caller falls back to the
view classifier.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from dicom_node.codes import VIEW_CODE_RULES


@dataclass(frozen=True)
class ViewGuess:
    """What the header says about the view. ``view`` is None when it says nothing usable."""

    view: str | None  # "frontal" | "lateral" | None
    projection: str | None  # "PA" | "AP" | "LL" | "RL" | "LAT" | "LLD" | "RLD" | "OBLIQUE" | None
    source: str  # the attribute that decided, e.g. "ViewPosition"; "" when none did
    confidence: float  # 0..1, how much the source is trusted
    detail: str = ""  # the value that decided (header text, never patient identifiers)

    @property
    def decided(self) -> bool:
        return bool(self.source)


UNKNOWN = ViewGuess(None, None, "", 0.0, "no header attribute names the view")

_VIEW_POSITION: dict[str, tuple[str | None, str]] = {
    "PA": ("frontal", "PA"),
    "POSTERO-ANTERIOR": ("frontal", "PA"),
    "POSTEROANTERIOR": ("frontal", "PA"),
    "AP": ("frontal", "AP"),
    "ANTERO-POSTERIOR": ("frontal", "AP"),
    "ANTEROPOSTERIOR": ("frontal", "AP"),
    "FRONTAL": ("frontal", ""),
    "LL": ("lateral", "LL"),
    "LEFT LATERAL": ("lateral", "LL"),
    "RL": ("lateral", "RL"),
    "RIGHT LATERAL": ("lateral", "RL"),
    "LATERAL": ("lateral", "LAT"),
    "LAT": ("lateral", "LAT"),
    "LARGE LATERAL": ("lateral", "LAT"),
    "LLD": ("frontal", "LLD"),
    "RLD": ("frontal", "RLD"),
    "LAO": (None, "OBLIQUE"),
    "RAO": (None, "OBLIQUE"),
    "LPO": (None, "OBLIQUE"),
    "RPO": (None, "OBLIQUE"),
    "OBLIQUE": (None, "OBLIQUE"),
    "OBL": (None, "OBLIQUE"),
}

# spelling variants ("POSTERO_ANTERIOR", "Left-Lateral") compare without separators
_VIEW_POSITION_COMPACT = {re.sub(r"[^A-Z]", "", k): v for k, v in _VIEW_POSITION.items()}

_FRONTAL_WORDS = {
    "PA": "PA",
    "AP": "AP",
    "FRONTAL": "",
    "FRONT": "",
    "POSTEROANTERIOR": "PA",
    "ANTEROPOSTERIOR": "AP",
    "PORTABLE": "AP",
}
_LATERAL_WORDS = {
    "LAT": "LAT",
    "LATERAL": "LAT",
    "LL": "LL",
    "RL": "RL",
    "LLAT": "LL",
    "RLAT": "RL",
}
_OBLIQUE_WORDS = {"OBLIQUE", "OBL", "LAO", "RAO", "LPO", "RPO"}

_SERIES_TEXT = ("SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription")
_STUDY_TEXT = (
    "StudyDescription",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)
_STUDY_CODES = ("ProcedureCodeSequence", "RequestedProcedureCodeSequence")


def _norm(value: object) -> str:
    return re.sub(r"\s+", " ", str(value or "").strip().upper())


def _from_view_position(ds: Dataset) -> ViewGuess | None:
    raw = _norm(ds.get("ViewPosition", ""))
    if not raw:
        return None
    rule = _VIEW_POSITION_COMPACT.get(re.sub(r"[^A-Z]", "", raw))
    if rule is None:
        return None
    view, projection = rule
    confidence = 0.95 if projection not in ("LLD", "RLD") else 0.8
    return ViewGuess(view, projection or None, "ViewPosition", confidence, raw)


def _from_view_code(ds: Dataset) -> ViewGuess | None:
    for item in ds.get("ViewCodeSequence", []) or []:
        scheme = _norm(item.get("CodingSchemeDesignator", ""))
        value = str(item.get("CodeValue", "")).strip()
        meaning = _norm(item.get("CodeMeaning", ""))
        rule = VIEW_CODE_RULES.get((scheme, value))
        if rule is not None:
            view, projection = rule
            return ViewGuess(view, projection or None, "ViewCodeSequence", 0.9, f"{scheme} {value}")
        if meaning:
            guess = _from_text(meaning, "ViewCodeSequence", 0.85)
            if guess is not None:
                return guess
    return None


def _from_orientation(ds: Dataset) -> ViewGuess | None:
    value = ds.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    a, b = (_norm(v) for v in value)
    if not a or not b:
        return None
    pair = {a, b}
    # single-letter primary directions only: "LP\F" is an oblique
    if any(len(v) != 1 for v in pair):
        return None
    vertical = pair & {"H", "F"}
    if len(vertical) != 1:
        return None
    other = (pair - vertical).pop() if len(pair - vertical) == 1 else ""
    if other in ("L", "R"):
        return ViewGuess("frontal", None, "PatientOrientation", 0.7, f"{a}\\{b}")
    if other in ("A", "P"):
        return ViewGuess("lateral", None, "PatientOrientation", 0.7, f"{a}\\{b}")
    return None


def _from_text(text: str, source: str, confidence: float) -> ViewGuess | None:
    words = re.findall(r"[A-Z]+", text.upper().replace("P-A", "PA").replace("A-P", "AP"))
    frontal = [_FRONTAL_WORDS[w] for w in words if w in _FRONTAL_WORDS]
    lateral = [_LATERAL_WORDS[w] for w in words if w in _LATERAL_WORDS]
    oblique = any(w in _OBLIQUE_WORDS for w in words)
    if oblique or (frontal and lateral) or not (frontal or lateral):
        return None
    if frontal:
        specific = {p for p in frontal if p}
        # "PA/AP" or "PA PORTABLE": frontal, but which projection is unclear
        projection = specific.pop() if len(specific) == 1 else None
        return ViewGuess("frontal", projection, source, confidence, text[:64])
    specific = {p for p in lateral if p and p != "LAT"}
    projection = specific.pop() if len(specific) == 1 else "LAT"
    return ViewGuess("lateral", projection, source, confidence, text[:64])


def _descriptions(ds: Dataset) -> Iterator[tuple[str, str, float]]:
    """(text, keyword, confidence) of each description, most specific first."""
    for keyword in _SERIES_TEXT:
        yield _norm(ds.get(keyword, "")), keyword, 0.6
    for keyword in _STUDY_TEXT:
        yield _norm(ds.get(keyword, "")), keyword, 0.4
    for keyword in _STUDY_CODES:
        for item in ds.get(keyword, []) or []:
            yield _norm(item.get("CodeMeaning", "")), keyword, 0.4


def _from_descriptions(ds: Dataset) -> ViewGuess | None:
    for text, keyword, confidence in _descriptions(ds):
        guess = _from_text(text, keyword, confidence) if text else None
        if guess is not None:
            return guess
    return None


def view_from_headers(ds: Dataset) -> ViewGuess:
    """The view the header names, by the first rule that decides (see the module docstring)."""
    for rule in (_from_view_position, _from_view_code, _from_orientation, _from_descriptions):
        guess = rule(ds)
        if guess is not None:
            return guess
    return UNKNOWN


# --- pairing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One instance offered for pairing: its view and what says how good an image it is."""

    key: Hashable  # the caller's handle (path, SOP Instance UID, ...), returned unchanged
    guess: ViewGuess
    rows: int = 0
    cols: int = 0
    image_type: tuple[str, ...] = field(default_factory=tuple)
    sop_instance_uid: str = ""

    @classmethod
    def from_dataset(
        cls, ds: Dataset, key: Hashable | None = None, guess: ViewGuess | None = None
    ) -> Candidate:
        image_type = tuple(_norm(v) for v in (ds.get("ImageType") or []))
        uid = str(ds.get("SOPInstanceUID", ""))
        return cls(
            key=key if key is not None else uid,
            guess=guess if guess is not None else view_from_headers(ds),
            rows=int(ds.get("Rows", 0) or 0),
            cols=int(ds.get("Columns", 0) or 0),
            image_type=image_type,
            sop_instance_uid=uid,
        )


_FRONTAL_RANK = {"PA": 0, "AP": 1, None: 2, "LLD": 3, "RLD": 3}
_LATERAL_RANK = {"LL": 0, "LAT": 1, None: 1, "RL": 2}


def _quality_key(c: Candidate) -> tuple[int, int, int, float, str]:
    original = 0 if (c.image_type[:1] == ("ORIGINAL",)) else 1
    primary = (
        0 if (len(c.image_type) > 1 and c.image_type[1] == "PRIMARY") or not c.image_type else 1
    )
    return (
        primary,
        original,
        -(c.rows * c.cols),
        -c.guess.confidence,
        str(c.sop_instance_uid or c.key),
    )


def pick_pair(candidates: Sequence[Candidate]) -> tuple[Candidate | None, Candidate | None]:
    """Choose (frontal, lateral) from a study's instances; either may be None.

    Frontal: PA before AP before a frontal of unknown projection before a decubitus; among equals a
    PRIMARY image before a SECONDARY one (screen captures, reformatted copies), ORIGINAL before
    DERIVED, the larger matrix, the more confident view source, and finally the SOP Instance UID so
    the choice never depends on arrival order. Lateral: left lateral (the standard chest lateral)
    before an unspecified lateral before a right lateral, then the same quality order. A caller
    must not analyse a study whose frontal is None.
    """
    frontals = [c for c in candidates if c.guess.view == "frontal"]
    laterals = [c for c in candidates if c.guess.view == "lateral"]
    frontal = min(
        frontals,
        key=lambda c: (_FRONTAL_RANK.get(c.guess.projection, 2), *_quality_key(c)),
        default=None,
    )
    lateral = min(
        laterals,
        key=lambda c: (_LATERAL_RANK.get(c.guess.projection, 1), *_quality_key(c)),
        default=None,
    )
    return frontal, lateral
