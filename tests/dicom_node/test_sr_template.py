"""dicom_node.sr_template: a report filled into its shape's template equals, element by element,
the report highdicom builds in full for the same input, and passes dciodvfy and dsrdump.

The only elements allowed to differ are highdicom's Contributing Equipment
"ContributionDateTime" (the clock at build time); every input here gives ``content_datetime``,
so the content, series and creation dates and times must be equal too.
"""

from __future__ import annotations

import copy
import datetime as _dt
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.sr import (
    CropInfo,
    FindingResult,
    MaskQualityInfo,
    PreviousReport,
    ReportInput,
    build_report,
    read_findings,
)
from dicom_node.sr_template import ReportTemplates, diff, shape_key
from tests.dicom_node import test_sr as base
from tests.dicom_node.test_sr import _ctr, _input, validate

frontal, lateral = base.frontal, base.lateral  # the same module-scoped fixtures

WHEN = _dt.datetime(2024, 5, 6, 7, 8, 9)
CLOCK = "(0018,A002)"  # Contribution DateTime


def _equal_to_full_build(inp: ReportInput, templates: ReportTemplates) -> Dataset:
    rendered = templates.render(inp)
    filled = rendered.dataset()
    full = build_report(inp)
    problems = diff(full, filled)
    assert [p for p in problems if CLOCK not in p] == [], problems
    # the clock is the only difference, and it is there (the comparison really walked the tree)
    assert any(CLOCK in p for p in problems) or str(full.ContributingEquipmentSequence[-1].get(
        "ContributionDateTime")) == str(filled.ContributingEquipmentSequence[-1].get(
        "ContributionDateTime"))  # fmt: skip
    assert rendered.sop_instance_uid == full.SOPInstanceUID == filled.SOPInstanceUID
    assert filled.file_meta.MediaStorageSOPInstanceUID == full.SOPInstanceUID
    return filled


def _variant(inp: ReportInput, shift: float, study: Dataset | None = None) -> ReportInput:
    """The same shape, other values: probabilities, thresholds, regions and crop moved."""
    findings = [
        replace(f, probability=min(1.0, f.probability + shift) if f.present else f.probability / 2)
        for f in inp.findings
    ]
    crop = inp.crop and CropInfo(inp.crop.x0 + 7, inp.crop.y0 + 3, inp.crop.x1 - 5, inp.crop.y1)
    return replace(
        inp,
        frontal=study or inp.frontal,
        findings=findings,
        model1=replace(inp.model1, probability=min(1.0, inp.model1.probability + shift)),
        crop=crop,
        regions={
            k: CropInfo(b.x0 + 1, b.y0 + 2, b.x1 + 3, b.y1 + 4) for k, b in inp.regions.items()
        },
        content_datetime=WHEN + _dt.timedelta(seconds=int(shift * 1000)),
    )


def _other_patient(ds: Dataset) -> Dataset:
    out = copy.deepcopy(ds)  # never the module's fixture itself
    out.PatientName, out.PatientID = "Other^Person", "P-2"
    out.StudyInstanceUID = pydicom.uid.generate_uid()
    out.SeriesInstanceUID, out.SOPInstanceUID = (
        pydicom.uid.generate_uid(),
        pydicom.uid.generate_uid(),
    )
    out.StudyDate = "20230102"
    if ds.get("AccessionNumber"):  # an empty attribute stays empty: that is another shape
        out.AccessionNumber = "ACC9"
    return out


