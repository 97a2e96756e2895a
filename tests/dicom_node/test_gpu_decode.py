"""dicom_node.gpu_decode on a machine without nvImageCodec or a GPU: which instances it would
take, their first frame's code stream, and the CPU fallback giving the CPU path's images.
(On a GPU, bench/gpu.py checks the GPU decode bit for bit against the CPU decoder.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node import gpu_decode
from dicom_node.pixels import DecodedImage, PixelDecodeError, load_image, load_images

DATA = Path(__file__).resolve().parents[1] / "data"
J2KR = DATA / "RG1_J2KR.dcm"
UNCR = DATA / "RG1_UNCR.dcm"
JPEG = DATA / "siim_cr_pa_secondary_capture.dcm"


def test_eligible_instances() -> None:
    assert gpu_decode.eligible(pydicom.dcmread(J2KR))
    assert gpu_decode.eligible(pydicom.dcmread(JPEG))
    assert not gpu_decode.eligible(pydicom.dcmread(UNCR))  # not compressed
    signed = pydicom.dcmread(J2KR)
    signed.PixelRepresentation = 1  # signed data stays with the CPU decoder
    assert not gpu_decode.eligible(signed)
    colour = pydicom.dcmread(J2KR)
    colour.SamplesPerPixel = 3
    assert not gpu_decode.eligible(colour)


def test_first_frame_codestream_is_the_j2k_codestream() -> None:
    stream = gpu_decode.first_frame_codestream(pydicom.dcmread(J2KR))
    assert stream[:4] == b"\xff\x4f\xff\x51"  # SOC then SIZ
    assert stream.rstrip(b"\x00")[-2:] == b"\xff\xd9"  # EOC (the item may be padded)


def test_switched_off_means_no_gpu_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gpu_decode.ENV_SWITCH, "off")
    assert not gpu_decode.available()
    assert gpu_decode.decode_first_frames([pydicom.dcmread(J2KR)]) == [None]


def test_without_nvimgcodec_the_cpu_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gpu_decode.ENV_SWITCH, raising=False)
    try:
        import nvidia.nvimgcodec  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401
    except ImportError:
        assert not gpu_decode.available()
    else:  # pragma: no cover - only where the package is installed
        pytest.skip("nvImageCodec is installed here")
    ds = pydicom.dcmread(J2KR)
    assert not gpu_decode.wanted(ds)
    assert gpu_decode.decode_first_frames([ds]) == [None]


def test_given_stored_values_are_used() -> None:
    ds = pydicom.dcmread(J2KR)
    stored = ds.pixel_array
    ref = load_image(J2KR)
    same = load_image(ds, stored=stored)
    np.testing.assert_array_equal(same.pixels, ref.pixels)
    assert same.inverted and ref.inverted  # MONOCHROME1 handled after the decode
    darker = load_image(ds, stored=(stored // 2).astype(stored.dtype))
    assert not np.array_equal(darker.pixels, ref.pixels)


def test_load_images_matches_load_image_and_reports_each_failure(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    out = load_images([J2KR, junk, JPEG])
    assert isinstance(out[0], DecodedImage) and isinstance(out[2], DecodedImage)
    assert isinstance(out[1], PixelDecodeError)
    np.testing.assert_array_equal(out[0].pixels, load_image(J2KR).pixels)
    np.testing.assert_array_equal(out[2].pixels, load_image(JPEG).pixels)
