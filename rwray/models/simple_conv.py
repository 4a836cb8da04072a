"""SimpleConvNet of ReBias (Bahng et al., ICML 2020): the Biased-MNIST target and biased networks.

4 x [Conv k x k (padding k//2, stride 1) -> norm -> ReLU] with 16-32-64-128 channels, no pooling between blocks,
global average pooling, one Linear layer. The kernel size is the only architectural difference between the target
network f (k = 7: sees shapes) and the biased network g (k = 1: each output pixel sees one input pixel, so the net
can only pick up per-pixel statistics such as the background colour, never the digit's shape).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from rwray.datainfo import DataInfo
from rwray.models.layers import NormParams, norm2d

WIDTHS = (16, 32, 64, 128)


class SimpleConvParams(NormParams):
    name: Literal["simple_conv"] = "simple_conv"
    kernel: int = Field(7, ge=1, description="conv kernel size: 7 for the target net f, 1 for the biased net g")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, k: int) -> int:
        if k % 2 == 0:
            # padding k//2 keeps H x W only for odd k; an even kernel would grow the map by one pixel per layer
            raise ValueError(f"simple_conv kernel must be odd (padding k//2 keeps the size), got {k}")
        return k


class SimpleConvNet(nn.Module):
    def __init__(self, p: SimpleConvParams, info: DataInfo):
        super().__init__()
        layers: list[nn.Module] = []
        cin = info.image_shape[0]
        for cout in WIDTHS:
            # No conv bias: the norm layer right after it has its own shift.
            layers += [nn.Conv2d(cin, cout, p.kernel, padding=p.kernel // 2, bias=False), norm2d(p.norm, cout), nn.ReLU()]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, info.num_classes)
        self.feature_dim = cin
        self.kernel = p.kernel
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init for ReLU nets (the reference's choice for this net too)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.body(x).mean(dim=(2, 3))  # [B, C, H, W] -> [B, 128] global average pool
        logits = self.fc(feats)  # [B, K]
        return (logits, feats) if return_features else logits
