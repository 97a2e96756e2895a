"""The findings of one study as a DICOM TID 1500 Measurement Report (Enhanced SR).

:func:`build_report` turns a :class:`ReportInput` (the source images' headers, the model outputs
and the device's identity) into a :class:`highdicom.sr.EnhancedSR`: Enhanced SR because everything
in it is 2-D image coordinates (no SCOORD3D, no by-reference relationships); OHIF's SR handler,
dcmtk and highdicom all read it. The document:

- the **same patient and study** as the source images (their Patient and General Study modules
  are copied), in a series of its own. It refuses, with ``ValueError``, images that disagree on
  Patient ID, Issuer of Patient ID or Study Instance UID: never a report for the wrong patient;
- **observer context**: a device observer (the product's name and version, the AE title,
  TID 1004);
- **procedure reported**: LOINC 36643-5 "XR Chest 2 Views" (frontal + lateral) or 36554-4 "XR Chest
  Single view";
- **qualitative evaluations** (TID 1500 rows 12-14) placed right after the procedure, so that a
  text reader (dsrdump, a text-only viewer) meets it first: a **summary** text (Model 1's
  decision, the Present findings with probability and threshold, the Absent ones, the
  cardiothoracic ratio, the lung-mask QC state and failing check, "NOT FOR DIAGNOSTIC USE", the
  report it replaces), then each **Absent** Model 2 finding as ``<finding> = Absent`` inferred
  from its probability and threshold, the lung-mask QC as ``acceptable``/``rejected`` inferred
  from its measurements, and the notes (crop box, each model's weights hash, once);
- **image library** (TID 1600) listing the frontal and, when present, the lateral image;
- **imaging measurements**, every group marked on the frontal image so a viewer can show it:
  Model 1's decision (TID 1410, region: the lung crop box, else the whole image), one TID 1410
  group per **Present** Model 2 finding (region: the box around its Grad-CAM hot area, else the
  lung box), each with the probability (a NUM named by the finding's code, unit
  ``{probability}``, with the decision threshold as its property) and ``<finding> = Present``;
  and, when the models
  measured an interpretable one, the **cardiothoracic ratio** (TID 1501) with the cardiac and
  thoracic widths each inferred from its line;
- a **deterministic SOP Instance UID** (:func:`~dicom_node.derived.report_uid`) from the source SOP
  Instance UIDs and the model names, versions and weight hashes: sending the same analysis twice
  never creates two documents; a re-analysis after late images has other sources, so a new UID,
  a higher Instance Number, and lists the report it replaces in the Predecessor Documents
  Sequence and the summary.

Why that shape: OHIF (3.13) throws on a measurement group with no image coordinates and labels
each drawn measurement with its NUMs' names and values, so every group has coordinates and the
probability NUM carries the finding's name; Absent findings stay structured (and readable back)
without cluttering the image.

:func:`~dicom_node.sr_read.read_report` and :func:`~dicom_node.sr_read.read_findings` read a
written report back (re-exported here). UIDs, the PHI-safe header copy and the atomic write live
in :mod:`dicom_node.derived` (shared with the key image); the content items in
:mod:`dicom_node.sr_content`. See :mod:`dicom_node.codes` for every code used.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Mapping, Sequence
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
    CtrInfo,
    DeviceInfo,
    FindingResult,
    LineInfo,
    MaskQualityInfo,
    atomic_write,
    check_same_patient_and_study,
    no_person_name_warnings,
    report_series_uid,
    report_uid,
    require_int,
    require_str,
    sanitize_copied_attributes,
    source_header,
)
from dicom_node.sr_content import (
    MODEL1,
    MODEL2,
    NOT_FOR_DIAGNOSTIC_USE,
    ctr_group,
    finding_group,
    qualitative_evaluations,
)
from dicom_node.sr_read import ReportedFinding, read_findings, read_report

__all__ = [
    "DEFAULT_SERIES_NUMBER",
    "MODEL1",
    "MODEL2",
    "NOT_FOR_DIAGNOSTIC_USE",
    "SERIES_DESCRIPTION",
    "SR_SOP_CLASS",
    "AlgorithmInfo",
    "CropInfo",
    "CtrInfo",
    "DeviceInfo",
    "FindingResult",
    "LineInfo",
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

DEFAULT_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "CXR AI findings - NOT FOR DIAGNOSTIC USE"
#: Model 1's one label: the study is abnormal (its finding type is :data:`codes.ABNORMAL`).
MODEL1_LABEL = "Abnormal"
SR_SOP_CLASS = pydicom.uid.EnhancedSRStorage


# --- inputs (the worker converts the models' outputs into these) -------------------------------


@dataclass(frozen=True)
class PreviousReport:
    """A report this one replaces (for the Predecessor Documents Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = SR_SOP_CLASS

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
    result, labelled ``"Abnormal"``; ``findings`` are Model 2's, each label once. ``regions``
    maps a finding's label to the box (frontal pixels) around its heat map's hot area
    (:func:`~dicom_node.derived.hot_region`); a Present finding without one is marked on the
    lung crop box. ``ctr`` is drawn only when interpretable.
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
    #: InstanceNumber of the report (and its key image): 1, then one more per re-analysis
    instance_number: int = 1
    #: why this report replaces ``previous`` (e.g. "a late image arrived"); no patient data
    supersedes_reason: str = ""
    regions: Mapping[str, CropInfo] = field(default_factory=dict)
    ctr: CtrInfo | None = None

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
        require_int(self.instance_number, "ReportInput.instance_number", minimum=1)
        require_str(self.supersedes_reason, "ReportInput.supersedes_reason")
        for label, box in self.regions.items():
            _require_instance(box, CropInfo, f"regions[{label!r}]")
            if label not in seen:
                raise ValueError(f"ReportInput.regions names {label!r}, which is not a finding")
        _require_instance(self.ctr, (CtrInfo, type(None)), "ctr")

    @property
    def sources(self) -> list[Dataset]:
        return [self.frontal] + ([self.lateral] if self.lateral is not None else [])

    @property
    def algorithms(self) -> list[AlgorithmInfo]:
        algos = [self.model1_algorithm, self.model2_algorithm]
        if self.lung_mask_algorithm is not None:
            algos.append(self.lung_mask_algorithm)
        return algos

    @property
    def lung_box(self) -> CropInfo:
        """Where the study-level decision is marked: the lung crop box, else the whole image."""
        if self.crop is not None and self.crop.x1 > self.crop.x0 and self.crop.y1 > self.crop.y0:
            return self.crop
        return CropInfo(0, 0, int(self.frontal.Columns), int(self.frontal.Rows))

    def region(self, label: str) -> CropInfo:
        """The box a Present finding is marked on."""
        box = self.regions.get(label)
        return box if box is not None and box.x1 > box.x0 and box.y1 > box.y0 else self.lung_box


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


def build_report(inp: ReportInput) -> hd.sr.EnhancedSR:
    """Build the TID 1500 report for ``inp``; raises ``ValueError`` on inconsistent input."""
    with no_person_name_warnings():
        return _build_report(inp)


Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def _groups(inp: ReportInput, sop_uid: str) -> list[Group]:
    groups: list[Group] = [
        finding_group(inp.model1, inp.model1_algorithm, MODEL1, sop_uid, inp.frontal, inp.lung_box)
    ]
    groups += [
        finding_group(f, inp.model2_algorithm, MODEL2, sop_uid, inp.frontal, inp.region(f.label))
        for f in inp.findings  # each label once: ReportInput checked it
        if f.present
    ]
    if inp.ctr is not None and inp.ctr.shown:
        groups.append(ctr_group(inp.ctr, inp.lung_mask_algorithm, sop_uid, inp.frontal))
    return groups


def _build_report(inp: ReportInput) -> hd.sr.EnhancedSR:
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
    previous = _previous(inp.previous, study_uid, sop_uid)

    device = hd.sr.ObserverContext(
        observer_type=_codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=inp.device.uid,
            name=inp.device.ae_title,
            manufacturer_name=inp.device.manufacturer,
            model_name=f"{inp.device.name} {inp.device.version}"[:64],
        ),
    )
    procedure = (
        codes.PROCEDURE_CHEST_XR_2_VIEWS
        if inp.lateral is not None
        else codes.PROCEDURE_CHEST_XR_1_VIEW
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=procedure,
        imaging_measurements=_groups(inp, sop_uid),
        referenced_images=[_library_stub(h) for h in headers],
    )
    # the summary container goes right after the procedure reported (before the image library)
    root = report[0].ContentSequence
    after = 1 + max(
        i
        for i, item in enumerate(root)
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
    )
    root.insert(after, qualitative_evaluations(inp, [str(p.SOPInstanceUID) for p in previous]))

    sr = hd.sr.EnhancedSR(
        evidence=headers,
        content=report,
        series_instance_uid=series_uid,
        series_number=inp.series_number,
        sop_instance_uid=sop_uid,
        instance_number=inp.instance_number,
        manufacturer=inp.device.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=previous or None,
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
    # the product and its version, never the host or process name
    sr.ManufacturerModelName = inp.device.name[:64]
    sr.SoftwareVersions = inp.device.version[:64]
    sr.StationName = inp.device.ae_title[:16]
    when = inp.content_datetime or _dt.datetime.now()
    sr.ContentDate = when.strftime("%Y%m%d")  # type: ignore[assignment]
    sr.ContentTime = when.strftime("%H%M%S")  # type: ignore[assignment]
    sr.SeriesDate, sr.SeriesTime = sr.ContentDate, sr.ContentTime
    sr.InstanceCreationDate = sr.ContentDate
    sr.InstanceCreationTime = sr.ContentTime
    return sr


def write_report(sr: Dataset, path: str | Path) -> Path:
    """Write ``sr`` as a DICOM Part 10 file (atomically: a reader never sees half a file)."""
    return atomic_write(sr, path)
