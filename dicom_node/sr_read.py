"""Read a report written by :func:`dicom_node.sr.build_report` back, through highdicom.

:func:`read_findings` gives every Model 1 and Model 2 finding with its probability, threshold and
Present/Absent state, wherever the report put it (a marked measurement group for Model 1 and the
Present findings, a qualitative evaluation of the whole study for the Absent ones);
:func:`read_summary` the summary text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node import codes
from dicom_node.sr_content import MODEL1, MODEL2

_SR_CLASSES = (hd.sr.EnhancedSR, hd.sr.ComprehensiveSR, hd.sr.Comprehensive3DSR)
Document = hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR


def read_report(path: str | Path) -> Document:
    """Read a report written by :func:`~dicom_node.sr.write_report` back as a highdicom object."""
    return _document(pydicom.dcmread(str(path)))


def _document(sr: Dataset | str | Path) -> Document:
    if isinstance(sr, _SR_CLASSES):
        return sr
    ds = sr if isinstance(sr, Dataset) else pydicom.dcmread(str(sr))
    sop = str(ds.SOPClassUID)
    kinds: dict[str, type[Document]] = {
        pydicom.uid.EnhancedSRStorage: hd.sr.EnhancedSR,
        pydicom.uid.ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
        pydicom.uid.Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
    }
    kind = kinds.get(sop)
    if kind is None:
        raise ValueError(f"{ds.get('SOPInstanceUID', '?')} is not an SR this worker writes ({sop})")
    return cast(Document, kind.from_dataset(ds))


@dataclass(frozen=True)
class ReportedFinding:
    """One finding read back from a report."""

    model: str  # "Model 1" or "Model 2"
    label: str
    code: tuple[str, str]  # (scheme designator, code value) of the finding type
    probability: float
    threshold: float
    present: bool
    #: the box (x0, y0, x1, y1, frontal pixels) the finding is marked on; None when not marked
    region: tuple[float, float, float, float] | None = None


def _is(item: Dataset, code: codes.Coded) -> bool:
    seq = item.get("ConceptNameCodeSequence")
    return bool(seq) and codes.same_code(_Coded(seq[0]), code)


@dataclass(frozen=True)
class _Coded:
    """A code item of a dataset seen through :class:`codes.Coded`."""

    item: Dataset

    @property
    def value(self) -> str:
        return str(self.item.CodeValue)

    @property
    def scheme_designator(self) -> str:
        return str(self.item.CodingSchemeDesignator)

    @property
    def meaning(self) -> str:
        return str(self.item.get("CodeMeaning", ""))


def _num(item: Dataset) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def _children(item: Dataset) -> Iterator[Dataset]:
    yield from item.get("ContentSequence", [])


def _finding(
    finding_type: codes.Coded, nums: list[Dataset], present: bool, region: np.ndarray | None
) -> ReportedFinding | None:
    label = codes.finding_label(finding_type)
    if label is None:
        return None
    probability = [_num(n) for n in nums if _is(n, finding_type)]
    threshold = [_num(n) for n in nums if _is(n, codes.DECISION_THRESHOLD)]
    if not probability or not threshold:
        raise ValueError(f"finding {label!r} has no probability or no decision threshold")
    box = None
    if region is not None and region.size:
        pts = np.asarray(region, dtype=float).reshape(-1, 2)
        box = (
            float(pts[:, 0].min()),
            float(pts[:, 1].min()),
            float(pts[:, 0].max()),
            float(pts[:, 1].max()),
        )
    return ReportedFinding(
        model=MODEL1 if codes.same_code(finding_type, codes.ABNORMAL) else MODEL2,
        label=label,
        code=(finding_type.scheme_designator, finding_type.value),
        probability=probability[0],
        threshold=threshold[0],
        present=present,
        region=box,
    )


def _qualitative_container(doc: Document) -> Dataset | None:
    for item in _children(doc.content[0]):
        if item.ValueType == "CONTAINER" and _is(item, codes.QUALITATIVE_EVALUATIONS):
            return item
    return None


def read_findings(sr: Dataset | str | Path) -> list[ReportedFinding]:
    """Every Model 1 and Model 2 finding of a report built by :func:`build_report`: Model 1
    first, then the Present Model 2 findings (marked groups, in report order), then the Absent
    ones (qualitative evaluations, in report order).

    The label comes from each coded finding (:func:`codes.finding_label`), never from the
    tracking identifier's free text; groups that are not findings (the cardiothoracic ratio) and
    evaluations that are not (the lung-mask QC) are skipped.
    """
    doc = _document(sr)
    content = doc.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError(f"SR {doc.SOPInstanceUID} is not a TID 1500 Measurement Report")
    out: list[ReportedFinding] = []
    for group in content.get_planar_roi_measurement_groups():
        ftype = group.finding_type
        if ftype is None:
            continue
        present = [
            q.value.value == codes.PRESENT.value
            for q in group.get_qualitative_evaluations()
            if codes.same_code(q.name, ftype) and isinstance(q.value, hd.sr.CodedConcept)
        ]
        # the threshold is a property of the probability NUM (one level down)
        nums = [item for item in _children(group[0]) if item.ValueType == "NUM"]
        nums += [sub for item in nums for sub in _children(item) if sub.ValueType == "NUM"]
        roi = group.roi
        found = _finding(
            ftype, nums, bool(present and present[0]), roi.value if roi is not None else None
        )
        if found is not None:
            out.append(found)
    out.sort(key=lambda f: f.model != MODEL1)  # stable: Model 1 first, report order after
    container = _qualitative_container(doc)
    for item in _children(container) if container is not None else ():
        if item.ValueType != "CODE":
            continue
        concept = _Coded(item.ConceptNameCodeSequence[0])
        value = _Coded(item.ConceptCodeSequence[0])
        nums = [n for n in _children(item) if n.ValueType == "NUM"]
        found = _finding(concept, nums, codes.same_code(value, codes.PRESENT), None)
        if found is not None:
            out.append(found)
    return out


def read_summary(sr: Dataset | str | Path) -> list[str]:
    """The report's summary, one line per item (empty when it has none)."""
    container = _qualitative_container(_document(sr))
    return [
        str(item.TextValue)
        for item in (_children(container) if container is not None else ())
        if item.ValueType == "TEXT" and _is(item, codes.SUMMARY)
    ]
