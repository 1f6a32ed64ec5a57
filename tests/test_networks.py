import pytest
import torch

from gcmodels.networks import build_network


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


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(name="vgg16", num_classes=3), "model.name='vgg16' is unknown; allowed: \\['alexnet', 'resnet18', 'resnet50'\\]"),
     (dict(name="resnet18", num_classes=3, pooling="median"), "model.pooling='median' is unknown"),
     (dict(name="alexnet", num_classes=3, pooling="max"), "not available for alexnet"),
     (dict(name="resnet18", num_classes=1), "classes must be an integer >= 2")],
)
def test_bad_network_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_network(**kwargs)
