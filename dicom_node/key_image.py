"""A Secondary Capture "key image" for viewers that do not render Structured Reports.

:func:`build_key_image` draws, on the windowed frontal image: the lung outline (green), the crop
box (yellow), the heatmaps of the strongest present findings (up to three, each in its own colour,
blended where the heatmap exceeds :data:`HEATMAP_FLOOR`), a banner "NOT FOR DIAGNOSTIC USE" and a
legend with Model 1's result and the findings shown. It returns the RGB picture, its PNG bytes and
an SC Image dataset in the same patient and study as the frontal image, in a series of its own,
with Burned In Annotation YES and a deterministic SOP Instance UID (same inputs, same UID).

No patient identifier is drawn into the pixels.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node import derived
from dicom_node.derived import AlgorithmInfo, CropInfo, DeviceInfo, FindingResult

log = logging.getLogger(__name__)

BANNER = "NOT FOR DIAGNOSTIC USE"
DEFAULT_SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "CXR AI key image - NOT FOR DIAGNOSTIC USE"
HEATMAP_FLOOR = 0.4
MAX_HEATMAPS = 3
# BGR colours (OpenCV order)
_LUNG = (0, 200, 0)
_CROP = (0, 220, 255)
_HEAT = [(0, 0, 255), (255, 0, 255), (255, 160, 0)]


@dataclass(frozen=True)
class ShownFinding:
    """A finding as the picture needs it, when the caller has no threshold at hand."""

    label: str
    probability: float
    present: bool

    def __post_init__(self) -> None:
        derived.require_str(self.label, "ShownFinding.label")
        derived.require_probability(self.probability, f"{self.label} probability")


@dataclass
class KeyImageInput:
    """What the key image shows. ``image`` is :attr:`dicom_node.pixels.DecodedImage.pixels`.

    The SOP Instance UID derives from ``report_uid`` when given (the key image belongs to that
    report), else from the frontal image and ``algorithms``.
    """

    frontal: Dataset  # the source frontal image (header suffices)
    image: np.ndarray  # float32 (rows, cols) in [0, 1], 0 = black
    model1: FindingResult | None
    findings: Sequence[FindingResult | ShownFinding]
    algorithms: list[AlgorithmInfo] = field(default_factory=list)
    report_uid: str | None = None
    lung_mask: np.ndarray | None = None  # 0/1 at the image's resolution
    crop: CropInfo | None = None
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # label -> [0, 1], any size
    device: DeviceInfo = field(default_factory=DeviceInfo)
    max_side: int = 1024  # the picture is downscaled so its longer side is at most this
    series_number: int = DEFAULT_SERIES_NUMBER
    content_datetime: _dt.datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.frontal, Dataset):
            raise TypeError(
                "KeyImageInput.frontal must be a pydicom Dataset, "
                f"got {type(self.frontal).__name__}"
            )
        if self.model1 is not None and not isinstance(self.model1, FindingResult):
            raise TypeError(
                f"KeyImageInput.model1 must be a FindingResult or None, "
                f"got {type(self.model1).__name__}"
            )
        for i, f in enumerate(self.findings):
            if not isinstance(f, FindingResult | ShownFinding):
                raise TypeError(
                    f"KeyImageInput.findings[{i}] must be a FindingResult or ShownFinding, "
                    f"got {type(f).__name__}"
                )
        derived.require_int(self.max_side, "KeyImageInput.max_side", minimum=1)
        derived.require_int(self.series_number, "KeyImageInput.series_number", minimum=1)


@dataclass(frozen=True)
class KeyImage:
    dataset: Dataset  # Secondary Capture Image Storage, RGB, 8 bit
    rgb: np.ndarray  # uint8 (rows, cols, 3)
    png: bytes
    shown: list[str]  # labels whose heatmaps are drawn, strongest first


def key_image_uid(
    frontal: Dataset, algorithms: Sequence[AlgorithmInfo], report: str | None = None
) -> str:
    """The key image's SOP Instance UID: a function of its report's UID (or sources and models)."""
    if report:
        return derived.deterministic_uid("cxr-key-image-v1", "report", report)
    if not algorithms:
        raise ValueError(
            "key image: give report_uid or the algorithms, so its UID is deterministic"
        )
    return derived.deterministic_uid("cxr-key-image-v1", derived.report_uid([frontal], algorithms))


def _strongest(inp: KeyImageInput) -> list[FindingResult | ShownFinding]:
    present = [
        f for f in inp.findings if f.present and f.label in inp.heatmaps and f.label != "No Finding"
    ]
    return sorted(present, key=lambda f: (-f.probability, f.label))[:MAX_HEATMAPS]


def _text(
    img: np.ndarray, text: str, org: tuple[int, int], scale: float, color: tuple[int, int, int]
) -> None:
    thickness = max(1, int(round(scale * 2)))
    cv2.putText(
        img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA
    )
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness, cv2.LINE_AA)


def render(inp: KeyImageInput) -> tuple[np.ndarray, list[str]]:
    """The annotated picture as RGB uint8, and the labels whose heatmaps it shows."""
    image = np.asarray(inp.image, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 8:
        raise ValueError(f"key image: expected a 2-D image, got shape {image.shape}")
    h0, w0 = image.shape
    scale = min(1.0, inp.max_side / max(h0, w0))
    h, w = max(1, int(round(h0 * scale))), max(1, int(round(w0 * scale)))
    gray = cv2.resize(np.clip(image, 0, 1), (w, h), interpolation=cv2.INTER_AREA)
    canvas = cv2.cvtColor((gray * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)

    shown = _strongest(inp)
    for color, finding in zip(_HEAT, shown, strict=False):
        heat = cv2.resize(
            np.clip(np.asarray(inp.heatmaps[finding.label], dtype=np.float32), 0, 1), (w, h)
        )
        alpha = np.clip((heat - HEATMAP_FLOOR) / (1 - HEATMAP_FLOOR), 0, 1)[..., None] * 0.45
        canvas = (canvas * (1 - alpha) + np.array(color, dtype=np.float32) * alpha).astype(np.uint8)
        level = ((heat >= 0.6) * 255).astype(np.uint8)
        contours, _ = cv2.findContours(level, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, color, max(1, w // 500))

    line = max(2, w // 300)
    if inp.lung_mask is not None:
        mask = cv2.resize(
            (np.asarray(inp.lung_mask) > 0).astype(np.uint8),
            (w, h),
            interpolation=cv2.INTER_NEAREST,
        )
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, _LUNG, line)
    if inp.crop is not None:
        c = inp.crop
        p0 = (int(c.x0 * scale), int(c.y0 * scale))
        p1 = (int(max(c.x1 - 1, c.x0) * scale), int(max(c.y1 - 1, c.y0) * scale))
        cv2.rectangle(canvas, p0, p1, _CROP, line)

    # banner and legend in bands added above and below, so nothing covers the anatomy
    font = max(0.5, w / 1400)
    band = int(40 * font) + 10
    top = np.zeros((band, w, 3), np.uint8)
    _text(top, BANNER, (10, band - 12), font * 1.2, (0, 0, 255))
    rows: list[str] = []
    colors: list[tuple[int, int, int]] = []
    if inp.model1 is not None:
        m1 = inp.model1
        rows.append(
            f"Model 1: {'ABNORMAL' if m1.present else 'no abnormality'} "
            f"(p={m1.probability:.2f}, threshold {m1.threshold:.2f})"
        )
        colors.append((255, 255, 255))
    for color, f in zip(_HEAT, shown, strict=False):
        rows.append(f"{f.label}: p={f.probability:.2f}")
        colors.append(color)
    rows.append("green: lung outline   yellow: crop box")
    colors.append((200, 200, 200))
    step = int(30 * font) + 6
    bottom = np.zeros((step * len(rows) + 10, w, 3), np.uint8)
    for i, (text, color) in enumerate(zip(rows, colors, strict=True)):
        _text(bottom, text, (10, step * (i + 1)), font, color)
    canvas = np.vstack([top, canvas, bottom])
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB), [f.label for f in shown]


def build_key_image(inp: KeyImageInput) -> KeyImage:
    """Render and wrap the key image; raises ``ValueError`` on unusable input."""
    derived.check_same_patient_and_study([inp.frontal])
    rgb, shown = render(inp)
    header = derived.source_header(inp.frontal)
    sop_uid = key_image_uid(inp.frontal, inp.algorithms, inp.report_uid)
    series_uid = derived.key_image_series_uid(str(header.StudyInstanceUID), inp.device)
    orientation = header.get("PatientOrientation")
    known = orientation is not None and len(orientation) == 2 and all(str(v) for v in orientation)
    with derived.no_person_name_warnings():
        sc = _sc_image(inp, header, rgb, sop_uid, series_uid, orientation if known else None)
    if not known:
        sc.PatientOrientation = ""  # type: ignore[assignment]  # type 2: present, empty when the source did not say
    _describe(sc, inp, header, shown)
    derived.sanitize_copied_attributes(sc)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV failure
        raise ValueError(f"key image {sop_uid}: PNG encoding failed")
    return KeyImage(dataset=sc, rgb=rgb, png=png.tobytes(), shown=shown)


def _sc_image(
    inp: KeyImageInput,
    header: Dataset,
    rgb: np.ndarray,
    sop_uid: str,
    series_uid: str,
    orientation: Sequence[object] | None,
) -> hd.sc.SCImage:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=inp.series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=inp.device.manufacturer,
        # highdicom insists on a value; an unknown one is emptied by the caller
        patient_orientation=(
            (str(orientation[0]), str(orientation[1])) if orientation is not None else ("L", "F")
        ),
    )


def _describe(sc: Dataset, inp: KeyImageInput, header: Dataset, shown: list[str]) -> None:
    # Laterality is type 2C (paired body parts only): naming the body part lets validators see
    # that a chest needs none; when the source does not name it, say it is unknown (empty)
    if header.get("BodyPartExamined"):
        sc.BodyPartExamined = header.BodyPartExamined
    elif "Laterality" not in sc:
        sc.Laterality = ""
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.ImageComments = f"{BANNER}. Annotated copy of the frontal image; findings: " + (
        ", ".join(shown) if shown else "none shown"
    )
    sc.DerivationDescription = "Downscaled, windowed frontal radiograph with model annotations"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ManufacturerModelName = inp.device.name[:64]
    sc.SoftwareVersions = inp.device.version[:64]
    ref = Dataset()
    ref.ReferencedSOPClassUID = inp.frontal.SOPClassUID
    ref.ReferencedSOPInstanceUID = inp.frontal.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    when = inp.content_datetime or _dt.datetime.now()
    sc.ContentDate = when.strftime("%Y%m%d")
    sc.ContentTime = when.strftime("%H%M%S")
    sc.InstanceCreationDate, sc.InstanceCreationTime = sc.ContentDate, sc.ContentTime


def write_key_image(
    key: KeyImage, dicom_path: str | Path, png_path: str | Path | None = None
) -> tuple[Path, Path | None]:
    """Write the DICOM file (and the PNG when ``png_path`` is given), each atomically."""
    dicom_path = derived.atomic_write(key.dataset, dicom_path)
    out_png = None if png_path is None else derived.atomic_write(key.png, png_path)
    return dicom_path, out_png
