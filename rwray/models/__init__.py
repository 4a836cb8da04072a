"""Registry of models. Every model's forward is ``forward(x, return_features=False)`` and returns logits [B, K],
or (logits [B, K], features [B, D]) when asked: methods such as ReBias need the pooled features."""

from torch import nn

from rwray.models import bagnet, resnet_cifar, resnet_imagenet, simple_conv, small_cnn
from rwray.registry import Registry, union_of

MODELS: Registry[nn.Module] = Registry("model")
MODELS.add("resnet32", resnet_cifar.ResNet32Params, resnet_cifar.resnet32, "CIFAR ResNet-32 (LDAM/ABSGD recipes)")
MODELS.add("resnet18", resnet_cifar.ResNet18Params, resnet_cifar.resnet18, "CIFAR ResNet-18")
MODELS.add("small_cnn", small_cnn.SmallCNNParams, small_cnn.SmallCNN, "small CNN for 8x8 digits")
MODELS.add("simple_conv", simple_conv.SimpleConvParams, simple_conv.SimpleConvNet, "ReBias SimpleConvNet: 4 x (k x k conv, norm, ReLU), GAP, linear")
MODELS.add("resnet10", resnet_imagenet.ResNet10Params, resnet_imagenet.resnet10,
           "ImageNet ResNet-10: torchvision ResNet(BasicBlock, [1, 1, 1, 1]) (ImageNet-LT)")
MODELS.add("resnet18_imagenet", resnet_imagenet.ResNet18ImageNetParams, resnet_imagenet.resnet18_imagenet,
           "torchvision ResNet-18 (7x7 stem, max-pool; ReBias's f on 9-class ImageNet)")
MODELS.add("resnet50", resnet_imagenet.ResNet50Params, resnet_imagenet.resnet50, "torchvision ResNet-50")
MODELS.add("resnet152", resnet_imagenet.ResNet152Params, resnet_imagenet.resnet152, "torchvision ResNet-152, Places-LT")
MODELS.add("resnext50_32x4d", resnet_imagenet.ResNeXt50Params, resnet_imagenet.resnext50_32x4d,
           "torchvision ResNeXt-50 32x4d")
MODELS.add("bagnet18", bagnet.BagNetParams, bagnet.bagnet18, "ReBias BagNet-18 as coded: 5x5-pixel patches (net g)")

ModelConfig = union_of(MODELS)

__all__ = ["MODELS", "ModelConfig"]
