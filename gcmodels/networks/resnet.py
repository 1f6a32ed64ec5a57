"""ResNet18 and ResNet50 (torchvision's), explained at ``layer4``; optionally with global max
pooling (GMP) and with their last stages dilated instead of strided (finer maps)."""
from __future__ import annotations

from functools import partial
from typing import Literal

from torch import nn
from torchvision import models

from .base import ARCHITECTURES, Architecture, ExplainableNet, ModelOptions, Normalize

# ResNet output stride -> how many of the last stages (layer4, then layer3) lose their stride 2.
UNSTRIDED_STAGES = {32: 0, 16: 1, 8: 2}


def remove_stride(stages: list[nn.Sequential]) -> None:
    """Turn the stride 2 of each stage into dilation (DeepLab's atrous ResNet): the convolution that
    had the stride keeps the dilation before it, every 3x3 convolution after it doubles it, so each
    output at the old stride's positions sees exactly the pixels it saw before (same weights, same
    receptive fields, finer output). For ResNet50 this is torchvision's
    ``replace_stride_with_dilation``; torchvision refuses ResNet18's BasicBlock, whose stride sits
    in the block's first convolution rather than its middle one, hence this function."""
    dilation = 1
    for stage in stages:
        previous, dilation = dilation, dilation * 2
        rate = previous
        for conv in stage.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            strided = conv.stride == (2, 2)
            conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                conv.dilation, conv.padding = (rate, rate), (rate, rate)
                if strided:  # the convolutions after this one work on the finer grid
                    rate = dilation


def global_pool(pooling: str) -> nn.Module:
    """GMP (the paper's): global max instead of global average pooling, same weights otherwise."""
    return nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)


def _resnet(arch: str, num_classes: int, pooling: str = "avg", pretrained: bool = False,
            output_stride: int | None = None) -> ExplainableNet:
    net = getattr(models, arch)(weights="DEFAULT" if pretrained else None)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    unstrided = UNSTRIDED_STAGES[output_stride or 32]
    remove_stride(stages[len(stages) - unstrided:] if unstrided else [])
    if net.fc.out_features != num_classes:
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    features = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    head = nn.Sequential(global_pool(pooling), nn.Flatten(1), net.fc)
    return ExplainableNet(features, head, Normalize())


class ResNetOptions(ModelOptions):
    # 32 (torchvision), or 16 / 8: layer4, then layer3, dilated instead of strided.
    output_stride: Literal[tuple(UNSTRIDED_STAGES)] | None = None


for _arch in ("resnet18", "resnet50"):
    ARCHITECTURES.register(_arch, ResNetOptions)(Architecture(partial(_resnet, _arch), lambda model: 32))
