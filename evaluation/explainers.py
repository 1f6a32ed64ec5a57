"""Explainers scored by the evaluation: ``explainer(net, images, targets) -> heatmaps [B, h, w]``.

``images``: float pixel-space batch ``[B, 3, H, W]`` in [0, 1]; ``targets``: class indices, long
``[B]``. Heatmaps are detached, on the images' device, at the method's own resolution (Grad-CAM and
c-MWP: the explained layer's ``h x w``; the others: ``H x W``); the metrics upsample and normalise
them. Every explainer enables gradients locally, so it works inside ``torch.no_grad()`` (validation,
testing), and differentiates only with respect to inputs or activations
(``torch.autograd.grad``), so it leaves no ``.grad`` in the network's parameters.

Explainers use the network as it is: call ``net.eval()`` first. FullGrad and c-MWP treat batch
norm as a fixed affine map and refuse a network whose batch norm (or, for c-MWP, dropout) is in
training mode.

Captum provides Gradient, SmoothGrad and Integrated Gradients. Grad-CAM reuses the project's own
``gcmodels.gradcam``; FullGrad and c-MWP are written here. Captum has no FullGrad. Its LRP with
the Alpha1-Beta0 rule is excitation backprop's rule, but it has no contrastive dual unit, applies
its own epsilon rule to batch norm instead of folding it into the convolution, and does not
propagate correctly through ResNet's residual additions (captum PR #342, issue #546).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from captum.attr import NoiseTunnel, Saliency
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from gcmodels.gradcam import MODES, gradcam, gradcam_from_activations
from gcmodels.networks import Normalize

_MAX_NAMES_SHOWN = 30


def _name_list(names: list[str]) -> str:
    shown = names[:_MAX_NAMES_SHOWN]
    more = f" ... ({len(names)} in all)" if len(names) > len(shown) else ""
    return ", ".join(shown) + more


def _require_eval(net: nn.Module, kinds: tuple[type, ...], method: str) -> None:
    for name, module in net.named_modules():
        if isinstance(module, kinds) and module.training:
            raise ValueError(
                f"{method} needs {type(module).__name__} {name!r} in eval mode (it treats it as a "
                "fixed per-sample map); call net.eval() first"
            )


class Explainer:
    """Base class: ``explainer(net, images, targets) -> heatmaps [B, h, w]`` (detached)."""

    def __call__(self, net: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        if images.dim() != 4 or targets.shape != images.shape[:1]:
            raise ValueError(
                f"need images [B, C, H, W] and one target class per image; got images "
                f"{tuple(images.shape)} and targets {tuple(targets.shape)}"
            )
        with torch.enable_grad():
            maps = self.explain(net, images, targets.long())
        return maps.detach()

    def explain(self, net: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError


# Pixels per forward/backward pass of the many-pass explainers (SmoothGrad, Integrated Gradients)
# when their own option leaves it open: 64 images at 224 px, 16 composites at 448 px. All passes
# at once took more than the 80 GB of an H100 (IG, 32 steps x 32 composites at 448 px).
_PIXELS_PER_PASS = 64 * 224 * 224


def _images_per_pass(images: Tensor) -> int:
    return max(1, _PIXELS_PER_PASS // (images.shape[-2] * images.shape[-1]))


def _input_leaf(images: Tensor) -> Tensor:
    """A fresh leaf that requires grad: gradients w.r.t. the input without touching the caller's
    tensor (and without Captum's warning about inputs that do not require grad)."""
    return images.detach().requires_grad_(True)


# ------------------------------------------------------------------------------------- Grad-CAM


@dataclass
class GradCAM(Explainer):
    """Grad-CAM (``mode="elementwise"``: the paper's Eq. 3; ``"standard"``: Eq. 1-2).

    ``layer=None`` explains the net's explained layer (``net.features`` output, through
    ``gcmodels.gradcam``); ``layer="features.6"`` (any named submodule) explains that module's
    output, captured by a forward hook. Returns the raw ReLU map (not L1-normalised): the metrics
    normalise, and raw maps keep the scale visible for figures.
    """

    mode: str = "elementwise"
    layer: Optional[str] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Grad-CAM mode {self.mode!r} is unknown; allowed: {list(MODES)}")

    def explain(self, net, images, targets):
        if self.layer is None:
            return gradcam(net, images, targets, self.mode, normalize=False)[1]
        module = _submodule(net, self.layer)
        captured: list[Tensor] = []

        def capture(_module, _inputs, output):
            captured.append(output)
            # Later in-place ops (ReLU(inplace=True) after a conv) would overwrite the captured
            # activations; the rest of the network runs on a copy instead.
            return output.clone()

        handle = module.register_forward_hook(capture)
        try:
            # The input requires grad so the activations do even when the weights are frozen.
            logits = net(_input_leaf(images))
        finally:
            handle.remove()
        if len(captured) != 1 or captured[0].dim() != 4:
            raise ValueError(
                f"Grad-CAM layer {self.layer!r} must run once per forward pass and output "
                f"[B, C, h, w]; it ran {len(captured)} time(s)"
                + (f" with output shape {tuple(captured[0].shape)}" if captured else "")
            )
        scores = logits.gather(1, targets.view(-1, 1)).squeeze(1)
        return gradcam_from_activations(captured[0], scores, self.mode, normalize=False)


def _submodule(net: nn.Module, name: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in net.named_modules() if n]
        raise ValueError(f"layer {name!r} is not a submodule of the network; valid names: "
                         f"{_name_list(names)}") from None


# ------------------------------------------------------------------------ Captum-based methods


@dataclass
class Gradient(Explainer):
    """Gradient saliency (Simonyan et al.): ``max_c |dy_t / dx_c|`` (Captum ``Saliency``)."""

    def explain(self, net, images, targets):
        grads = Saliency(net).attribute(_input_leaf(images), target=targets, abs=True)
        return grads.amax(dim=1)


@dataclass
class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al.): mean of ``|dy_t/dx|`` over ``num_samples`` noisy copies
    ``x + N(0, stdev^2)``, then max over channels (Captum ``NoiseTunnel(Saliency)``).

    ``stdev`` is in pixel units; images span [0, 1], so it is also the paper's noise level
    ``sigma / (x_max - x_min)``. The noise comes from torch's global RNG (Captum takes no
    generator): with ``seed=None`` set ``torch.manual_seed`` for reproducible maps; with an integer
    ``seed`` every call draws the same noise from a forked RNG and leaves the global one alone.
    ``samples_per_pass`` caps how many noisy copies of the batch go through the net at once;
    by default as many as keep a pass near 64 images of 224 px (one copy at least).
    """

    num_samples: int = 25
    stdev: float = 0.15
    seed: Optional[int] = None
    samples_per_pass: Optional[int] = None

    def __post_init__(self):
        if self.num_samples < 1 or self.stdev < 0:
            raise ValueError(f"SmoothGrad needs num_samples >= 1 and stdev >= 0; got "
                             f"{self.num_samples} and {self.stdev}")

    def explain(self, net, images, targets):
        if self.seed is None:
            return self._smoothgrad(net, images, targets)
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return self._smoothgrad(net, images, targets)

    def _smoothgrad(self, net, images, targets):
        grads = NoiseTunnel(Saliency(net)).attribute(
            _input_leaf(images), nt_type="smoothgrad", nt_samples=self.num_samples,
            nt_samples_batch_size=self.samples_per_pass or max(1, _images_per_pass(images) // len(images)),
            stdevs=float(self.stdev),
            target=targets, abs=True,
        )
        return grads.amax(dim=1)


@dataclass
class IntegratedGradients(Explainer):
    """Integrated Gradients (Sundararajan et al.), Captum, Gauss-Legendre rule with ``steps``
    points, from ``baseline`` (a number or a tensor broadcastable to the images; 0 = a black image
    in pixel space).

    Map: ``|sum_c attr_c|``. The channel sum is the pixel's attribution (IG attributions are
    additive, and summing first keeps completeness per pixel); the absolute value then scores
    evidence for and against the class alike, as the other gradient maps do.

    ``internal_batch_size`` (Captum's): how many (step, image) pairs go through the net at once;
    by default as many as keep a pass near 64 images of 224 px, and never fewer than the batch
    (Captum's own floor: one step of every image).
    """

    steps: int = 32
    baseline: float | Tensor = 0.0
    internal_batch_size: Optional[int] = None

    def attributions(self, net, images, targets) -> tuple[Tensor, Tensor]:
        """Per-channel attributions ``[B, C, H, W]`` and Captum's convergence delta ``[B]``
        (``sum(attr) - (y_t(x) - y_t(baseline))``; near 0 when the integral is accurate)."""
        with torch.enable_grad():
            attr, delta = CaptumIntegratedGradients(net).attribute(
                _input_leaf(images), baselines=self.baseline, target=targets.long(),
                n_steps=self.steps,
                internal_batch_size=self.internal_batch_size or max(len(images), _images_per_pass(images)),
                return_convergence_delta=True,
            )
        return attr.detach(), delta.detach()

    def explain(self, net, images, targets):
        return self.attributions(net, images, targets)[0].sum(dim=1).abs()


# ------------------------------------------------------------------------------------- FullGrad


def _bias_of(module: nn.Module, output: Tensor) -> Optional[Tensor]:
    """The bias ``module`` adds to ``output``, shaped to broadcast against it; None if it adds
    none. Raises for modules with a bias that FullGrad does not know how to account for."""
    if isinstance(module, Normalize):
        return -module.mean / module.std  # (x - m) / s = x / s + (-m / s)
    channel_shape = (1, -1) + (1,) * (output.dim() - 2)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.track_running_stats:
            raise NotImplementedError(f"FullGrad: {type(module).__name__} without running "
                                      "statistics normalises with batch statistics, not a fixed bias")
        scale = _batchnorm_scale(module)
        shift = module.bias if module.affine else torch.zeros_like(scale)
        return (shift - module.running_mean * scale).view(channel_shape)
    bias = getattr(module, "bias", None)
    if not isinstance(bias, Tensor):
        return None
    if isinstance(module, nn.Linear):
        return bias
    if isinstance(module, nn.modules.conv._ConvNd):
        return bias.view(channel_shape)
    raise NotImplementedError(f"FullGrad has no rule for the bias of {type(module).__name__}; "
                              "its contribution would be missing from the decomposition")


def _batchnorm_scale(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale * bn.weight if bn.affine else scale


@dataclass
class _FullGradients:
    inputs: Tensor
    input_grad: Tensor
    biases: list[Tensor]  # each broadcastable to its layer's output
    output_grads: list[Tensor]


@dataclass
class FullGrad(Explainer):
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019).

    Map: ``psi(x * grad_x) + sum_layers sum_channels psi(grad_z * b)`` over every layer with a
    bias and a spatial output (Conv2d, eval-mode BatchNorm2d's effective bias
    ``beta - mean * gamma / sqrt(var + eps)``, and the Normalize layer, whose ``(x - m)/s`` has the
    bias ``-m/s``). ``psi``: absolute value per channel, min-max rescaled over the layer's whole
    ``[C, h, w]`` tensor, summed over channels, upsampled bilinearly to the image size (the paper's
    ``sum_c psi(.)``: absolute value before the channel sum, so channels cannot cancel). Linear
    layers' biases have no spatial extent and enter only ``decompose``.
    """

    def decompose(self, net, images, targets) -> tuple[Tensor, Tensor]:
        """Full-gradient decomposition of the target logit: ``(input_term [B], bias_terms [B])``
        with ``input_term = sum(x * dy/dx)`` and ``bias_terms = sum_layers sum(dy/dz * b)``.
        For a piecewise-linear (ReLU, max/avg pooling) network in eval mode the two add up to
        ``y_t`` exactly (completeness)."""
        with torch.enable_grad():
            parts = self._gradients(net, images, targets.long())
        input_term = (parts.inputs * parts.input_grad).flatten(1).sum(1)
        bias_terms = torch.zeros_like(input_term)
        for bias, grad in zip(parts.biases, parts.output_grads):
            bias_terms = bias_terms + (grad * bias).flatten(1).sum(1)
        return input_term.detach(), bias_terms.detach()

    def explain(self, net, images, targets):
        parts = self._gradients(net, images, targets)
        size = images.shape[-2:]
        maps = _fullgrad_postprocess(parts.inputs * parts.input_grad)
        for bias, grad in zip(parts.biases, parts.output_grads):
            if grad.dim() == 4:
                layer_map = _fullgrad_postprocess(grad * bias)
                maps = maps + F.interpolate(layer_map[:, None], size=size, mode="bilinear")[:, 0]
        return maps

    @staticmethod
    def _gradients(net, images, targets) -> _FullGradients:
        _require_eval(net, (nn.modules.batchnorm._BatchNorm,), "FullGrad")
        outputs: list[Tensor] = []
        biases: list[Tensor] = []

        def capture(module, _inputs, output):
            bias = _bias_of(module, output)
            if bias is None:
                return None
            outputs.append(output)
            biases.append(bias.detach())
            return output.clone()  # protects the captured output from later in-place ops

        # Every call of a module is captured, so a module used twice contributes twice.
        handles = [m.register_forward_hook(capture) for m in net.modules() if not list(m.children())]
        try:
            inputs = _input_leaf(images)
            # Samples do not interact in eval mode: the gradient of the batch's summed target
            # logits is each sample's own gradient.
            score = net(inputs).gather(1, targets.view(-1, 1)).sum()
        finally:
            for handle in handles:
                handle.remove()
        grads = torch.autograd.grad(score, [inputs] + outputs, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip([inputs] + outputs, grads)]
        return _FullGradients(inputs.detach(), grads[0], biases, grads[1:])


def _fullgrad_postprocess(tensor: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, h, w]``: abs, min-max rescale per sample, sum over channels."""
    tensor = tensor.abs()
    flat = tensor.flatten(1)
    low = flat.amin(1).view(-1, 1, 1, 1)
    span = (flat.amax(1).view(-1, 1, 1, 1) - low).clamp_min(torch.finfo(tensor.dtype).tiny)
    return ((tensor - low) / span).sum(1)


# ------------------------------------------------------------------- Contrastive Excitation BP


def _excite(inputs: list[Tensor], excitation: Callable[..., Tensor], p_out: Tensor) -> list[Tensor]:
    """Excitation-backprop rule of one layer: ``P(x_j) = x_j sum_i W+_ij P(z_i) / z_i`` with
    ``z = W+ x`` (positive weights, no bias) given by ``excitation(*inputs)``.

    Gradient trick: ``W+^T s = d<z, s>/dx`` for ``s = P / z``, so any positive linear map (conv,
    linear, average pooling, a residual sum) needs only its forward. A unit with ``z = 0`` has no
    excitatory input: its probability is dropped."""
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    with torch.enable_grad():
        z = excitation(*inputs)
        nonzero = z != 0
        ratio = torch.where(nonzero, p_out / torch.where(nonzero, z, torch.ones_like(z)), 0.0)
        grads = torch.autograd.grad(z, inputs, grad_outputs=ratio)
    return [x.detach() * g for x, g in zip(inputs, grads)]


def _excite_one(excitation: Callable[[Tensor], Tensor], x: Tensor, p_out: Tensor) -> Tensor:
    return _excite([x], excitation, p_out)[0]


def _route(op: nn.Module, x: Tensor, p_out: Tensor) -> Tensor:
    """Winner-take-all ops (max pooling) and reshapes: probability goes where the gradient goes
    (to the window's winner; to the same element before flattening)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (p_in,) = torch.autograd.grad(op(x), x, grad_outputs=p_out)
    return p_in


def _pass_through(_x: Tensor, p_out: Tensor) -> Tensor:
    return p_out


# The positive weights are made when a layer is excited, not when the stages are listed: most
# stages lie below the explained layer and are never excited.
def _positive_conv(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None) -> Callable[[Tensor], Tensor]:
    """``x -> conv(x)`` with the positive part of the weights and no bias; a following eval-mode
    batch norm is folded in first (conv + BN is one affine layer at inference), so a negative BN
    scale flips its channel's weights and the originally negative weights become excitatory."""

    def excitation(x: Tensor) -> Tensor:
        weight = conv.weight.detach()
        if bn is not None:
            weight = weight * _batchnorm_scale(bn).detach().view(-1, 1, 1, 1)
        return F.conv2d(x, weight.clamp(min=0), None, conv.stride, conv.padding, conv.dilation,
                        conv.groups)

    return excitation


def _positive_linear(weight: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: F.linear(x, weight.detach().clamp(min=0))


def _residual_rule(block: nn.Module, x: Tensor, p_out: Tensor) -> Tensor:
    """torchvision ``BasicBlock``/``Bottleneck``: ``relu(main(x) + shortcut(x))``.

    The output units sum two non-negative inputs: the main branch's last hidden activation
    (through the last conv + BN) and the block input (through the identity or the downsampling
    conv + BN). Treating the sum as one layer over both splits each unit's probability between the
    branches in proportion to their excitatory contributions; the main branch's share then goes
    down its conv + BN + ReLU stages."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if isinstance(block, Bottleneck):
        pairs.append((block.conv3, block.bn3))
    with torch.no_grad():
        hidden = [x]
        for conv, bn in pairs[:-1]:
            hidden.append(F.relu(bn(conv(hidden[-1]))))
    last = _positive_conv(*pairs[-1])
    shortcut = (lambda v: v) if block.downsample is None else _positive_conv(*block.downsample)
    p_hidden, p_input = _excite([hidden[-1], x], lambda h, v: last(h) + shortcut(v), p_out)
    for (conv, bn), h in reversed(list(zip(pairs[:-1], hidden[:-1]))):
        p_hidden = _excite_one(_positive_conv(conv, bn), h, p_hidden)
    return p_input + p_hidden


def _is_conv_bn(module: nn.Module) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) == 2
            and isinstance(module[0], nn.Conv2d) and isinstance(module[1], nn.BatchNorm2d))


def _leaf_rule(module: nn.Module) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """``(input, P at output) -> P at input`` for one module or conv + batch-norm pair; None
    where c-MWP has no rule."""
    if isinstance(module, (nn.ReLU, nn.Identity, nn.modules.dropout._DropoutNd)):
        return _pass_through  # dropout: its eval-mode identity
    if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)):
        return partial(_route, module)
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return partial(_excite_one, module)  # a linear map with positive weights
    if isinstance(module, nn.Linear):
        return partial(_excite_one, _positive_linear(module.weight))
    if isinstance(module, nn.Conv2d) or _is_conv_bn(module):
        conv, bn = (module, None) if isinstance(module, nn.Conv2d) else module
        # Other padding modes pad with non-zero values, which the functional conv does not add.
        return partial(_excite_one, _positive_conv(conv, bn)) if conv.padding_mode == "zeros" else None
    if isinstance(module, nn.BatchNorm2d):
        # A batch norm not after a conv: a per-channel weight; a channel with a non-positive
        # scale has no excitatory input and passes no probability down.
        scale = _batchnorm_scale(module).detach().clamp(min=0).view(1, -1, 1, 1)
        return partial(_excite_one, lambda x: x * scale)
    if isinstance(module, (BasicBlock, Bottleneck)) and (
        module.downsample is None or _is_conv_bn(module.downsample)
    ):
        return partial(_residual_rule, module)
    return None


@dataclass
class _Stage:
    """One step of the top-down walk: ``forward`` maps its input to its output, ``backward``
    maps (input, P at output) to P at input. ``names``: module paths whose output it is."""

    names: list[str]
    module: nn.Module
    forward: Callable[[Tensor], Tensor]
    backward: Optional[Callable[[Tensor, Tensor], Tensor]]


def _stages(module: nn.Module, path: str) -> list[_Stage]:
    """Flatten nested ``nn.Sequential``s into stages; a Conv2d directly followed by a BatchNorm2d
    is one stage (named after the batch norm, whose output it is)."""
    if not isinstance(module, nn.Sequential):
        return [_Stage([path], module, module, _leaf_rule(module))]
    children = list(module.named_children())
    stages: list[_Stage] = []
    index = 0
    while index < len(children):
        name, child = children[index]
        following = children[index + 1][1] if index + 1 < len(children) else None
        if isinstance(child, nn.Conv2d) and isinstance(following, nn.BatchNorm2d):
            pair = nn.Sequential(child, following)
            stages.append(_Stage([f"{path}.{children[index + 1][0]}"], pair, pair, _leaf_rule(pair)))
            index += 2
            continue
        stages.extend(_stages(child, f"{path}.{name}"))
        index += 1
    if stages:
        stages[-1].names.append(path)  # a Sequential's output is its last stage's
    return stages


SIGNALS = ("target", "dual", "contrast")


@dataclass
class ContrastiveExcitationBackprop(Explainer):
    """Contrastive Marginal Winning Probability (c-MWP; Zhang et al., "Top-down Neural Attention
    by Excitation Backprop", ECCV 2016).

    Excitation backprop propagates a unit probability at the target logit down to ``layer`` with
    ``P(x_j) = x_j sum_i W+_ij P(y_i) / sum_k W+_ik x_k`` (positive weights, biases ignored). The
    contrastive map subtracts the MWP of the "dual" unit (the target's classifier weights negated)
    and then clips: ``relu(sum_channels(MWP_target - MWP_dual))``. EB is linear in the top
    signal, so the difference is propagated in one pass.

    ``layer``: a module path whose output receives the map (default: the output of
    ``net.features``, the explained layer). Supported: every stage of ``net.features`` and
    ``net.head`` when they are (nested) ``nn.Sequential``s of Conv2d, Linear, ReLU, MaxPool2d,
    AdaptiveMaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm2d (eval; folded into a preceding
    conv), Flatten, Dropout (eval identity), Identity, and torchvision BasicBlock/Bottleneck
    (residual sum split by excitation). The head must end with a Linear classifier. Not supported:
    other ops on the way down (e.g. Tanh, convs padded other than with zeros) -> NotImplementedError; layers inside a block or a
    conv + BN pair, and Normalize (its output is signed, outside EB's assumption of non-negative
    inputs) -> NotImplementedError naming the supported layers. EB assumes non-negative inputs to
    every weighted layer (true above the first conv of ReLU nets).
    """

    layer: Optional[str] = None

    def stages(self, net) -> tuple[list[_Stage], int]:
        """The network as stages, and the index of the stage whose output is ``layer``."""
        stages = _stages(net.features, "features") + _stages(net.head, "head")
        layer = self.layer or "features"
        positions = {name: index for index, stage in enumerate(stages[:-1]) for name in stage.names}
        if layer not in positions:
            _submodule(net, layer)  # ValueError for names that are not modules at all
            raise NotImplementedError(
                f"c-MWP cannot stop at layer {layer!r} (inside a block or a conv + batch-norm pair, "
                f"the input normalisation, or the logits); supported layers: {_name_list(list(positions))}"
            )
        if not isinstance(stages[-1].module, nn.Linear):
            raise NotImplementedError("c-MWP needs a head that ends with a Linear classifier, not "
                                      f"{type(stages[-1].module).__name__}")
        for stage in stages[positions[layer] + 1:-1]:
            if stage.backward is None:
                raise NotImplementedError(
                    f"c-MWP has no excitation rule for {type(stage.module).__name__} at "
                    f"{stage.names[0]!r}, between layer {layer!r} and the logits"
                )
        return stages, positions[layer]

    def probabilities(self, net, images, targets, signal: str = "contrast") -> Tensor:
        """MWP at ``layer``, one value per unit (``[B, C, h, w]`` for a conv layer).

        ``signal="target"``: the target unit's MWP (sums to 1 where all excitations are positive);
        ``"dual"``: the dual unit's; ``"contrast"``: their difference (signed, not yet clipped)."""
        if signal not in SIGNALS:
            raise ValueError(f"c-MWP signal {signal!r} is unknown; allowed: {list(SIGNALS)}")
        _require_eval(net, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd), "c-MWP")
        stages, stop = self.stages(net)
        inputs: dict[int, Tensor] = {}
        with torch.no_grad():
            x = net.normalize(images)
            for index, stage in enumerate(stages):
                if index > stop:
                    # Only ReLU(inplace=True) later modifies a stage's input, and ReLU's rule
                    # does not read it.
                    inputs[index] = x
                x = stage.forward(x)
        classifier = stages[-1].module
        one_hot = F.one_hot(targets.long(), classifier.out_features).to(x.dtype)
        top_input = inputs[len(stages) - 1]

        def from_unit(weight: Tensor) -> Tensor:  # MWP at the classifier's input
            return _excite_one(_positive_linear(weight), top_input, one_hot)

        if signal == "target":
            p = from_unit(classifier.weight)
        elif signal == "dual":
            p = from_unit(-classifier.weight)
        else:
            p = from_unit(classifier.weight) - from_unit(-classifier.weight)
        for index in range(len(stages) - 2, stop, -1):
            p = stages[index].backward(inputs[index], p)
        return p

    def explain(self, net, images, targets):
        contrast = self.probabilities(net, images, targets, "contrast")
        if contrast.dim() != 4:
            raise ValueError(f"c-MWP maps need a layer with output [B, C, h, w]; layer "
                             f"{self.layer or 'features'!r} gives {tuple(contrast.shape)}")
        return F.relu(contrast.sum(dim=1))


# ------------------------------------------------------------------------------------- Registry

EXPLAINERS: dict[str, Callable[..., Explainer]] = {
    "gradcam": GradCAM,
    "gradcam_standard": partial(GradCAM, mode="standard"),
    "gradient": Gradient,
    "smoothgrad": SmoothGrad,
    "integrated_gradients": IntegratedGradients,
    "fullgrad": FullGrad,
    "cmwp": ContrastiveExcitationBackprop,
}


def build_explainer(name: str, **kwargs) -> Explainer:
    """The explainer called ``name`` (a key of ``EXPLAINERS``) with its options as keywords."""
    if name not in EXPLAINERS:
        raise ValueError(f"explainer {name!r} is unknown; valid explainers: {sorted(EXPLAINERS)}")
    return EXPLAINERS[name](**kwargs)
