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


def test_split_network_equals_torchvision_forward():
    torch.manual_seed(0)
    net = build_network("resnet18", 10).eval()
    images = torch.rand(2, 3, 64, 64)
    # Rebuild torchvision's own forward from the same modules to check the split loses nothing.
    import torchvision

    reference = torchvision.models.resnet18(num_classes=10).eval()
    reference.load_state_dict({k.replace("features.", ""): v for k, v in net.state_dict().items()}, strict=False)
    features = dict(zip(["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"], net.features))
    for name, module in features.items():
        setattr(reference, name, module)
    reference.fc = net.head[2]
    with torch.no_grad():
        expected = reference(net.normalize(images))
        assert torch.allclose(net(images), expected, atol=1e-5)


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
