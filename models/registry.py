"""Model cards and weights: every model is a safetensors file plus a JSON card.

The code reads labels, thresholds, input size and normalisation from the card, never from
constants. Loading verifies the weights' SHA-256 against the card; there is no pickle loading and
no download at run time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from models.api import ModelInfo, ModelKind


class ModelLoadError(RuntimeError):
    """A model card or its weights file is missing, invalid or does not match its hash."""


class Normalisation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mean: float = 0.5
    std: float = 0.5


class ModelCard(BaseModel):
    """Metadata that travels with a weights file."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    version: str
    architecture: str
    weights_file: str  # relative to the card's folder
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_size: int = Field(gt=0)
    normalisation: Normalisation = Field(default_factory=Normalisation)
    labels: list[str]
    thresholds: dict[str, float] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)  # e.g. ngf, views
    training_data: str = ""
    split: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    intended_use: str = "Research and engineering demonstration only. NOT FOR DIAGNOSTIC USE."
    notes: str = ""

    def threshold(self, label: str) -> float:
        return float(self.thresholds.get(label, 0.5))

    def info(self, kind: ModelKind) -> ModelInfo:
        """The card's identity for the report, in the role ``kind`` it plays in the analysis."""
        return ModelInfo(
            name=self.name,
            version=self.version,
            sha256=self.sha256,
            architecture=self.architecture,
            kind=kind,
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_card(card_path: Path) -> ModelCard:
    """Read and validate a model card, raising :class:`ModelLoadError` with what to do."""
    if not card_path.exists():
        raise ModelLoadError(
            f"model card {card_path} not found: check models.* paths in config.yaml, or train the "
            f"model with 'cxr-worker train ...' (see README)"
        )
    try:
        return ModelCard.model_validate(json.loads(card_path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ModelLoadError(f"model card {card_path} is invalid: {exc}") from None


def load_weights(
    card_path: Path, *, map_location: str | torch.device = "cpu"
) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Return the card and its state dict after checking the weights file's SHA-256."""
    card = read_card(card_path)
    weights = card_path.parent / card.weights_file
    if not weights.exists():
        raise ModelLoadError(
            f"weights file {weights} named by {card_path} not found: restore it from the release "
            f"or retrain the model"
        )
    digest = sha256_file(weights)
    if digest != card.sha256:
        raise ModelLoadError(
            f"weights file {weights} has SHA-256 {digest}, but {card_path} expects {card.sha256}: "
            f"the file is corrupt or was replaced; restore the matching pair (card + weights)"
        )
    state = load_file(str(weights), device=str(map_location))
    return card, state


def load_state(net: nn.Module, state: dict[str, torch.Tensor], card_path: Path) -> None:
    """Load ``state`` (float16 storage cast back) into ``net``, the network ``card_path``
    describes; raises :class:`ModelLoadError` when the weights do not fit it."""
    try:
        net.load_state_dict(to_float(state))
    except RuntimeError as exc:
        raise ModelLoadError(
            f"weights of {card_path} do not fit the network its card describes: {exc}"
        ) from None


def save_model(
    card: ModelCard, state_dict: dict[str, torch.Tensor], card_path: Path, *, half: bool = False
) -> ModelCard:
    """Write ``state_dict`` as safetensors next to ``card_path`` and the card with its SHA-256.

    ``half`` stores floating-point tensors as float16 (weights are cast back on load)."""
    card_path.parent.mkdir(parents=True, exist_ok=True)
    weights = card_path.parent / card.weights_file
    tensors = {}
    for k, v in state_dict.items():
        t = v.detach().cpu().contiguous()
        if half and t.is_floating_point():
            t = t.half()
        tensors[k] = t
    save_file(tensors, str(weights))
    card = card.model_copy(update={"sha256": sha256_file(weights)})
    card_path.write_text(json.dumps(card.model_dump(), indent=2) + "\n", encoding="utf-8")
    return card


def to_float(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast float16 tensors (half-precision storage) back to float32 for loading into modules."""
    return {k: (v.float() if v.dtype == torch.float16 else v) for k, v in state.items()}
