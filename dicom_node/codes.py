"""Coded concepts used in the Structured Report and by the view rules, in one place.

Standard codes (SNOMED CT ``SCT``, DICOM ``DCM``, LOINC ``LN``, UCUM) are used wherever a concept
exists; the few concepts without a standard code use the private coding scheme designator
``99CXRPW`` (the ``99`` prefix is how DICOM marks a local scheme, PS3.16 section 8.2). Every code
is a :class:`pydicom.sr.coding.Code`, so highdicom accepts it directly.

:data:`CODE_TABLE` is the table the README copies: run ``python -m dicom_node.codes`` to print it
as Markdown.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from pydicom.sr.coding import Code


class Coded(Protocol):
    """A coded concept as read back (highdicom's ``CodedConcept``) or written (a ``Code``)."""

    @property
    def value(self) -> str: ...
    @property
    def scheme_designator(self) -> str: ...
    @property
    def meaning(self) -> str: ...


#: Private coding scheme designator for concepts without a standard code.
LOCAL_SCHEME = "99CXRPW"
LOCAL_SCHEME_NAME = "cxr-pacs-worker local codes"
LOCAL_SCHEME_VERSION = "1"

# --- document structure -------------------------------------------------------------------------
#: Procedure reported: LOINC "XR Chest 2 Views" (frontal + lateral) and "XR Chest Single view".
PROCEDURE_CHEST_XR_2_VIEWS = Code("36643-5", "LN", "XR Chest 2 Views")
PROCEDURE_CHEST_XR_1_VIEW = Code("36554-4", "LN", "XR Chest Single view")

PROBABILITY = Code("122157", "DCM", "Probability")
UNIT_PROBABILITY = Code("{probability}", "UCUM", "probability")
UNIT_RATIO = Code("1", "UCUM", "no units")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = Code("121106", "DCM", "Comment")
LUNG = Code("39607008", "SCT", "Lung")
LUNG_MASK_ACCEPTABLE = Code("CXRPW001", LOCAL_SCHEME, "Lung mask acceptable")
LUNG_MASK_REJECTED = Code("CXRPW002", LOCAL_SCHEME, "Lung mask rejected, full image analysed")
LUNG_MASK_QUALITY = Code("CXRPW003", LOCAL_SCHEME, "Lung mask quality")
DECISION_THRESHOLD = Code("CXRPW004", LOCAL_SCHEME, "Decision threshold")
LUNG_MASK_AREA_FRACTION = Code("CXRPW006", LOCAL_SCHEME, "Lung mask area fraction")
LUNG_MASK_BALANCE = Code("CXRPW007", LOCAL_SCHEME, "Lung mask left/right balance")
LUNG_MASK_COMPONENTS = Code("CXRPW011", LOCAL_SCHEME, "Lung mask connected components")
LUNG_MASK_FAILED_CHECK = Code("CXRPW012", LOCAL_SCHEME, "Lung mask failed check")
#: the cardiothoracic ratio and the two widths it is measured from (no standard code found for
#: the chest radiograph's transverse ratio; LOINC 59076-0 is the cardiothoracic *area* ratio)
CARDIOTHORACIC_RATIO = Code("CXRPW008", LOCAL_SCHEME, "Cardiothoracic ratio")
CARDIAC_WIDTH = Code("CXRPW009", LOCAL_SCHEME, "Cardiac width")
THORACIC_WIDTH = Code("CXRPW010", LOCAL_SCHEME, "Thoracic width")
SUMMARY = Code("121111", "DCM", "Summary")
UNIT_RATIO_ANNOTATED = Code("{ratio}", "UCUM", "ratio")
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_PIXELS = Code("{pixels}", "UCUM", "pixels")

# --- findings -----------------------------------------------------------------------------------
#: Model 1 result: the study is abnormal (not "No Finding").
ABNORMAL = Code("263654008", "SCT", "Abnormal")

#: The 14 CheXpert observations -> their code. Keys are the model cards' label strings.
#: Cardiomegaly, Opacity, Pulmonary edema, Pleural effusion, Pneumothorax, Abnormal are taken from
#: the DICOM PS3.16 tables (as shipped in pydicom's concept dictionary); Lung consolidation,
#: Pneumonia, Atelectasis and Fracture of bone are SNOMED CT concepts not listed in a DICOM CID.
#: CheXpert categories with no precise SNOMED CT concept ("No Finding", "Enlarged
#: Cardiomediastinum", "Lung Lesion", "Pleural Other", "Support Devices") get local codes.
FINDING_CODES: dict[str, Code] = {
    "No Finding": Code("CXRPW100", LOCAL_SCHEME, "No Finding"),
    "Enlarged Cardiomediastinum": Code("CXRPW101", LOCAL_SCHEME, "Enlarged Cardiomediastinum"),
    "Cardiomegaly": Code("287272002", "SCT", "Cardiomegaly"),
    "Lung Opacity": Code("112001", "DCM", "Opacity"),
    "Lung Lesion": Code("CXRPW102", LOCAL_SCHEME, "Lung Lesion"),
    "Edema": Code("19242006", "SCT", "Pulmonary edema"),
    "Consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "Pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "Atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "Pneumothorax": Code("36118008", "SCT", "Pneumothorax"),
    "Pleural Effusion": Code("60046008", "SCT", "Pleural effusion"),
    "Pleural Other": Code("CXRPW103", LOCAL_SCHEME, "Pleural abnormality, other"),
    "Fracture": Code("125605004", "SCT", "Fracture of bone"),
    "Support Devices": Code("CXRPW104", LOCAL_SCHEME, "Support Devices"),
    "Abnormal": ABNORMAL,
}
_LABEL_BY_CODE = {(c.scheme_designator, c.value): label for label, c in FINDING_CODES.items()}
_UNKNOWN_LABEL_PREFIX = "CXRPWX"


def finding_code(label: str) -> Code:
    """The code for a model label; an unknown label gets a deterministic local code.

    A model card may carry labels this table does not know (a retrained model); they are still
    reported, under a local code derived from the label text (its meaning is the label, cut to
    64 characters), rather than dropped.
    """
    code = FINDING_CODES.get(label)
    if code is not None:
        return code
    digest = hashlib.sha256(label.encode("utf-8")).hexdigest()[:8].upper()
    return Code(f"{_UNKNOWN_LABEL_PREFIX}{digest}", LOCAL_SCHEME, label[:64])


def same_code(a: Coded, b: Coded) -> bool:
    """``True`` when ``a`` and ``b`` are one concept (same scheme and value, any meaning)."""
    return (a.scheme_designator, a.value) == (b.scheme_designator, b.value)


def finding_label(code: Coded) -> str | None:
    """The model label that :func:`finding_code` turned into ``code``, or ``None`` when ``code``
    is not a finding (the lung-mask quality, say). An unknown label's local code gives back its
    meaning, which is the label (cut to 64 characters)."""
    label = _LABEL_BY_CODE.get((code.scheme_designator, code.value))
    if label is not None:
        return label
    if code.scheme_designator == LOCAL_SCHEME and code.value.startswith(_UNKNOWN_LABEL_PREFIX):
        return str(code.meaning)
    return None


# --- views (CID 4010 "DX View", plus the retired SNOMED RT values older modalities still send) -
VIEW_PA = Code("272479007", "SCT", "postero-anterior")
VIEW_AP = Code("399348003", "SCT", "antero-posterior")
VIEW_LATERAL = Code("399067008", "SCT", "lateral")
VIEW_LEFT_LATERAL = Code("399173006", "SCT", "left lateral")
VIEW_RIGHT_LATERAL = Code("399198007", "SCT", "right lateral")


def _rules(view: str, projection: str, *codes: str) -> dict[tuple[str, str], tuple[str, str]]:
    """``"SCT:value"`` or ``"SRT:value"`` codes -> (view, projection); a retired SNOMED RT
    ``SRT`` code is also accepted under its other designator ``SNM3``."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for code in codes:
        scheme, value = code.split(":")
        for designator in ("SRT", "SNM3") if scheme == "SRT" else (scheme,):
            out[(designator, value)] = (view, projection)
    return out


#: (scheme, value) -> (view, projection). SRT/SNM3 are the retired SNOMED RT forms (PS3.16 still
#: lists them as "retired"); IU X-ray headers carry ``R-10214 SNM3 postero-anterior``.
VIEW_CODE_RULES: dict[tuple[str, str], tuple[str, str]] = {
    **_rules("frontal", "PA", "SCT:272479007", "SCT:399182006", "SRT:R-10214"),
    **_rules("frontal", "AP", "SCT:399348003", "SRT:R-10206"),
    **_rules("frontal", "", "SCT:399033003"),
    **_rules("lateral", "LAT", "SCT:399067008", "SCT:49370004", "SRT:R-102CD"),
    **_rules("lateral", "LL", "SCT:399173006", "SRT:R-10236"),
    **_rules("lateral", "RL", "SCT:399198007", "SRT:R-10232"),
}


@dataclass(frozen=True)
class CodeRow:
    use: str
    code: Code

    @property
    def standard(self) -> bool:
        return self.code.scheme_designator != LOCAL_SCHEME


def code_table() -> list[CodeRow]:
    """Every code this package writes, with what it is used for."""
    rows = [
        CodeRow("procedure reported (frontal + lateral)", PROCEDURE_CHEST_XR_2_VIEWS),
        CodeRow("procedure reported (frontal only)", PROCEDURE_CHEST_XR_1_VIEW),
        CodeRow(
            "unit of a finding's probability (the NUM is named by the finding's code)",
            UNIT_PROBABILITY,
        ),
        CodeRow("qualitative value", PRESENT),
        CodeRow("qualitative value", ABSENT),
        CodeRow("algorithm family", ARTIFICIAL_INTELLIGENCE),
        CodeRow("free-text container", QUALITATIVE_EVALUATIONS),
        CodeRow("free-text item", COMMENT),
        CodeRow("summary text (first item of the qualitative evaluations)", SUMMARY),
        CodeRow("finding site", LUNG),
        CodeRow("measurement name", DECISION_THRESHOLD),
        CodeRow("QC evaluation name", LUNG_MASK_QUALITY),
        CodeRow("QC value", LUNG_MASK_ACCEPTABLE),
        CodeRow("QC value", LUNG_MASK_REJECTED),
        CodeRow("QC measurement", LUNG_MASK_AREA_FRACTION),
        CodeRow("QC measurement", LUNG_MASK_BALANCE),
        CodeRow("QC measurement", LUNG_MASK_COMPONENTS),
        CodeRow("QC text: the first failing check", LUNG_MASK_FAILED_CHECK),
        CodeRow("measurement: cardiothoracic ratio", CARDIOTHORACIC_RATIO),
        CodeRow("measurement: widest cardiac span (line)", CARDIAC_WIDTH),
        CodeRow("measurement: widest inner thoracic span (line)", THORACIC_WIDTH),
        CodeRow("unit of the cardiothoracic ratio", UNIT_RATIO_ANNOTATED),
        CodeRow("unit of a width with known pixel spacing", UNIT_MM),
        CodeRow("unit of a width without pixel spacing", UNIT_PIXELS),
    ]
    rows += [CodeRow(f"finding: {label}", code) for label, code in FINDING_CODES.items()]
    return rows


def code_table_markdown() -> str:
    lines = [
        "| use | code | scheme | meaning | standard |",
        "|---|---|---|---|---|",
    ]
    for row in code_table():
        c = row.code
        lines.append(
            f"| {row.use} | `{c.value}` | {c.scheme_designator} | {c.meaning} | "
            f"{'yes' if row.standard else 'no (local)'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - documentation helper
    print(code_table_markdown())
