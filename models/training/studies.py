"""Studies as classifier inputs, shared by training and evaluation: the label vector a model is
trained on, a dataset of (frontal, lateral, target, mask) and batched prediction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from models.classifiers import MultiViewClassifier
from models.common import autocast
from models.registry import Normalisation
from models.training.datasets.chexpert import StudyRecord, apply_policy, model1_raw
from models.training.images import ImageCache

#: (frontal, lateral, lateral present, target, loss mask) of one study
StudyItem = tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor, torch.Tensor]


def record_raw(rec: StudyRecord, model: str) -> np.ndarray:
    """The raw label vector ``model`` ("model1" or "model2") learns from ``rec``."""
    return model1_raw(rec.raw) if model == "model1" else rec.raw


def labelled(records: Sequence[StudyRecord], model: str) -> list[StudyRecord]:
    """Records with at least one non-blank label for this model."""
    return [r for r in records if not np.all(np.isnan(record_raw(r, model)))]


class StudyDataset(Dataset[StudyItem]):
    """(frontal, lateral, lateral_present, target, mask) per study, from a shared image cache."""

    def __init__(
        self,
        records: Sequence[StudyRecord],
        model: str,
        policy: str,
        cache: ImageCache,
        norm: Normalisation,
        seed: int,
    ) -> None:
        self.records = list(records)
        self.model = model
        self.policy = policy
        self.cache = cache
        self.norm = norm
        # label smoothing draws (num_workers=0: reproducible)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> StudyItem:
        r = self.records[i]
        target, mask = apply_policy(record_raw(r, self.model), self.policy, self.rng)
        frontal = self.cache.tensor(r.frontal, self.norm, frontal=True)
        if r.lateral is not None:
            lateral, present = self.cache.tensor(r.lateral, self.norm), True
        else:
            lateral, present = torch.zeros_like(frontal), False
        return frontal, lateral, present, torch.from_numpy(target), torch.from_numpy(mask)


def collate(batch: list[Any]) -> tuple[torch.Tensor, ...]:
    f, lat, p, t, m = zip(*batch, strict=True)
    return (
        torch.stack(f),
        torch.stack(lat),
        torch.tensor(p, dtype=torch.bool),
        torch.stack(t),
        torch.stack(m),
    )


@torch.no_grad()
def predict(
    model: MultiViewClassifier,
    ds: StudyDataset,
    device: torch.device,
    batch_size: int,
    use_lateral: bool = True,
) -> np.ndarray:
    """Sigmoid probabilities (studies x labels) of ``model`` on every study of ``ds``, in order."""
    logits = predict_logits(model, ds, device, batch_size, use_lateral)
    out: np.ndarray = 1.0 / (1.0 + np.exp(-logits))
    return out


@torch.no_grad()
def predict_logits(
    model: MultiViewClassifier,
    ds: StudyDataset,
    device: torch.device,
    batch_size: int,
    use_lateral: bool = True,
) -> np.ndarray:
    """Raw logits (studies x labels) of ``model`` on every study of ``ds``, in order."""
    model.eval()
    out = []
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for f, lat, p, _, _ in loader:
        with autocast(device):
            logits = model(
                f.to(device),
                lat.to(device) if use_lateral else None,
                p.to(device) if use_lateral else None,
            )
        out.append(logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
