"""The findings of one study as a DICOM TID 1500 Measurement Report (Comprehensive 3D SR).

:func:`build_report` turns a :class:`ReportInput` (the source images' headers, the model outputs
and the device's identity) into a :class:`highdicom.sr.Comprehensive3DSR`:

- the **same patient and study** as the source images (their Patient and General Study modules
  are copied), in a series of its own. It refuses, with ``ValueError``, images that disagree on
  Patient ID, Issuer of Patient ID or Study Instance UID: never a report for the wrong patient;
- **observer context**: a device observer (the worker's name, version and AE title, TID 1004);
- **procedure reported**: LOINC 36643-5 "XR Chest 2 Views" (frontal + lateral) or 36554-4 "XR Chest
  Single view";
- **image library** (TID 1600) listing the frontal and, when present, the lateral image;
- per finding a **measurement group** (TID 1501): tracking identifier, finding type, Algorithm
  Identification (TID 4019: model name, version, weight SHA-256 and architecture as parameters),
  the probability (DCM 122157, unit ``{probability}``), the decision threshold, and a qualitative
  evaluation Present/Absent at the model card's threshold. Model 1 ("Abnormal") comes first,
  then Model 2's observations, then a lung-mask quality group (area fraction, left/right
  balance, acceptable/rejected);
- a root **Qualitative Evaluations** container (TID 1500 row 12) with free text: "NOT FOR
  DIAGNOSTIC USE", the crop box and the lung-mask quality flags;
- a **deterministic SOP Instance UID** (:func:`~dicom_node.derived.report_uid`) from the source SOP
  Instance UIDs and the model names, versions and weight hashes: sending the same analysis twice
  never creates two documents; a re-analysis after late images has other sources, so a new UID,
  and lists the report it replaces in the Predecessor Documents Sequence.

:func:`read_report` and :func:`read_findings` read a written report back. UIDs, the PHI-safe header
copy and the atomic write live in :mod:`dicom_node.derived` (shared with the key image); the names
the worker uses (``FindingResult``, ``AlgorithmInfo``, ``DeviceInfo``, ``CropInfo``,
``report_series_uid``) are re-exported here. See :mod:`dicom_node.codes` for every code used.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as _codes

from dicom_node import codes
from dicom_node.derived import (
    AlgorithmInfo,
    CropInfo,
    DeviceInfo,
    FindingResult,
    atomic_write,
    check_same_patient_and_study,
    deterministic_uid,
    no_person_name_warnings,
    report_series_uid,
    report_uid,
    require_int,
    require_number,
    require_str,
    require_str_fields,
    sanitize_copied_attributes,
    source_header,
)

__all__ = [
    "DEFAULT_SERIES_NUMBER",
    "NOT_FOR_DIAGNOSTIC_USE",
    "SERIES_DESCRIPTION",
    "AlgorithmInfo",
    "CropInfo",
    "DeviceInfo",
    "FindingResult",
    "MaskQualityInfo",
    "PreviousReport",
    "ReportInput",
    "ReportedFinding",
    "build_report",
    "read_findings",
    "read_report",
    "report_series_uid",
    "report_uid",
    "write_report",
]

log = logging.getLogger(__name__)

NOT_FOR_DIAGNOSTIC_USE = (
    "NOT FOR DIAGNOSTIC USE. Research-grade model outputs produced without radiologist review."
)
DEFAULT_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "CXR AI findings - NOT FOR DIAGNOSTIC USE"
#: Model 1's one label: the study is abnormal (its finding type is :data:`codes.ABNORMAL`).
MODEL1_LABEL = "Abnormal"
MODEL1, MODEL2 = "Model 1", "Model 2"


# --- inputs (the worker converts the models' outputs into these) -------------------------------


@dataclass(frozen=True)
class MaskQualityInfo:
    """Plausibility of the lung mask; ``ok`` False means the full image was analysed."""

    area_fraction: float
    components: int
    left_right_balance: float
    ok: bool
    reason: str = ""

    def __post_init__(self) -> None:
        require_number(self.area_fraction, "MaskQualityInfo.area_fraction")
        require_number(self.left_right_balance, "MaskQualityInfo.left_right_balance")
        require_int(self.components, "MaskQualityInfo.components")
        require_str_fields(self, "reason")


@dataclass(frozen=True)
class PreviousReport:
    """A report this one replaces (for the Predecessor Documents Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = pydicom.uid.Comprehensive3DSRStorage

    def __post_init__(self) -> None:
        for attr in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
            if not require_str(getattr(self, attr), f"PreviousReport.{attr}"):
                raise ValueError(f"PreviousReport.{attr} is empty: give the replaced report's UID")


def _kind_name(kind: type) -> str:
    if kind is type(None):
        return "None"
    return ("an " if kind.__name__[0] in "AEIOU" else "a ") + kind.__name__


def _require_instance(value: object, kind: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, kind):
        names = " or ".join(_kind_name(k) for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TypeError(f"ReportInput.{what} must be {names}, got {type(value).__name__}")


@dataclass
class ReportInput:
    """Everything one report (TID 1500) says; checked when built, so a bad value names itself.

    ``frontal``/``lateral`` are the source images (headers suffice). ``model1`` is Model 1's
    result, labelled ``"Abnormal"``; ``findings`` are Model 2's, each label once.
    """

    frontal: Dataset
    model1: FindingResult
    findings: list[FindingResult]
    model1_algorithm: AlgorithmInfo
    model2_algorithm: AlgorithmInfo
    lateral: Dataset | None = None
    used_lateral: bool = False
    lung_mask_algorithm: AlgorithmInfo | None = None
    crop: CropInfo | None = None
    mask_quality: MaskQualityInfo | None = None
    device: DeviceInfo = field(default_factory=DeviceInfo)
    previous: Sequence[PreviousReport | Dataset] = ()
    series_number: int = DEFAULT_SERIES_NUMBER
    #: SOP Instance UIDs of every image the analysis weighed
    considered_instances: Sequence[str] = ()
    content_datetime: _dt.datetime | None = None  # defaults to now

    def __post_init__(self) -> None:
        _require_instance(self.frontal, Dataset, "frontal")
        _require_instance(self.lateral, (Dataset, type(None)), "lateral")
        _require_instance(self.model1, FindingResult, "model1")
        if self.model1.label != MODEL1_LABEL:
            raise ValueError(
                f"ReportInput.model1 has label {self.model1.label!r}; Model 1 reports "
                f"{MODEL1_LABEL!r} only (put other labels in findings)"
            )
        _require_instance(self.findings, list, "findings")
        seen = {self.model1.label}
        for i, f in enumerate(self.findings):
            _require_instance(f, FindingResult, f"findings[{i}]")
            if f.label in seen:
                raise ValueError(
                    f"finding {f.label!r} is reported twice; each label may appear once"
                )
            seen.add(f.label)
        _require_instance(self.model1_algorithm, AlgorithmInfo, "model1_algorithm")
        _require_instance(self.model2_algorithm, AlgorithmInfo, "model2_algorithm")
        _require_instance(
            self.lung_mask_algorithm, (AlgorithmInfo, type(None)), "lung_mask_algorithm"
        )
        _require_instance(self.crop, (CropInfo, type(None)), "crop")
        _require_instance(self.mask_quality, (MaskQualityInfo, type(None)), "mask_quality")
        _require_instance(self.device, DeviceInfo, "device")
        for i, p in enumerate(self.previous):
            _require_instance(p, (PreviousReport, Dataset), f"previous[{i}]")
        require_int(self.series_number, "ReportInput.series_number", minimum=1)
        if isinstance(self.considered_instances, str):
            raise TypeError(
                "ReportInput.considered_instances must be a sequence of SOP Instance UIDs, "
                "not one string"
            )
        for i, uid in enumerate(self.considered_instances):
            require_str(uid, f"ReportInput.considered_instances[{i}]")
        _require_instance(self.content_datetime, (_dt.datetime, type(None)), "content_datetime")

    @property
    def sources(self) -> list[Dataset]:
        return [self.frontal] + ([self.lateral] if self.lateral is not None else [])

    @property
    def algorithms(self) -> list[AlgorithmInfo]:
        algos = [self.model1_algorithm, self.model2_algorithm]
        if self.lung_mask_algorithm is not None:
            algos.append(self.lung_mask_algorithm)
        return algos


# --- content ------------------------------------------------------------------------------------


def _valid_spacing(value: object) -> bool:
    try:
        return value is not None and len(value) == 2 and all(float(v) > 0 for v in value)  # type: ignore[arg-type,attr-defined]
    except (TypeError, ValueError):
        return False


def _library_stub(ds: Dataset) -> Dataset:
    """What the image library reads about an image.

    highdicom adds the projection-radiography descriptors (TID 1603: patient orientation, imager
    pixel spacing) for CR/DX and fails when either is missing, as in the NEMA RG1 images
    (PixelSpacing ``0\\0``, no ImagerPixelSpacing). Those descriptors are optional, so they are
    written only when both attributes are present and valid.
    """
    stub = Dataset()
    for kw in (
        "SOPClassUID",
        "SOPInstanceUID",
        "Rows",
        "Columns",
        "Modality",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
    ):
        if kw in ds:
            setattr(stub, kw, ds.get(kw))
    orientation = ds.get("PatientOrientation")
    if (
        orientation is not None
        and len(orientation) == 2
        and _valid_spacing(ds.get("ImagerPixelSpacing"))
    ):
        stub.PatientOrientation = orientation
        stub.ImagerPixelSpacing = ds.ImagerPixelSpacing
    else:
        # only steers highdicom away from TID 1603; the coded modality comes from the SOP class
        stub.Modality = "OT"
    return stub


def _algorithm_id(a: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    params = [f"weights_sha256={a.sha256}"]
    if a.architecture:
        params.append(f"architecture={a.architecture}")
    return hd.sr.AlgorithmIdentification(
        name=a.name[:64] or "unnamed",
        version=a.version[:64] or "unknown",
        parameters=params,
        family=codes.ARTIFICIAL_INTELLIGENCE,
    )


def _tracking(report_sop_uid: str, label: str, text: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=deterministic_uid(report_sop_uid, "tracking", label),
        identifier=text[:64],
    )


def _finding_group(
    f: FindingResult,
    algo: AlgorithmInfo,
    sop_uid: str,
    title: str,
    sources: list[hd.sr.SourceImageForMeasurementGroup],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    code = codes.finding_code(f.label)
    p, t = float(f.probability), float(f.threshold)  # in [0, 1]: FindingResult checked them
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_uid, f.label, f"{title}: {f.label}"),
        finding_type=code,
        algorithm_id=_algorithm_id(algo),
        measurements=[
            hd.sr.Measurement(
                name=codes.PROBABILITY, value=round(p, 6), unit=codes.UNIT_PROBABILITY
            ),
            hd.sr.Measurement(
                name=codes.DECISION_THRESHOLD, value=round(t, 6), unit=codes.UNIT_PROBABILITY
            ),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=code, value=codes.PRESENT if p >= t else codes.ABSENT)
        ],
        source_images=sources,
    )


def _mask_group(
    inp: ReportInput, sop_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    q = inp.mask_quality
    if q is None:
        return None
    measurements = [
        hd.sr.Measurement(
            name=codes.LUNG_MASK_AREA_FRACTION,
            value=round(float(q.area_fraction), 6),
            unit=codes.UNIT_RATIO,
        ),
        hd.sr.Measurement(
            name=codes.LUNG_MASK_BALANCE,
            value=round(float(q.left_right_balance), 6),
            unit=codes.UNIT_RATIO,
        ),
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_uid, "lung-mask", "Lung mask quality"),
        finding_type=codes.LUNG_MASK_QUALITY,
        algorithm_id=_algorithm_id(inp.lung_mask_algorithm) if inp.lung_mask_algorithm else None,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.LUNG)],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.LUNG_MASK_QUALITY,
                value=codes.LUNG_MASK_ACCEPTABLE if q.ok else codes.LUNG_MASK_REJECTED,
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(inp.frontal.SOPClassUID),
                referenced_sop_instance_uid=str(inp.frontal.SOPInstanceUID),
            )
        ],
    )


