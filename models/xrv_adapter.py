"""Use a torchxrayvision DenseNet-121 checkpoint that a site has on disk as Model 2.

torchxrayvision is not a runtime dependency: its DenseNet uses torchvision's module names, so the
network is instantiated from ``torchvision.models.DenseNet`` with a 1-channel stem and the
checkpoint's state dict is loaded into it. Inputs follow torchxrayvision's convention: pixel
values scaled to [-1024, 1024] at 224x224.

Accepted files: a state dict saved with ``torch.save(model.state_dict(), path)`` (read with
``torch.load(weights_only=True)``) or a ``.safetensors`` file. torchxrayvision's own release files
pickle whole models and are refused (no pickle loading); convert one once with::

    python -c "import torch, torchxrayvision as xrv; \\
      torch.save(xrv.models.DenseNet(weights='densenet121-res224-chex').state_dict(), 'chex.pt')"

Which of the 18 outputs are real: a sidecar JSON beside the checkpoint (``<file>.json`` with
``{"pathologies": [...18 names, "" for unused...], "op_threshs": [...]}``) wins; otherwise the
torchxrayvision default 18-label order is assumed, and outputs whose operating threshold in the
checkpoint is NaN (torchxrayvision's marker for "not trained") are dropped. Outputs are mapped onto
the 14 CheXpert observations; observations the checkpoint does not predict (e.g. No Finding,
Support Devices) are absent from the result, not invented.

With operating thresholds, probabilities are normalised as torchxrayvision's ``op_norm`` does
(the threshold maps to 0.5), so the decision threshold is 0.5; without them the sigmoid output
is used with 0.5, which is not calibrated: say so in the results.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet

from models.classifiers import to_tensor
from models.labels import OBSERVATIONS
from models.registry import ModelCard, ModelLoadError, Normalisation, sha256_file

log = logging.getLogger(__name__)

ARCHITECTURE = "torchxrayvision-densenet121"
#: torchxrayvision's ``datasets.default_pathologies`` (the order of its 18 DenseNet outputs).
XRV_DEFAULT_PATHOLOGIES = [
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
]
#: torchxrayvision name -> CheXpert observation. Only same-meaning names are mapped: e.g.
#: Pleural_Thickening is not "Pleural Other" and Nodule/Mass are not all of "Lung Lesion".
XRV_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis",
    "Consolidation": "Consolidation",
    "Pneumothorax": "Pneumothorax",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Cardiomegaly": "Cardiomegaly",
    "Lung Lesion": "Lung Lesion",
    "Fracture": "Fracture",
    "Lung Opacity": "Lung Opacity",
    "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
}
INPUT_SIZE = 224
# [0, 1] -> [-1024, 1024]: (x - 0.5) / (1 / 2048)
XRV_NORMALISATION = Normalisation(mean=0.5, std=1.0 / 2048.0)


def xrv_densenet(num_classes: int) -> DenseNet:
    net = DenseNet(
        growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=num_classes
    )
    net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(
            f"torchxrayvision checkpoint {path} not found: check models.torchxrayvision_checkpoint"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a pickled model
        raise ModelLoadError(
            f"torchxrayvision checkpoint {path} is not a plain state dict ({type(exc).__name__}); "
            f"torchxrayvision release files pickle whole models, which are not loaded here. "
            f"Convert it once with torch.save(model.state_dict(), ...) (see models/xrv_adapter.py)"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(
            f"torchxrayvision checkpoint {path} does not hold a state dict of tensors"
        )
    return state


class XrvClassifier:
    """A torchxrayvision DenseNet as Model 2 (frontal only), same interface as
    :class:`models.classifiers.Classifier`."""

    uses_lateral = False

    def __init__(
        self,
        net: DenseNet,
        card: ModelCard,
        output_index: list[int],
        op_threshs: torch.Tensor | None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.card = card
        self.output_index = output_index  # card label i <- network output output_index[i]
        self.op_threshs = op_threshs.to(self.device) if op_threshs is not None else None

    @classmethod
    def from_checkpoint(cls, path: Path, device: torch.device | str = "cpu") -> XrvClassifier:
        path = Path(path)
        state = read_state_dict(path)
        op = state.pop("op_threshs", None)
        if "classifier.weight" not in state:
            raise ModelLoadError(
                f"{path}: no 'classifier.weight': not a torchxrayvision DenseNet state dict"
            )
        n_out = int(state["classifier.weight"].shape[0])
        pathologies = list(XRV_DEFAULT_PATHOLOGIES)
        side = path.with_suffix(path.suffix + ".json")
        side = side if side.exists() else path.with_suffix(".json")
        if side.exists():
            meta = json.loads(side.read_text(encoding="utf-8"))
            pathologies = list(meta.get("pathologies", pathologies))
            if meta.get("op_threshs") is not None:
                op = torch.tensor([math.nan if v is None else float(v) for v in meta["op_threshs"]])
        elif op is None:
            log.warning(
                "%s: no op_threshs and no sidecar JSON; assuming all %d torchxrayvision outputs "
                "are trained (true for the 'all' weights only). Add %s with 'pathologies' "
                "for a single-dataset checkpoint",
                path.name,
                n_out,
                side.name,
            )
        if len(pathologies) != n_out:
            raise ModelLoadError(
                f"{path}: {n_out} outputs but {len(pathologies)} pathology names; "
                f"give the names in {side}"
            )
        net = xrv_densenet(n_out)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"{path} is not a torchxrayvision DenseNet-121 state dict: {exc}"
            ) from None
        if op is not None and op.numel() != n_out:
            raise ModelLoadError(f"{path}: op_threshs has {op.numel()} values for {n_out} outputs")
        trained = {
            name: i
            for i, name in enumerate(pathologies)
            if name and (op is None or not math.isnan(float(op.view(-1)[i])))
        }
        labels, index = [], []
        for obs in OBSERVATIONS:
            for xname, cname in XRV_TO_CHEXPERT.items():
                if cname == obs and xname in trained:
                    labels.append(obs)
                    index.append(trained[xname])
        if not labels:
            raise ModelLoadError(f"{path}: none of its outputs map onto the CheXpert observations")
        digest = sha256_file(path)
        card = ModelCard(
            name="model2-torchxrayvision",
            version=f"xrv-{path.stem}-{digest[:8]}",
            architecture=ARCHITECTURE,
            weights_file=path.name,
            sha256=digest,
            input_size=INPUT_SIZE,
            normalisation=XRV_NORMALISATION,
            labels=labels,
            thresholds={lab: 0.5 for lab in labels},
            hyperparameters={"source_pathologies": pathologies, "calibrated": op is not None},
            training_data="torchxrayvision checkpoint supplied by the site (see its documentation)",
            notes=(
                "op_norm-calibrated: threshold 0.5 is torchxrayvision's operating point"
                if op is not None
                else "uncalibrated sigmoid outputs; 0.5 is not an operating point"
            ),
        )
        log.info(
            "loaded torchxrayvision checkpoint %s: %d of 14 observations mapped",
            path.name,
            len(labels),
        )
        return cls(net, card, index, op.float().view(-1) if op is not None else None, device)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net.features(x))

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net.classifier(F.adaptive_avg_pool2d(fmap, 1).flatten(1))
        return logits

    def probabilities_all(self, x: torch.Tensor) -> torch.Tensor:
        """All network outputs as torchxrayvision would return them (sigmoid, op_norm when set)."""
        out = torch.sigmoid(self.head(self.feature_map(x)))
        if self.op_threshs is not None:
            out = op_norm(out, self.op_threshs)
        return out

    @torch.no_grad()
    def predict(
        self, frontals: list[np.ndarray], laterals: list[np.ndarray | None] | None = None
    ) -> np.ndarray:
        if not frontals:
            return np.zeros((0, len(self.card.labels)), dtype=np.float32)
        x = to_tensor(frontals, self.card).to(self.device)
        return self.probabilities_all(x)[:, self.output_index].cpu().numpy()

    def heatmaps(
        self, frontal: np.ndarray, lateral: np.ndarray | None, labels: list[str]
    ) -> dict[str, np.ndarray]:
        from models.gradcam import grad_cam

        idx = [self.output_index[self.card.labels.index(lab)] for lab in labels]
        x = to_tensor([frontal], self.card).to(self.device)
        cams = grad_cam(self.feature_map, self.head, x, idx)
        return dict(zip(labels, cams, strict=True))


def op_norm(prob: torch.Tensor, op_threshs: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's operating-point normalisation: the threshold maps to 0.5, linearly on
    each side; outputs with a NaN threshold are 0.5."""
    t = op_threshs.view(1, -1).expand_as(prob)
    valid = ~torch.isnan(t)
    below = prob / (t * 2)
    above = 1 - ((1 - prob) / ((1 - t) * 2))
    out = torch.where(prob < t, below, above)
    return torch.where(valid, out, torch.full_like(prob, 0.5))
