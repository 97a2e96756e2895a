"""Model 1 and Model 2: a torchvision DenseNet (DenseNet-121 by default, as in CheXNet; the card
sets growth rate, blocks and stem width) on the frontal and optional lateral.

One backbone is shared by both views (the weights stay ~14 MB in float16 per model). Each view is
pooled to a 1024-d feature; the lateral slot holds either the lateral's features plus a learned
"lateral view" embedding, or, for a frontal-only study, a learned "lateral missing" embedding.
The two are concatenated and a linear head gives one logit per card label (late fusion), so a
frontal-only study is an ordinary input, not a special case.

Architecture hyper-parameters (``growth_rate``, ``block_config``, ``num_init_features``) live in
the model card, so tests can build tiny networks with the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet

from models.common import channels_last, compile_module, device_images, resize_on_device
from models.config import InferenceConfig
from models.registry import ModelCard, ModelLoadError, load_member_weights, load_state, read_card

log = logging.getLogger(__name__)

ARCHITECTURE = "densenet-shared-backbone-late-fusion"
#: identifiers earlier cards used for the same code path (then always DenseNet-121 sized)
ARCHITECTURE_ALIASES = (ARCHITECTURE, "densenet121-shared-backbone-late-fusion")
DENSENET121 = {"growth_rate": 32, "block_config": [6, 12, 24, 16], "num_init_features": 64}


def densenet_backbone(
    growth_rate: int = 32,
    block_config: tuple[int, ...] | list[int] = (6, 12, 24, 16),
    num_init_features: int = 64,
) -> nn.Sequential:
    """torchvision's DenseNet feature extractor (DenseNet-121 by default) with a 1-channel stem.

    Built with random weights: nothing is downloaded."""
    net = DenseNet(
        growth_rate=growth_rate,
        block_config=tuple(block_config),
        num_init_features=num_init_features,
    )
    net.features.conv0 = nn.Conv2d(
        1, num_init_features, kernel_size=7, stride=2, padding=3, bias=False
    )
    nn.init.kaiming_normal_(net.features.conv0.weight)
    features: nn.Sequential = net.features
    return features


class MultiViewClassifier(nn.Module):
    """Frontal + optional lateral -> one logit per label."""

    def __init__(
        self,
        num_labels: int,
        *,
        growth_rate: int = 32,
        block_config: tuple[int, ...] | list[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.features = densenet_backbone(growth_rate, block_config, num_init_features)
        norm5 = self.features.norm5
        assert isinstance(norm5, nn.BatchNorm2d)
        dim = int(norm5.num_features)
        self.feature_dim = dim
        self.lateral_missing = nn.Parameter(torch.zeros(dim))
        self.lateral_view = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * dim, num_labels)
        nn.init.zeros_(self.head.bias)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last dense block's output after the final norm and ReLU (Grad-CAM's target)."""
        return F.relu(self.features(x))

    @staticmethod
    def pool(fmap: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(fmap, 1).flatten(1)

    def fuse(
        self,
        frontal_feat: torch.Tensor,
        lateral: torch.Tensor | None,
        lateral_present: torch.Tensor | None,
    ) -> torch.Tensor:
        b = frontal_feat.shape[0]
        lat = self.lateral_missing.expand(b, -1).clone()
        if lateral is not None and lateral_present is not None and bool(lateral_present.any()):
            idx = torch.nonzero(lateral_present, as_tuple=False).flatten()
            lat_feat = self.pool(self.feature_map(lateral[idx])) + self.lateral_view
            lat = lat.index_copy(0, idx, lat_feat.to(lat.dtype))
        logits: torch.Tensor = self.head(self.dropout(torch.cat([frontal_feat, lat], dim=1)))
        return logits

    def forward(
        self,
        frontal: torch.Tensor,
        lateral: torch.Tensor | None = None,
        lateral_present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``frontal``: (B,1,H,W); ``lateral``: (B,1,H,W) or None; ``lateral_present``: (B,) bool
        saying which rows of ``lateral`` are real (others are ignored). Returns (B, labels)
        logits."""
        if lateral is not None and lateral_present is None:
            lateral_present = torch.ones(frontal.shape[0], dtype=torch.bool, device=frontal.device)
        return self.fuse(self.pool(self.feature_map(frontal)), lateral, lateral_present)


class LogitMean(nn.Module):
    """An ensemble of :class:`MultiViewClassifier` s (a card with ``members``): the same inputs
    go through every member and the output is the mean of their raw logits (float32);
    calibration is applied to that mean (:func:`calibrated`)."""

    def __init__(self, members: list[MultiViewClassifier]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def nets(self) -> list[MultiViewClassifier]:
        return [m for m in self.members if isinstance(m, MultiViewClassifier)]

    def forward(
        self,
        frontal: torch.Tensor,
        lateral: torch.Tensor | None = None,
        lateral_present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        outs = [m(frontal, lateral, lateral_present).float() for m in self.members]
        return torch.stack(outs).mean(dim=0)


def arch_kwargs(card: ModelCard) -> dict[str, Any]:
    hp = card.hyperparameters
    return {k: hp.get(k, v) for k, v in DENSENET121.items()}


def build_classifier(card: ModelCard) -> MultiViewClassifier:
    """An untrained network shaped as ``card`` describes."""
    if card.architecture not in ARCHITECTURE_ALIASES:
        raise ModelLoadError(
            f"model card {card.name}: architecture {card.architecture!r} is not {ARCHITECTURE!r}; "
            f"this card is for a different network"
        )
    return MultiViewClassifier(len(card.labels), **arch_kwargs(card))


def derived_from(card: ModelCard) -> str | None:
    """The card file (relative to this card's folder) whose network this card is derived from,
    or None for a card with its own network (see :class:`DerivedModel1`)."""
    d = card.hyperparameters.get("derived_from")
    return str(d["card"]) if isinstance(d, dict) and "card" in d else None


def load_classifier(
    card_path: Path, device: torch.device | str = "cpu"
) -> tuple[ModelCard, MultiViewClassifier | LogitMean]:
    """Load a classifier from its card (SHA-256 checked), in eval mode on ``device``: its
    network, or for an ensemble card (``members``) a :class:`LogitMean` of the members (each
    file's SHA-256 checked).

    A derived card (Model 1 = 1 - P(No Finding) of Model 2) has no network of its own: the
    card and network it is derived from are returned."""
    src = derived_from(read_card(Path(card_path)))
    if src is not None:
        card_path = Path(card_path).parent / src
    card, states = load_member_weights(Path(card_path))
    nets = []
    for state in states:
        model = build_classifier(card)
        load_state(model, state, card_path)
        nets.append(model.to(device).eval())
    if not card.members:
        return card, nets[0]
    return card, LogitMean(nets).to(device).eval()


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image to ``size`` x ``size`` (the aspect ratio is not kept, as in CheXpert)."""
    h, w = image.shape
    interp = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
    return cv2.resize(
        np.ascontiguousarray(image, dtype=np.float32), (size, size), interpolation=interp
    )


def to_tensor(
    images: list[np.ndarray],
    card: ModelCard,
    device: torch.device | str = "cpu",
    *,
    memory_channels_last: bool = False,
) -> torch.Tensor:
    """Images (2-D float32 in [0,1]) -> normalised (B,1,S,S) tensor at the card's input size,
    on ``device``. On the CPU OpenCV resizes (:func:`resize_square`); on CUDA the full-size
    images are sent once (pinned memory, one asynchronous copy; a crop of an image already sent is
    cut on the device) and resized there."""
    size = card.input_size
    dev = torch.device(device)
    if dev.type == "cuda":
        sent = device_images(dev).send(images)
        t = torch.stack(
            [resize_on_device(x, size, area=x.shape[0] > size or x.shape[1] > size) for x in sent]
        )[:, None]
    else:
        arr = np.stack([resize_square(im, size) for im in images])[:, None]
        t = torch.from_numpy(arr)
    t = (t - card.normalisation.mean) / card.normalisation.std
    return channels_last(t) if memory_channels_last else t


def calibration_params(card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """Per-label Platt scaling ``(a, b)`` of the card (``sigmoid(a * logit + b)``); identity
    (a = 1, b = 0) for labels the card does not calibrate."""
    params = card.hyperparameters.get("calibration", {}).get("params", {})
    a = np.ones(len(card.labels), dtype=np.float32)
    b = np.zeros(len(card.labels), dtype=np.float32)
    for j, lab in enumerate(card.labels):
        if lab in params:
            a[j], b[j] = float(params[lab][0]), float(params[lab][1])
    return a, b


def calibrated(logits: torch.Tensor, card: ModelCard) -> np.ndarray:
    """Calibrated probabilities (studies x labels) from raw logits, as the card says."""
    a, b = calibration_params(card)
    z = logits.float().cpu().numpy() * a + b
    out: np.ndarray = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    return out


def validate_image(image: np.ndarray, what: str) -> np.ndarray:
    """Check the models.api image contract: 2-D, finite, values in [0, 1]."""
    if not isinstance(image, np.ndarray) or image.ndim != 2:
        shape = getattr(image, "shape", None)
        raise ValueError(f"{what}: expected a 2-D greyscale array, got shape {shape}")
    if min(image.shape) < 16:
        raise ValueError(
            f"{what}: image {image.shape} is too small to analyse (need at least 16x16)"
        )
    img = image.astype(np.float32, copy=False)
    # min and max carry any NaN or infinity, so two passes check everything; an image already in
    # [0, 1] is returned as it is (no copy: a crop of it stays a view of it, see models.common)
    lo, hi = float(img.min()), float(img.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{what}: image contains NaN or infinite values")
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{what}: pixel values span [{lo:.3g}, {hi:.3g}], expected [0, 1]")
    if lo < 0.0 or hi > 1.0:
        return img.clip(0.0, 1.0)
    return img


class Classifier:
    """A loaded Model 1 / Model 2 ready for inference on numpy images (models.api contract).

    ``predict`` returns calibrated probabilities in the card's label order; ``heatmaps`` gives
    Grad-CAM maps, uint8 0..255 at the network's input resolution, for the named labels.

    ``net`` is one network or a :class:`LogitMean` ensemble: the batch is prepared once and run
    through every member (one forward of the ensemble module, compiled as a whole when
    ``models.inference.compile`` is on), the raw logits are averaged, then calibrated."""

    uses_lateral = True

    def __init__(
        self,
        card: ModelCard,
        net: MultiViewClassifier | LogitMean,
        device: torch.device | str = "cpu",
    ) -> None:
        self.card = card
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.members = net.nets() if isinstance(net, LogitMean) else [net]
        self.channels_last = False
        self._forward: Callable[..., torch.Tensor] = self.net

    def accelerate(self, opts: InferenceConfig) -> None:
        """Apply ``models.inference`` on CUDA (a no-op on the CPU): channels-last and
        ``torch.compile`` of the forward pass (Grad-CAM keeps the eager network)."""
        if self.device.type != "cuda":
            return
        self.set_channels_last(opts.channels_last)
        self._forward = compile_module(self.net, opts.compile)

    def set_channels_last(self, on: bool) -> None:
        """Run the network and its inputs in channels-last memory order (same results)."""
        fmt = torch.channels_last if on else torch.contiguous_format
        self.net.to(memory_format=fmt)
        self.channels_last = on

    @classmethod
    def from_card(cls, card_path: Path, device: torch.device | str = "cpu") -> Classifier:
        card, net = load_classifier(card_path, device)
        return cls(card, net, device)

    def _inputs(
        self, frontals: list[np.ndarray], laterals: list[np.ndarray | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if len(frontals) != len(laterals):
            raise ValueError(f"{len(frontals)} frontal images but {len(laterals)} lateral entries")
        cl = self.channels_last
        f = to_tensor(frontals, self.card, self.device, memory_channels_last=cl)
        present = [lat is not None for lat in laterals]
        if not any(present):
            return f, None, None
        size = self.card.input_size
        blank = np.zeros((size, size), dtype=np.float32)
        lat = to_tensor(
            [lat if lat is not None else blank for lat in laterals],
            self.card,
            self.device,
            memory_channels_last=cl,
        )
        return f, lat, torch.tensor(present, dtype=torch.bool, device=self.device)

    @torch.no_grad()
    def predict(self, frontals: list[np.ndarray], laterals: list[np.ndarray | None]) -> np.ndarray:
        if not frontals:
            return np.zeros((0, len(self.card.labels)), dtype=np.float32)
        from models.common import autocast

        f, lat, present = self._inputs(frontals, laterals)
        with autocast(self.device):
            logits = self._forward(f, lat, present)
        return calibrated(logits, self.card)

    def heatmaps(
        self, frontal: np.ndarray, lateral: np.ndarray | None, labels: list[str]
    ) -> dict[str, np.ndarray]:
        return self.heatmaps_batch([frontal], [lateral], [labels])[0]

    def heatmaps_batch(
        self,
        frontals: list[np.ndarray],
        laterals: list[np.ndarray | None],
        labels: list[list[str]],
    ) -> list[dict[str, np.ndarray]]:
        """Grad-CAM maps for several studies at once (one forward pass per member for the batch,
        one backward pass per distinct label: :func:`models.gradcam.grad_cam_batch`); for study
        i, ``labels[i]`` -> uint8 map at the input resolution. An ensemble's map is the mean of
        its members' (:func:`mean_cams`)."""
        from models.gradcam import grad_cam_batch

        if len(labels) != len(frontals):
            raise ValueError(f"{len(frontals)} frontal images but {len(labels)} label lists")
        idx = [[self.card.labels.index(lab) for lab in labs] for labs in labels]
        f, lat, present = self._inputs(frontals, laterals)

        def head(net: MultiViewClassifier) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda fm: net.fuse(net.pool(fm), lat, present)

        per_member = [grad_cam_batch(net.feature_map, head(net), f, idx) for net in self.members]
        out = []
        for i, labs in enumerate(labels):
            maps = [m[i] for m in per_member]
            cams = maps[0] if len(maps) == 1 else mean_cams(maps)
            out.append(dict(zip(labs, cams, strict=True)))
        return out


def mean_cams(maps: list[np.ndarray]) -> np.ndarray:
    """An ensemble's Grad-CAM: the mean of its members' uint8 maps (K, H, W), stretched again to
    0..255 per map as :func:`models.gradcam.grad_cam` does (all 0 where the mean is flat)."""
    if maps[0].shape[0] == 0:  # no labels asked for
        return maps[0]
    mean = np.mean(np.stack(maps).astype(np.float32), axis=0)
    lo = mean.min(axis=(1, 2), keepdims=True)
    span = mean.max(axis=(1, 2), keepdims=True) - lo
    out = np.where(span > 0, (mean - lo) * 255.0 / np.maximum(span, 1e-12), 0.0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


NO_FINDING = "No Finding"


class DerivedModel1:
    """Model 1 derived from Model 2: P(Abnormal) = 1 - P(No Finding), both calibrated, from the
    one network or ensemble; its threshold is 1 - Model 2's No Finding threshold, so the two
    decisions are one decision (:func:`models.analyzer.reconcile` keeps them equal at the
    boundary).

    Its card names the Model 2 card (``hyperparameters.derived_from.card``) and carries the same
    weights file(s) and SHA-256."""

    def __init__(self, card: ModelCard, source: Classifier) -> None:
        if NO_FINDING not in source.card.labels:
            raise ModelLoadError(
                f"Model 1 card {card.name} is derived from {source.card.name}, which has no "
                f"'{NO_FINDING}' output"
            )
        if card.sha256 != source.card.sha256:
            raise ModelLoadError(
                f"Model 1 card {card.name} is derived from weights {card.sha256[:12]}, but the "
                f"loaded Model 2 {source.card.name} has {source.card.sha256[:12]}: install the "
                f"matching model1.json and model2.json together"
            )
        self.card = card
        self.source = source
        self.uses_lateral = source.uses_lateral
        self.index = source.card.labels.index(NO_FINDING)

    @classmethod
    def from_card(
        cls, card_path: Path, source: Classifier | None = None, device: torch.device | str = "cpu"
    ) -> DerivedModel1:
        card = read_card(Path(card_path))
        src = derived_from(card)
        if src is None:
            raise ModelLoadError(f"model card {card_path} is not derived from another card")
        if source is None:
            source = Classifier.from_card(Path(card_path).parent / src, device)
        return cls(card, source)

    def from_model2(self, p2: np.ndarray) -> np.ndarray:
        """Model 1's probabilities (studies x 1) from Model 2's (studies x labels)."""
        out: np.ndarray = (1.0 - np.asarray(p2, dtype=np.float32)[:, [self.index]]).astype(
            np.float32
        )
        return out

    def predict(self, frontals: list[np.ndarray], laterals: list[np.ndarray | None]) -> np.ndarray:
        return self.from_model2(self.source.predict(frontals, laterals))

    def heatmaps(
        self, frontal: np.ndarray, lateral: np.ndarray | None, labels: list[str]
    ) -> dict[str, np.ndarray]:
        cams = self.source.heatmaps(frontal, lateral, [NO_FINDING])
        return {lab: cams[NO_FINDING] for lab in labels}


def load_model1(
    card_path: Path, model2: object, device: torch.device | str = "cpu"
) -> Classifier | DerivedModel1:
    """Model 1 from its card: derived from ``model2`` (a :class:`Classifier`) when the card says
    so, else its own network."""
    card = read_card(Path(card_path))
    if derived_from(card) is None:
        return Classifier.from_card(Path(card_path), device)
    if not isinstance(model2, Classifier):
        raise ModelLoadError(
            f"Model 1 card {card_path} is derived from a Model 2 card, but Model 2 is "
            f"{type(model2).__name__}: use the Model 1 card that matches the configured Model 2"
        )
    return DerivedModel1(card, model2)