def test_filled_reports_equal_full_builds_and_are_valid(
    frontal: Dataset, lateral: Dataset, tmp_path: Path
) -> None:
    templates = ReportTemplates(template_after=1)
    first = _input(frontal, lateral, content_datetime=WHEN, ctr=_ctr())
    _equal_to_full_build(first, templates)
    assert (templates.misses, templates.hits) == (1, 0)
    assert list(templates._cache.values())[0] is not None, "the shape must be templatable"
    # the next study of the same shape comes from the template: other values, other patient
    second = _variant(first, 0.01)
    second = replace(second, lateral=None, used_lateral=False)
    _equal_to_full_build(second, templates)  # a new shape (no lateral): built, templated
    third = _variant(second, 0.02, study=_other_patient(frontal))
    filled = _equal_to_full_build(third, templates)
    assert templates.hits == 1 and templates.misses == 2
    assert filled.PatientID == "P-2" and filled.StudyInstanceUID == third.frontal.StudyInstanceUID
    path = tmp_path / "filled.dcm"
    path.write_bytes(templates.render(third).data)
    assert all("Error" not in w for w in validate(path))
    got = {(f.label, f.present, round(f.probability, 6)) for f in read_findings(path)}
    want = {(f.label, f.present, round(f.probability, 6)) for f in third.findings}
    assert want <= got


@pytest.mark.parametrize(
    "kw",
    [
        {"crop": None, "mask_quality": MaskQualityInfo(0.05, 5, 0.1, False, "too small")},
        {"ctr": _ctr(interpretable=False, reason="AP film")},
        {"findings": [FindingResult("Pneumothorax", 0.9, 0.5, False)]},
        {"findings": [FindingResult("Some New Label", 0.7, 0.4)]},  # a local code
        {"instance_number": 2, "supersedes_reason": "a late lateral arrived"},
    ],
)
def test_other_shapes_fill_exactly(frontal: Dataset, kw: dict[str, object]) -> None:
    templates = ReportTemplates(template_after=1)
    inp = _input(frontal, content_datetime=WHEN, **kw)
    if "supersedes_reason" in kw:
        prev = PreviousReport(str(frontal.StudyInstanceUID), "2.25.1", "2.25.2")
        inp = replace(inp, previous=[prev])
    _equal_to_full_build(inp, templates)
    again = _variant(inp, 0.003, study=_other_patient(frontal))
    if "supersedes_reason" in kw:
        again = replace(again, previous=[PreviousReport(str(again.frontal.StudyInstanceUID),
                                                        "2.25.3", "2.25.4")])  # fmt: skip
    assert shape_key(again) == shape_key(inp)
    _equal_to_full_build(again, templates)
    assert templates.hits == 1


def test_secondary_capture_source(data_dir: Path, tmp_path: Path) -> None:
    sc = pydicom.dcmread(data_dir / "siim_cr_pa_secondary_capture.dcm", stop_before_pixels=True)
    templates = ReportTemplates(template_after=1)
    inp = _input(sc, content_datetime=WHEN)
    _equal_to_full_build(inp, templates)
    second = _variant(inp, 0.01, study=_other_patient(sc))
    _equal_to_full_build(second, templates)
    assert templates.hits == 1
    path = templates.render(second).write(tmp_path / "sc.dcm")
    validate(path)


def test_a_different_shape_is_not_filled_from_another(frontal: Dataset) -> None:
    templates = ReportTemplates(template_after=1)
    inp = _input(frontal, content_datetime=WHEN)
    flipped = [replace(f, probability=1 - f.probability) for f in inp.findings]
    other = replace(inp, findings=flipped)
    assert shape_key(other) != shape_key(inp)
    _equal_to_full_build(inp, templates)
    _equal_to_full_build(other, templates)
    assert templates.misses == 2 and templates.hits == 0


def test_a_template_is_made_only_for_a_shape_that_recurs(
    frontal: Dataset, lateral: Dataset
) -> None:
    """One-off shapes cost a plain build: the probes are built on the second sighting."""
    templates = ReportTemplates()
    first = _input(frontal, lateral, content_datetime=WHEN)
    templates.render(first)
    assert not templates._cache, "a shape seen once must not get a template yet"
    templates.render(_variant(first, 0.01))
    assert len(templates._cache) == 1
    assert (templates.misses, templates.hits) == (2, 0)
    _equal_to_full_build(_variant(first, 0.02), templates)
    assert templates.hits == 1
