"""BagNet-18 as the ReBias seed codes it (clovaai/rebias, models/imagenet_models.py: ``BagNetDeep(BasicBlock_,
[2, 2, 2, 2], strides=[2, 2, 2, 1], kernel3=[1, 0, 0, 0])``): ReBias's biased network g for 9-class ImageNet, a
ResNet-18 layout whose units see only small patches, so it can learn local texture but not global shape.

Layout (C channels in, K classes): stem 1x1 conv (C->64), 3x3 conv (unpadded), BatchNorm, ReLU; four stages of two
basic blocks (64-128-256-512 channels, strides 2, 2, 2, 1). A block is conv(k x k, stride s, NO padding) -> norm ->
ReLU -> 1x1 conv -> norm, plus the shortcut (identity, or 1x1 conv stride s + norm when the shape changes); the
unpadded conv makes the branch smaller than the shortcut, whose trailing rows and columns are cropped to match.
k = 3 only in the first block of the first stage (``kernel3=[1, 0, 0, 0]``), k = 1 everywhere else. Global average
pooling, then the classifier ``fc``: the logits are the average over positions of per-patch logits.

Receptive field: **5 x 5 input pixels** per unit of the last feature map. Analytically (`receptive_field`): the
only convs wider than 1x1 are the stem's 3x3 (stride 1: +2) and layer1.0's 3x3 (after stride 1: +2), so
1 + 2 + 2 = 5; the 1x1 stride-2 convs after it grow nothing, and the shortcut path is all 1x1. Measured in
tests/test_models_imagenet.py: the gradient of one unit of layer4's output w.r.t. the input (eval mode, so
BatchNorm does not couple positions) is non-zero on exactly a 5 x 5 window. The seed's ``bagnet18(rf=43)``
argument is unused: the network as coded sees 5 x 5 patches, not 43 x 43 (BagNet-33's stages use 3x3 convs in
every stage); this module reproduces the code, not the argument.

Module names (conv1, conv2, bn1, layer1..4 with blocks conv1/bn1/conv2/bn2/downsample, fc) follow the seed's, so its
state dicts load (``model.weights``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rwray.datainfo import DataInfo
from rwray.models.layers import Norm, NormParams, head, norm2d
from rwray.models.weights import WeightsPath, maybe_load

WIDTHS = (64, 128, 256, 512)
BLOCKS = (2, 2, 2, 2)
STRIDES = (2, 2, 2, 1)
KERNEL3 = (1, 0, 0, 0)  # per stage: how many leading blocks use a 3x3 conv (the rest 1x1)


class BagNetParams(NormParams):
    name: Literal["bagnet18"] = "bagnet18"
    normed_head: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)
    weights: WeightsPath | None = None


class BagBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, kernel: int, norm: Norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, kernel, stride, padding=0, bias=False)
        self.bn1 = norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 1, bias=False)
        self.bn2 = norm2d(norm, planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), norm2d(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W] -> [B, planes, H', W']
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        # Unit i of the unpadded k x k / s conv sees input rows s*i .. s*i+k-1; the 1x1 / s shortcut's unit i sees
        # row s*i, the first of them: keep the shortcut's leading rows/columns (as the seed does).
        identity = identity[:, :, : out.shape[2], : out.shape[3]]
        return F.relu(out + identity)


class BagNet(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, norm: Norm = "batch", normed_head: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 64, 1, bias=False)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=0, bias=False)
        # The seed's stem BatchNorm keeps running statistics with momentum 0.001 (from the original BagNet code).
        self.bn1 = nn.BatchNorm2d(64, momentum=0.001) if norm == "batch" else norm2d(norm, 64)
        cin, stages = 64, []
        for width, n, stride, k3 in zip(WIDTHS, BLOCKS, STRIDES, KERNEL3):
            blocks = [BagBlock(cin if i == 0 else width, width, stride if i == 0 else 1, 3 if i < k3 else 1, norm)
                      for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = head(cin, num_classes, normed_head)
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the seed's N(0, 2 / (k*k*out)) is He init, fan_out mode
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 512, H', W'] with H' = ceil((H - 4) / 8) (64 -> 8, 224 -> 28): one unit per patch."""
        x = F.relu(self.bn1(self.conv2(self.conv1(x))))  # [B, 64, H-2, W-2]
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.feature_map(x).mean(dim=(2, 3))  # [B, 512] global average pool
        logits = self.fc(self.dropout(feats))  # [B, K]
        return (logits, feats) if return_features else logits


def receptive_field(model: BagNet) -> int:
    """Side, in input pixels, of the window one unit of `feature_map` sees, from the main path's convs: each k x k
    conv adds (k - 1) times the product of the strides before it. The shortcuts are 1x1 convs aligned with the
    window's first row and column, so they see nothing outside it."""
    convs = [model.conv1, model.conv2] + [c for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
                                          for block in stage for c in (block.conv1, block.conv2)]
    rf, jump = 1, 1
    for conv in convs:
        rf += (conv.kernel_size[0] - 1) * jump
        jump *= conv.stride[0]
    return rf


def bagnet18(p: BagNetParams, info: DataInfo) -> BagNet:
    return maybe_load(BagNet(info.image_shape[0], info.num_classes, p.norm, p.normed_head, p.dropout), p.weights)
