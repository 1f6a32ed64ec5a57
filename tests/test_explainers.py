import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from evaluation.explainers import (
    EXPLAINERS,
    ContrastiveExcitationBackprop,
    FullGrad,
    GradCAM,
    Gradient,
    IntegratedGradients,
    SmoothGrad,
    build_explainer,
    check_explainer,
)
from gcmodels.networks import ExplainableNet, Normalize, build_network
from gcmodels.options import ConfigError
from tests.conftest import small_vit, tiny_net


def randomise_batchnorm(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters, some scales negative, so batch
    norm's effective bias and sign matter."""
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(size, generator=generator))
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.3)
    return net


def relu_net(num_classes: int = 5) -> ExplainableNet:
    """A small piecewise-linear net with every kind of bias: conv, batch norm, Normalize, linear."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(6, num_classes))
    return randomise_batchnorm(ExplainableNet(features, head, Normalize()), generator).eval()


def images_and_targets(batch=2, size=16, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, size, size, generator=generator, dtype=dtype)
    return images, torch.arange(batch) % 3


def target_logits(net, images, targets):
    with torch.no_grad():
        return net(images).gather(1, targets.view(-1, 1)).squeeze(1)


# ----------------------------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize("mode", ["elementwise", "standard"])
def test_gradcam_of_linear_head_has_closed_form(mode):
    net = relu_net()
    images, targets = images_and_targets()
    activations = net.forward_features(images).detach()
    weights = net.head[2].weight[targets].detach()  # [B, C]
    h, w = activations.shape[-2:]
    expected = torch.relu(torch.einsum("bc,bchw->bhw", weights, activations) / (h * w))
    maps = GradCAM(mode)(net, images, targets)
    assert maps.shape == (2, h, w)
    assert torch.allclose(maps, expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["elementwise", "standard"])
def test_gradcam_at_inner_layer_matches_split_network(mode):
    # features.0 is a conv followed by an in-place ReLU, which must not spoil the captured map.
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 5, 3), nn.ReLU())
    net = ExplainableNet(features, tiny_net(num_classes=3, channels=5).head, Normalize())
    images, targets = images_and_targets()
    inner = features[0](net.normalize(images)).detach().requires_grad_(True)
    scores = net.head(features[1:](inner.clone())).gather(1, targets.view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(scores, inner)
    if mode == "standard":
        grads = grads.mean(dim=(2, 3), keepdim=True)
    expected = torch.relu((grads * inner).sum(1)).detach()
    assert torch.allclose(GradCAM(mode, layer="features.0")(net, images, targets), expected, atol=1e-6)
    # The explained layer named explicitly is the default.
    assert torch.allclose(GradCAM(mode, layer="features")(net, images, targets),
                          GradCAM(mode)(net, images, targets), atol=1e-6)


def test_gradcam_layer_errors():
    net = relu_net()
    images, targets = images_and_targets()
    with pytest.raises(ValueError, match="features.0"):
        GradCAM(layer="features.99")(net, images, targets)
    shared = nn.ReLU()  # one module called twice: which call to explain is ambiguous
    net = ExplainableNet(nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.Conv2d(4, 4, 3), shared),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="2 time"):
        GradCAM(layer="features.1")(net, images, targets)


# ----------------------------------------------------------------------------------- FullGrad


def alexnet_with_normalize():
    return build_network("alexnet", 6)


def resnet18_with_batchnorm():
    return randomise_batchnorm(build_network("resnet18", 6), torch.Generator().manual_seed(2))


@pytest.mark.parametrize("make_net, size", [
    (relu_net, 16), (alexnet_with_normalize, 64), (resnet18_with_batchnorm, 64),
])
def test_fullgrad_completeness_and_maps(make_net, size):
    torch.manual_seed(0)
    net = make_net().eval().double()
    images, targets = images_and_targets(size=size, dtype=torch.float64)
    input_term, bias_terms = FullGrad().decompose(net, images, targets)
    logits = target_logits(net, images, targets)
    assert torch.allclose(input_term + bias_terms, logits, rtol=1e-6, atol=1e-9)
    assert (bias_terms.abs() > 1e-3 * logits.abs()).all()  # the biases matter in these nets
    maps = FullGrad()(net, images, targets)
    assert maps.shape == (2, size, size)
    assert (maps >= 0).all() and maps.isfinite().all()


def _psi(tensor):
    """FullGrad's post-processing: abs, min-max over each sample's whole [C, h, w], channel sum."""
    tensor = tensor.abs()
    low = tensor.amin(dim=(1, 2, 3), keepdim=True)
    high = tensor.amax(dim=(1, 2, 3), keepdim=True)
    return ((tensor - low) / (high - low)).sum(1)


def test_fullgrad_map_of_relu_net_matches_a_hand_written_forward():
    """The map of ``test_fullgrad_completeness_and_maps``'s relu_net, against FullGrad computed
    from a forward pass written out layer by layer: psi(x * dy/dx) plus psi(dy/dz * b) for every
    spatial bias (Normalize's -m/s, conv 0's bias, both batch norms' effective bias; conv 4 has
    none), the 8x8 one upsampled bilinearly to 16x16."""
    net = relu_net().double()
    images, targets = images_and_targets(dtype=torch.float64)
    conv0, bn1, conv4, bn5, linear = net.features[0], net.features[1], net.features[4], net.features[5], net.head[2]
    mean, std = net.normalize.mean.double(), net.normalize.std.double()

    def bn_scale_shift(bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return scale.view(1, -1, 1, 1), (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)

    (scale1, shift1), (scale5, shift5) = bn_scale_shift(bn1), bn_scale_shift(bn5)
    x = images.clone().requires_grad_(True)
    z_norm = (x - mean) / std
    z0 = F.conv2d(z_norm, conv0.weight, conv0.bias, padding=1)
    z1 = z0 * scale1 + shift1
    z4 = F.conv2d(F.max_pool2d(torch.relu(z1), 2), conv4.weight, padding=1)
    z5 = z4 * scale5 + shift5
    logits = torch.relu(z5).mean(dim=(2, 3)) @ linear.weight.T + linear.bias
    with torch.no_grad():
        assert torch.allclose(logits, net(images), atol=1e-12)  # the written-out forward is the net's
    score = logits[torch.arange(2), targets].sum()
    g_x, g_norm, g0, g1, g5 = torch.autograd.grad(score, [x, z_norm, z0, z1, z5])
    expected = (
        _psi(images * g_x) + _psi(g_norm * (-mean / std)) + _psi(g0 * conv0.bias.view(1, -1, 1, 1))
        + _psi(g1 * shift1)
        + F.interpolate(_psi(g5 * shift5)[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    ).detach()
    torch.testing.assert_close(FullGrad()(net, images, targets), expected, rtol=1e-9, atol=1e-10)


def test_fullgrad_refuses_training_batchnorm():
    images, targets = images_and_targets()
    with pytest.raises(ValueError, match="eval"):
        FullGrad()(relu_net().train(), images, targets)


# -------------------------------------------------------------------------------------- c-MWP


def positive_head_net():
    """Every weighted unit has a positive weight on an input that is always positive (the
    classifier's dual units too), so every unit has excitatory input and no probability is
    dropped."""
    torch.manual_seed(0)
    head = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Dropout(0.5), nn.Linear(24, 8), nn.ReLU(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():
        for layer in (head[0], head[7], head[9]):
            layer.weight[:, 0] = layer.weight[:, 0].abs() + 0.1
        # conv channel 0 and hidden units 0 and 1 are positive for positive images
        head[0].weight[0], head[0].bias[0] = head[0].weight[0].abs(), 0.1
        head[7].weight[:2], head[7].bias[:2] = head[7].weight[:2].abs(), 0.1
        head[9].weight[:, 1] = -head[9].weight[:, 1].abs() - 0.1  # excites the dual units
    return ExplainableNet(nn.Identity(), head).eval().double()


# TorchRay's excitation_backprop, transcribed independently of the explainer: it swaps the
# functional conv, linear, pooling and batch-norm ops for autograd Functions whose backward is the
# EB rule (batch norm: the identity), leaves ReLU's backward alone and replaces each residual
# addition with an element-wise sum whose backward splits by the addends' shares. The contrast is
# its two passes: a backward with the classifier's weights negated, then one with them restored
# and the first pass's gradient subtracted at a contrast layer.


class _WeightedEB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, op):
        ctx.save_for_backward(x, weight)
        ctx.op = op
        return op(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = ctx.op(x, weight.clamp(min=0), None)
            (g,) = torch.autograd.grad(z, x, grad / (z + 1e-20))
        return x.detach() * g, None, None, None


class _PoolEB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op):
        ctx.save_for_backward(x)
        ctx.op = op
        return op(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = ctx.op(x)
            (g,) = torch.autograd.grad(z, x, grad / (z + 1e-20))
        return x.detach() * g, None


class _NormEB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op):
        return op(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _EltwiseSumEB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        total = a + b
        return a / total * grad, b / total * grad


def _eltwise_block_forward(block, x):
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return block.relu(_EltwiseSumEB.apply(out, identity))


def _patch_for_torchray_eb(patch: pytest.MonkeyPatch) -> None:
    def weighted(original):
        return lambda x, weight, bias=None, *args, **kwargs: _WeightedEB.apply(
            x, weight, bias, lambda v, w, b: original(v, w, b, *args, **kwargs))

    def unary(function, original):
        return lambda x, *args, **kwargs: function.apply(x, lambda v: original(v, *args, **kwargs))

    patch.setattr(F, "conv2d", weighted(F.conv2d))
    patch.setattr(F, "linear", weighted(F.linear))
    for name in ("avg_pool2d", "adaptive_avg_pool2d", "max_pool2d", "adaptive_max_pool2d"):
        patch.setattr(F, name, unary(_PoolEB, getattr(F, name)))
    patch.setattr(F, "batch_norm", unary(_NormEB, F.batch_norm))
    patch.setattr(BasicBlock, "forward", _eltwise_block_forward)
    patch.setattr(Bottleneck, "forward", _eltwise_block_forward)


def torchray_contrastive_eb(net, images, targets, saliency_layer, contrast_layer, classifier_layer):
    """TorchRay's ``contrastive_excitation_backprop``: the gradient at ``saliency_layer``'s output
    (``[B, C, h, w]``; its map is the channel sum clipped at 0)."""
    net = copy.deepcopy(net).requires_grad_(False)
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # hooks see each module's own output
    classifier = net.get_submodule(classifier_layer)
    saliency, contrast = {}, {}

    def catch_saliency(_module, _input, output):
        saliency["x"] = output.detach().requires_grad_(True)
        return saliency["x"]

    def catch_contrast(_module, _input, output):
        if "grad" in contrast:
            output.register_hook(lambda grad: grad - contrast["grad"])
        else:
            output.register_hook(lambda grad: contrast.setdefault("grad", grad))

    hooks = [net.get_submodule(saliency_layer).register_forward_hook(catch_saliency),
             net.get_submodule(contrast_layer).register_forward_hook(catch_contrast)]
    with pytest.MonkeyPatch.context() as patch, torch.enable_grad():
        _patch_for_torchray_eb(patch)
        logits = net(images)
        one_hot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        # As TorchRay: negated after the forward, so the backward's saved weight is the dual's.
        classifier.weight.data.neg_()
        logits.backward(one_hot)
        classifier.weight.data.neg_()
        net(images).backward(one_hot)
    for hook in hooks:
        hook.remove()
    return saliency["x"].grad


def correlation(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.mark.parametrize("arch, size, layer, contrast_layer, classifier_layer", [
    ("resnet18", 128, "features.6", "head.0", "head.2"),
    ("resnet18", 128, "features.7", "head.0", "head.2"),
    ("resnet50", 64, "features.6", "head.0", "head.2"),
    ("alexnet", 128, "features.11", "head.3.5", "head.3.6"),
    ("alexnet", 128, "features.5", "head.3.5", "head.3.6"),
])
def test_cmwp_torchray_rules_match_torchray(arch, size, layer, contrast_layer, classifier_layer):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = randomise_batchnorm(build_network(arch, 5), generator).eval().double()
    images, targets = images_and_targets(size=size, dtype=torch.float64)
    reference = torchray_contrastive_eb(net, images, targets, layer, contrast_layer, classifier_layer)
    explainer = ContrastiveExcitationBackprop(layer)
    ours = explainer.probabilities(net, images, targets)
    scale = reference.abs().max()
    assert scale > 0
    torch.testing.assert_close(ours / scale, reference / scale, rtol=0, atol=1e-9)
    maps = explainer(net, images, targets)
    torch.testing.assert_close(maps, reference.sum(1).clamp(min=0), rtol=1e-9, atol=1e-9 * scale.item())
    assert correlation(maps, reference.sum(1).clamp(min=0)) > 0.999


@pytest.mark.parametrize("rules", ["torchray", "folded"])
@pytest.mark.parametrize("arch, layers", [
    ("resnet18", {f"features.{4 + stage}": 16 >> stage for stage in range(4)}),  # layer1..layer4
    ("resnet50", {f"features.{4 + stage}": 16 >> stage for stage in range(4)}),
    ("alexnet", {"features.1": 15, "features.2": 7, "features.5": 3, "features.9": 3, None: 3}),
])
def test_cmwp_stops_at_every_stage(arch, layers, rules):
    torch.manual_seed(0)
    net = build_network(arch, 5).eval()
    images, targets = images_and_targets(size=64)
    for layer, side in layers.items():
        maps = ContrastiveExcitationBackprop(layer, rules)(net, images, targets)
        assert maps.shape == (2, side, side) and maps.isfinite().all() and maps.sum() > 0


@pytest.mark.parametrize("rules", ["torchray", "folded"])
@pytest.mark.parametrize("layer", [None, "head.1", "head.4", "head.8"])
@pytest.mark.parametrize("signal", ["target", "dual"])
def test_mwp_conserves_probability_mass(layer, signal, rules):
    net = positive_head_net()
    images, targets = images_and_targets(size=8, dtype=torch.float64)
    mwp = ContrastiveExcitationBackprop(layer, rules).probabilities(net, images + 0.1, targets, signal)
    assert (mwp >= 0).all()
    assert torch.allclose(mwp.flatten(1).sum(1), torch.ones(2, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("rules", ["torchray", "folded"])
@pytest.mark.parametrize("arch, size, layer", [
    ("resnet18", 64, "features.5"), ("resnet50", 32, "features.6.2"), ("alexnet", 64, "features.3"),
])
def test_mwp_conserves_mass_through_real_networks(arch, size, layer, rules):
    # Fresh batch norms add no bias, so every ReLU-active unit has excitatory input (TorchRay's
    # residual split gives signed shares, but they still add up to the whole).
    torch.manual_seed(0)
    net = build_network(arch, 5).eval().double()
    images, targets = images_and_targets(size=size, dtype=torch.float64)
    mwp = ContrastiveExcitationBackprop(layer, rules).probabilities(net, images, targets, "target")
    assert torch.allclose(mwp.flatten(1).sum(1), torch.ones(2, dtype=torch.float64), atol=1e-8)


def test_mwp_of_hand_computed_two_layer_head():
    head = nn.Sequential(nn.Flatten(1), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        head[1].weight.copy_(torch.tensor([[1.0, -1.0, 2.0], [1.0, 1.0, -1.0]]))
        head[1].bias.copy_(torch.tensor([0.5, -0.5]))  # biases change h but not the EB rule
        head[3].weight.copy_(torch.tensor([[3.0, 1.0], [-0.5, 2.0]]))
        head[3].bias.copy_(torch.tensor([1.0, -1.0]))
    net = ExplainableNet(nn.Identity(), head)
    x = torch.tensor([1.0, 2.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 1, 1)
    targets = torch.tensor([0, 1])
    explainer = ContrastiveExcitationBackprop()
    # h = relu(W1 x + b1) = [1.5, 1.5]; W1+ x = [3, 3].
    # class 0: P(h) = [3, 1] * 1.5 / 6 = [.75, .25]; P(x) = x * (W1+^T (P(h) / 3)) = [1/3, 1/6, 1/2]
    # class 1: W2+ = [0, 2], P(h) = [0, 1], P(x) = [1/3, 2/3, 0]
    # dual of class 0: -W2 = [-3, -1] has no positive weight: no excitation, probability dropped
    # dual of class 1: (-W2)+ = [.5, 0], P(h) = [1, 0], P(x) = [1/3, 0, 2/3]
    target = torch.tensor([[1 / 3, 1 / 6, 1 / 2], [1 / 3, 2 / 3, 0.0]])
    dual = torch.tensor([[0.0, 0.0, 0.0], [1 / 3, 0.0, 2 / 3]])
    assert torch.allclose(explainer.probabilities(net, x, targets, "target")[..., 0, 0], target)
    assert torch.allclose(explainer.probabilities(net, x, targets, "dual")[..., 0, 0], dual)
    assert torch.allclose(explainer.probabilities(net, x, targets)[..., 0, 0], target - dual)


@pytest.mark.parametrize("arch, layer, map_size", [
    ("resnet18", None, 2), ("resnet18", "features.6", 4), ("alexnet", None, 3), ("alexnet", "head.0", 1),
])
def test_cmwp_map_is_clipped_target_minus_dual(arch, layer, map_size):
    torch.manual_seed(0)
    net = build_network(arch, 5).eval()
    images, targets = images_and_targets(batch=3, size=64)
    explainer = ContrastiveExcitationBackprop(layer)
    maps = explainer(net, images, targets)
    target = explainer.probabilities(net, images, targets, "target")
    dual = explainer.probabilities(net, images, targets, "dual")
    assert maps.shape == (3, map_size, map_size)
    assert torch.allclose(maps, torch.relu((target - dual).sum(1)), atol=1e-7)
    assert (maps >= 0).all() and maps.sum() > 0


def test_cmwp_errors():
    images, targets = images_and_targets()
    with pytest.raises(NotImplementedError, match="Tanh"):
        ContrastiveExcitationBackprop()(tiny_net(), images, targets)
    net = relu_net()
    with pytest.raises(NotImplementedError, match="features.5"):  # conv of a conv + BN pair
        ContrastiveExcitationBackprop("features.4", "folded")(net, images, targets)
    assert ContrastiveExcitationBackprop("features.4")(net, images, targets).shape == (2, 8, 8)
    resnet = build_network("resnet18", 5).eval()
    with pytest.raises(NotImplementedError, match="features.7.0"):  # inside a residual block
        ContrastiveExcitationBackprop("features.7.0.conv1")(resnet, images, targets)
    with pytest.raises(ValueError, match="not a submodule"):
        ContrastiveExcitationBackprop("features.42")(net, images, targets)
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        ContrastiveExcitationBackprop("head.1")(net, images, targets)
    with pytest.raises(ValueError, match="eval"):
        ContrastiveExcitationBackprop()(net.train(), images, targets)


# ------------------------------------------------------------------- Gradient, SmoothGrad, IG


def test_gradient_is_max_abs_input_gradient():
    net = tiny_net()
    images, targets = images_and_targets()
    inputs = images.clone().requires_grad_(True)
    (grads,) = torch.autograd.grad(net(inputs).gather(1, targets.view(-1, 1)).sum(), inputs)
    maps = Gradient()(net, images, targets)
    assert maps.shape == (2, 16, 16)
    assert torch.allclose(maps, grads.abs().amax(1))


def test_smoothgrad_is_reproducible_and_noiseless_limit_is_gradient():
    net = tiny_net()
    images, targets = images_and_targets()
    explainer = SmoothGrad(num_samples=4, stdev=0.15, seed=None)
    torch.manual_seed(3)
    first = explainer(net, images, targets)
    torch.manual_seed(3)
    assert torch.equal(explainer(net, images, targets), first)
    assert not torch.allclose(explainer(net, images, targets), first)  # fresh noise
    assert first.shape == (2, 16, 16) and (first >= 0).all()
    seeded = SmoothGrad(num_samples=4, stdev=0.15, seed=7)
    state = torch.get_rng_state()
    assert torch.equal(seeded(net, images, targets), seeded(net, images, targets))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    noiseless = SmoothGrad(num_samples=2, stdev=0.0, seed=None)(net, images, targets)
    assert torch.allclose(noiseless, Gradient()(net, images, targets), atol=1e-7)


def test_integrated_gradients_completeness():
    net = tiny_net().double()
    images, targets = images_and_targets(dtype=torch.float64)
    explainer = IntegratedGradients(steps=32)
    attributions, delta = explainer.attributions(net, images, targets)
    change = target_logits(net, images, targets) - target_logits(net, torch.zeros_like(images), targets)
    assert delta.abs().max() < 1e-6 * change.abs().max()
    assert torch.allclose(attributions.flatten(1).sum(1), change, rtol=1e-6)
    maps = explainer(net, images, targets)
    assert maps.shape == (2, 16, 16) and (maps >= 0).all()
    assert torch.allclose(maps, attributions.sum(1).abs())


@pytest.mark.parametrize("name", ["smoothgrad", "integrated_gradients"])
def test_many_pass_explainers_split_passes_by_image_size_without_changing_the_maps(name, monkeypatch):
    """Their default passes hold about _PIXELS_PER_PASS pixels (a bound on memory: all at once ran
    out of an H100's 80 GB); split finer, every image still goes through the net once per sample
    or step, and the maps stay the same (SmoothGrad without noise, whose draws follow the split)."""
    from evaluation.explainers import base

    net = relu_net().double()
    images, targets = images_and_targets(batch=3, dtype=torch.float64)
    options = {"num_samples": 6, "stdev": 0.0, "seed": None} if name == "smoothgrad" else {"steps": 8}
    explainer = build_explainer(name, **options)
    whole = explainer(net, images, targets)
    passes = []
    original_forward = net.forward
    monkeypatch.setattr(net, "forward", lambda x: passes.append(len(x)) or original_forward(x))
    monkeypatch.setattr(base, "_PIXELS_PER_PASS", 4 * 16 * 16)  # 4 images of 16 px per pass
    split = explainer(net, images, targets)
    # SmoothGrad: one copy of the 3 images per pass; IG: one step of the 3 (Captum's floor), and
    # two more passes for its convergence check.
    assert passes == [3] * (6 if name == "smoothgrad" else 8 + 2)
    torch.testing.assert_close(split, whole, rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------- All explainers


# Few samples and steps, for small networks and images.
QUICK_OPTIONS = {"smoothgrad": {"num_samples": 3, "stdev": 0.15, "seed": None}, "integrated_gradients": {"steps": 4},
                 # 16 px noise images: a high compactness keeps several superpixels.
                 "lime": {"num_samples": 20, "kernel_width": 0.25, "segmentation": "slic", "num_segments": 4,
                          "compactness": 100.0, "kernel_size": 4.0, "max_dist": 200.0, "ratio": 0.2, "seed": 0,
                          "fill": "segment", "score": "probability", "ridge": 1.0}}


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_explainers_work_under_no_grad_and_leave_no_parameter_gradients(name):
    net = relu_net()
    images, targets = images_and_targets()
    explainer = build_explainer(name, **QUICK_OPTIONS.get(name, {}))
    torch.manual_seed(0)  # SmoothGrad's noise: the same draws in both calls
    with torch.no_grad():
        maps = explainer(net, images, targets)
    assert maps.dim() == 3 and maps.shape[0] == 2 and not maps.requires_grad
    assert maps.device == images.device and maps.isfinite().all() and (maps >= 0).all()
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    # Working under no_grad means giving the maps of a caller with gradients enabled, which the
    # tests above pin to their references; non-zero maps keep the comparison from being vacuous.
    torch.manual_seed(0)
    torch.testing.assert_close(maps, explainer(net, images, targets), rtol=1e-6, atol=1e-7)
    assert maps.amax() > 0


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
@pytest.mark.parametrize("arch", ["vit", "convnext_tiny"])
def test_explainers_on_layer_norms_and_attention_give_maps_or_name_what_they_lack(name, arch):
    """Every explainer gives a ViT's and a ConvNeXt's maps, or refuses before any pass, naming the
    module it has no rule for (c-MWP, FullGrad: layer norms, attention)."""
    torch.manual_seed(0)
    net, size = (small_vit(5), 32) if arch == "vit" else (build_network("convnext_tiny", 5), 64)
    net.eval()
    images, targets = images_and_targets(size=size)
    explainer = build_explainer(name, **QUICK_OPTIONS.get(name, {}))
    if name in ("cmwp", "fullgrad"):
        with pytest.raises(NotImplementedError, match="LayerNorm|ViTHead|ViTFeatures"):
            check_explainer(explainer, net)
        return
    check_explainer(explainer, net)
    maps = explainer(net, images, targets)
    assert maps.dim() == 3 and maps.shape[0] == 2 and maps.isfinite().all() and (maps >= 0).all()
    assert maps.amax() > 0


def test_build_explainer():
    assert build_explainer("gradcam_standard").mode == "standard"
    assert build_explainer("gradcam", layer="features.0").layer == "features.0"
    assert build_explainer("smoothgrad", num_samples=3, stdev=0.15, seed=None).num_samples == 3
    assert EXPLAINERS.validate({"name": "gradcam_standard"}).name == "gradcam_standard"
    with pytest.raises(ConfigError) as error:
        EXPLAINERS.validate({"name": "shap"})
    assert error.value.keys == ["explainer.name"]
    # The name picks Grad-CAM's mode (gradcam: elementwise, gradcam_standard: standard): no option sets it.
    with pytest.raises(ConfigError) as error:
        EXPLAINERS.validate({"name": "gradcam", "mode": "standard"})
    assert error.value.keys == ["explainer.mode"]
