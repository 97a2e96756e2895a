"""The content items of the TID 1500 report (see :mod:`dicom_node.sr` for the document shape).

Every function here turns the checked records of a :class:`~dicom_node.sr.ReportInput` into
highdicom content items; none reads a file or the clock.

A finding's probability is a NUM named by the finding's own code with unit ``{probability}``
(``Pneumothorax = 0.87 {probability}``) with the decision threshold it was compared with as its
property, beside the qualitative evaluation ``Pneumothorax = Present/Absent``: a viewer that
labels a measurement with its NUMs' names (OHIF does) then shows which finding it is, and a
reader of the tree never needs the tracking identifier's free text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicom_node import codes
from dicom_node.derived import (
    AlgorithmInfo,
    CropInfo,
    CtrInfo,
    FindingResult,
    LineInfo,
    MaskQualityInfo,
    deterministic_uid,
)

if TYPE_CHECKING:  # the records live in dicom_node.sr, which imports this module
    from dicom_node.sr import ReportInput

Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)

NOT_FOR_DIAGNOSTIC_USE = (
    "NOT FOR DIAGNOSTIC USE. Research-grade model outputs produced without radiologist review."
)
MODEL1, MODEL2 = "Model 1", "Model 2"
_R = hd.sr.RelationshipTypeValues


def algorithm_id(a: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 with the name and version only; the weights' hash and architecture are said
    once per model in the qualitative evaluations (:func:`algorithm_lines`)."""
    return hd.sr.AlgorithmIdentification(
        name=a.name[:64] or "unnamed",
        version=a.version[:64] or "unknown",
        family=codes.ARTIFICIAL_INTELLIGENCE,
    )


def _tracking(report_uid: str, key: str, text: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=deterministic_uid(report_uid, "tracking", key), identifier=text[:64]
    )


def _source(frontal: Dataset) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(str(frontal.SOPClassUID), str(frontal.SOPInstanceUID))


def _box(box: CropInfo) -> np.ndarray:
    """A closed rectangle (5 points, column/row) around the pixels [x0, x1) x [y0, y1): the
    edges lie on pixel borders (a pixel's top-left corner is its integer coordinate)."""
    return np.array(
        [[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1], [box.x0, box.y0]],
        dtype=float,
    )


def finding_group(
    f: FindingResult,
    algo: AlgorithmInfo,
    model: str,
    report_uid: str,
    frontal: Dataset,
    region: CropInfo,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: a finding marked on the frontal image (``region``), with its probability,
    threshold and Present/Absent evaluation."""
    code = codes.finding_code(f.label)
    image_region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_box(region),
        source_image=_source(frontal),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(report_uid, f.label, f"{model}: {f.label}"),
        referenced_region=image_region,
        finding_type=code,
        algorithm_id=algorithm_id(algo),
        measurements=[
            hd.sr.Measurement(
                name=code, value=round(float(f.probability), 6), unit=codes.UNIT_PROBABILITY
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=code, value=codes.PRESENT if f.present else codes.ABSENT
            )
        ],
    )
    # Two children of the probability NUM (TID 300 allows both; the Enhanced SR IOD allows NUM
    # HAS PROPERTIES NUM and NUM INFERRED FROM SCOORD):
    # - the decision threshold it was compared with, as its property: a viewer that labels a
    #   group with its top-level NUMs (OHIF) then shows one line per finding, "name: p";
    # - the rectangle it is inferred from: the Cornerstone3D adapter OHIF hydrates measurements
    #   with reads a group's geometry from its first NUM, not from the group's region.
    # highdicom refuses measurement coordinates inside TID 1410 at construction, so both are
    # added to the built NUM.
    probability = next(
        item
        for item in group[0].ContentSequence
        if item.ValueType == "NUM" and codes.same_code(_name(item), code)
    )
    where = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_box(region),
        source_image=_source(frontal),
    )
    threshold = hd.sr.NumContentItem(
        name=codes.DECISION_THRESHOLD,
        value=round(float(f.threshold), 6),
        unit=codes.UNIT_PROBABILITY,
        relationship_type=_R.HAS_PROPERTIES,
    )
    probability.ContentSequence = hd.sr.ContentSequence([threshold, where])
    return group


def _name(item: Dataset) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0])


def _spacing_mm(frontal: Dataset) -> float | None:
    """The pixel spacing in mm when the frontal states a square one, else None (report pixels)."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        value = frontal.get(kw)
        try:
            rows, cols = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if rows > 0 and abs(rows - cols) <= 1e-6 * max(rows, cols):
            return rows
    return None


def _width(name: Code, line: LineInfo, frontal: Dataset) -> hd.sr.Measurement:
    mm = _spacing_mm(frontal)
    value, unit = (line.length * mm, codes.UNIT_MM) if mm else (line.length, codes.UNIT_PIXELS)
    return hd.sr.Measurement(
        name=name,
        value=round(value, 2),
        unit=unit,
        referenced_coordinates=[
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=np.array([[line.x0, line.y0], [line.x1, line.y1]], dtype=float),
                source_image=_source(frontal),
            )
        ],
    )


