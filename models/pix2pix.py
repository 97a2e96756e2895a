"""Pix2Pix networks (Isola et al., 2017) for lung masks: a U-Net generator and a PatchGAN
discriminator.

The generator maps a 1-channel radiograph (normalised with the card's mean/std) to 1 channel of
*logits*; ``torch.sigmoid(logits)`` is the lung probability map. The Pix2Pix convention of a
``tanh`` output in [-1, 1] is the same thing rescaled: ``tanh(x / 2) == 2 * sigmoid(x) - 1``, which
is what the discriminator sees (:func:`to_gan_range`).
"""

from __future__ import annotations

import torch
from torch import nn


def to_gan_range(prob: torch.Tensor) -> torch.Tensor:
    """Map a probability map in [0, 1] to Pix2Pix's [-1, 1] range."""
    return prob * 2.0 - 1.0


class _Block(nn.Module):
    """A sequential block; subclasses fill ``self.block``."""

    block: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return out


class _Down(_Block):
    def __init__(self, cin: int, cout: int, *, norm: bool = True, act: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if act:
            layers.append(nn.LeakyReLU(0.2, inplace=False))
        layers.append(nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=not norm))
        if norm:
            layers.append(nn.BatchNorm2d(cout))
        self.block = nn.Sequential(*layers)


class _Up(_Block):
    def __init__(self, cin: int, cout: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReLU(inplace=False),
            nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.block = nn.Sequential(*layers)


class UNetGenerator(nn.Module):
    """U-Net with skip connections between mirrored layers ("unet_256" of Isola et al.).

    ``depth`` down-sampling steps halve the input each time; for a 256x256 input ``depth=8``
    reaches 1x1 as in the paper. Channel widths are ``ngf * (1, 2, 4, 8, 8, ...)``. Dropout (the
    paper's noise source) sits in the three decoder blocks after the innermost one and is off in
    ``eval()``, so inference is deterministic. Input height and width must be multiples of
    ``2 ** depth``."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 16,
        depth: int = 8,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"UNetGenerator depth must be >= 2, got {depth}")
        if ngf < 1:
            raise ValueError(f"UNetGenerator ngf must be >= 1, got {ngf}")
        self.depth = depth
        widths = [ngf * min(2**i, 8) for i in range(depth)]
        downs: list[nn.Module] = [_Down(in_channels, widths[0], norm=False, act=False)]
        for i in range(1, depth):
            innermost = i == depth - 1
            downs.append(_Down(widths[i - 1], widths[i], norm=not innermost))
        self.downs = nn.ModuleList(downs)
        ups: list[nn.Module] = []
        # decoder step j mirrors encoder level depth-1-j; all but the innermost take a concatenation
        for j in range(depth - 1):
            level = depth - 1 - j
            cin = widths[level] if j == 0 else widths[level] * 2
            ups.append(_Up(cin, widths[level - 1], dropout=dropout if 1 <= j <= 3 else 0.0))
        self.ups = nn.ModuleList(ups)
        self.final = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.ConvTranspose2d(widths[0] * 2, out_channels, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits with the input's spatial size."""
        m = 2**self.depth
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(
                f"UNetGenerator(depth={self.depth}) needs height and width divisible by {m}, "
                f"got {tuple(x.shape[-2:])}"
            )
        skips: list[torch.Tensor] = []
        h = x
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = skips.pop()  # innermost
        for up in self.ups:
            h = up(h)
            h = torch.cat([h, skips.pop()], dim=1)
        logits: torch.Tensor = self.final(h)
        return logits


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN ("70x70" with ``n_layers=3``): scores overlapping patches of
    (image, mask) pairs as real or fake. Returns one logit per patch."""

    def __init__(self, in_channels: int = 2, ndf: int = 16, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``image`` normalised as for the generator, ``mask`` in [-1, 1] (see
        :func:`to_gan_range`)."""
        scores: torch.Tensor = self.model(torch.cat([image, mask], dim=1))
        return scores


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """Pix2Pix initialisation: N(0, 0.02) for convolutions, N(1, 0.02) for batch-norm scales."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
