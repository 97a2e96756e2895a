"""The Analyzer end to end on synthetic images with tiny, randomly initialised cards in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.analyzer import Analyzer
from models.api import ModelKind, StudyAnalysis, StudyAnalyzer, StudyInput
from models.classifiers import Classifier
from models.config import ModelsConfig
from models.labels import OBSERVATIONS
from models.pix2pix import UNetGenerator
from models.registry import ModelCard, ModelLoadError, save_model
from models.view_classifier import ARCHITECTURE as VIEW_ARCH
from models.view_classifier import ViewCNN

from .test_classifiers import tiny_card


def tiny_view_card(path: Path) -> ModelCard:
    torch.manual_seed(0)
    net = ViewCNN(width=4, blocks=3)
    card = ModelCard(
        name="view_classifier",
        version="test",
        architecture=VIEW_ARCH,
        weights_file=path.with_suffix(".safetensors").name,
        sha256="0" * 64,
        input_size=32,
        labels=["frontal", "lateral"],
        thresholds={"lateral": 0.5},
        hyperparameters={"width": 4, "blocks": 3},
    )
    return save_model(card, net.state_dict(), path, half=True)


def tiny_lung_card(path: Path) -> None:
    torch.manual_seed(0)
    gen = UNetGenerator(ngf=4, depth=6)
    card = ModelCard(
        name="lung_mask",
        version="test",
        architecture="pix2pix-unet",
        weights_file=path.with_suffix(".safetensors").name,
        sha256="0" * 64,
        input_size=64,
        labels=["lung"],
        thresholds={"lung": 0.5},
        hyperparameters={"ngf": 4, "depth": 6, "dropout": 0.5},
    )
    save_model(card, gen.state_dict(), path, half=True)


@pytest.fixture
def cfg(tmp_path: Path) -> ModelsConfig:
    tiny_lung_card(tmp_path / "lung_mask.json")
    tiny_card(tmp_path / "model1.json", ["Abnormal"], thresholds={"Abnormal": 0.0}, name="model1")
    # thresholds 0 / 1 make Cardiomegaly and No Finding always present, the rest never
    thr = {o: 1.0 for o in OBSERVATIONS} | {"Cardiomegaly": 0.0, "No Finding": 0.0}
    tiny_card(tmp_path / "model2.json", list(OBSERVATIONS), thresholds=thr, name="model2", seed=1)
    tiny_view_card(tmp_path / "view_classifier.json")
    return ModelsConfig(weights_dir=tmp_path)


def _img(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.random((h, w), dtype=np.float32)


def test_analyse_batch_with_and_without_lateral(cfg: ModelsConfig) -> None:
    an: StudyAnalyzer = Analyzer.from_config(cfg, device="cpu")
    rng = np.random.default_rng(0)
    studies = [
        StudyInput("a", _img(rng, 120, 100), _img(rng, 90, 110)),
        StudyInput("b", _img(rng, 80, 96)),
        StudyInput("c", _img(rng, 64, 64), None),
    ]
    out = an.analyse(studies)
    assert [type(r) for r in out] == [StudyAnalysis] * 3
    a, b, _ = out
    assert isinstance(a, StudyAnalysis) and isinstance(b, StudyAnalysis)
    assert a.key == "a" and a.used_lateral and not b.used_lateral
    assert a.model1.label == "Abnormal" and a.model1.threshold == 0.0 and a.model1.present
    assert [f.label for f in a.model2] == list(OBSERVATIONS)
    # Model 1 (threshold 0) says abnormal, so Model 2's No Finding is not Present although its
    # own threshold is 0: the two are one decision (models.analyzer.reconcile)
    assert {f.label for f in a.model2 if f.present} == {"Cardiomegaly"}
    nf = next(f for f in a.model2 if f.label == "No Finding")
    assert nf.probability == pytest.approx(1 - a.model1.probability, abs=1e-6)
    # Grad-CAM for positive findings only (No Finding is not localised), in the frontal's frame
    assert set(a.heatmaps) == {"Cardiomegaly"}
    # uint8 at Model 2's input resolution, placed by the box it saw (issue 11: no float32 copy
    # at the frontal's resolution)
    hm = a.heatmaps["Cardiomegaly"]
    assert isinstance(an, Analyzer)
    size = an.model2.card.input_size
    assert hm.values.shape == (size, size) and hm.values.dtype == np.uint8
    assert hm.values.max() in (0, 255) and hm.values.min() == 0  # stretched, or flat (all 0)
    assert hm.box == a.lung_mask.crop  # the lung crop the model saw
    assert a.lung_mask.mask.shape == (120, 100)
    assert {m.name for m in a.models} >= {"lung_mask", "model1", "model2"}
    assert {"lung_mask", "model1", "model2", "gradcam"} <= set(a.timings_ms)
    # the lateral changes Model 1's output (it is really used)
    alone = an.analyse([StudyInput("a2", studies[0].frontal)])[0]
    assert isinstance(alone, StudyAnalysis)
    assert alone.model1.probability != pytest.approx(a.model1.probability, abs=1e-7)


def test_one_bad_study_fails_alone(cfg: ModelsConfig) -> None:
    an = Analyzer.from_config(cfg, device="cpu")
    rng = np.random.default_rng(1)
    out = an.analyse(
        [
            StudyInput("ok", _img(rng, 70, 70)),
            StudyInput("rgb", rng.random((70, 70, 3), dtype=np.float32)),
            StudyInput("range", _img(rng, 70, 70) * 300),
            StudyInput("nan", np.full((70, 70), np.nan, np.float32)),
            StudyInput("ok2", _img(rng, 50, 60), _img(rng, 50, 60)),
        ]
    )
    assert isinstance(out[0], StudyAnalysis) and isinstance(out[4], StudyAnalysis)
    assert isinstance(out[1], ValueError) and "rgb" in str(out[1]) and "2-D" in str(out[1])
    assert isinstance(out[2], ValueError) and "[0, 1]" in str(out[2])
    assert isinstance(out[3], ValueError) and "NaN" in str(out[3])
    assert an.analyse([]) == []


def test_batched_failure_is_attributed_to_its_study(cfg: ModelsConfig) -> None:
    an = Analyzer.from_config(cfg, device="cpu")
    real = an.model2.predict

    def flaky(frontals: list[np.ndarray], laterals: list[np.ndarray | None]) -> np.ndarray:
        if any(f.shape == (77, 77) for f in frontals):
            raise RuntimeError("simulated failure on the 77x77 study")
        return real(frontals, laterals)

    an.model2.predict = flaky  # type: ignore[method-assign]
    rng = np.random.default_rng(2)
    out = an.analyse([StudyInput("x", _img(rng, 60, 60)), StudyInput("y", _img(rng, 77, 77))])
    assert isinstance(out[0], StudyAnalysis)
    assert isinstance(out[1], RuntimeError) and "77x77" in str(out[1])


def test_gradcam_is_batched_and_a_failing_study_fails_alone(cfg: ModelsConfig) -> None:
    """Grad-CAM runs once for the batch (issue 11); when the batched call fails, each study is
    tried alone, and only the one that fails loses its result."""
    an = Analyzer.from_config(cfg, device="cpu")
    assert isinstance(an.model2, Classifier)
    real = an.model2.heatmaps_batch
    calls: list[int] = []

    def spy(
        frontals: list[np.ndarray], laterals: list[np.ndarray | None], labels: list[list[str]]
    ) -> list[dict[str, np.ndarray]]:
        calls.append(len(frontals))
        if any(float(f.mean()) > 0.9 for f in frontals):
            raise RuntimeError("simulated Grad-CAM failure on the bright study")
        return real(frontals, laterals, labels)

    an.model2.heatmaps_batch = spy  # type: ignore[method-assign]
    rng = np.random.default_rng(5)
    ok = [StudyInput(k, _img(rng, 70, 70)) for k in ("p", "q", "r")]
    out = an.analyse(ok)
    assert calls == [3] and all(isinstance(r, StudyAnalysis) for r in out)
    assert all(set(r.heatmaps) == {"Cardiomegaly"} for r in out if isinstance(r, StudyAnalysis))
    calls.clear()
    bright = StudyInput("bright", np.full((70, 70), 0.95, np.float32))
    out = an.analyse([ok[0], bright, ok[1]])
    assert calls == [3, 1, 1, 1]  # the batch, then one by one
    assert isinstance(out[0], StudyAnalysis) and isinstance(out[2], StudyAnalysis)
    assert isinstance(out[1], RuntimeError) and "bright" in str(out[1])
    # a Model 2 without heatmaps_batch (a torchxrayvision checkpoint) is asked study by study
    an.model2.heatmaps_batch = real  # type: ignore[method-assign]
    an.model2 = _PerStudyOnly(an.model2)  # type: ignore[assignment]
    out = an.analyse(ok)
    assert an.model2.calls == 3
    assert all(isinstance(r, StudyAnalysis) and set(r.heatmaps) == {"Cardiomegaly"} for r in out)


class _PerStudyOnly:
    """A Model 2 with ``heatmaps`` but no ``heatmaps_batch``, as the torchxrayvision adapter."""

    def __init__(self, inner: Classifier) -> None:
        self.inner, self.card, self.uses_lateral = inner, inner.card, inner.uses_lateral
        self.calls = 0

    def predict(self, frontals: list[np.ndarray], laterals: list[np.ndarray | None]) -> np.ndarray:
        return self.inner.predict(frontals, laterals)

    def heatmaps(
        self, frontal: np.ndarray, lateral: np.ndarray | None, labels: list[str]
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        return self.inner.heatmaps(frontal, lateral, labels)


def test_classify_views_and_model_infos(cfg: ModelsConfig) -> None:
    an = Analyzer.from_config(cfg, device="cpu")
    rng = np.random.default_rng(3)
    preds = an.classify_views([_img(rng, 100, 80), _img(rng, 64, 64)])
    assert len(preds) == 2 and all(
        p.view in ("frontal", "lateral") and 0.5 <= p.probability <= 1 for p in preds
    )
    infos = an.model_infos()
    assert [i.name for i in infos] == ["lung_mask", "model1", "model2", "view_classifier"]
    assert [i.kind for i in infos] == [
        ModelKind.LUNG_MASK,
        ModelKind.MODEL1,
        ModelKind.MODEL2,
        ModelKind.VIEW,
    ]
    assert all(len(i.sha256) == 64 for i in infos)


def test_xrv_checkpoint_replaces_model2(cfg: ModelsConfig, tmp_path: Path) -> None:
    from models.xrv_adapter import xrv_densenet

    torch.manual_seed(0)
    ck = tmp_path / "site_xrv.pt"
    torch.save(xrv_densenet(18).state_dict(), ck)
    an = Analyzer.from_config(
        cfg.model_copy(update={"torchxrayvision_checkpoint": ck}), device="cpu"
    )
    out = an.analyse(
        [StudyInput("s", np.random.default_rng(4).random((90, 90), dtype=np.float32))]
    )[0]
    assert isinstance(out, StudyAnalysis)
    labels = [f.label for f in out.model2]
    assert (
        "No Finding" not in labels and "Support Devices" not in labels and "Cardiomegaly" in labels
    )
    assert any(
        m.name.startswith("model2") and m.architecture == "torchxrayvision-densenet121"
        for m in out.models
    )
    xrv_kinds = [m.kind for m in out.models if m.architecture == "torchxrayvision-densenet121"]
    assert xrv_kinds == [ModelKind.MODEL2]


def test_missing_card_is_reported_by_name(cfg: ModelsConfig) -> None:
    (cfg.weights_dir / "model2.json").unlink()
    with pytest.raises(ModelLoadError, match="model2.json"):
        Analyzer.from_config(cfg, device="cpu")


def test_model_input_follows_card_input_crop(cfg: ModelsConfig) -> None:
    from models.analyzer import _Work
    from models.api import CropBox, LungMaskResult, MaskQuality

    an = Analyzer.from_config(cfg, device="cpu")
    frontal = np.random.default_rng(5).random((100, 80), dtype=np.float32)
    box = CropBox(10, 20, 70, 90)
    w = _Work(
        0,
        StudyInput("k", frontal),
        frontal,
        None,
        {},
        mask=LungMaskResult(np.zeros((100, 80), np.uint8), box, MaskQuality(0.3, 2, 0.9, True)),
        crop=frontal[20:90, 10:70],
    )
    img, b = an._input(an.model2, w)
    assert img.shape == (70, 60) and b == box  # trained on lung crops (the default)
    an.model2.card = an.model2.card.model_copy(
        update={"hyperparameters": {"input_crop": "full image"}}
    )
    img, b = an._input(an.model2, w)
    assert img.shape == (100, 80) and b == CropBox(0, 0, 80, 100)


def test_unvalidated_thresholds_are_reported_and_flagged(cfg: ModelsConfig) -> None:
    import json

    path = cfg.weights_dir / "model2.json"
    card = json.loads(path.read_text())
    card["hyperparameters"]["unvalidated_thresholds"] = ["Pneumonia", "Pleural Other"]
    path.write_text(json.dumps(card))
    an = Analyzer.from_config(cfg, device="cpu")
    out = an.analyse(
        [StudyInput("u", np.random.default_rng(6).random((64, 64), dtype=np.float32))]
    )[0]
    assert isinstance(out, StudyAnalysis)
    assert len(out.model2) == 14
    flagged = {f.label for f in out.model2 if not f.threshold_validated}
    assert flagged == {"Pneumonia", "Pleural Other"}