def _free_text(inp: ReportInput) -> list[str]:
    lines = [NOT_FOR_DIAGNOSTIC_USE]
    if inp.crop is not None:
        c = inp.crop
        lines.append(
            f"Lung crop box on the frontal image (pixels): x0={c.x0} y0={c.y0} x1={c.x1} y1={c.y1}"
        )
    if inp.mask_quality is not None:
        q = inp.mask_quality
        state = (
            "acceptable"
            if q.ok
            else f"REJECTED ({q.reason or 'no reason given'}); the full image was analysed"
        )
        lines.append(
            f"Lung mask {state}: area fraction {q.area_fraction:.3f}, components {q.components}, "
            f"left/right balance {q.left_right_balance:.3f}"
        )
    lines.append(
        "Views analysed: frontal"
        + (" and lateral" if inp.used_lateral and inp.lateral is not None else " only")
    )
    unvalidated = [f.label for f in inp.findings if not f.threshold_validated]
    if unvalidated:
        lines.append(
            "Decision thresholds not validated on held-out data (model card default): "
            + ", ".join(unvalidated)
        )
    return lines


def _qualitative_container(lines: list[str]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.COMMENT,
                value=text[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for text in lines
        ]
    )
    return container


def _previous(
    items: Sequence[PreviousReport | Dataset], study_uid: str, own_uid: str
) -> list[Dataset]:
    out = []
    for p in items:
        if isinstance(p, PreviousReport):
            d = Dataset()
            d.StudyInstanceUID = p.study_instance_uid
            d.SeriesInstanceUID = p.series_instance_uid
            d.SOPInstanceUID = p.sop_instance_uid
            d.SOPClassUID = p.sop_class_uid
        else:
            d = p
        if str(d.StudyInstanceUID) != study_uid:
            raise ValueError(
                f"previous report {d.SOPInstanceUID} belongs to another study: a report can only "
                "replace a report of its own study"
            )
        if str(d.SOPInstanceUID) == own_uid:
            continue  # a resend of the same analysis does not replace itself
        out.append(d)
    return out


