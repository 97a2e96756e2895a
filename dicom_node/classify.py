"""Is a received instance a chest radiograph this service should analyse, or one of its own
outputs coming back?

Ineligible instances are still stored and acknowledged (PACS must not keep retrying them, and a
PACS routing whole studies sends SRs, presentation states, PDFs... with the images); the queue
never analyses them, never lets them reopen a study, and marks a study with nothing eligible
``ignored`` with the reason returned here.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from .derived import DeviceInfo, key_image_series_uid, report_series_uid

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

#: The image classes a chest radiograph arrives in; only these are ever analysed.
ANALYSED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    SECONDARY_CAPTURE: "Secondary Capture Image Storage",
}

# BodyPartExamined values meaning the chest, including the spellings seen from real devices
# (German/French/Spanish/Portuguese/Italian "thorax"/"torace") besides the DICOM defined term CHEST.
_CHEST_BODY_PARTS = frozenset(
    {
        "CHEST",
        "THORAX",
        "TORAX",
        "TORACE",
        "THORACIC",
        "LUNG",
        "LUNGS",
        "CHEST_PA",
        "CHEST_AP",
        "CHEST_LAT",
        "PORTABLE CHEST",
        "CHEST PA",
        "CHEST AP",
        "CXR",
        "BRUSTKORB",
        "POUMON",
        "PULMON",
    }
)
# Words in Study/Series Description or Protocol Name that say "chest" when BodyPartExamined is
# absent.
_CHEST_WORDS = re.compile(
    r"(?<![A-Z])(CHEST|THORAX|THORAC\w*|TORAX|TORACE|LUNGS?|CXR|PULM\w*|POUMON|BRUSTKORB)(?![A-Z])"
)
# SNOMED / SRT codes for chest or thorax in AnatomicRegionSequence
_CHEST_CODES = frozenset(
    {"T-D3000", "51185008", "43799004", "T-D0100", "302551006", "39607008", "T-28000"}
)


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    return str(value).strip().upper() if value is not None else ""


def _anatomic_codes(ds: Dataset) -> set[str]:
    try:
        seq = ds.get("AnatomicRegionSequence") or []
        return {str(item.get("CodeValue", "")).strip().upper() for item in seq}
    except Exception:
        return set()


def own_output(ds: Dataset, device: DeviceInfo) -> str | None:
    """The reason to store-and-ignore an instance this worker made (its report or key image,
    routed back by PACS), recognised by the deterministic series UIDs of ``device``; None for
    anything else. It must never be analysed nor reopen its study."""
    study = _text(ds, "StudyInstanceUID")
    series = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if not study or not series:
        return None
    if series == report_series_uid(str(ds.StudyInstanceUID), device):
        return "this worker's own report (its SR series), stored only"
    if series == key_image_series_uid(str(ds.StudyInstanceUID), device):
        return "this worker's own key image (its key image series), stored only"
    return None


def chest_eligibility(ds: Dataset) -> tuple[bool, str | None]:
    """``(True, None)`` for a chest radiograph; ``(False, reason)`` otherwise.

    A chest radiograph is a CR or DX image (or a Secondary Capture whose Modality is CR or DX,
    the form public chest X-ray sets arrive in) of one of :data:`ANALYSED_SOP_CLASSES`, whose
    BodyPartExamined says chest, or, when BodyPartExamined is empty, whose anatomic region code
    or study/series description or protocol name says chest. The reason names the deciding
    attribute (never patient data).
    """
    modality = _text(ds, "Modality")
    sop_class = _text(ds, "SOPClassUID")
    if modality not in RADIOGRAPH_MODALITIES:
        kind = "Secondary Capture with " if sop_class == SECONDARY_CAPTURE else ""
        shown = modality or "(none)"
        return False, f"{kind}Modality {shown} is not a radiograph (CR or DX)"
    if sop_class and sop_class not in ANALYSED_SOP_CLASSES:
        return False, f"SOP class {sop_class} is not an image class this worker analyses"
    body_part = _text(ds, "BodyPartExamined")
    if body_part:
        if body_part in _CHEST_BODY_PARTS or _CHEST_WORDS.search(body_part):
            return True, None
        return False, f"BodyPartExamined {body_part} is not the chest"
    if _anatomic_codes(ds) & _CHEST_CODES:
        return True, None
    for keyword in (
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "RequestedProcedureDescription",
    ):
        if _CHEST_WORDS.search(_text(ds, keyword)):
            return True, None
    return False, (
        "BodyPartExamined is empty and neither AnatomicRegionSequence nor the study/series "
        "description or protocol name mentions the chest"
    )
