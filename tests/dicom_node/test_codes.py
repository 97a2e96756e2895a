"""dicom_node.codes: every label has a code, unknown labels a stable local one, and back again."""

from __future__ import annotations

import pytest
from pydicom.sr.coding import Code

from dicom_node import codes


@pytest.mark.parametrize("label", sorted(codes.FINDING_CODES))
def test_known_label_gets_its_table_code_and_reads_back(label: str) -> None:
    code = codes.finding_code(label)
    assert code is codes.FINDING_CODES[label]
    assert codes.finding_label(code) == label


def test_known_codes_are_distinct() -> None:
    keys = [(c.scheme_designator, c.value) for c in codes.FINDING_CODES.values()]
    assert len(keys) == len(set(keys))


def test_unknown_label_gets_a_deterministic_local_code() -> None:
    a, b = codes.finding_code("Hernia"), codes.finding_code("Hernia")
    assert a == b and a.scheme_designator == codes.LOCAL_SCHEME
    assert a.value.startswith("CXRPWX") and len(a.value) == len("CXRPWX") + 8
    assert a.meaning == "Hernia"
    assert codes.finding_code("Hernia ") != a  # another label, another code
    assert codes.finding_label(a) == "Hernia"


def test_unknown_long_label_keeps_64_characters_of_meaning() -> None:
    label = "x" * 80
    code = codes.finding_code(label)
    assert code.meaning == "x" * 64 and codes.finding_label(code) == "x" * 64
    assert codes.finding_code("x" * 81).value != code.value  # the hash sees the whole label


def test_same_code_ignores_the_meaning() -> None:
    assert codes.same_code(Code("263654008", "SCT", "anything"), codes.ABNORMAL)
    assert not codes.same_code(Code("263654008", "DCM", "Abnormal"), codes.ABNORMAL)


def test_non_finding_codes_have_no_label() -> None:
    assert codes.finding_label(codes.LUNG_MASK_QUALITY) is None
    assert codes.finding_label(codes.PROBABILITY) is None
    assert codes.finding_label(Code("CXRPW999", codes.LOCAL_SCHEME, "Unrelated")) is None


def test_view_rules_accept_retired_snomed_rt_under_both_designators() -> None:
    assert codes.VIEW_CODE_RULES[("SRT", "R-10214")] == ("frontal", "PA")
    assert codes.VIEW_CODE_RULES[("SNM3", "R-10214")] == ("frontal", "PA")
    assert codes.VIEW_CODE_RULES[("SCT", "399198007")] == ("lateral", "RL")
    assert ("SNM3", "399198007") not in codes.VIEW_CODE_RULES
    assert len(codes.VIEW_CODE_RULES) == 18


def test_code_table_lists_the_report_codes() -> None:
    table = codes.code_table_markdown()
    wanted = [codes.SUMMARY, codes.CARDIOTHORACIC_RATIO, codes.CARDIAC_WIDTH]
    wanted += [codes.THORACIC_WIDTH, codes.LUNG_MASK_FAILED_CHECK, codes.UNIT_PROBABILITY]
    for code in wanted:
        assert f"| `{code.value}` | {code.scheme_designator} | {code.meaning} |" in table
    local = [row.code.value for row in codes.code_table() if not row.standard]
    assert len(local) == len(set(local))  # no local code used twice
