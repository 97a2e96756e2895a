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
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from models.api import LungMaskResult
from models.common import autocast, channels_last, compile_module, device_images, resize_on_device
from models.config import InferenceConfig
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
        self.channels_last = False
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self.generator

    def accelerate(self, opts: InferenceConfig) -> None:
        """Apply ``models.inference`` on CUDA (a no-op on the CPU): batch size, channels-last,
        ``torch.compile``."""
        if self.device.type != "cuda":
            return
        self.batch_size = opts.batch_size
        self.set_channels_last(opts.channels_last)
        self._forward = compile_module(self.generator, opts.compile)

    def set_channels_last(self, on: bool) -> None:
        """Run the generator and its inputs in channels-last memory order (same results)."""
        fmt = torch.channels_last if on else torch.contiguous_format
        self.generator.to(memory_format=fmt)
        self.channels_last = on

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

    @staticmethod
    def _check(i: int, img: np.ndarray) -> None:
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

    def _prepare(self, images: list[np.ndarray]) -> torch.Tensor:
        """The normalised (N, 1, size, size) batch, on the CPU (OpenCV resize) or, on CUDA,
        built on the device from the full-resolution images."""
        for i, img in enumerate(images):
            self._check(i, img)
        if self.device.type == "cuda":
            return self._prepare_on_device(images)
        batch = np.empty((len(images), 1, self.size, self.size), dtype=np.float32)
        for i, img in enumerate(images):
            a = np.nan_to_num(img.astype(np.float32, copy=False), nan=0.0)
            batch[i, 0] = resize_image(np.clip(a, 0.0, 1.0), self.size)
        batch = (batch - self.mean) / self.std
        x = torch.from_numpy(batch)
        return channels_last(x) if self.channels_last else x

    def _prepare_on_device(self, images: list[np.ndarray]) -> torch.Tensor:
        sent = device_images(self.device).send(images)
        batch = torch.empty((len(images), 1, self.size, self.size), device=self.device)
        for i, (img, t) in enumerate(zip(images, sent, strict=True)):
            t = torch.nan_to_num(t, nan=0.0).clamp_(0.0, 1.0)
            batch[i, 0] = resize_on_device(t, self.size, area=min(img.shape[:2]) >= self.size)
        batch = (batch - self.mean) / self.std
        return channels_last(batch) if self.channels_last else batch

    def probability_maps(self, images: list[np.ndarray]) -> np.ndarray:
        """Lung probabilities, ``N x size x size`` float32 in [0, 1], at the network's
        resolution."""
        if not images:
            return np.empty((0, self.size, self.size), dtype=np.float32)
        chunks: list[torch.Tensor] = []
        with torch.inference_mode():
            for s in range(0, len(images), self.batch_size):
                x = self._prepare(images[s : s + self.batch_size])
                with autocast(self.device):
                    logits = self._forward(x)
                chunks.append(torch.sigmoid(logits.float())[:, 0])
            # one copy back (one synchronisation) for the whole batch
            out: np.ndarray = torch.cat(chunks).cpu().numpy()
        return np.ascontiguousarray(out, dtype=np.float32)

    def predict(self, images: list[np.ndarray], *, margin: float) -> list[LungMaskResult]:
        """Mask, crop box and quality for each image (2-D float32 in [0, 1], any resolution)."""
        if not images:
            return []
        probs = self.probability_maps(images)
        return [
            mask_and_crop(p, img.shape, threshold=self.threshold, margin=margin, limits=self.limits)
            for p, img in zip(probs, images, strict=True)
        ]