def ctr_group(
    ctr: CtrInfo, algo: AlgorithmInfo | None, report_uid: str, frontal: Dataset
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the cardiothoracic ratio, and the cardiac and thoracic widths each inferred
    from its line on the frontal image (so a viewer draws both lines)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(report_uid, "ctr", "Cardiothoracic ratio"),
        finding_type=codes.CARDIOTHORACIC_RATIO,
        algorithm_id=algorithm_id(algo) if algo is not None else None,
        measurements=[
            hd.sr.Measurement(
                name=codes.CARDIOTHORACIC_RATIO,
                value=round(float(ctr.ratio), 4),
                unit=codes.UNIT_RATIO_ANNOTATED,
            ),
            _width(codes.CARDIAC_WIDTH, ctr.cardiac, frontal),
            _width(codes.THORACIC_WIDTH, ctr.thoracic, frontal),
        ],
    )


# --- the qualitative evaluations container (TID 1500 rows 12-14) -------------------------------


def _num(name: Code, value: float, unit: Code) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=name, value=value, unit=unit, relationship_type=_R.INFERRED_FROM
    )


def _text(name: Code, text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=text, relationship_type=_R.CONTAINS)


def absent_evaluation(f: FindingResult) -> hd.sr.CodeContentItem:
    """Row 13: ``<finding> = Absent`` for the whole study, inferred from its probability and the
    threshold it stayed under."""
    code = codes.finding_code(f.label)
    item = hd.sr.CodeContentItem(name=code, value=codes.ABSENT, relationship_type=_R.CONTAINS)
    item.ContentSequence = hd.sr.ContentSequence(
        [
            _num(code, round(float(f.probability), 6), codes.UNIT_PROBABILITY),
            _num(codes.DECISION_THRESHOLD, round(float(f.threshold), 6), codes.UNIT_PROBABILITY),
        ]
    )
    return item


def mask_evaluation(q: MaskQualityInfo) -> list[hd.sr.ContentItem]:
    """Row 13: the lung mask acceptable or rejected, inferred from its measurements; row 14: the
    first check it failed, when rejected."""
    value = codes.LUNG_MASK_ACCEPTABLE if q.ok else codes.LUNG_MASK_REJECTED
    item = hd.sr.CodeContentItem(
        name=codes.LUNG_MASK_QUALITY, value=value, relationship_type=_R.CONTAINS
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [
            _num(codes.LUNG_MASK_AREA_FRACTION, round(float(q.area_fraction), 6), codes.UNIT_RATIO),
            _num(codes.LUNG_MASK_BALANCE, round(float(q.left_right_balance), 6), codes.UNIT_RATIO),
            _num(codes.LUNG_MASK_COMPONENTS, int(q.components), codes.UNIT_RATIO),
        ]
    )
    out: list[hd.sr.ContentItem] = [item]
    if not q.ok and (q.rule or q.reason):
        out.append(_text(codes.LUNG_MASK_FAILED_CHECK, q.state[len("REJECTED (") : -1]))
    return out


