"""Configuration section owned by the models (``models:``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "weights"


class InferenceConfig(BaseModel):
    """How the networks run (``models.inference``). Only CUDA uses these: on the CPU the networks
    run in float32, contiguous, uncompiled, which is both the fastest and the reference path."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    channels_last: bool = Field(
        True, description="CUDA: networks and inputs in channels-last memory order"
    )
    compile: bool = Field(
        False,
        description="CUDA: torch.compile each network's forward pass (slower first batches, "
        "faster after; needs a working compiler toolchain on the GPU host)",
    )
    batch_size: int = Field(
        64, ge=1, le=1024, description="CUDA: most images one forward pass takes"
    )


class ModelsConfig(BaseModel):
    """Which model cards to load. Each card (JSON) names its safetensors file and SHA-256.

    Relative paths are resolved against ``weights_dir``; the default is the weights bundled
    with the package."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    weights_dir: Path = Field(BUNDLED_WEIGHTS)
    lung_mask: Path = Field(Path("lung_mask.json"))
    model1: Path = Field(Path("model1.json"))
    model2: Path = Field(Path("model2.json"))
    view_classifier: Path = Field(Path("view_classifier.json"))
    torchxrayvision_checkpoint: Path | None = Field(
        None,
        description="Optional: a torchxrayvision DenseNet-121 checkpoint on disk to use as Model 2",
    )
    crop_margin_fraction: float = Field(0.05, ge=0, le=0.5)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)

    def resolve(self, p: Path) -> Path:
        return p if p.is_absolute() else self.weights_dir / p
