"""Contrastive excitation backprop (c-MWP), written here rather than taken from Captum: Captum's
LRP with the Alpha1-Beta0 rule is excitation backprop's rule, but it has no contrastive dual unit,
applies its own epsilon rule to batch norm, and does not propagate correctly through ResNet's
residual additions (captum PR #342, issue #546).

Two rule sets differ where the paper (written for Caffe nets without batch norm or residuals)
leaves the choice open: "torchray" follows TorchRay's ``excitation_backprop`` (the pointing-game
benchmark's implementation), "folded" folds batch norm into the conv and treats a residual sum as
one excitation layer."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from evaluation.explainers.base import (
    EXPLAINERS,
    Explainer,
    batchnorm_scale,
    layer_output_shapes,
    name_list,
    require_eval,
    submodule,
)


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
def _positive_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> Callable[[Tensor], Tensor]:
    """``x -> conv(x)`` with the positive part of the weights and no bias; a following eval-mode
    batch norm is folded in first (conv + BN is one affine layer at inference), so a negative BN
    scale flips its channel's weights and the originally negative weights become excitatory."""

    def excitation(x: Tensor) -> Tensor:
        weight = conv.weight.detach()
        if bn is not None:
            weight = weight * batchnorm_scale(bn).detach().view(-1, 1, 1, 1)
        return F.conv2d(x, weight.clamp(min=0), None, conv.stride, conv.padding, conv.dilation,
                        conv.groups)

    return excitation


def _positive_linear(weight: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: F.linear(x, weight.detach().clamp(min=0))


def _conv_bn_pairs(block: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """A torchvision block's main branch, ReLU after every pair but the last."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if isinstance(block, Bottleneck):
        pairs.append((block.conv3, block.bn3))
    return pairs


def _folded_residual_rule(block: nn.Module, x: Tensor, p_out: Tensor) -> Tensor:
    """torchvision ``BasicBlock``/``Bottleneck``: ``relu(main(x) + shortcut(x))``.

    The output units sum two non-negative inputs: the main branch's last hidden activation
    (through the last conv + BN) and the block input (through the identity or the downsampling
    conv + BN). Treating the sum as one layer over both splits each unit's probability between the
    branches in proportion to their excitatory contributions; the main branch's share then goes
    down its conv + BN + ReLU stages."""
    pairs = _conv_bn_pairs(block)
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


def _relu_mask(x: Tensor, p_out: Tensor) -> Tensor:
    """TorchRay leaves ReLU's own backward in place: no probability where the input is <= 0."""
    return torch.where(x > 0, p_out, 0.0)


def _torchray_residual_rule(block: nn.Module, x: Tensor, p_out: Tensor) -> Tensor:
    """TorchRay's ``EltwiseSum``: ``relu(main + shortcut)`` gives each addend the share
    ``addend / sum`` of the probability at the sum, using the actual (signed) batch-normed values
    rather than excitations, so a negative main branch passes negative probability and the other
    addend more than all of it. Batch norm passes probability unchanged; every conv applies the
    EB rule with its own positive weights."""
    pairs = _conv_bn_pairs(block)
    with torch.no_grad():
        hidden, before_relu = [x], []
        for conv, bn in pairs[:-1]:
            before_relu.append(bn(conv(hidden[-1])))
            hidden.append(F.relu(before_relu[-1]))
        main = pairs[-1][1](pairs[-1][0](hidden[-1]))
        shortcut = x if block.downsample is None else block.downsample(x)
        total = main + shortcut
        # The block's last ReLU passes nothing where the sum is <= 0, so no division by zero.
        share = torch.where(total > 0, p_out / torch.where(total > 0, total, 1.0), 0.0)
    p_hidden = _excite_one(_positive_conv(pairs[-1][0]), hidden[-1], main * share)
    for (conv, _), h, a in reversed(list(zip(pairs[:-1], hidden[:-1], before_relu))):
        p_hidden = _excite_one(_positive_conv(conv), h, _relu_mask(a, p_hidden))
    p_input = shortcut * share
    if block.downsample is not None:
        p_input = _excite_one(_positive_conv(block.downsample[0]), x, p_input)
    return p_input + p_hidden


def _is_conv_bn(module: nn.Module) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) == 2
            and isinstance(module[0], nn.Conv2d) and isinstance(module[1], nn.BatchNorm2d))


def _folded_rule(module: nn.Module) -> Callable[[Tensor, Tensor], Tensor] | None:
    if isinstance(module, nn.ReLU):
        return _pass_through
    if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
        return partial(_route, module)
    if isinstance(module, nn.BatchNorm2d):
        # A batch norm not after a conv: a per-channel weight; a channel with a non-positive
        # scale has no excitatory input and passes no probability down.
        scale = batchnorm_scale(module).detach().clamp(min=0).view(1, -1, 1, 1)
        return partial(_excite_one, lambda x: x * scale)
    if isinstance(module, (BasicBlock, Bottleneck)):
        return partial(_folded_residual_rule, module)
    return None


def _torchray_rule(module: nn.Module) -> Callable[[Tensor, Tensor], Tensor] | None:
    if isinstance(module, nn.ReLU):
        return _relu_mask
    if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
        # The EB rule with the max as the layer's output: the winner keeps the probability unless
        # its whole window is zero, where the probability is dropped.
        return partial(_excite_one, module)
    if isinstance(module, nn.BatchNorm2d):
        return _pass_through
    if isinstance(module, (BasicBlock, Bottleneck)):
        return partial(_torchray_residual_rule, module)
    return None


# Only the modules the two rule sets treat differently; _leaf_rule handles the rest.
RULES = {"torchray": _torchray_rule, "folded": _folded_rule}


