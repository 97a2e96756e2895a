"""Cardiothoracic ratio from the lung mask (models/ctr.py): geometry on synthetic masks, the
interpretability rules, and the Analyzer filling ``StudyAnalysis.ctr`` with the bundled lung-mask
generator on the real NEMA chest film."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.analyzer import Analyzer
from models.api import CropBox, LungMaskResult, MaskQuality, StudyAnalysis, StudyInput
from models.config import BUNDLED_WEIGHTS, ModelsConfig
from models.ctr import measure, spans
from models.labels import OBSERVATIONS

from .test_analyzer import tiny_view_card
from .test_classifiers import tiny_card

DATA = Path(__file__).resolve().parents[1] / "data"


def box_lungs(size: int = 200) -> np.ndarray:
    """Two block lungs: columns [20, 80) and [120, 180), rows [20, 180); over rows [100, 170) the
    heart pushes their medial borders out to 60 and 140."""
    m = np.zeros((size, size), np.uint8)
    m[20:180, 20:80] = 1
    m[20:180, 120:180] = 1
    m[100:170, 60:80] = 0
    m[100:170, 120:140] = 0
    return m


def result(mask: np.ndarray, ok: bool = True, rule: str = "") -> LungMaskResult:
    q = MaskQuality(0.3, 2, 1.0, ok=ok, reason=f"{rule}: x" if rule else "", rule=rule)
    return LungMaskResult(mask=mask, crop=CropBox(0, 0, mask.shape[1], mask.shape[0]), quality=q)


def test_spans_measure_the_widest_cardiac_and_thoracic_rows() -> None:
    found = spans(box_lungs())
    assert found is not None
    cardiac, thoracic = found
    # 80 background columns [60, 140) between the medial borders, on a heart row
    assert (cardiac.x0, cardiac.x1) == (60.0, 140.0) and cardiac.length == 80.0
    assert 100 <= cardiac.y0 - 0.5 < 170 and cardiac.y0 == cardiac.y1
    # the outer borders: columns [20, 180)
    assert (thoracic.x0, thoracic.x1) == (20.0, 180.0) and thoracic.length == 160.0
    ctr = measure(result(box_lungs()), "PA")
    assert ctr is not None and ctr.ratio == pytest.approx(0.5)
    assert ctr.interpretable and ctr.reason == ""


def test_wider_heart_gives_a_larger_ratio_and_scales_with_the_image() -> None:
    m = box_lungs()
    m[100:170, 50:60] = 0  # the heart's right border moves 10 px outwards
    ctr = measure(result(m), None)
    assert ctr is not None and ctr.ratio == pytest.approx(90 / 160)
    big = np.kron(m, np.ones((3, 3), np.uint8))  # the same film at 3x the resolution
    ctr3 = measure(result(big), "PA")
    assert ctr3 is not None and ctr3.ratio == pytest.approx(ctr.ratio, abs=0.01)
    assert ctr3.thoracic.length == pytest.approx(3 * 160)


def test_tapering_costophrenic_rows_do_not_count_as_heart() -> None:
    m = box_lungs()
    m[150:180, 20:80] = 0
    m[150:180, 20:30] = 1  # the left-hand lung ends in a narrow lateral recess
    found = spans(m)
    assert found is not None
    assert found[0].length == 80.0  # not 110 (from the recess's medial edge at x = 30)


def test_ap_film_and_failed_mask_are_not_interpretable() -> None:
    ap = measure(result(box_lungs()), "AP")
    assert ap is not None and not ap.interpretable and "AP" in ap.reason
    assert ap.ratio == pytest.approx(0.5)  # still measured, with the reason it must not be read
    bad = measure(result(box_lungs(), ok=False, rule="touches_border"), "PA")
    assert bad is not None and not bad.interpretable and "touches_border" in bad.reason
    lateral = measure(result(box_lungs()), "LL")
    assert lateral is not None and not lateral.interpretable


def test_no_two_lungs_no_ratio() -> None:
    one = np.zeros((100, 100), np.uint8)
    one[10:90, 10:40] = 1
    assert spans(one) is None
    assert measure(result(one), "PA") is None
    assert measure(result(np.zeros((50, 50), np.uint8)), "PA") is None


@pytest.fixture
def nema_cfg(tmp_path: Path) -> ModelsConfig:
    """The bundled lung-mask generator with tiny classifiers (their outputs do not matter)."""
    card = BUNDLED_WEIGHTS / "lung_mask.json"
    shutil.copy(card, tmp_path / "lung_mask.json")
    shutil.copy(BUNDLED_WEIGHTS / "lung_mask.safetensors", tmp_path / "lung_mask.safetensors")
    tiny_card(tmp_path / "model1.json", ["Abnormal"], name="model1")
    thr = {o: 0.5 for o in OBSERVATIONS}
    tiny_card(tmp_path / "model2.json", list(OBSERVATIONS), thresholds=thr, name="model2", seed=1)
    tiny_view_card(tmp_path / "view_classifier.json")
    return ModelsConfig(weights_dir=tmp_path)


def test_analyzer_reports_ctr_on_the_nema_film(nema_cfg: ModelsConfig) -> None:
    from dicom_node.pixels import load_image

    img = load_image(DATA / "RG1_UNCR.dcm").pixels
    an = Analyzer.from_config(nema_cfg, device="cpu")
    pa, ap, unknown = an.analyse(
        [
            StudyInput("pa", img, projection="PA"),
            StudyInput("ap", img, projection="AP"),
            StudyInput("none", img),
        ]
    )
    assert isinstance(pa, StudyAnalysis) and isinstance(ap, StudyAnalysis)
    assert isinstance(unknown, StudyAnalysis)
    assert pa.ctr is not None and ap.ctr is not None and unknown.ctr is not None
    h, w = img.shape
    for seg in (pa.ctr.cardiac, pa.ctr.thoracic):
        assert 0 <= seg.x0 < seg.x1 <= w and 0 <= seg.y0 <= h and seg.y0 == seg.y1
    # in image coordinates of the 1841-column film, the thorax spans most of the width
    assert pa.ctr.thoracic.length > 0.6 * w
    assert 0.3 < pa.ctr.ratio < 0.7
    assert pa.ctr.ratio == ap.ctr.ratio == unknown.ctr.ratio
    assert not ap.ctr.interpretable and "AP projection" in ap.ctr.reason
    # on PA the ratio is read exactly when the mask passed its quality checks
    assert pa.ctr.interpretable == pa.lung_mask.quality.ok
    # the complaint: a mask reaching the film's top edge must not read "acceptable"
    if pa.lung_mask.mask[0].any():
        assert pa.lung_mask.quality.rule == "touches_border"
    if not pa.lung_mask.quality.ok:
        assert pa.lung_mask.quality.rule in pa.ctr.reason
    assert unknown.ctr.interpretable == pa.ctr.interpretable


def _write_chexpert_small(root: Path) -> None:
    base = root / "CheXpert-v1.0-small"
    rows = ["Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly"]
    for i, (view, proj, cm) in enumerate(
        [
            ("Frontal", "PA", "1.0"),
            ("Lateral", "", "1.0"),
            ("Frontal", "AP", ""),
            ("Frontal", "PA", "-1.0"),
        ]
    ):
        rel = f"CheXpert-v1.0-small/train/patient0000{i}/study1/view1_{view.lower()}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
        rows.append(f"{rel},Male,50,{view},{proj},,{cm}")
    (base / "train.csv").write_text("\n".join(rows) + "\n")


def test_ctr_evaluation_reads_chexpert_small_and_nih(tmp_path: Path) -> None:
    from models.training.eval_ctr import CtrDataError, chexpert_cases, nih_cases

    _write_chexpert_small(tmp_path / "cx")
    cases = chexpert_cases(tmp_path / "cx")
    assert [(c.key, c.projection, c.label, c.blank) for c in cases] == [
        ("patient00000/study1/view1_frontal.jpg", "PA", 1.0, False),
        ("patient00002/study1/view1_frontal.jpg", "AP", None, True),
        ("patient00003/study1/view1_frontal.jpg", "PA", None, False),
    ]
    only = chexpert_cases(tmp_path / "cx", {"chexpert:patient00002/study1"})
    assert [c.key.split("/")[0] for c in only] == ["patient00002"]

    nih = tmp_path / "nih"
    (nih / "images").mkdir(parents=True)
    for n in ("a", "b"):
        (nih / "images" / f"{n}.jpg").write_bytes(b"x")
    (nih / "labels.csv").write_text(
        "file,patient_id,view,finding_labels\n"
        "images/a.jpg,1,PA,Cardiomegaly|Effusion\nimages/b.jpg,2,AP,No Finding\n"
    )
    got = [(c.key, c.projection, c.label) for c in nih_cases(nih)]
    assert got == [("a.jpg", "PA", 1.0), ("b.jpg", "AP", 0.0)]
    assert [c.key for c in nih_cases(nih, {"nih:b"})] == ["b.jpg"]
    (nih / "labels.csv").write_text(
        "file,patient_id,view,finding_labels\nimages/a.jpg,1,PA,No Finding\nimages/c.jpg,3,PA,x\n"
    )
    with pytest.raises(CtrDataError, match=r"labels.csv:3: image .*c.jpg is missing"):
        nih_cases(nih)


def test_ctr_report_auroc_subsets() -> None:
    from models.training.eval_ctr import CtrCase, report

    cases = [
        CtrCase("nih", f"{i}", Path("x"), "PA" if i % 2 else "AP", float(i >= 10), False)
        for i in range(20)
    ]
    for i, c in enumerate(cases):
        c.ratio = 0.40 + 0.01 * i  # perfectly ordered: positives have the larger ratios
        c.interpretable = c.projection == "PA"
    cases[0].ratio = None  # not measured
    rep = report(cases)
    assert rep["nih"]["all"]["strict"]["auroc"] == 1.0
    assert rep["nih"]["all"]["strict"]["n"] == 19 and rep["nih"]["not_measured"] == 1
    assert rep["nih"]["pa"]["strict"]["n"] == 10
    assert rep["pooled"]["all"]["strict"]["positives"] == 10
