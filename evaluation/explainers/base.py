"""The ``Explainer`` base class and the helpers that several method families share."""
from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gcmodels.options import Registry

# Every explainer by config name (``explainer.name``), registered where it is defined; its options
# are its dataclass fields, with their ranges in their annotations.
EXPLAINERS = Registry("explainer")

_MAX_NAMES_SHOWN = 30


def name_list(names: list[str]) -> str:
    shown = names[:_MAX_NAMES_SHOWN]
    more = f" ... ({len(names)} in all)" if len(names) > len(shown) else ""
    return ", ".join(shown) + more


def require_eval(net: nn.Module, kinds: tuple[type, ...], method: str) -> None:
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

    def at_precision(self, precision: str) -> Explainer:
        """This explainer with its network passes that need no gradient at ``precision``
        (``evaluation.precision``); itself where every pass needs one (they stay in float32)."""
        return self

    def check_layer(self, net: nn.Module) -> None:
        """Raise ValueError or NotImplementedError where the explainer's ``layer`` option does not
        fit ``net`` (:func:`check_explainer`); explainers without one have nothing to check."""


def check_explainer(explainer: Explainer, net: nn.Module, key: str = "explainer") -> None:
    """Refuse an explainer whose ``layer`` option does not fit ``net``, before any image is read:
    a name that is not a module of ``net`` (ValueError), a Grad-CAM layer that runs more than once
    per forward pass or whose output is not ``[B, C, h, w]`` (ValueError), a layer c-MWP cannot stop
    at (NotImplementedError) or whose output is not ``[B, C, h, w]`` (ValueError). The error keeps
    its type and its message starts with ``{key}.layer=<value>:`` (``key``: where the caller's
    config holds the explainer). ``net`` is left as it is, in either mode: no weight, batch-norm
    statistic or gradient changes (:func:`layer_output_shapes`)."""
    try:
        explainer.check_layer(net)
    except (ValueError, NotImplementedError) as err:
        raise type(err)(f"{key}.layer={getattr(explainer, 'layer', None)!r}: {err}") from None


# Pixels per forward/backward pass of the many-pass explainers (SmoothGrad, Integrated Gradients)
# when their own option leaves it open: 64 images at 224 px, 16 composites at 448 px. All passes
# at once took more than the 80 GB of an H100 (IG, 32 steps x 32 composites at 448 px).
_PIXELS_PER_PASS = 64 * 224 * 224


def images_per_pass(images: Tensor) -> int:
    return max(1, _PIXELS_PER_PASS // (images.shape[-2] * images.shape[-1]))


def input_leaf(images: Tensor) -> Tensor:
    """A fresh leaf that requires grad: gradients w.r.t. the input without touching the caller's
    tensor (and without Captum's warning about inputs that do not require grad)."""
    return images.detach().requires_grad_(True)


def submodule(net: nn.Module, name: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in net.named_modules() if n]
        raise ValueError(f"layer {name!r} is not a submodule of the network; valid names: "
                         f"{name_list(names)}") from None


# The dry run's input: the architectures' own 224 px, at which each of their layers has an output;
# 2 images, as training-mode batch norm refuses one value per channel.
_PROBE_SHAPE = (2, 3, 224, 224)


def layer_output_shapes(net: nn.Module, layer: str) -> list[torch.Size]:
    """The shape of each output of module ``layer`` (one per call) in a forward pass of ``net``.

    The pass runs on the meta device, with stand-ins for the weights and buffers: it computes
    nothing, and leaves ``net`` (its batch-norm statistics included) as it was."""
    module = submodule(net, layer)
    shapes: list[torch.Size] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: shapes.append(output.shape))
    stand_ins = {name: torch.empty_like(tensor, device="meta")
                 for name, tensor in itertools.chain(net.named_parameters(), net.named_buffers())}
    dtype = next(net.parameters()).dtype
    try:
        with torch.no_grad():
            functional_call(net, stand_ins, (torch.zeros(_PROBE_SHAPE, dtype=dtype, device="meta"),))
    finally:
        handle.remove()
    return shapes


# Eval-mode batch norm as a fixed per-channel affine map: FullGrad takes its bias from it, c-MWP
# folds it into the preceding conv.
def batchnorm_scale(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale * bn.weight if bn.affine else scale
