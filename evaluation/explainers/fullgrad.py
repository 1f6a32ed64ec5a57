"""FullGrad, written here: Captum has no FullGrad."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evaluation.explainers.base import EXPLAINERS, Explainer, batchnorm_scale, input_leaf, require_eval
from gcmodels.networks import Normalize


def _bias_of(module: nn.Module, output: Tensor) -> Tensor | None:
    """The bias ``module`` adds to ``output``, shaped to broadcast against it; None if it adds
    none. Raises for modules with a bias that FullGrad does not know how to account for."""
    if isinstance(module, Normalize):
        return -module.mean / module.std  # (x - m) / s = x / s + (-m / s)
    channel_shape = (1, -1) + (1,) * (output.dim() - 2)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.track_running_stats:
            raise NotImplementedError(f"FullGrad: {type(module).__name__} without running "
                                      "statistics normalises with batch statistics, not a fixed bias")
        scale = batchnorm_scale(module)
        shift = module.bias if module.affine else torch.zeros_like(scale)
        return (shift - module.running_mean * scale).view(channel_shape)
    check_bias_rule(module)
    bias = getattr(module, "bias", None)
    if not isinstance(bias, Tensor):
        return None
    return bias if isinstance(module, nn.Linear) else bias.view(channel_shape)


def check_bias_rule(module: nn.Module, name: str | None = None) -> None:
    """Raise where ``module`` (at ``name``) has a bias FullGrad has no rule for (a layer norm),
    or parameters of its own beside submodules (attention's input projection, a transformer's
    class token and position embeddings), which the hooks on the leaf modules would miss."""
    where = f" at {name!r}" if name else ""
    own = [key for key, _ in module.named_parameters(recurse=False)]
    if own and any(True for _ in module.children()):
        raise NotImplementedError(f"FullGrad: {type(module).__name__}{where} holds parameters {own} beside its "
                                  "submodules; their contribution would be missing from the decomposition")
    if isinstance(getattr(module, "bias", None), Tensor) and not isinstance(
            module, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        raise NotImplementedError(f"FullGrad has no rule for the bias of {type(module).__name__}{where}; "
                                  "its contribution would be missing from the decomposition")


@dataclass
class _FullGradients:
    inputs: Tensor
    input_grad: Tensor
    biases: list[Tensor]  # each broadcastable to its layer's output
    output_grads: list[Tensor]


@EXPLAINERS.register("fullgrad")
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

    def check_layer(self, net: nn.Module) -> None:
        """Refuse, before any pass, a network with a module FullGrad cannot decompose
        (:func:`check_bias_rule`)."""
        for name, module in net.named_modules():
            check_bias_rule(module, name)

    @staticmethod
    def _gradients(net, images, targets) -> _FullGradients:
        require_eval(net, (nn.modules.batchnorm._BatchNorm,), "FullGrad")
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
            inputs = input_leaf(images)
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
