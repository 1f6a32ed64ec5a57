"""AlexNet and VGG16 (torchvision's), explained at the last convolution's ReLU (TorchRay's layer
for both: AlexNet's conv5, 13x13 at 224 px; VGG16's conv5_3, 14x14), and ConvNeXt-T, explained at
its last stage (7x7)."""
from __future__ import annotations

from typing import Literal

from torch import nn
from torchvision import models

from .base import ARCHITECTURES, Architecture, ExplainableNet, ModelOptions, Normalize
from .resnet import global_pool

ALEXNET_STRIDE = 16
VGG_STRIDE = 16
CONVNEXT_STRIDE = 32


def _replace_last(classifier: nn.Sequential, num_classes: int) -> None:
    if classifier[-1].out_features != num_classes:
        classifier[-1] = nn.Linear(classifier[-1].in_features, num_classes)


def _conv_then_mlp(net: nn.Module, num_classes: int) -> ExplainableNet:
    """A torchvision network of ``features`` (convolutions, ReLUs and max-pools), ``avgpool`` and a
    ``classifier`` MLP (AlexNet, VGG), split before the last max-pool of ``features``: that
    pool moves to the head."""
    _replace_last(net.classifier, num_classes)
    head = nn.Sequential(net.features[-1], net.avgpool, nn.Flatten(1), net.classifier)
    return ExplainableNet(net.features[:-1], head, Normalize())


def _alexnet(num_classes: int, pooling: str = "avg", pretrained: bool = False,
             output_stride: int | None = None) -> ExplainableNet:
    return _conv_then_mlp(models.alexnet(weights="DEFAULT" if pretrained else None), num_classes)


def _vgg16(num_classes: int, pooling: str = "avg", pretrained: bool = False, output_stride: int | None = None,
           batch_norm: bool = False) -> ExplainableNet:
    builder = models.vgg16_bn if batch_norm else models.vgg16
    return _conv_then_mlp(builder(weights="DEFAULT" if pretrained else None), num_classes)


def _convnext_tiny(num_classes: int, pooling: str = "avg", pretrained: bool = False,
                   output_stride: int | None = None) -> ExplainableNet:
    net = models.convnext_tiny(weights="DEFAULT" if pretrained else None)
    _replace_last(net.classifier, num_classes)
    # The classifier's LayerNorm2d normalises each image's pooled vector alone: a head with no
    # batch statistics, as Grad-CAM needs (gcmodels.gradcam).
    return ExplainableNet(net.features, nn.Sequential(global_pool(pooling), net.classifier), Normalize())


class AlexNetOptions(ModelOptions):
    # No global pooling to swap for GMP: the head is maxpool + 6x6 adaptive pool + MLP.
    pooling: Literal["avg"]
    # conv5 is at stride 16, fixed: the option dilates a ResNet's last stages.
    output_stride: Literal[ALEXNET_STRIDE] | None = None


class VGGOptions(ModelOptions):
    # As AlexNet's: maxpool + 7x7 adaptive pool + MLP, and conv5_3 at stride 16.
    pooling: Literal["avg"]
    output_stride: Literal[VGG_STRIDE] | None = None
    # torchvision's vgg16_bn: a batch norm after every convolution.
    batch_norm: bool = False


class ConvNeXtOptions(ModelOptions):
    output_stride: Literal[CONVNEXT_STRIDE] | None = None


ARCHITECTURES.register("alexnet", AlexNetOptions)(Architecture(_alexnet, lambda model: ALEXNET_STRIDE))
ARCHITECTURES.register("vgg16", VGGOptions)(Architecture(_vgg16, lambda model: VGG_STRIDE))
ARCHITECTURES.register("convnext_tiny", ConvNeXtOptions)(Architecture(_convnext_tiny, lambda model: CONVNEXT_STRIDE))
