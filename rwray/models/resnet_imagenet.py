"""ImageNet-scale ResNets from torchvision's own classes (He et al. 2016; ResNeXt, Xie et al. 2017): ResNet-10,
-50, -152 and ResNeXt-50 32x4d, as the ImageNet-LT / Places-LT / 9-class ImageNet recipes use them.

Each model *is* a `torchvision.models.resnet.ResNet`: a subclass that changes ``forward`` and turns torchvision's
in-place ReLUs off (the per-sample-gradient hooks of rwray.gram refuse outputs overwritten in place). Its modules
keep torchvision's names (conv1, bn1, layer1..4, fc), so torchvision's or a seed's state dict loads as is
(`rwray.models.weights`, ``model.weights: PATH``). torchvision's weight enums are never used: nothing is downloaded.

Stem: 7x7/2 conv and 3x3/2 max-pool, then four stages at strides 4, 8, 16, 32: a 224x224 input ends at 7x7, a
64x64 one at 2x2 (small inputs work, e.g. for tests). Feature width D: 512 (ResNet-10) or 2048 (the others).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from rwray.datainfo import DataInfo
from rwray.models.layers import Norm, NormParams, head, norm2d
from rwray.models.weights import WeightsPath, maybe_load

Arch = Literal["resnet10", "resnet18_imagenet", "resnet50", "resnet152", "resnext50_32x4d"]

# name -> (block, blocks per stage, groups, width per group): torchvision's builder arguments; resnet10 has no
# torchvision builder (it is the Decoupling / OLTR ImageNet-LT backbone).
ARCHS: dict[str, tuple[type[nn.Module], list[int], int, int]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1], 1, 64),
    "resnet18_imagenet": (BasicBlock, [2, 2, 2, 2], 1, 64),  # torchvision's resnet18 ("resnet18" is CIFAR's)
    "resnet50": (Bottleneck, [3, 4, 6, 3], 1, 64),
    "resnet152": (Bottleneck, [3, 8, 36, 3], 1, 64),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], 32, 4),
}


class _ImageNetParams(NormParams):
    name: Arch  # each subclass pins its own
    normed_head: bool = False  # cosine classifier (LDAM recipe)
    dropout: float = Field(0.0, ge=0, lt=1)  # before the classifier
    weights: WeightsPath | None = None  # a local state dict to start from (rwray.models.weights)


class ResNet10Params(_ImageNetParams):
    name: Literal["resnet10"] = "resnet10"


class ResNet18ImageNetParams(_ImageNetParams):
    name: Literal["resnet18_imagenet"] = "resnet18_imagenet"


class ResNet50Params(_ImageNetParams):
    name: Literal["resnet50"] = "resnet50"


class ResNet152Params(_ImageNetParams):
    name: Literal["resnet152"] = "resnet152"


class ResNeXt50Params(_ImageNetParams):
    name: Literal["resnext50_32x4d"] = "resnext50_32x4d"


class ImageNetResNet(ResNet):
    """torchvision's ResNet with this registry's forward: logits [B, K], or (logits, pooled features [B, D])."""

    def __init__(self, arch: Arch, in_ch: int, num_classes: int, norm: Norm = "batch", normed_head: bool = False,
                 dropout: float = 0.0):
        block, blocks, groups, width = ARCHS[arch]
        # norm_layer=None keeps torchvision's exact BatchNorm2d (its defaults); GroupNorm goes through norm2d. A
        # partial, not a lambda: torchvision keeps it on the model (_norm_layer), which must stay picklable.
        norm_layer = None if norm == "batch" else functools.partial(norm2d, "group")
        super().__init__(block, blocks, num_classes=num_classes, groups=groups, width_per_group=width,
                         norm_layer=norm_layer)
        self.arch = arch
        for m in self.modules():  # torchvision's ReLUs are in place: the fast Gram (rwray.gram.capture) refuses a
            if isinstance(m, nn.ReLU):  # norm layer's recorded output being overwritten after the forward
                m.inplace = False
        self.feature_dim: int = self.fc.in_features  # 512 * block.expansion
        if in_ch != 3:  # same shape of stem, other input channels (a 3-channel weights file then no longer fits)
            self.conv1 = nn.Conv2d(in_ch, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        if normed_head:
            self.fc = head(self.feature_dim, num_classes, True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # no parameters: no state-dict keys

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> pooled penultimate features [B, D]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, 64, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, D, H/32, W/32]
        return torch.flatten(self.avgpool(x), 1)  # [B, D]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.features(x)
        logits = self.fc(self.dropout(feats))  # [B, K]
        return (logits, feats) if return_features else logits


def _build(p: _ImageNetParams, info: DataInfo) -> ImageNetResNet:
    model = ImageNetResNet(p.name, info.image_shape[0], info.num_classes, p.norm, p.normed_head, p.dropout)
    return maybe_load(model, p.weights)


def resnet10(p: ResNet10Params, info: DataInfo) -> ImageNetResNet:
    return _build(p, info)


def resnet18_imagenet(p: ResNet18ImageNetParams, info: DataInfo) -> ImageNetResNet:
    return _build(p, info)


def resnet50(p: ResNet50Params, info: DataInfo) -> ImageNetResNet:
    return _build(p, info)


def resnet152(p: ResNet152Params, info: DataInfo) -> ImageNetResNet:
    return _build(p, info)


def resnext50_32x4d(p: ResNeXt50Params, info: DataInfo) -> ImageNetResNet:
    return _build(p, info)
