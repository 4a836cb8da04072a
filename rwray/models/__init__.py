"""Registry of models. Every model's forward is ``forward(x, return_features=False)`` and returns logits [B, K],
or (logits [B, K], features [B, D]) when asked: methods such as ReBias need the pooled features."""

from torch import nn

from rwray.models import resnet_cifar, simple_conv, small_cnn
from rwray.registry import Registry, union_of

MODELS: Registry[nn.Module] = Registry("model")
MODELS.add("resnet32", resnet_cifar.ResNet32Params, resnet_cifar.resnet32, "CIFAR ResNet-32 (LDAM/ABSGD recipes)")
MODELS.add("resnet18", resnet_cifar.ResNet18Params, resnet_cifar.resnet18, "CIFAR ResNet-18")
MODELS.add("small_cnn", small_cnn.SmallCNNParams, small_cnn.SmallCNN, "small CNN for 8x8 digits")
MODELS.add("simple_conv", simple_conv.SimpleConvParams, simple_conv.SimpleConvNet, "ReBias SimpleConvNet: 4 x (k x k conv, norm, ReLU), GAP, linear")

ModelConfig = union_of(MODELS)

__all__ = ["MODELS", "ModelConfig"]
