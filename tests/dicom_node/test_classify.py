"""dicom_node.classify: which received instances are chest radiographs to analyse."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.classify import chest_eligibility
from tests.conftest import DATA


def _header(name: str) -> Dataset:
    return pydicom.dcmread(DATA / name, stop_before_pixels=True)


@pytest.mark.parametrize(
    "name",
    [
        "RG1_UNCR.dcm",
        "RG1_J2KR.dcm",
        "siim_cr_pa_secondary_capture.dcm",
        "siim_fake_monochrome1.dcm",
    ],
)
def test_chest_files_are_eligible(name: str) -> None:
    assert chest_eligibility(_header(name)) == (True, None)


def test_extremity_cr_is_not_eligible() -> None:
    assert chest_eligibility(_header("RG3_UNCR.dcm")) == (
        False,
        "BodyPartExamined EXTREMITY is not the chest",
    )


def test_ct_is_not_eligible() -> None:
    ds = _header("RG1_UNCR.dcm")
    ds.Modality = "CT"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ok, why = chest_eligibility(ds)
    assert not ok and why == "Modality CT is not a radiograph (CR or DX)"


def test_secondary_capture_without_radiograph_modality_is_not_eligible() -> None:
    ds = _header("siim_cr_pa_secondary_capture.dcm")
    ds.Modality = "OT"
    assert chest_eligibility(ds) == (
        False,
        "Secondary Capture with Modality OT is not a radiograph (CR or DX)",
    )


@pytest.mark.parametrize(
    ("study", "series", "protocol", "expected"),
    [
        ("THORAX", None, None, True),
        (None, "RX Torax PA", None, True),
        (None, None, "CXR portable", True),
        ("Knee 2 views", "AP", None, False),
        (None, None, None, False),
        ("PATCHEST", None, None, False),  # a word, not a substring
    ],
)
def test_descriptions_decide_when_body_part_is_empty(
    study: str | None, series: str | None, protocol: str | None, expected: bool
) -> None:
    ds = _header("RG1_UNCR.dcm")
    del ds.BodyPartExamined
    for kw in ("StudyDescription", "SeriesDescription", "ProtocolName"):
        if kw in ds:
            delattr(ds, kw)
    for kw, v in (
        ("StudyDescription", study),
        ("SeriesDescription", series),
        ("ProtocolName", protocol),
    ):
        if v is not None:
            setattr(ds, kw, v)
    ok, why = chest_eligibility(ds)
    assert ok is expected
    assert (why is None) is expected