def _p(p: float) -> str:
    return f"{p:.2f}"


def summary_lines(inp: ReportInput, replaced: Sequence[str]) -> list[str]:
    """The report in a few lines for dsrdump readers and text-only viewers: Model 1's decision,
    each Present finding with probability and threshold, the Absent ones, the cardiothoracic
    ratio, the lung-mask QC state and failing check, and what this report replaces."""
    m1 = inp.model1
    present = [f for f in inp.findings if f.present]
    absent = [f for f in inp.findings if not f.present]
    lines = [
        "NOT FOR DIAGNOSTIC USE.",
        f"{MODEL1} ({inp.model1_algorithm.name} {inp.model1_algorithm.version}): "
        + ("ABNORMAL" if m1.present else "no abnormality detected")
        + f", p={_p(m1.probability)} (threshold {_p(m1.threshold)}).",
        f"{MODEL2} ({inp.model2_algorithm.name} {inp.model2_algorithm.version}): "
        + f"{len(present)} of {len(inp.findings)} findings Present.",
    ]
    lines += [f"Present: {f.label} p={_p(f.probability)} ({f.threshold_text})." for f in present]
    if absent:
        lines.append(f"Absent: {', '.join(f.label for f in absent)}.")
    if inp.ctr is not None:
        if inp.ctr.shown:
            lines.append(f"Cardiothoracic ratio: {inp.ctr.ratio:.2f}.")
        else:
            why = inp.ctr.reason or "not interpretable on this image"
            lines.append(f"Cardiothoracic ratio not reported: {why}.")
    if inp.mask_quality is not None:
        q = inp.mask_quality
        lines.append(
            "Lung mask QC: "
            + (f"{q.state}." if q.ok else f"{q.state}; the full image was analysed.")
        )
    lines.append(
        "Views analysed: frontal"
        + (" and lateral." if inp.used_lateral and inp.lateral is not None else " only.")
    )
    for uid in replaced:
        lines.append(f"Replaces report {uid}: {inp.supersedes_reason or 'a re-analysis'}.")
    return lines


def algorithm_lines(inp: ReportInput) -> list[str]:
    """Each model's identity once: name, version, architecture and the weights' SHA-256."""
    named = [(MODEL1, inp.model1_algorithm), (MODEL2, inp.model2_algorithm)]
    if inp.lung_mask_algorithm is not None:
        named.append(("Lung mask", inp.lung_mask_algorithm))
    return [
        f"{role}: {a.name} {a.version}"
        + (f", architecture {a.architecture}" if a.architecture else "")
        + f", weights sha256 {a.sha256}"
        for role, a in named
    ]


def comment_lines(inp: ReportInput) -> list[str]:
    lines = [NOT_FOR_DIAGNOSTIC_USE]
    if inp.crop is not None:
        c = inp.crop
        lines.append(
            f"Lung crop box on the frontal image (pixels): x0={c.x0} y0={c.y0} x1={c.x1} y1={c.y1}"
        )
    lines.extend(algorithm_lines(inp))
    unvalidated = [f.label for f in inp.findings if not f.threshold_validated]
    if unvalidated:
        lines.append(
            "Decision thresholds not validated on held-out data (too few held-out cases to set "
            "them; read these calls as unmeasured): " + ", ".join(unvalidated)
        )
    return lines


def qualitative_evaluations(
    inp: ReportInput, replaced: Sequence[str]
) -> hd.sr.ContainerContentItem:
    """The root "Qualitative Evaluations" container: the summary first, then every Absent
    Model 2 finding, the lung-mask QC and the free-text notes."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=_R.CONTAINS,
        is_content_continuous=False,
    )
    items: list[hd.sr.ContentItem] = [
        _text(codes.SUMMARY, line) for line in summary_lines(inp, replaced)
    ]
    items += [absent_evaluation(f) for f in inp.findings if not f.present]
    if inp.mask_quality is not None:
        items += mask_evaluation(inp.mask_quality)
    items += [_text(codes.COMMENT, line[:1024]) for line in comment_lines(inp)]
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container
