"""The torchxrayvision adapter reproduces torchxrayvision's own forward pass from a saved state
dict.

torchxrayvision is a test dependency only: the adapter never imports it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.registry import ModelLoadError
from models.xrv_adapter import XRV_DEFAULT_PATHOLOGIES, XrvClassifier

xrv = pytest.importorskip("torchxrayvision")


@pytest.fixture(scope="module")
def xrv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = xrv.models.DenseNet(weights=None).eval()
    # random init leaves BatchNorm at identity and a zero bias; perturb so the check is not trivial
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
        m.classifier.bias.uniform_(-1, 1)
    return m


def _xrv_input(img: np.ndarray) -> torch.Tensor:
    # xrv's convention: [0, 255] -> [-1024, 1024] via xrv.datasets.normalize, 224x224
    x = xrv.datasets.normalize(img * 255.0, 255)
    return torch.from_numpy(x.astype(np.float32))[None, None]


def test_adapter_matches_torchxrayvision_forward(
    tmp_path: Path, xrv_model: torch.nn.Module
) -> None:
    path = tmp_path / "xrv_random.pt"
    torch.save(xrv_model.state_dict(), path)
    clf = XrvClassifier.from_checkpoint(path)
    # all 18 outputs trained (no op_threshs): the 11 that have a CheXpert meaning are reported
    assert clf.card.labels == [
        "Enlarged Cardiomediastinum",
        "Cardiomegaly",
        "Lung Opacity",
        "Lung Lesion",
        "Edema",
        "Consolidation",
        "Pneumonia",
        "Atelectasis",
        "Pneumothorax",
        "Pleural Effusion",
        "Fracture",
    ]
    assert "No Finding" not in clf.card.labels and "Support Devices" not in clf.card.labels
    assert clf.card.input_size == 224 and not clf.uses_lateral
    rng = np.random.default_rng(0)
    img = rng.random((224, 224), dtype=np.float32)
    with torch.no_grad():
        ref = torch.sigmoid(xrv_model(_xrv_input(img)))[0].numpy()
    ours = clf.predict([img])[0]
    for lab, p in zip(clf.card.labels, ours, strict=True):
        xname = {"Pleural Effusion": "Effusion"}.get(lab, lab)
        assert p == pytest.approx(ref[XRV_DEFAULT_PATHOLOGIES.index(xname)], abs=1e-4), lab
    assert np.ptp(ours) > 1e-3  # outputs differ across labels: the comparison means something


def test_adapter_with_operating_thresholds_drops_untrained_outputs(
    tmp_path: Path, xrv_model: torch.nn.Module
) -> None:
    op = torch.full((18,), math.nan)
    trained = ["Atelectasis", "Cardiomegaly", "Effusion", "Nodule"]
    for name in trained:
        op[XRV_DEFAULT_PATHOLOGIES.index(name)] = 0.1
    state = dict(xrv_model.state_dict())
    state["op_threshs"] = op
    path = tmp_path / "xrv_op.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    clf = XrvClassifier.from_checkpoint(path)
    assert clf.card.labels == [
        "Cardiomegaly",
        "Atelectasis",
        "Pleural Effusion",
    ]  # Nodule has no CheXpert name
    img = np.random.default_rng(1).random((300, 260), dtype=np.float32)
    xrv_model.op_threshs = op  # the registered buffer: xrv now applies op_norm
    try:
        with torch.no_grad():
            import cv2

            ref = xrv_model(_xrv_input(cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA)))[
                0
            ].numpy()
    finally:
        xrv_model.op_threshs = None
    ours = clf.predict([img])[0]
    assert ours == pytest.approx([ref[10], ref[0], ref[7]], abs=1e-4)
    cams = clf.heatmaps(img, None, ["Cardiomegaly"])
    cam = cams["Cardiomegaly"]
    assert cam.shape == (224, 224) and cam.dtype == np.uint8 and cam.max() == 255


def test_sidecar_names_outputs(tmp_path: Path, xrv_model: torch.nn.Module) -> None:
    path = tmp_path / "nih.pt"
    torch.save(xrv_model.state_dict(), path)
    names = XRV_DEFAULT_PATHOLOGIES[:14] + ["", "", "", ""]  # like torchxrayvision's NIH weights
    (tmp_path / "nih.pt.json").write_text(json.dumps({"pathologies": names}))
    clf = XrvClassifier.from_checkpoint(path)
    assert "Lung Opacity" not in clf.card.labels and "Fracture" not in clf.card.labels
    assert "Cardiomegaly" in clf.card.labels


def test_pickled_whole_model_and_missing_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, as torchxrayvision releases are
    with pytest.raises(ModelLoadError, match="state dict"):
        XrvClassifier.from_checkpoint(path)
    with pytest.raises(ModelLoadError, match="not found"):
        XrvClassifier.from_checkpoint(tmp_path / "absent.pt")
