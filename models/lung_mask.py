"""Lung masks for frontal radiographs: the Pix2Pix generator plus :mod:`models.crop`.

Aspect handling: every image is resized to the card's ``input_size`` square by a plain
(anisotropic) resize (:func:`resize_image`, the same mapping the training data in
:mod:`models.training.datasets.masks` uses), and the mask is resized back the same way. Chest
radiographs are close to square (JSRT 1:1, Montgomery about 1:1.2), the training augmentation
varies the aspect ratio, and a squash avoids the black padding bars that a letterbox would show
the network but that it never saw in training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from models.api import LungMaskResult
from models.common import autocast
from models.crop import DEFAULT_LIMITS, QualityLimits, mask_and_crop
from models.pix2pix import UNetGenerator
from models.registry import ModelCard, ModelLoadError, load_weights, to_float

log = logging.getLogger(__name__)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Anisotropic resize to ``size x size`` (area filter when shrinking)."""
    interp = cv2.INTER_AREA if min(img.shape[:2]) >= size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


class LungMasker:
    """Pix2Pix U-Net lung segmentation configured entirely by its model card."""

    def __init__(
        self,
        card: ModelCard,
        generator: UNetGenerator,
        device: torch.device,
        *,
        batch_size: int = 8,
        limits: QualityLimits = DEFAULT_LIMITS,
    ) -> None:
        self.card = card
        self.generator = generator.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.limits = limits
        self.size = card.input_size
        self.mean, self.std = card.normalisation.mean, card.normalisation.std
        self.threshold = card.threshold("lung")

    @classmethod
    def from_card(cls, card_path: Path, device: torch.device, **kwargs: object) -> LungMasker:
        """Load the generator named by ``card_path`` (SHA-256 checked by the registry)."""
        card, state = load_weights(Path(card_path))
        hp = card.hyperparameters
        try:
            gen = UNetGenerator(
                ngf=int(hp.get("ngf", 16)),
                depth=int(hp.get("depth", 8)),
                dropout=float(hp.get("dropout", 0.5)),
            )
            gen.load_state_dict(to_float(state))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ModelLoadError(
                f"weights for {card_path} do not fit a UNetGenerator with the card's "
                f"hyperparameters {hp}: {exc}; restore the matching card + weights pair"
            ) from None
        log.info("lung mask model %s %s loaded on %s", card.name, card.version, device)
        return cls(card, gen, device, **kwargs)  # type: ignore[arg-type]

    def _prepare(self, images: list[np.ndarray]) -> torch.Tensor:
        batch = np.empty((len(images), 1, self.size, self.size), dtype=np.float32)
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.ndim != 2 or min(img.shape) < 2:
                raise ValueError(
                    f"lung mask input {i} must be a 2-D array (rows, cols), got "
                    f"{getattr(img, 'shape', type(img))}"
                )
            if not np.issubdtype(img.dtype, np.floating):
                raise TypeError(
                    f"lung mask input {i} has dtype {img.dtype}; expected float in [0, 1] "
                    f"(decode and window the pixels first, e.g. divide 8-bit data by 255)"
                )
            a = np.nan_to_num(img.astype(np.float32, copy=False), nan=0.0)
            batch[i, 0] = resize_image(np.clip(a, 0.0, 1.0), self.size)
        batch = (batch - self.mean) / self.std
        return torch.from_numpy(batch)

    def probability_maps(self, images: list[np.ndarray]) -> np.ndarray:
        """Lung probabilities, ``N x size x size`` float32 in [0, 1], at the network's
        resolution."""
        out = np.empty((len(images), self.size, self.size), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(images), self.batch_size):
                x = self._prepare(images[s : s + self.batch_size]).to(self.device)
                with autocast(self.device):
                    logits = self.generator(x)
                out[s : s + len(x)] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
        return out

    def predict(self, images: list[np.ndarray], *, margin: float) -> list[LungMaskResult]:
        """Mask, crop box and quality for each image (2-D float32 in [0, 1], any resolution)."""
        if not images:
            return []
        probs = self.probability_maps(images)
        return [
            mask_and_crop(p, img.shape, threshold=self.threshold, margin=margin, limits=self.limits)
            for p, img in zip(probs, images, strict=True)
        ]
