"""Frontal vs lateral from pixels, for studies whose DICOM headers do not say.

A small CNN at low resolution (the card's ``input_size``, 128 by default): telling a PA/AP view
from a lateral is a coarse, global shape question. One logit; the card's labels name the classes
(``labels[1]`` is the positive class, "lateral") and its threshold decides.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.api import ViewPrediction
from models.classifiers import to_tensor, validate_image
from models.common import compile_module
from models.config import InferenceConfig
from models.registry import ModelCard, ModelLoadError, load_state, load_weights

ARCHITECTURE = "small-cnn-view"


class ViewCNN(nn.Module):
    """Conv(3x3)-BN-ReLU-MaxPool blocks with widths ``width * 2**i``, global pooling, one logit."""

    def __init__(self, width: int = 16, blocks: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for i in range(blocks):
            cout = width * 2 ** min(i, 3)
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        logit: torch.Tensor = self.head(f)
        return logit.squeeze(1)


def build_view_cnn(card: ModelCard) -> ViewCNN:
    if card.architecture != ARCHITECTURE:
        raise ModelLoadError(
            f"model card {card.name}: architecture {card.architecture!r} is not {ARCHITECTURE!r}"
        )
    if len(card.labels) != 2:
        raise ModelLoadError(
            f"model card {card.name}: a view classifier needs 2 labels, got {card.labels}"
        )
    hp = card.hyperparameters
    return ViewCNN(width=int(hp.get("width", 16)), blocks=int(hp.get("blocks", 5)))


class ViewClassifier:
    """Loaded view classifier: ``predict(images) -> list[ViewPrediction]``."""

    def __init__(self, card: ModelCard, net: ViewCNN, device: torch.device) -> None:
        self.card = card
        self.net = net.to(device).eval()
        self.device = device
        self.channels_last = False
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self.net

    def accelerate(self, opts: InferenceConfig) -> None:
        """Apply ``models.inference`` on CUDA (a no-op on the CPU)."""
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
    def from_card(cls, card_path: Path, device: torch.device | str = "cpu") -> ViewClassifier:
        card, state = load_weights(Path(card_path))
        net = build_view_cnn(card)
        load_state(net, state, card_path)
        return cls(card, net, torch.device(device))

    @torch.no_grad()
    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """P(labels[1]) for each image (2-D float32 in [0,1])."""
        if not images:
            return np.zeros(0, dtype=np.float32)
        imgs = [validate_image(im, f"view image {i}") for i, im in enumerate(images)]
        x = to_tensor(imgs, self.card, self.device, memory_channels_last=self.channels_last)
        # float32 even on CUDA: a tiny network whose decision routes the study; bf16 saves nothing
        logits = self._forward(x)
        out: np.ndarray = torch.sigmoid(logits.float()).cpu().numpy()
        return out

    def predict(self, images: list[np.ndarray]) -> list[ViewPrediction]:
        neg, pos = self.card.labels
        thr = self.card.threshold(pos)
        out = []
        for p in self.probabilities(images):
            p = float(p)
            out.append(
                ViewPrediction(view=pos, probability=p)
                if p >= thr
                else ViewPrediction(view=neg, probability=1.0 - p)
            )
        return out
