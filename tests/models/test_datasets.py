"""Loaders for real layouts: CheXpert-v1.0-small, NIH ChestX-ray14, the COVID-19 collection;
de-duplication and the patient-level three-way split across sources."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.labels import OBSERVATIONS
from models.training.datasets.chexpert import DatasetError, StudyRecord, read_chexpert
from models.training.datasets.covid import read_covid
from models.training.datasets.nih import nih_raw, read_nih
from models.training.datasets.sources import dedupe, patient_split3, read_studies, split_of

IDX = {o: i for i, o in enumerate(OBSERVATIONS)}
HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(OBSERVATIONS) + "\n"


def _img(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((40, 32), value, np.uint8))


def _row(rel: str, view: str, labels: dict[str, str]) -> str:
    return f"{rel},Female,60,{view},AP," + ",".join(labels.get(o, "") for o in OBSERVATIONS) + "\n"


def small_release(root: Path, csv_name: str = "train.csv", split: str = "train") -> Path:
    """A CheXpert-v1.0-small folder: CSV paths start 'CheXpert-v1.0-small/'."""
    base = root / "CheXpert-v1.0-small"
    rows = []
    for pat, study, view, labels in [
        ("patient00001", "study1", "Frontal", {"No Finding": "1"}),
        ("patient00001", "study1", "Lateral", {"No Finding": "1"}),
        ("patient00002", "study1", "Frontal", {"Edema": "-1", "Cardiomegaly": "1"}),
    ]:
        name = "view1_frontal.jpg" if view == "Frontal" else "view2_lateral.jpg"
        rel = f"CheXpert-v1.0-small/{split}/{pat}/{study}/{name}"
        _img(root / rel)
        rows.append(_row(rel, view, labels))
    base.mkdir(parents=True, exist_ok=True)
    (base / csv_name).write_text(HEADER + "".join(rows))
    return root


def test_chexpert_small_layout_and_valid_csv(tmp_path: Path) -> None:
    root = small_release(tmp_path)
    recs = read_chexpert(root)
    assert [r.key for r in recs] == ["chexpert:patient00001/study1", "chexpert:patient00002/study1"]
    assert recs[0].lateral is not None and recs[0].frontal.name == "view1_frontal.jpg"
    assert recs[1].raw[IDX["Edema"]] == -1 and recs[1].raw[IDX["No Finding"]] == 0
    # the release folder itself works too
    assert len(read_chexpert(root / "CheXpert-v1.0-small")) == 2
    # 'test' reads test_labels.csv, or valid.csv when that is what the release has
    v = small_release(tmp_path / "v", "valid.csv", "valid")
    assert [r.source for r in read_chexpert(v, "test")] == ["chexpert-test"] * 2


def test_chexpert_missing_image_and_bad_label_name_file_and_line(tmp_path: Path) -> None:
    root = small_release(tmp_path)
    (root / "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg").unlink()
    with pytest.raises(DatasetError, match=r"train\.csv:4: image .*patient00002.* not found"):
        read_chexpert(root)
    root = small_release(tmp_path / "b")
    csv = root / "CheXpert-v1.0-small/train.csv"
    csv.write_text(csv.read_text().replace(",1,", ",2,", 1))
    with pytest.raises(DatasetError, match=r"train\.csv:2: label value '2'"):
        read_chexpert(root)


def test_nih_mapping_masks_what_nih_does_not_label() -> None:
    raw = nih_raw("Effusion|Infiltration|Nodule")
    assert raw[IDX["Pleural Effusion"]] == 1 and raw[IDX["Lung Opacity"]] == 1
    assert raw[IDX["Lung Lesion"]] == 1 and raw[IDX["No Finding"]] == 0
    assert raw[IDX["Cardiomegaly"]] == 0 and raw[IDX["Pneumothorax"]] == 0  # NIH labels these
    for o in ("Enlarged Cardiomediastinum", "Fracture", "Support Devices"):
        assert math.isnan(raw[IDX[o]])  # never called negative
    normal = nih_raw("No Finding")
    assert normal[IDX["No Finding"]] == 1 and normal[IDX["Atelectasis"]] == 0
    assert math.isnan(normal[IDX["Support Devices"]])
    assert nih_raw("Edema")[IDX["Lung Opacity"]] == 1  # a child of Lung Opacity
    assert nih_raw("Hernia")[IDX["No Finding"]] == 0  # abnormal, no CheXpert observation
    with pytest.raises(DatasetError, match="not an NIH"):
        nih_raw("Covid")


def test_nih_reader_data_entry_layout_and_errors(tmp_path: Path) -> None:
    _img(tmp_path / "images" / "00000001_000.png")
    _img(tmp_path / "images" / "00000001_001.png")
    _img(tmp_path / "images" / "00000002_000.png")
    head = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,View Position\n"
    (tmp_path / "Data_Entry_2017.csv").write_text(
        head
        + "00000001_000.png,Cardiomegaly|Effusion,0,1,57,PA\n"
        + "00000001_001.png,No Finding,1,1,58,LL\n"
        + "00000002_000.png,No Finding,0,2,40,AP\n"
    )
    recs = read_nih(tmp_path / "Data_Entry_2017.csv")
    assert [r.key for r in recs] == ["nih:00000001_000", "nih:00000002_000"]  # LL skipped
    assert recs[0].patient == "nih:1" and recs[0].raw[IDX["Cardiomegaly"]] == 1
    (tmp_path / "bad.csv").write_text(head + "00000002_000.png,Covid,0,2,40,PA\n")
    with pytest.raises(DatasetError, match=r"bad\.csv:2: finding 'Covid'"):
        read_nih(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text(head + "00000009_000.png,No Finding,0,9,40,PA\n")
    with pytest.raises(DatasetError, match=r"missing\.csv:2: image .*00000009_000.png not found"):
        read_nih(tmp_path / "missing.csv")


def test_covid_metadata_views_findings_and_errors(tmp_path: Path) -> None:
    for n in "abcdef":
        _img(tmp_path / "images" / f"{n}.jpg")
    head = "filename,view,finding,sex,age,patientid,license,file\n"
    (tmp_path / "metadata.csv").write_text(
        head
        + "a.jpeg,PA,COVID-19,M,60,1,,images/a.jpg\n"
        + "b.jpeg,L,COVID-19,M,60,1,,images/b.jpg\n"
        + "c.jpeg,AP Supine,ARDS,F,50,2,,images/c.jpg\n"
        + "d.jpeg,PA,todo,F,50,3,,images/d.jpg\n"
        + "e.jpeg,,Pneumonia,F,50,4,,images/e.jpg\n"
        + "f.jpeg,PA,No Finding,F,50,5,,images/f.jpg\n"
    )
    recs = read_covid(tmp_path)
    assert [r.key for r in recs] == ["covid:a", "covid:c", "covid:f"]
    a, c, f = recs
    assert a.raw[IDX["Pneumonia"]] == 1 and a.raw[IDX["Lung Opacity"]] == 1
    assert a.raw[IDX["No Finding"]] == 0 and math.isnan(a.raw[IDX["Cardiomegaly"]])
    assert c.raw[IDX["Lung Opacity"]] == 1 and math.isnan(c.raw[IDX["Pneumonia"]])
    assert f.raw[IDX["No Finding"]] == 1 and f.raw[IDX["Pneumonia"]] == 0
    (tmp_path / "m2.csv").write_text(head + "z.jpeg,PA,COVID-19,M,60,9,,images/z.jpg\n")
    with pytest.raises(DatasetError, match=r"m2\.csv:2: image .*z.jpg not found"):
        read_covid(tmp_path / "m2.csv")


def _rec(key: str, patient: str, source: str) -> StudyRecord:
    return StudyRecord(key, patient, source, Path(key), None, np.zeros(14, np.float32))


def test_dedupe_and_three_way_split_keep_a_patient_on_one_side(tmp_path: Path) -> None:
    # the same CheXpert study read from chexpert_small and chexpert_sample counts once
    a = small_release(tmp_path / "a")
    b = small_release(tmp_path / "b")
    recs = read_studies(chexpert=[a, b])
    assert len(recs) == 2 and all("/a/" in str(r.frontal) for r in recs)
    assert len(dedupe([*recs, *recs])) == 2
    many = [_rec(f"s{i}", f"p{i // 2}", "x" if i % 3 else "y") for i in range(3000)]
    parts = patient_split3(many, 0.15, 0.15, seed=3)
    sides = {k: {r.patient for r in v} for k, v in parts.items()}
    assert not sides["train"] & sides["val"] and not sides["train"] & sides["test"]
    assert not sides["val"] & sides["test"]
    assert sum(len(v) for v in parts.values()) == 3000
    for k, frac in (("val", 0.15), ("test", 0.15), ("train", 0.7)):
        assert abs(len(parts[k]) / 3000 - frac) < 0.05
    # a patient's split does not depend on the source or on what else is read
    assert split_of("chexpert:patient00001", 0.15, 0.15, 0) == split_of(
        "chexpert:patient00001", 0.15, 0.15, 0
    )
    alone = patient_split3([_rec("k", "p7", "other")], 0.15, 0.15, seed=3)
    where = next(k for k, v in alone.items() if v)
    assert "p7" in sides[where]
