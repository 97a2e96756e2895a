"""dicom_node.uids: the UID grammar, checked before a UID is ever used as a file name."""

from __future__ import annotations

import pytest

from dicom_node.uids import InvalidUID, is_valid_uid, uid_problem, validate_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "0", "1.0.3", "2.25." + "9" * 39, "1" * 64])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid), uid_problem(uid)


@pytest.mark.parametrize(
    ("uid", "why"),
    [
        ("../../etc", "characters other than digits"),
        ("1.2/3", "characters other than digits"),
        ("", "empty"),
        ("1..2", "empty component"),
        (".1.2", "empty component"),
        ("1.2.", "empty component"),
        ("1.02.3", "leading zero"),
        ("1" * 65, "65 characters"),
        ("1.2 ", "characters other than digits"),
        (None, "missing"),
    ],
)
def test_invalid_uids_say_why(uid: object, why: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUID, match=why) as ei:
        validate_uid(uid, what="StudyInstanceUID")
    assert "StudyInstanceUID" in str(ei.value)
