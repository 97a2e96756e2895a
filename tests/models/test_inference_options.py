"""The CUDA inference options checked on the CPU: channels-last gives the same numbers, the
``models.inference`` section parses, the device-side resizes match OpenCV's, and a crop of an
image already sent to the device is cut from the device copy."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from models.analyzer import Analyzer
from models.classifiers import Classifier, validate_image
from models.common import DeviceImages, compile_module, resize_on_device
from models.config import InferenceConfig, ModelsConfig
from models.lung_mask import LungMasker
from models.view_classifier import ViewClassifier

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shipped() -> tuple[LungMasker, Classifier, ViewClassifier]:
    cfg = ModelsConfig()
    return (
        LungMasker.from_card(cfg.resolve(cfg.lung_mask), CPU),
        Classifier.from_card(cfg.resolve(cfg.model2), CPU),
        ViewClassifier.from_card(cfg.resolve(cfg.view_classifier), CPU),
    )


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:300, 0:260]
    smooth = (0.5 + 0.4 * np.sin(yy / 23.0) * np.cos(xx / 31.0)).astype(np.float32)
    return [smooth, rng.random((180, 220), dtype=np.float32)]


def test_channels_last_gives_the_same_outputs(
    shipped: tuple[LungMasker, Classifier, ViewClassifier],
) -> None:
    masker, clf, view = shipped
    imgs = _images()
    before = (
        masker.probability_maps(imgs),
        clf.predict(imgs, [None, imgs[0]]),
        view.probabilities(imgs),
    )
    for m in shipped:
        m.set_channels_last(True)
    try:
        first = next(masker.generator.parameters())
        assert first.is_contiguous(memory_format=torch.channels_last)
        after = (
            masker.probability_maps(imgs),
            clf.predict(imgs, [None, imgs[0]]),
            view.probabilities(imgs),
        )
    finally:
        for m in shipped:
            m.set_channels_last(False)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_accelerate_is_a_no_op_on_the_cpu(
    shipped: tuple[LungMasker, Classifier, ViewClassifier],
) -> None:
    masker, clf, _ = shipped
    masker.accelerate(InferenceConfig(compile=True, batch_size=3))
    clf.accelerate(InferenceConfig(compile=True))
    assert masker.batch_size == 8 and not masker.channels_last
    assert clf._forward is clf.net


def test_inference_section_parses_and_rejects_unknown_keys() -> None:
    assert ModelsConfig().inference == InferenceConfig(
        channels_last=True, compile=False, batch_size=64
    )
    cfg = ModelsConfig.model_validate({"inference": {"compile": True, "batch_size": 128}})
    assert cfg.inference.compile and cfg.inference.batch_size == 128
    with pytest.raises(ValueError, match="compile_mode"):
        ModelsConfig.model_validate({"inference": {"compile_mode": "max"}})
    with pytest.raises(ValueError, match="batch_size"):
        ModelsConfig.model_validate({"inference": {"batch_size": 0}})


def test_analyzer_from_config_on_cpu_ignores_the_cuda_options() -> None:
    an = Analyzer.from_config(ModelsConfig(inference={"compile": True}), device="cpu")
    assert isinstance(an.model2, Classifier) and an.model2._forward is an.model2.net


def test_compile_module_wraps_only_when_asked() -> None:
    net = torch.nn.Linear(2, 2)
    assert compile_module(net, False) is net
    wrapped = compile_module(net, True)
    assert wrapped is not net and callable(wrapped)


def test_validate_image_keeps_the_array_when_in_range() -> None:
    img = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    assert validate_image(img, "x") is img
    over = img * 1.0005
    out = validate_image(over, "x")
    assert out is not over and out.max() == 1.0
    for bad in (np.nan, np.inf, -np.inf):
        broken = img.copy()
        broken[3, 4] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            validate_image(broken, "x")
    with pytest.raises(ValueError, match="span"):
        validate_image(img * 2, "x")


def test_device_resizes_match_opencv() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((512, 384), dtype=np.float32)
    # shrinking by whole factors: area averaging is exactly OpenCV's INTER_AREA
    got = resize_on_device(torch.from_numpy(img), 128, area=True).numpy()
    ref = cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # enlarging: bilinear with half-pixel centres is OpenCV's INTER_LINEAR
    small = rng.random((40, 50), dtype=np.float32)
    got = resize_on_device(torch.from_numpy(small), 64, area=False).numpy()
    ref = cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_a_crop_of_a_sent_image_is_cut_from_the_device_copy() -> None:
    images = DeviceImages(CPU)
    frame = np.arange(60 * 50, dtype=np.float32).reshape(60, 50)
    images._remember(frame, torch.from_numpy(frame.copy()))
    crop = frame[7:40, 11:33]
    cut = images._lookup(crop)
    assert cut is not None and cut.shape == (33, 22)
    np.testing.assert_array_equal(cut.numpy(), crop)
    # a different array, or the same memory read with other strides, is not found
    assert images._lookup(frame.copy()) is None
    assert images._lookup(frame[::2]) is None
    # the entry goes with its host array
    del frame, crop
    assert images._bytes == 0 and not images._sent
