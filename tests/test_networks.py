import pytest
import torch
from torchvision import models

from gcmodels.networks import ARCHITECTURES, build_network
from gcmodels.options import ConfigError

MODEL = {"pretrained": False, "output_stride": None, "init_from": None}


@pytest.mark.parametrize(
    "name, size, feature_shape",
    [("resnet18", 224, (512, 7, 7)), ("resnet50", 224, (2048, 7, 7)), ("alexnet", 224, (256, 13, 13)),
     ("alexnet", 448, (256, 27, 27)), ("resnet18", 448, (512, 14, 14))],
)
def test_explained_layer_shapes(name, size, feature_shape):
    net = build_network(name, 7).eval()
    with torch.no_grad():
        features = net.forward_features(torch.rand(1, 3, size, size))
        logits = net.head(features)
    assert tuple(features.shape[1:]) == feature_shape
    assert logits.shape == (1, 7)


RESNET_NAMES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def torchvision_keys(name: str, key: str) -> str:
    """The torchvision parameter name of one of ours (``features.4.0.conv1.weight`` ->
    ``layer1.0.conv1.weight``): the split keeps torchvision's modules, renamed by position."""
    part, index, rest = key.split(".", 2)
    if name == "alexnet":
        # features[:-1] is torchvision's features; the head is (maxpool, avgpool, flatten, classifier).
        return f"features.{index}.{rest}" if part == "features" else f"classifier.{rest}"
    return f"{RESNET_NAMES[int(index)]}.{rest}" if part == "features" else f"fc.{rest}"


@pytest.mark.parametrize("name", ["resnet18", "alexnet"])
def test_split_network_equals_an_independent_torchvision_network(name):
    """Our weights loaded strictly (every key mapped, none left over) into a separately built
    torchvision network give the same logits: the split loses and adds nothing."""
    import torchvision

    torch.manual_seed(0)
    net = build_network(name, 10).eval()
    reference = getattr(torchvision.models, name)(num_classes=10).eval()
    mapped = {torchvision_keys(name, key): value for key, value in net.state_dict().items()}
    reference.load_state_dict(mapped, strict=True)
    images = torch.rand(2, 3, 64 if name == "resnet18" else 224, 64 if name == "resnet18" else 224)
    with torch.no_grad():
        expected = reference(net.normalize(images))
        assert torch.allclose(net(images), expected, atol=1e-5)
        assert not torch.allclose(build_network(name, 10).eval()(images), expected, atol=1e-3)  # not vacuous


def test_gmp_uses_global_max_pooling():
    net = build_network("resnet18", 3, pooling="max").eval()
    with torch.no_grad():
        features = net.forward_features(torch.rand(1, 3, 64, 64))
        expected = net.head[2](features.amax(dim=(2, 3)))
        assert torch.allclose(net.head(features), expected, atol=1e-6)


def test_an_unknown_architecture_is_refused():
    with pytest.raises(ConfigError) as error:
        ARCHITECTURES.validate({**MODEL, "name": "vgg16", "pooling": "avg"})
    assert error.value.keys == ["model.name"]


def test_output_stride_dilates_like_torchvision_and_keeps_the_weights():
    """ResNet50 at output stride 8 is torchvision's atrous ResNet50 (its replace_stride_with_dilation):
    same outputs with the same weights. ResNet18, which torchvision refuses to dilate, gets the same
    rule: finer maps from the same parameters."""
    torch.manual_seed(0)
    ours = build_network("resnet50", 10, output_stride=8).eval()
    reference = models.resnet50(num_classes=10, replace_stride_with_dilation=[False, True, True]).eval()
    # Same modules in the same order (conv1, bn1, layer1-4, fc): copy the weights across.
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert [v.shape for v in ours_state.values()] == [v.shape for v in reference_state.values()]
    reference.load_state_dict(dict(zip(reference_state, ours_state.values())))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(ours.normalize(images)), rtol=1e-4, atol=1e-5)
    # ResNet18: with the weights of the standard network, the finer map sampled at the standard
    # map's positions is the standard map: every output sees the pixels it saw before.
    standard = build_network("resnet18", 10).eval()
    for stride in (16, 8):
        fine = build_network("resnet18", 10, output_stride=stride).eval()
        fine.load_state_dict(standard.state_dict())
        with torch.no_grad():
            coarse, dense = standard.forward_features(images), fine.forward_features(images)
        step = 32 // stride
        assert dense.shape[-1] == coarse.shape[-1] * step
        torch.testing.assert_close(dense[..., ::step, ::step], coarse, rtol=1e-4, atol=1e-4)
    sizes = {stride: build_network("resnet18", 10, output_stride=stride)
             .forward_features(torch.rand(1, 3, 80, 80)).shape[-1] for stride in (32, 16, 8)}
    assert sizes == {32: 3, 16: 5, 8: 10}


@pytest.mark.parametrize("key, value", [("pooling", "max"), ("output_stride", 8), ("output_stride", 32)])
def test_alexnet_refuses_gmp_and_other_output_strides(key, value):
    """AlexNet has no global pooling to swap for GMP, and its conv5 is at stride 16, fixed: the
    options that ResNet takes are refused for it."""
    alexnet = {**MODEL, "name": "alexnet", "pooling": "avg"}
    assert ARCHITECTURES.validate({**alexnet, "output_stride": 16}).output_stride == 16
    ARCHITECTURES.validate({**alexnet, "name": "resnet18", key: value})
    with pytest.raises(ConfigError) as error:
        ARCHITECTURES.validate({**alexnet, key: value})
    assert error.value.keys == [f"model.{key}"]
