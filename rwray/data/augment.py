"""Batched image ops on the worker's device: decode uint8 rows, random crop with padding, horizontal flip, normalise.

All ops act on the whole batch at once (no per-image Python loop), so augmentation costs a few tensor kernels.
"""

from __future__ import annotations

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