def _leaf_rule(module: nn.Module, rules: str) -> Callable[[Tensor, Tensor], Tensor] | None:
    """``(input, P at output) -> P at input`` for one module (or, folded, a conv + batch-norm
    pair); None where c-MWP has no rule."""
    if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)):
        return _pass_through  # dropout: its eval-mode identity
    if isinstance(module, nn.Flatten):
        return partial(_route, module)
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return partial(_excite_one, module)  # a linear map with positive weights
    if isinstance(module, nn.Linear):
        return partial(_excite_one, _positive_linear(module.weight))
    if isinstance(module, nn.Conv2d) or _is_conv_bn(module):
        conv, bn = (module, None) if isinstance(module, nn.Conv2d) else module
        # Other padding modes pad with non-zero values, which the functional conv does not add.
        return partial(_excite_one, _positive_conv(conv, bn)) if conv.padding_mode == "zeros" else None
    if isinstance(module, (BasicBlock, Bottleneck)) and not (
        module.downsample is None or _is_conv_bn(module.downsample)
    ):
        return None
    return RULES[rules](module)


@dataclass
class _Stage:
    """One step of the top-down walk: ``forward`` maps its input to its output, ``backward``
    maps (input, P at output) to P at input. ``names``: module paths whose output it is."""

    names: list[str]
    module: nn.Module
    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor] | None


def _stages(module: nn.Module, path: str, rules: str) -> list[_Stage]:
    """Flatten nested ``nn.Sequential``s into stages; with folded rules, a Conv2d directly followed
    by a BatchNorm2d is one stage (named after the batch norm, whose output it is)."""
    if not isinstance(module, nn.Sequential):
        return [_Stage([path], module, module, _leaf_rule(module, rules))]
    children = list(module.named_children())
    stages: list[_Stage] = []
    index = 0
    while index < len(children):
        name, child = children[index]
        following = children[index + 1][1] if index + 1 < len(children) else None
        if rules == "folded" and isinstance(child, nn.Conv2d) and isinstance(following, nn.BatchNorm2d):
            pair = nn.Sequential(child, following)
            stages.append(_Stage([f"{path}.{children[index + 1][0]}"], pair, pair, _leaf_rule(pair, rules)))
            index += 2
            continue
        stages.extend(_stages(child, f"{path}.{name}", rules))
        index += 1
    if stages:
        stages[-1].names.append(path)  # a Sequential's output is its last stage's
    return stages


SIGNALS = ("target", "dual", "contrast")


@EXPLAINERS.register("cmwp")
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
    ``net.features``, the explained layer: ResNet's ``layer4``, AlexNet's conv5 ReLU; TorchRay's
    benchmark uses ResNet50's ``layer3``, here ``features.6``). Supported: every stage of
    ``net.features`` and ``net.head`` when they are (nested) ``nn.Sequential``s of Conv2d, Linear,
    ReLU, MaxPool2d, AdaptiveMaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm2d (eval),
    Flatten, Dropout (eval identity), Identity, and torchvision BasicBlock/Bottleneck. The head
    must end with a Linear classifier. Not supported: other ops on the way down (e.g. Tanh, convs
    padded other than with zeros) -> NotImplementedError; layers inside a block (or, folded, a
    conv + BN pair), and Normalize (its output is signed, outside EB's assumption of non-negative
    inputs) -> NotImplementedError naming the supported layers. EB assumes non-negative inputs to
    every weighted layer (true above the first conv of ReLU nets).

    ``rules``: how batch norm, ReLU, max pooling and residual sums pass probability down.
    ``"torchray"`` (TorchRay's ``excitation_backprop`` with its ``EltwiseSum`` skip connections):
    batch norm passes it unchanged and each conv uses its own positive weights; ReLU zeroes it
    where its input is <= 0; max pooling is an EB layer (nothing passes from an all-zero window);
    a residual sum splits it in proportion to the signed addends. ``"folded"``: batch norm is
    folded into the preceding conv (so a negative BN scale flips which weights excite); ReLU and
    max pooling pass it on (to the window's winner); a residual sum is one EB layer over both
    branches, split by their excitations.
    """

    layer: str | None = None
    rules: Literal[tuple(RULES)] = "torchray"

    def stages(self, net) -> tuple[list[_Stage], int]:
        """The network as stages, and the index of the stage whose output is ``layer``."""
        stages = _stages(net.features, "features", self.rules) + _stages(net.head, "head", self.rules)
        layer = self.layer or "features"
        positions = {name: index for index, stage in enumerate(stages[:-1]) for name in stage.names}
        if layer not in positions:
            submodule(net, layer)  # ValueError for names that are not modules at all
            inside = "a block or a conv + batch-norm pair" if self.rules == "folded" else "a block"
            raise NotImplementedError(
                f"c-MWP cannot stop at layer {layer!r} (inside {inside}, the input normalisation, "
                f"or the logits); supported layers: {name_list(list(positions))}"
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
        require_eval(net, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd), "c-MWP")
        stages, stop = self.stages(net)
        inputs: dict[int, Tensor] = {}
        with torch.no_grad():
            x = net.normalize(images)
            for index, stage in enumerate(stages):
                if index > stop:
                    # Only ReLU(inplace=True) later modifies a stage's input, to relu(input):
                    # ReLU's rules read at most its sign.
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
        self._require_map(contrast.shape)
        return F.relu(contrast.sum(dim=1))

    def check_layer(self, net):
        self.stages(net)
        self._require_map(layer_output_shapes(net, self.layer or "features")[0])

    def _require_map(self, shape) -> None:
        if len(shape) != 4:
            raise ValueError(f"c-MWP maps need a layer with output [B, C, h, w]; layer "
                             f"{self.layer or 'features'!r} gives {tuple(shape)}")
