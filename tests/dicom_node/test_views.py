"""dicom_node.views: header rules on synthetic datasets, the real test files, and pairing."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.views import Candidate, ViewGuess, pick_pair, view_from_headers


def _ds(**attrs: object) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _ds(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


@pytest.mark.parametrize(
    ("value", "view", "projection"),
    [
        ("PA", "frontal", "PA"),
        ("pa ", "frontal", "PA"),
        ("AP", "frontal", "AP"),
        ("LL", "lateral", "LL"),
        ("RL", "lateral", "RL"),
        ("LATERAL", "lateral", "LAT"),
        ("LAT", "lateral", "LAT"),
        ("LARGE LATERAL", "lateral", "LAT"),
        ("POSTERO_ANTERIOR", "frontal", "PA"),
        ("Left-Lateral", "lateral", "LL"),
        ("LLD", "frontal", "LLD"),
        ("RAO", None, "OBLIQUE"),
    ],
)
def test_view_position(value: str, view: str | None, projection: str) -> None:
    guess = view_from_headers(_ds(ViewPosition=value))
    assert (guess.view, guess.projection, guess.source) == (view, projection, "ViewPosition")


def test_view_position_wins_over_contradicting_description() -> None:
    guess = view_from_headers(_ds(ViewPosition="LL", SeriesDescription="CHEST PA"))
    assert guess.view == "lateral" and guess.source == "ViewPosition"


def test_unknown_view_position_falls_through() -> None:
    guess = view_from_headers(_ds(ViewPosition="XYZ", PatientOrientation=["P", "F"]))
    assert guess.view == "lateral" and guess.source == "PatientOrientation"


@pytest.mark.parametrize(
    ("code", "view", "projection"),
    [
        (("272479007", "SCT", "postero-anterior"), "frontal", "PA"),
        (("399348003", "SCT", "antero-posterior"), "frontal", "AP"),
        (("399173006", "SCT", "left lateral"), "lateral", "LL"),
        (("399198007", "SCT", "right lateral"), "lateral", "RL"),
        (("399067008", "SCT", "lateral"), "lateral", "LAT"),
        (("R-10214", "SNM3", "postero-anterior"), "frontal", "PA"),
        (("R-10236", "SRT", "left lateral"), "lateral", "LL"),
        (("X-1", "99LOCAL", "Lateral"), "lateral", "LAT"),  # unknown code: the meaning decides
    ],
)
def test_view_code_sequence(code: tuple[str, str, str], view: str, projection: str) -> None:
    guess = view_from_headers(_ds(ViewCodeSequence=[_code(*code)]))
    assert (guess.view, guess.projection) == (view, projection)
    assert guess.source == "ViewCodeSequence"


@pytest.mark.parametrize(
    ("orientation", "view"),
    [
        (["L", "F"], "frontal"),
        (["R", "F"], "frontal"),
        (["A", "F"], "lateral"),
        (["P", "F"], "lateral"),
        (["F", "L"], "frontal"),  # rotated display
        (["LP", "F"], None),  # oblique: undecided
        (["L", "P"], None),  # axial: not a chest radiograph orientation
    ],
)
def test_patient_orientation(orientation: list[str], view: str | None) -> None:
    guess = view_from_headers(_ds(PatientOrientation=orientation))
    assert guess.view == view
    assert guess.projection is None  # orientation never tells PA from AP or LL from RL
    assert guess.decided == (view is not None)


@pytest.mark.parametrize(
    ("attrs", "view", "projection", "source"),
    [
        ({"SeriesDescription": "CHEST PA"}, "frontal", "PA", "SeriesDescription"),
        ({"SeriesDescription": "Thorax lat."}, "lateral", "LAT", "SeriesDescription"),
        ({"ProtocolName": "CHEST_FRONTAL"}, "frontal", None, "ProtocolName"),
        ({"SeriesDescription": "CHEST PA AND LATERAL"}, None, None, ""),
        ({"SeriesDescription": "CHAPTER ONE"}, None, None, ""),  # "AP" only as a word
        ({"StudyDescription": "XR CHEST LATERAL"}, "lateral", "LAT", "StudyDescription"),
        (
            {"SeriesDescription": "CHEST PA AND LAT", "StudyDescription": "CHEST LATERAL ONLY"},
            "lateral",
            "LAT",
            "StudyDescription",
        ),
        ({"StudyDescription": "Xray Chest PA/AP Portable"}, "frontal", None, "StudyDescription"),
        ({"SeriesDescription": "CHEST OBLIQUE"}, None, None, ""),
    ],
)
def test_descriptions(
    attrs: dict[str, str], view: str | None, projection: str | None, source: str
) -> None:
    guess = view_from_headers(_ds(**attrs))
    assert (guess.view, guess.projection, guess.source) == (view, projection, source)
    if source == "StudyDescription":
        assert guess.confidence < 0.5  # study-level text is weak evidence


def test_procedure_code_meaning() -> None:
    ds = _ds(ProcedureCodeSequence=[_code("XR2013", "LOCAL", "Xray Chest Lateral")])
    guess = view_from_headers(ds)
    assert guess.view == "lateral" and guess.source == "ProcedureCodeSequence"


def test_nothing_decides() -> None:
    guess = view_from_headers(_ds(Modality="CR"))
    assert guess == ViewGuess(None, None, "", 0.0, guess.detail) and not guess.decided


def test_real_files(data_dir: Path) -> None:
    rg1 = view_from_headers(pydicom.dcmread(data_dir / "RG1_UNCR.dcm", stop_before_pixels=True))
    assert (rg1.view, rg1.projection) == ("frontal", "PA")
    siim = pydicom.dcmread(data_dir / "siim_cr_pa_secondary_capture.dcm", stop_before_pixels=True)
    assert view_from_headers(siim).projection == "PA"


# --- pairing ------------------------------------------------------------------------------------


def _cand(
    key: str,
    view: str | None,
    projection: str | None,
    rows: int = 2000,
    image_type=("ORIGINAL", "PRIMARY"),
    conf: float = 0.95,
) -> Candidate:  # noqa: E501
    return Candidate(
        key, ViewGuess(view, projection, "ViewPosition", conf), rows, rows, tuple(image_type), key
    )


def test_pick_pair_prefers_pa_over_ap_even_if_smaller() -> None:
    frontal, lateral = pick_pair(
        [
            _cand("ap", "frontal", "AP", 3000),
            _cand("pa", "frontal", "PA", 1000),
            _cand("ll", "lateral", "LL"),
        ]
    )
    assert frontal is not None and frontal.key == "pa"
    assert lateral is not None and lateral.key == "ll"


def test_pick_pair_prefers_primary_original_then_larger() -> None:
    frontal, lateral = pick_pair(
        [
            _cand("secondary", "frontal", "PA", 4000, ("DERIVED", "SECONDARY")),
            _cand("small", "frontal", "PA", 1000),
            _cand("large", "frontal", "PA", 2500),
        ]
    )
    assert frontal is not None and frontal.key == "large" and lateral is None


def test_pick_pair_lateral_order_and_no_frontal() -> None:
    frontal, lateral = pick_pair(
        [
            _cand("rl", "lateral", "RL", 3000),
            _cand("ll", "lateral", "LL", 1000),
            _cand("obl", None, "OBLIQUE"),
        ]
    )
    assert frontal is None  # the caller must not analyse this study
    assert lateral is not None and lateral.key == "ll"


def test_pick_pair_is_order_independent() -> None:
    cands = [_cand(f"uid{i}", "frontal", "PA", 2000) for i in range(5)]
    first = pick_pair(cands)[0]
    assert first is not None
    assert pick_pair(list(reversed(cands)))[0] == first


def test_candidate_from_dataset(data_dir: Path) -> None:
    ds = pydicom.dcmread(data_dir / "RG1_UNCR.dcm", stop_before_pixels=True)
    cand = Candidate.from_dataset(ds)
    assert cand.key == ds.SOPInstanceUID and (cand.rows, cand.cols) == (1955, 1841)
    assert cand.image_type == ("DERIVED", "PRIMARY") and cand.guess.projection == "PA"