def build_report(inp: ReportInput) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report for ``inp``; raises ``ValueError`` on inconsistent input."""
    with no_person_name_warnings():
        return _build_report(inp)


def _build_report(inp: ReportInput) -> hd.sr.Comprehensive3DSR:
    sources = inp.sources
    check_same_patient_and_study(sources)
    if not inp.findings:
        log.warning("report for SOP %s has no Model 2 findings", inp.frontal.SOPInstanceUID)
    headers = [source_header(ds) for ds in sources]
    study_uid = str(headers[0].StudyInstanceUID)
    # every instance the analysis considered, not only the pair: a late image always yields a new
    # report (that names this one as predecessor), the same images and models the same report
    sop_uid = report_uid([*sources, *inp.considered_instances], inp.algorithms)
    series_uid = report_series_uid(study_uid, inp.device)

    device = hd.sr.ObserverContext(
        observer_type=_codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=inp.device.uid,
            name=inp.device.ae_title,
            manufacturer_name=inp.device.manufacturer,
            model_name=f"{inp.device.name} {inp.device.version}"[:64],
        ),
    )
    observation = hd.sr.ObservationContext(observer_device_context=device)

    analysed = [inp.frontal] + (
        [inp.lateral] if inp.used_lateral and inp.lateral is not None else []
    )
    group_sources = [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
        )
        for ds in analysed
    ]
    groups = [_finding_group(inp.model1, inp.model1_algorithm, sop_uid, MODEL1, group_sources)]
    groups += [
        _finding_group(f, inp.model2_algorithm, sop_uid, MODEL2, group_sources)
        for f in inp.findings  # each label once: ReportInput checked it
    ]
    mask_group = _mask_group(inp, sop_uid)
    if mask_group is not None:
        groups.append(mask_group)

    procedure = (
        codes.PROCEDURE_CHEST_XR_2_VIEWS
        if inp.lateral is not None
        else codes.PROCEDURE_CHEST_XR_1_VIEW
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation,
        procedure_reported=procedure,
        imaging_measurements=groups,
        referenced_images=[_library_stub(h) for h in headers],
    )
    report[0].ContentSequence.append(_qualitative_container(_free_text(inp)))

    sr = hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report,
        series_instance_uid=series_uid,
        series_number=inp.series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=inp.device.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=_previous(inp.previous, study_uid, sop_uid) or None,
        performed_procedure_codes=[procedure],
    )
    sanitize_copied_attributes(sr)
    scheme = Dataset()
    scheme.CodingSchemeDesignator = codes.LOCAL_SCHEME
    scheme.CodingSchemeName = codes.LOCAL_SCHEME_NAME
    scheme.CodingSchemeVersion = codes.LOCAL_SCHEME_VERSION
    scheme.CodingSchemeResponsibleOrganization = inp.device.manufacturer[:64]
    sr.CodingSchemeIdentificationSequence = [scheme]
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.ManufacturerModelName = inp.device.name[:64]
    sr.SoftwareVersions = inp.device.version[:64]
    sr.StationName = inp.device.ae_title[:16]
    when = inp.content_datetime or _dt.datetime.now()
    sr.ContentDate = when.strftime("%Y%m%d")  # type: ignore[assignment]
    sr.ContentTime = when.strftime("%H%M%S")  # type: ignore[assignment]
    sr.InstanceCreationDate = sr.ContentDate
    sr.InstanceCreationTime = sr.ContentTime
    return sr


def write_report(sr: Dataset, path: str | Path) -> Path:
    """Write ``sr`` as a DICOM Part 10 file (atomically: a reader never sees half a file)."""
    return atomic_write(sr, path)


def read_report(path: str | Path) -> hd.sr.Comprehensive3DSR:
    """Read a report written by :func:`write_report` back as a highdicom object."""
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(str(path)))


@dataclass(frozen=True)
class ReportedFinding:
    """One measurement group read back from a report."""

    model: str  # "Model 1" or "Model 2"
    label: str
    code: tuple[str, str]  # (scheme designator, code value) of the finding type
    probability: float
    threshold: float
    present: bool


def read_findings(sr: Dataset | str | Path) -> list[ReportedFinding]:
    """The Model 1 and Model 2 findings of a report built by :func:`build_report`, in order.

    The label comes from each group's coded finding type (:func:`codes.finding_label`), the model
    from whether that code is Model 1's :data:`codes.ABNORMAL`; other groups (the lung-mask
    quality) are skipped. The tracking identifier's free text is not parsed.
    """
    if isinstance(sr, hd.sr.Comprehensive3DSR):
        doc = sr
    else:
        ds = sr if isinstance(sr, Dataset) else pydicom.dcmread(str(sr))
        doc = hd.sr.Comprehensive3DSR.from_dataset(ds)
    content = doc.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError(f"SR {doc.SOPInstanceUID} is not a TID 1500 Measurement Report")
    out = []
    for group in content.get_image_measurement_groups():
        finding_type = group.finding_type
        label = None if finding_type is None else codes.finding_label(finding_type)
        if finding_type is None or label is None:
            continue
        values = {m.name.value: float(m.value) for m in group.get_measurements()}
        present = [
            q.value.value == codes.PRESENT.value
            for q in group.get_qualitative_evaluations()
            if q.name.value == finding_type.value and isinstance(q.value, hd.sr.CodedConcept)
        ]
        out.append(
            ReportedFinding(
                model=MODEL1 if codes.same_code(finding_type, codes.ABNORMAL) else MODEL2,
                label=label,
                code=(finding_type.scheme_designator, finding_type.value),
                probability=values[codes.PROBABILITY.value],
                threshold=values[codes.DECISION_THRESHOLD.value],
                present=bool(present and present[0]),
            )
        )
    return out
