"""dicom_node.conformance: dataset checks on real files (and broken copies of them)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_node.conformance import ReceivedInstance, inspect_dataset
from dicom_node.statuses import DatasetMismatch, UndecodableDataset
from dicom_node.uids import InvalidUID
from tests.conftest import DATA
from tests.dicom_net import body_bytes, fresh

ALL_FILES = sorted(p.name for p in DATA.glob("*.dcm"))


def _inspect(path: Path, data: bytes | None = None, **kw: str) -> ReceivedInstance:
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    args = {
        "transfer_syntax": str(meta.TransferSyntaxUID),
        "affected_sop_class_uid": str(meta.MediaStorageSOPClassUID),
        "affected_sop_instance_uid": str(meta.MediaStorageSOPInstanceUID),
    }
    args.update(kw)
    return inspect_dataset(body_bytes(path) if data is None else data, **args)


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_real_file_passes(name: str) -> None:
    info = _inspect(DATA / name)
    ds = pydicom.dcmread(DATA / name, stop_before_pixels=True)
    assert info.study_uid == ds.StudyInstanceUID
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.modality == "CR"
    assert "PixelData" not in info.header  # the header stops before the pixels


@pytest.mark.parametrize(
    ("option", "syntax"),
    [
        ("+ti", ImplicitVRLittleEndian),
        ("+tb", ExplicitVRBigEndian),
        ("+td", DeflatedExplicitVRLittleEndian),
    ],
)
def test_other_uncompressed_syntaxes_pass(
    tmp_path: Path, option: str, syntax: pydicom.uid.UID
) -> None:
    """Converted by dcmtk's dcmconv (a real big endian / deflated encoder, not pydicom)."""
    if shutil.which("dcmconv") is None:
        pytest.skip("dcmtk's dcmconv is not installed")
    out = tmp_path / "x.dcm"
    subprocess.run(["dcmconv", option, str(DATA / "RG3_UNCR.dcm"), str(out)], check=True)
    info = _inspect(out)
    assert info.transfer_syntax_uid == syntax
    assert info.body_part == "EXTREMITY"


@pytest.mark.parametrize("cut", [1, 2, 1000, 3_600_000, 7_198_000])
def test_truncated_dataset_is_undecodable(cut: int) -> None:
    data = body_bytes(DATA / "RG1_UNCR.dcm")
    with pytest.raises(UndecodableDataset, match="cannot parse the dataset at byte"):
        _inspect(DATA / "RG1_UNCR.dcm", data[:-cut])


def test_truncated_compressed_dataset_is_undecodable() -> None:
    data = body_bytes(DATA / "RG1_J2KR.dcm")
    with pytest.raises(UndecodableDataset, match="truncated"):
        _inspect(DATA / "RG1_J2KR.dcm", data[: len(data) // 2])


@pytest.mark.parametrize(
    "syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"]
)
def test_random_bytes_are_undecodable(syntax: str) -> None:
    garbage = bytes(range(256)) * 40 + os.urandom(4000)
    with pytest.raises(UndecodableDataset):
        _inspect(DATA / "RG1_UNCR.dcm", garbage, transfer_syntax=syntax)


def test_garbage_deflate_stream_is_undecodable() -> None:
    with pytest.raises(UndecodableDataset, match="inflate"):
        _inspect(
            DATA / "RG1_UNCR.dcm", b"\xff" * 100, transfer_syntax=DeflatedExplicitVRLittleEndian
        )


def test_request_uids_must_match_dataset() -> None:
    with pytest.raises(
        DatasetMismatch, match="differs from the request's Affected SOP Instance UID"
    ):
        _inspect(DATA / "RG1_UNCR.dcm", affected_sop_instance_uid="1.2.3.4")
    with pytest.raises(DatasetMismatch, match="differs from the request's Affected SOP Class UID"):
        _inspect(DATA / "RG1_UNCR.dcm", affected_sop_class_uid="1.2.840.10008.5.1.4.1.1.7")


def _resave(tmp_path: Path, ds: Dataset) -> Path:
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_path_traversal_study_uid_is_a_mismatch(tmp_path: Path) -> None:
    ds = fresh(pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm"))
    ds.StudyInstanceUID = "../../etc"
    with pytest.raises(
        InvalidUID, match=r"StudyInstanceUID \(9 characters\) is not a valid DICOM UID"
    ):
        _inspect(_resave(tmp_path, ds))


def test_missing_series_uid_is_a_mismatch(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")
    del ds.SeriesInstanceUID
    with pytest.raises(
        InvalidUID, match=r"SeriesInstanceUID \(NoneType\) is not a valid DICOM UID: it is missing"
    ):
        _inspect(_resave(tmp_path, ds))


def test_pixel_length_must_match_rows_columns(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DATA / "RG3_UNCR.dcm")
    ds.Rows = ds.Rows + 1
    with pytest.raises(
        DatasetMismatch, match=r"Pixel Data has 6195200 bytes but Rows 1761 x Columns 1760"
    ):
        _inspect(_resave(tmp_path, ds))


def test_missing_pixel_data_is_a_mismatch(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DATA / "RG3_UNCR.dcm")
    del ds.PixelData
    with pytest.raises(DatasetMismatch, match="Pixel Data .* is missing"):
        _inspect(_resave(tmp_path, ds))


def test_garbage_in_compressed_pixel_data_is_a_mismatch(tmp_path: Path) -> None:
    data = bytearray(body_bytes(DATA / "RG1_J2KR.dcm"))
    soc = data.find(b"\xff\x4f\xff\x51")
    data[soc : soc + 4096] = os.urandom(4096)
    with pytest.raises(DatasetMismatch, match="does not start with a JPEG 2000 codestream"):
        _inspect(DATA / "RG1_J2KR.dcm", bytes(data))


def test_encapsulated_pixels_in_an_uncompressed_syntax_are_a_mismatch() -> None:
    with pytest.raises(DatasetMismatch, match="encapsulated"):
        _inspect(DATA / "RG1_JLSN.dcm", transfer_syntax="1.2.840.10008.1.2.1")


def test_undefined_length_sequences_are_walked(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "51185008", "SCT", "Chest"
    ds.AnatomicRegionSequence = [item]
    ds["AnatomicRegionSequence"].is_undefined_length = True
    path = _resave(tmp_path, ds)
    raw = body_bytes(path)
    assert struct.pack("<HH", 0xFFFE, 0xE0DD) in raw  # really written with a sequence delimiter
    info = _inspect(path)
    assert info.header.AnatomicRegionSequence[0].CodeValue == "51185008"
    with pytest.raises(UndecodableDataset):  # remove the delimiter: the walk must notice
        i = raw.find(struct.pack("<HH", 0xFFFE, 0xE0DD))
        _inspect(path, raw[:i] + raw[i + 8 :])


def test_multiframe_and_ybr_422_lengths(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DATA / "RG3_UNCR.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 10, 20, 3
    ds.PixelData = bytes(10 * 20 * 2 * 3)
    assert _inspect(_resave(tmp_path, ds)).sop_instance_uid == ds.SOPInstanceUID
    ds.NumberOfFrames = 4
    with pytest.raises(DatasetMismatch, match="frames 4"):
        _inspect(_resave(tmp_path, ds))
    ds.NumberOfFrames, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.PixelData = bytes(10 * 20 * 2)
    assert _inspect(_resave(tmp_path, ds)).sop_instance_uid == ds.SOPInstanceUID
