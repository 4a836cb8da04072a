"""CIFAR ResNets: ResNet-32 (He et al. 2016, 3 stages x 5 basic blocks, 16-32-64 channels, parameter-free
"option A" shortcuts, as in the LDAM/ABSGD recipes) and a CIFAR ResNet-18 (3x3 stem, no max-pool)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rwray.datainfo import DataInfo
from rwray.models.layers import Norm, NormParams, head, norm2d


class ResNet32Params(NormParams):
    name: Literal["resnet32"] = "resnet32"
    normed_head: bool = False  # cosine classifier (LDAM recipe)
    dropout: float = Field(0.0, ge=0, lt=1)  # before the classifier (ABSGD CIFAR-10 recipe uses 0.2)


class ResNet18Params(NormParams):
    name: Literal["resnet18"] = "resnet18"
    normed_head: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)


class _PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels; no parameters."""

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C + extra, H/2, W/2]
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Norm, shortcut: Literal["pad", "conv"]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm2d(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "pad":
                self.shortcut = _PadShortcut(cout - cin)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm2d(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, widths: list[int], blocks: list[int], norm: Norm,
                 shortcut: Literal["pad", "conv"], normed_head: bool, dropout: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False), norm2d(norm, widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, norm, shortcut))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = head(cin, num_classes, normed_head)
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.layers(self.stem(x)).mean(dim=(2, 3))  # [B, D] after global average pooling
        logits = self.fc(self.dropout(feats))  # [B, K]
        return (logits, feats) if return_features else logits


def resnet32(p: ResNet32Params, info: DataInfo) -> CifarResNet:
    return CifarResNet(info.image_shape[0], info.num_classes, [16, 32, 64], [5, 5, 5], p.norm, "pad", p.normed_head, p.dropout)


def resnet18(p: ResNet18Params, info: DataInfo) -> CifarResNet:
    return CifarResNet(info.image_shape[0], info.num_classes, [64, 128, 256, 512], [2, 2, 2, 2], p.norm, "conv",
                       p.normed_head, p.dropout)
