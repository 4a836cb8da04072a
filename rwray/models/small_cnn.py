"""A small CNN for 8x8 digits and other tiny images: three 3x3 conv blocks, one 2x2 pool, global average pool."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from rwray.datainfo import DataInfo
from rwray.models.layers import NormParams, head, norm2d


class SmallCNNParams(NormParams):
    name: Literal["small_cnn"] = "small_cnn"
    width: int = Field(32, ge=4)
    normed_head: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)


class SmallCNN(nn.Module):
    def __init__(self, p: SmallCNNParams, info: DataInfo):
        super().__init__()
        w, c = p.width, info.image_shape[0]

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm2d(p.norm, cout), nn.ReLU()]

        self.body = nn.Sequential(*block(c, w), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w))
        self.dropout = nn.Dropout(p.dropout) if p.dropout > 0 else nn.Identity()
        self.fc = head(4 * w, info.num_classes, p.normed_head)
        self.feature_dim = 4 * w

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.body(x).mean(dim=(2, 3))  # [B, 4w]
        logits = self.fc(self.dropout(feats))  # [B, K]
        return (logits, feats) if return_features else logits
