"""Batched image ops on the worker's device: decode uint8 rows, random crop with padding, horizontal flip, Cutout,
mixup / CutMix, normalise.

All ops act on the whole batch at once (no per-image Python loop), so augmentation costs a few tensor kernels.
Every random draw comes from the generator passed in (seeded per step by the loop), so a resumed epoch replays.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


def decode(rows: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """[B, C*H*W] uint8 (the shard's image column) -> [B, C, H, W] float32 in [0, 1]."""
    return rows.view(rows.shape[0], *shape).float().div_(255.0)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a random half of the batch left-right. [B, C, H, W] -> same."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to H x W at a random offset per image. [B, C, H, W] -> same.

    One gather over a padded batch: offsets [B] index rows and columns of each image.
    """
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # [B, C, H+2p, W+2p]
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # [B, H]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # [B, W]
    idx_r = rows[:, None, :, None].expand(b, c, h, w + 2 * padding)
    out = padded.gather(2, idx_r)  # [B, C, H, W+2p]
    idx_c = cols[:, None, None, :].expand(b, c, h, w)
    return out.gather(3, idx_c)  # [B, C, H, W]


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-channel standardisation with the train split's mean/std from the manifest ([C] each)."""
    return (x - mean[None, :, None, None]) / std[None, :, None, None]


def augment(x: torch.Tensor, kind: str, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if kind == "crop_flip":
        x = random_crop(x, padding, generator)
    if kind in ("flip", "crop_flip"):
        x = random_flip(x, generator)
    return x


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): zero one size x size square per image, its centre uniform over the image and
    the square clipped at the borders (so near an edge less is cut), as the reference implementation does.
    [B, C, H, W] -> same."""
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1), device=x.device, generator=generator)  # [B, 1]
    cx = torch.randint(0, w, (b, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device)[None]  # [1, H]
    cols = torch.arange(w, device=x.device)[None]
    # The reference's y1 = clip(cy - s//2, 0, H), y2 = clip(cy + s//2, 0, H): rows y1 <= r < y2 are cut.
    in_r = (rows >= (cy - size // 2).clamp(0, h)) & (rows < (cy + size // 2).clamp(0, h))  # [B, H]
    in_c = (cols >= (cx - size // 2).clamp(0, w)) & (cols < (cx + size // 2).clamp(0, w))  # [B, W]
    cut = in_r[:, :, None] & in_c[:, None, :]  # [B, H, W]
    return x.masked_fill(cut[:, None], 0.0)


class Mix(NamedTuple):
    """A mixed batch's second targets: sample b is lam[b] of its own image (target y[b]) and 1 - lam[b] of
    sample perm[b]'s (target y2[b]). The loss is mixed the same way (`rwray.methods.base.sample_losses`)."""

    y2: torch.Tensor  # [B] int64
    lam: torch.Tensor  # [B] float32, the share of the sample's own target


def _mix_draws(x: torch.Tensor, alpha: float, generator: torch.Generator | None) -> tuple[torch.Tensor, np.random.Generator]:
    """The batch's permutation [B] and a host generator for λ ~ Beta(α, α) and the box, both from ``generator``
    (torch samples no Beta distribution from a given generator; numpy does)."""
    device = generator.device if generator is not None else x.device
    perm = torch.randperm(x.shape[0], device=device, generator=generator).to(x.device)
    host = np.random.default_rng(int(torch.randint(0, 2**62, (1,), device=device, generator=generator)))
    return perm, host


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None
          ) -> tuple[torch.Tensor, Mix]:
    """mixup (Zhang et al. 2018), one λ ~ Beta(α, α) per batch: x ← λ·x + (1 − λ)·x[perm]. [B, C, H, W] -> same."""
    perm, host = _mix_draws(x, alpha, generator)
    lam = float(host.beta(alpha, alpha))
    mixed = x.mul(lam).add_(x[perm], alpha=1.0 - lam)
    return mixed, Mix(y[perm], torch.full((x.shape[0],), lam, device=x.device))


def cutmix(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, Mix]:
    """CutMix (Yun et al. 2019), one box per batch: λ ~ Beta(α, α); a box of sides ⌊H√(1−λ)⌋ x ⌊W√(1−λ)⌋ centred
    uniformly, clipped at the borders, is pasted from x[perm]; λ becomes the share of pixels left, 1 − area/(H·W).
    [B, C, H, W] -> same."""
    perm, host = _mix_draws(x, alpha, generator)
    _, _, h, w = x.shape
    cut = math.sqrt(1.0 - float(host.beta(alpha, alpha)))
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(host.integers(h)), int(host.integers(w))
    y1, y2 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
    x1, x2 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    return mixed, Mix(y[perm], torch.full((x.shape[0],), lam, device=x.device))


MIXES = {"mixup": mixup, "cutmix": cutmix}
