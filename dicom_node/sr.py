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
- a **deterministic SOP Instance UID** (:func:`report_uid`) from the source SOP Instance UIDs and
  the model names, versions and weight hashes: sending the same analysis twice never creates two
  documents; a re-analysis after late images has other sources, so a new UID, and lists the report
  it replaces in the Predecessor Documents Sequence.

See :mod:`dicom_node.codes` for every code used.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as _codes

from dicom_node import codes

log = logging.getLogger(__name__)

NOT_FOR_DIAGNOSTIC_USE = (
    "NOT FOR DIAGNOSTIC USE. Research-grade model outputs produced without radiologist review."
)
DEFAULT_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "CXR AI findings - NOT FOR DIAGNOSTIC USE"
_TYPE2_PATIENT_STUDY = (
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


#: Namespace of this project's name-based UUIDs (a fixed, random UUID; never change it).
_UID_NAMESPACE = uuid.UUID("8f4c1e0a-3b7d-5c21-9a6e-2f1d0c4b7a93")


def deterministic_uid(*parts: str) -> str:
    """A UID that is a function of ``parts``: ``2.25.`` + a name-based (version 5) UUID.

    ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores its entropy and returns a
    random UID, and a prefixed one is not a valid ``2.25`` UUID-derived UID; so the UUID is made
    here, as ISO/IEC 9834-8 describes.
    """
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


# --- inputs (the worker converts the models' outputs into these) -------------------------------


@dataclass(frozen=True)
class FindingResult:
    """One model output: the probability of ``label`` and the model card's threshold for it."""

    label: str
    probability: float
    threshold: float
    threshold_validated: bool = True  # False: the model card's default, not set on held-out data

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class AlgorithmInfo:
    """A model's identity, for TID 4019 Algorithm Identification."""

    name: str
    version: str
    sha256: str
    architecture: str = ""


@dataclass(frozen=True)
class CropInfo:
    """The lung crop in frontal-image pixels: rows [y0, y1), columns [x0, x1)."""

    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class MaskQualityInfo:
    area_fraction: float
    components: int
    left_right_balance: float
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class DeviceInfo:
    """The worker as the SR's observer device and equipment."""

    name: str = "cxr-pacs-worker"
    version: str = "0.1.0"
    ae_title: str = "CXR_WORKER"
    manufacturer: str = "cxr-pacs-worker project"

    @property
    def uid(self) -> str:
        """A stable Device Observer UID for this worker identity."""
        return deterministic_uid("cxr-device", self.name, self.ae_title)


@dataclass(frozen=True)
class PreviousReport:
    """A report this one replaces (for the Predecessor Documents Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = pydicom.uid.Comprehensive3DSRStorage


@dataclass
class ReportInput:
    """Everything one report says. ``frontal``/``lateral`` are the source images (headers suffice)."""

    frontal: Dataset
    model1: FindingResult  # label "Abnormal" by convention
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
    considered_instances: Sequence[
        str
    ] = ()  # SOP Instance UIDs of every image the analysis weighed
    content_datetime: _dt.datetime | None = None  # defaults to now

    @property
    def sources(self) -> list[Dataset]:
        return [self.frontal] + ([self.lateral] if self.lateral is not None else [])

    @property
    def algorithms(self) -> list[AlgorithmInfo]:
        algos = [self.model1_algorithm, self.model2_algorithm]
        if self.lung_mask_algorithm is not None:
            algos.append(self.lung_mask_algorithm)
        return algos


# --- identity -----------------------------------------------------------------------------------


def check_same_patient_and_study(datasets: Sequence[Dataset]) -> None:
    """Raise ``ValueError`` unless every dataset has the same Patient ID, issuer and study.

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
    for ds in datasets[1:]:
        for kw in ("PatientID", "IssuerOfPatientID", "StudyInstanceUID"):
            a = str(first.get(kw, "") or "").strip()
            b = str(ds.get(kw, "") or "").strip()
            if a != b:
                raise ValueError(
                    f"source images {first.get('SOPInstanceUID', '?')} and "
                    f"{ds.get('SOPInstanceUID', '?')} have different {kw}: refusing to write one "
                    "report over two patients or studies; check the study's instances"
                )


def _algo_key(a: AlgorithmInfo) -> str:
    return f"{a.name}|{a.version}|{a.sha256}"


def report_uid(sources: Sequence[Dataset | str], algorithms: Sequence[AlgorithmInfo]) -> str:
    """The SOP Instance UID of the report on ``sources`` by ``algorithms`` (order-independent)."""
    uids = sorted({str(s.SOPInstanceUID) if isinstance(s, Dataset) else str(s) for s in sources})
    algos = sorted(_algo_key(a) for a in algorithms)
    return deterministic_uid("cxr-sr-v1", *uids, "--", *algos)


def report_series_uid(study_instance_uid: str, device: DeviceInfo) -> str:
    """One series per study and worker for all its reports, so re-analyses stay together."""
    return deterministic_uid("cxr-sr-series", study_instance_uid, device.name, device.ae_title)


# --- content ------------------------------------------------------------------------------------


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
    for kw in _TYPE2_PATIENT_STUDY:
        if kw not in out:
            setattr(out, kw, "")
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    return out


_KEEP_AS_IS = {
    "PatientID",
    "IssuerOfPatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
}


def sanitize_copied_attributes(sr: Dataset) -> None:
    """Repair or drop copied top-level values that break their VR (a source's ``PatientAge`` of
    ``62`` instead of ``062Y``), so a sloppy modality cannot make our report invalid.

    Identity attributes are never touched; type 2 attributes are emptied, others removed. The log
    names the attribute only (the value may be PHI).
    """
    from pydicom import config
    from pydicom.valuerep import validate_value

    for elem in list(sr):
        if elem.VR == "SQ" or elem.keyword in _KEEP_AS_IS or elem.value in (None, ""):
            continue
        values = elem.value if isinstance(elem.value, pydicom.multival.MultiValue) else [elem.value]
        try:
            for v in values:
                if isinstance(v, str | bytes):  # numbers and person names were parsed already
                    validate_value(elem.VR, v, config.RAISE)
            continue
        except ValueError:
            pass
        if (
            elem.VR == "AS"
            and str(elem.value).strip().isdigit()
            and len(str(elem.value).strip()) <= 3
        ):
            elem.value = f"{int(str(elem.value).strip()):03d}Y"
            action = "repaired as years"
        elif elem.keyword in _TYPE2_PATIENT_STUDY:
            elem.value = ""
            action = "emptied"
        else:
            del sr[elem.tag]
            action = "dropped"
        log.warning(
            "report %s: source attribute %s had an invalid %s value; %s",
            sr.get("SOPInstanceUID", "?"),
            elem.keyword or elem.tag,
            elem.VR,
            action,
        )


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
        stub.Modality = "OT"  # only steers highdicom away from TID 1603; the coded modality comes from the SOP class
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


def _clip01(value: float, what: str) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0 or v != v:
        raise ValueError(f"{what} = {value!r} is not a probability in [0, 1]")
    return v


def _finding_group(
    f: FindingResult,
    algo: AlgorithmInfo,
    sop_uid: str,
    title: str,
    sources: list[hd.sr.SourceImageForMeasurementGroup],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    code = codes.finding_code(f.label)
    p = _clip01(f.probability, f"{f.label} probability")
    t = _clip01(f.threshold, f"{f.label} threshold")
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


@contextmanager
def no_person_name_warnings() -> Iterator[None]:
    """Silence highdicom's person-name format warning, which quotes the patient's name (PHI)
    into warnings and logs. Local to the calls that copy patient data; nothing global."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The string .* unlikely to represent the intended person name"
        )
        yield


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
    groups = [_finding_group(inp.model1, inp.model1_algorithm, sop_uid, "Model 1", group_sources)]
    seen = {inp.model1.label}
    for f in inp.findings:
        if f.label in seen:
            raise ValueError(f"finding {f.label!r} is reported twice; each label may appear once")
        seen.add(f.label)
        groups.append(_finding_group(f, inp.model2_algorithm, sop_uid, "Model 2", group_sources))
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sr.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


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
    """The Model 1 and Model 2 findings of a report built by :func:`build_report`, in order."""
    doc = (
        sr
        if isinstance(sr, hd.sr.Comprehensive3DSR)
        else (
            hd.sr.Comprehensive3DSR.from_dataset(
                sr if isinstance(sr, Dataset) else pydicom.dcmread(str(sr))
            )
        )
    )
    out = []
    content = doc.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError(f"SR {doc.SOPInstanceUID} is not a TID 1500 Measurement Report")
    for group in content.get_image_measurement_groups():
        model, _, label = str(group.tracking_identifier).partition(": ")
        if model not in ("Model 1", "Model 2"):
            continue
        finding_type = group.finding_type
        if finding_type is None:
            continue
        values = {m.name.value: float(m.value) for m in group.get_measurements()}
        present = [
            q.value.value == codes.PRESENT.value  # type: ignore[union-attr]
            for q in group.get_qualitative_evaluations()
            if q.name.value == finding_type.value
        ]
        out.append(
            ReportedFinding(
                model=model,
                label=label,
                code=(finding_type.scheme_designator, finding_type.value),
                probability=values[codes.PROBABILITY.value],
                threshold=values[codes.DECISION_THRESHOLD.value],
                present=bool(present and present[0]),
            )
        )
    return out
