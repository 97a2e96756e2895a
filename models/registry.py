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


class Member(BaseModel):
    """One network of an ensemble card: its weights file (relative to the card's folder), that
    file's SHA-256, and where and how it was trained."""

    model_config = ConfigDict(extra="forbid")

    weights_file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    trained_on: str = ""
    description: str = ""


class ModelCard(BaseModel):
    """Metadata that travels with a weights file.

    An ensemble card lists its networks in ``members`` (same architecture, input and labels;
    the served output is the mean of their raw logits): ``weights_file`` is then the first
    member's and ``sha256`` is :func:`members_digest` of the members, so the model's identity
    in the report covers every network. A card without ``members`` is one network."""

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
    members: list[Member] = Field(default_factory=list)

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


def members_digest(members: list[Member]) -> str:
    """An ensemble card's ``sha256``: SHA-256 of its members' SHA-256s, one per line, in order."""
    return hashlib.sha256("\n".join(m.sha256 for m in members).encode("ascii")).hexdigest()


def _verified_state(
    card_path: Path, weights_file: str, sha256: str, map_location: str | torch.device
) -> dict[str, torch.Tensor]:
    weights = card_path.parent / weights_file
    if not weights.exists():
        raise ModelLoadError(
            f"weights file {weights} named by {card_path} not found: restore it from the release "
            f"or retrain the model"
        )
    digest = sha256_file(weights)
    if digest != sha256:
        raise ModelLoadError(
            f"weights file {weights} has SHA-256 {digest}, but {card_path} expects {sha256}: "
            f"the file is corrupt or was replaced; restore the matching pair (card + weights)"
        )
    return load_file(str(weights), device=str(map_location))


def load_weights(
    card_path: Path, *, map_location: str | torch.device = "cpu"
) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Return the card and its state dict after checking the weights file's SHA-256 (one-network
    cards; an ensemble card is read with :func:`load_member_weights`)."""
    card = read_card(card_path)
    if card.members:
        raise ModelLoadError(
            f"model card {card_path} is an ensemble of {len(card.members)} networks; this model "
            f"type loads one network"
        )
    return card, _verified_state(card_path, card.weights_file, card.sha256, map_location)


def load_member_weights(
    card_path: Path, *, map_location: str | torch.device = "cpu"
) -> tuple[ModelCard, list[dict[str, torch.Tensor]]]:
    """The card and one state dict per network: its members' (each file's SHA-256 checked, and
    the card's ``sha256`` against :func:`members_digest`), or the one network of a plain card."""
    card = read_card(card_path)
    if not card.members:
        return card, [_verified_state(card_path, card.weights_file, card.sha256, map_location)]
    want = members_digest(card.members)
    if card.sha256 != want or card.weights_file != card.members[0].weights_file:
        raise ModelLoadError(
            f"model card {card_path}: sha256 {card.sha256[:12]} / weights_file "
            f"{card.weights_file} do not match its members ({want[:12]} / "
            f"{card.members[0].weights_file}); restore the card from the release"
        )
    states = [
        _verified_state(card_path, m.weights_file, m.sha256, map_location) for m in card.members
    ]
    return card, states


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
    card_path.write_text(card_json(card), encoding="utf-8")
    return card


def card_json(card: ModelCard) -> str:
    """The card as written to disk (a one-network card has no ``members`` key, as before)."""
    data = card.model_dump()
    if not data["members"]:
        del data["members"]
    return json.dumps(data, indent=2) + "\n"


def save_ensemble(
    card: ModelCard, members: list[tuple[Path, Member]], card_path: Path
) -> ModelCard:
    """Copy each member's weights file (byte for byte) next to ``card_path`` under its
    ``Member.weights_file`` name and write ``card`` with the members, their SHA-256s and the
    ensemble's :func:`members_digest`."""
    import shutil

    card_path.parent.mkdir(parents=True, exist_ok=True)
    done: list[Member] = []
    for src, member in members:
        dst = card_path.parent / member.weights_file
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        done.append(member.model_copy(update={"sha256": sha256_file(dst)}))
    card = card.model_copy(
        update={
            "members": done,
            "weights_file": done[0].weights_file,
            "sha256": members_digest(done),
        }
    )
    card_path.write_text(card_json(card), encoding="utf-8")
    return card


def to_float(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast float16 tensors (half-precision storage) back to float32 for loading into modules."""
    return {k: (v.float() if v.dtype == torch.float16 else v) for k, v in state.items()}
