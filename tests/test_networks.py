import pytest
import torch
from torchvision import models

from gcmodels.gradcam import gradcam
from gcmodels.networks import ARCHITECTURES, build_network
from gcmodels.options import ConfigError
from tests.conftest import SMALL_VIT, small_vit

MODEL = {"pretrained": False, "output_stride": None, "init_from": None}



@pytest.mark.parametrize(
    "name, options, size, feature_shape",
    [("resnet18", {}, 224, (512, 7, 7)), ("resnet50", {}, 224, (2048, 7, 7)), ("alexnet", {}, 224, (256, 13, 13)),
     ("alexnet", {}, 448, (256, 27, 27)), ("resnet18", {}, 448, (512, 14, 14)), ("vgg16", {}, 224, (512, 14, 14)),
     ("vgg16", {"batch_norm": True}, 64, (512, 4, 4)), ("convnext_tiny", {}, 224, (768, 7, 7)),
     ("vit", SMALL_VIT, 32, (16, 4, 4)), ("vit", SMALL_VIT, 64, (16, 8, 8))],
)
def test_explained_layer_shapes(name, options, size, feature_shape):
    net = build_network(name, 7, **options).eval()
    with torch.no_grad():
        features = net.forward_features(torch.rand(1, 3, size, size))
        logits = net.head(features)
    assert tuple(net.to_grid(features, (size, size)).shape[1:]) == feature_shape
    assert logits.shape == (1, 7)


RESNET_NAMES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def torchvision_keys(name: str, key: str, num_layers: int = 0) -> str:
    """The torchvision parameter name of one of ours (``features.4.0.conv1.weight`` ->
    ``layer1.0.conv1.weight``): the split keeps torchvision's modules, renamed by position."""
    part, index, rest = key.split(".", 2) if key.count(".") > 1 else (*key.split("."), "")
    if name in ("alexnet", "vgg16"):
        # features[:-1] is torchvision's features; the head is (maxpool, avgpool, flatten, classifier).
        return f"features.{index}.{rest}" if part == "features" else f"classifier.{rest}"
    if name == "convnext_tiny":  # the head is (pool, classifier)
        return key if part == "features" else f"classifier.{rest}"
    if name == "vit":
        last = f"encoder.layers.encoder_layer_{num_layers - 1}"
        renamed = {"pos_embedding": "encoder.pos_embedding", "blocks": "encoder.layers", "ln_1": f"{last}.ln_1",
                   "ln": "encoder.ln", "heads": "heads", "conv_proj": "conv_proj", "class_token": "class_token"}
        # The head's other modules are the last block's own.
        return ".".join(filter(None, (renamed.get(index, f"{last}.{index}"), rest)))
    return f"{RESNET_NAMES[int(index)]}.{rest}" if part == "features" else f"fc.{rest}"


def built(name: str, options: dict, num_classes: int) -> torch.nn.Module:
    """``build_network``, with a random classifier for the ViT: torchvision initialises it to
    zeros, which would make every logit and map 0 and a comparison vacuous."""
    return small_vit(num_classes, **options) if name == "vit" else build_network(name, num_classes, **options)


def torchvision_reference(name: str, options: dict, num_classes: int) -> torch.nn.Module:
    if name == "vit":
        return models.VisionTransformer(**options, num_classes=num_classes)
    builder = "vgg16_bn" if options.get("batch_norm") else name
    return getattr(models, builder)(num_classes=num_classes)


@pytest.mark.parametrize("name, options, size", [
    ("resnet18", {}, 64), ("alexnet", {}, 224), ("vgg16", {}, 64), ("vgg16", {"batch_norm": True}, 64),
    ("convnext_tiny", {}, 64), ("vit", SMALL_VIT, 32)])
def test_split_network_equals_an_independent_torchvision_network(name, options, size):
    """Our weights loaded strictly (every key mapped, none left over) into a separately built
    torchvision network give the same logits: the split loses and adds nothing."""
    torch.manual_seed(0)
    net = built(name, options, 10).eval()
    reference = torchvision_reference(name, options, 10).eval()
    mapped = {torchvision_keys(name, key, options.get("num_layers", 0)): value
              for key, value in net.state_dict().items()}
    reference.load_state_dict(mapped, strict=True)
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        expected = reference(net.normalize(images))
        assert torch.allclose(net(images), expected, atol=1e-5)
        assert not torch.allclose(built(name, options, 10).eval()(images), expected, atol=1e-3)  # not vacuous


def test_vit_position_embeddings_at_another_size_are_torchvisions_resized_ones():
    """A ViT made for 32 px run on 64 px images (the GC loss's composites) equals torchvision's ViT
    made for 64 px with the position embeddings its interpolate_embeddings resizes."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    torch.manual_seed(0)
    net = built("vit", SMALL_VIT, 10).eval()
    state = {torchvision_keys("vit", key, SMALL_VIT["num_layers"]): value for key, value in net.state_dict().items()}
    large = {**SMALL_VIT, "image_size": 64}
    reference = models.VisionTransformer(**large, num_classes=10).eval()
    reference.load_state_dict(interpolate_embeddings(64, SMALL_VIT["patch_size"], state), strict=True)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(images), reference(net.normalize(images)), rtol=1e-4, atol=1e-5)


def test_vit_gradcam_is_the_map_of_the_patch_tokens_entering_the_last_attention():
    """Grad-CAM of the ViT equals a naive one on torchvision's model with the same weights: the
    tokens leaving the last encoder block's ``ln_1`` captured by a hook, the class token dropped,
    the patch tokens laid out in raster order on the patch grid, one image at a time. At the
    block's input itself, before ``ln_1``, the element-wise map is zero up to rounding: a layer
    norm's input gradient is orthogonal to its input."""
    torch.manual_seed(0)
    net = built("vit", SMALL_VIT, 5).eval()
    reference = models.VisionTransformer(**SMALL_VIT, num_classes=5).eval()
    reference.load_state_dict({torchvision_keys("vit", key, 2): value for key, value in net.state_dict().items()})
    images, classes = torch.rand(3, 3, 32, 32), torch.tensor([0, 3, 4])
    _, maps = gradcam(net, images, classes, normalize=False)
    last = reference.encoder.layers[-1]
    captured = {}
    last.ln_1.register_forward_hook(lambda module, inputs, output: captured.update(normalized=output))
    last.register_forward_pre_hook(lambda module, inputs: captured.update(entering=inputs[0]))
    for image, label, ours in zip(images, classes, maps):
        score = reference(net.normalize(image[None]))[0, label]
        grads = torch.autograd.grad(score, [captured["normalized"], captured["entering"]])
        (tokens, grad), (raw, raw_grad) = [(captured[key][0, 1:], g[0, 1:])  # [16 patches, D]
                                           for key, g in zip(("normalized", "entering"), grads)]
        expected = torch.stack([torch.relu((grad[p] * tokens[p]).sum()) for p in range(16)]).view(4, 4)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)
        assert (raw_grad * raw).sum(1).abs().max() < 1e-5 * expected.max()
    assert maps.flatten(1).std(1).min() > 0  # maps that vary over the grid


def test_gmp_uses_global_max_pooling():
    net = build_network("resnet18", 3, pooling="max").eval()
    with torch.no_grad():
        features = net.forward_features(torch.rand(1, 3, 64, 64))
        expected = net.head[2](features.amax(dim=(2, 3)))
        assert torch.allclose(net.head(features), expected, atol=1e-6)


def test_an_unknown_architecture_is_refused():
    with pytest.raises(ConfigError) as error:
        ARCHITECTURES.validate({**MODEL, "name": "vgg19", "pooling": "avg"})
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
