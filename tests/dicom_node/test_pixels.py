"""dicom_node.pixels on the real files in tests/data and on synthetic edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicom_node.pixels import DecodedImage, PixelDecodeError, load_image


@pytest.fixture(scope="module")
def rg1(data_dir: Path) -> DecodedImage:
    return load_image(data_dir / "RG1_UNCR.dcm")


def test_rg1_uncompressed_is_windowed_and_inverted(rg1: DecodedImage) -> None:
    assert rg1.pixels.dtype == np.float32
    assert rg1.pixels.shape == (1955, 1841) == (rg1.rows, rg1.cols)
    assert 0.0 <= float(rg1.pixels.min()) and float(rg1.pixels.max()) <= 1.0
    assert rg1.photometric == "MONOCHROME1" and rg1.inverted
    assert rg1.voi_source == "window" and rg1.window == (15000.0, 30000.0)
    assert rg1.pixel_spacing_mm is None  # PixelSpacing is 0\0: not a spacing
    assert rg1.sop_instance_uid.startswith("1.3.6.1.4.1.5962")


def test_rg1_lungs_darker_than_mediastinum(rg1: DecodedImage) -> None:
    img = rg1.pixels
    h, w = img.shape
    band = slice(int(h * 0.35), int(h * 0.55))
    right_lung = img[band, int(w * 0.22) : int(w * 0.35)].mean()
    left_lung = img[band, int(w * 0.65) : int(w * 0.78)].mean()
    mediastinum = img[band, int(w * 0.46) : int(w * 0.54)].mean()
    assert mediastinum > right_lung + 0.05, (mediastinum, right_lung)
    assert mediastinum > left_lung + 0.05, (mediastinum, left_lung)


@pytest.mark.parametrize(
    ("name", "atol"), [("RG1_J2KR.dcm", 1e-6), ("RG1_JLSN.dcm", 0.01), ("RG1_J2KI.dcm", 0.05)]
)
def test_compressed_rg1_decodes_to_the_same_image(
    data_dir: Path, rg1: DecodedImage, name: str, atol: float
) -> None:
    img = load_image(data_dir / name)
    assert img.pixels.shape == rg1.pixels.shape
    diff = np.abs(img.pixels - rg1.pixels)
    assert float(diff.mean()) <= atol, f"{name}: mean abs difference {diff.mean():.4f}"
    assert float(np.percentile(diff, 99)) <= max(atol * 5, 1e-6)


def _recoded(data_dir: Path, tmp_path: Path, syntax: pydicom.uid.UID) -> Path:
    ds = pydicom.dcmread(data_dir / "RG1_UNCR.dcm")
    if syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax)
    out = tmp_path / f"rg1_{syntax.name.replace(' ', '_')}.dcm"
    ds.save_as(out, enforce_file_format=True)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == syntax
    return out


@pytest.mark.parametrize("syntax", [RLELossless, DeflatedExplicitVRLittleEndian, JPEGLSLossless])
def test_lossless_syntaxes_give_identical_pixels(
    data_dir: Path, tmp_path: Path, rg1: DecodedImage, syntax: pydicom.uid.UID
) -> None:
    img = load_image(_recoded(data_dir, tmp_path, syntax))
    assert img.transfer_syntax_uid == syntax
    np.testing.assert_array_equal(img.pixels, rg1.pixels)


def test_implicit_little_and_explicit_big_endian(
    data_dir: Path, tmp_path: Path, rg1: DecodedImage
) -> None:
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

    ds = pydicom.dcmread(data_dir / "RG1_UNCR.dcm")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(tmp_path / "implicit.dcm", implicit_vr=True, little_endian=True)
    np.testing.assert_array_equal(load_image(tmp_path / "implicit.dcm").pixels, rg1.pixels)

    ds = pydicom.dcmread(data_dir / "RG1_UNCR.dcm")
    ds.PixelData = ds.pixel_array.astype(">u2").tobytes()  # big endian words on the wire
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    dcmwrite(tmp_path / "big.dcm", ds, implicit_vr=False, little_endian=False, force_encoding=True)
    big = load_image(tmp_path / "big.dcm")
    assert big.transfer_syntax_uid == ExplicitVRBigEndian
    np.testing.assert_array_equal(big.pixels, rg1.pixels)


def test_fake_monochrome1_is_the_inverse_of_the_original(data_dir: Path) -> None:
    original = load_image(data_dir / "siim_cr_pa_secondary_capture.dcm")
    fake = load_image(data_dir / "siim_fake_monochrome1.dcm")
    assert not original.inverted and fake.inverted
    assert original.voi_source == "percentile"
    np.testing.assert_allclose(1.0 - fake.pixels, original.pixels, atol=1e-6)
    # the original is a proper MONOCHROME2 chest: lungs darker than the spine
    img = original.pixels
    assert img[400:600, 480:540].mean() > img[400:600, 200:300].mean() + 0.05


def test_dataset_input_equals_path_input(data_dir: Path) -> None:
    a = load_image(data_dir / "siim_cr_pa_secondary_capture.dcm")
    b = load_image(pydicom.dcmread(data_dir / "siim_cr_pa_secondary_capture.dcm"))
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_garbage_file_raises(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    with pytest.raises(PixelDecodeError, match="garbage.dcm"):
        load_image(bad)


def test_corrupt_pixel_data_names_the_instance(data_dir: Path) -> None:
    ds = pydicom.dcmread(data_dir / "RG1_J2KR.dcm")
    ds.PixelData = b"\xff\x4f\xff\x51" + b"\x00" * 64 + b"\xff\xd9"
    with pytest.raises(PixelDecodeError) as info:
        load_image(ds)
    assert ds.SOPInstanceUID in str(info.value)
    assert ds.PatientID not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_no_pixel_data_raises(data_dir: Path) -> None:
    ds = pydicom.dcmread(data_dir / "RG3_UNCR.dcm", stop_before_pixels=True)
    with pytest.raises(PixelDecodeError, match="no Pixel Data"):
        load_image(ds)


# --- synthetic datasets: one grayscale-pipeline step at a time ----------------------------------


def _synthetic(pixels: np.ndarray, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


def _ramp() -> np.ndarray:
    return np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (50, 1))  # 50 x 100, 0..990


def test_rescale_and_window() -> None:
    # stored 0..990, slope 2 intercept -1000 -> -1000..980;
    # window [-500, 500] covers stored 250..750
    ds = _synthetic(
        _ramp(), RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=1000
    )
    img = load_image(ds)
    assert img.voi_source == "window"
    row = img.pixels[0]
    assert row[0] == 0.0 and row[25] == pytest.approx(0.0, abs=0.01) and row[-1] == 1.0
    assert row[50] == pytest.approx(0.5, abs=0.01)  # stored 500 -> 0 after rescale -> mid grey
    assert row[75] == pytest.approx(1.0, abs=0.01)


def test_multivalued_window_uses_the_first() -> None:
    ds = _synthetic(_ramp(), WindowCenter=[250, 700], WindowWidth=[500, 100])
    img = load_image(ds)
    assert img.window == (250.0, 500.0)


def test_voi_lut_sequence_wins_over_window() -> None:
    item = Dataset()
    item.LUTDescriptor = [1000, 0, 8]
    lut = (255 - np.arange(1000) * 255 // 999).astype(np.uint16)  # descending LUT
    item.LUTData = lut.tolist()
    ds = _synthetic(_ramp(), WindowCenter=500, WindowWidth=1000)
    ds.VOILUTSequence = [item]
    img = load_image(ds)
    assert img.voi_source == "voi_lut_sequence"
    assert img.pixels[0, 0] == pytest.approx(1.0) and img.pixels[0, -1] < 0.05


def test_padding_is_black_and_excluded_from_window() -> None:
    px = _ramp()
    px[:, :20] = 65535  # padding outside the collimated field
    ds = _synthetic(px, PixelPaddingValue=65535)
    img = load_image(ds)
    assert img.voi_source == "percentile"
    assert (img.pixels[:, :20] == 0).all()
    assert img.padding_fraction == pytest.approx(0.2)
    assert img.pixels[:, -1].min() > 0.99  # the window ignored 65535


def test_monochrome1_padding_stays_black() -> None:
    px = _ramp()
    px[:, :10] = 0
    ds = _synthetic(px, PhotometricInterpretation="MONOCHROME1", PixelPaddingValue=0)
    img = load_image(ds)
    assert img.inverted and (img.pixels[:, :10] == 0).all()
    assert img.pixels[0, 11] > img.pixels[0, -1]


def test_saturating_window_falls_back_to_percentile() -> None:
    ds = _synthetic(_ramp(), WindowCenter=50000, WindowWidth=10)
    img = load_image(ds)
    assert img.voi_source == "percentile_fallback"
    assert img.pixels.std() > 0.2


def test_multiframe_gives_first_frame() -> None:
    frames = np.stack([_ramp(), _ramp()[:, ::-1].copy()])
    ds = _synthetic(frames, WindowCenter=500, WindowWidth=1000)
    img = load_image(ds)
    assert img.number_of_frames == 2 and img.pixels.shape == (50, 100)
    assert img.pixels[0, 0] < img.pixels[0, -1]


def test_rgb_becomes_grayscale() -> None:
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[:, 30:] = (200, 200, 200)
    ds = _synthetic(np.zeros((40, 60), dtype=np.uint16))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = rgb.tobytes()
    img = load_image(ds)
    assert img.pixels.shape == (40, 60)
    assert img.pixels[:, :30].max() == 0.0 and img.pixels[:, 30:].min() == 1.0


def _dcmcjpeg(src: Path, dst: Path, option: str) -> Path:
    import shutil
    import subprocess

    exe = shutil.which("dcmcjpeg")
    if exe is None:
        pytest.fail("dcmcjpeg not found: install dcmtk (make system-deps)")
    subprocess.run([exe, option, str(src), str(dst)], check=True, capture_output=True, timeout=120)
    return dst


@pytest.mark.parametrize(
    ("source", "option", "syntax", "max_mean_diff"),
    [
        ("RG1_UNCR.dcm", "+e1", "1.2.840.10008.1.2.4.70", 0.0),  # JPEG lossless SV1
        ("RG1_UNCR.dcm", "+el", "1.2.840.10008.1.2.4.57", 0.0),  # JPEG lossless process 14
        ("RG3_UNCR.dcm", "+ee", "1.2.840.10008.1.2.4.51", 0.005),  # JPEG extended, 10-bit
        ("RG3_UNCR.dcm", "+eb", "1.2.840.10008.1.2.4.50", 0.01),  # JPEG baseline
    ],
)
def test_jpeg_family_encoded_by_dcmtk(
    data_dir: Path, tmp_path: Path, source: str, option: str, syntax: str, max_mean_diff: float
) -> None:
    original = load_image(data_dir / source)
    img = load_image(_dcmcjpeg(data_dir / source, tmp_path / f"{option[1:]}.dcm", option))
    assert img.transfer_syntax_uid == syntax
    assert float(np.abs(img.pixels - original.pixels).mean()) <= max_mean_diff
