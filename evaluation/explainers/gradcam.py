"""Grad-CAM, through the project's own ``gcmodels.gradcam`` (the map the GC loss trains), so the
evaluation scores exactly what training made consistent."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from evaluation.explainers.base import EXPLAINERS, Explainer, input_leaf, layer_output_shapes, submodule
from gcmodels.gradcam import MODES, gradcam, gradcam_from_activations


@EXPLAINERS.register("gradcam", fixed={"mode": "elementwise"})
@EXPLAINERS.register("gradcam_standard", fixed={"mode": "standard"})
@dataclass
class GradCAM(Explainer):
    """Grad-CAM (``mode="elementwise"``: the paper's Eq. 3; ``"standard"``: Eq. 1-2).

    ``layer=None`` explains the net's explained layer (``net.features`` output, through
    ``gcmodels.gradcam``); ``layer="features.6"`` (any named submodule) explains that module's
    output, captured by a forward hook. Returns the raw ReLU map (not L1-normalised): the metrics
    normalise, and raw maps keep the scale visible for figures.
    """

    mode: Literal[MODES] = "elementwise"
    layer: str | None = None

    def explain(self, net, images, targets):
        if self.layer is None:
            return gradcam(net, images, targets, self.mode, normalize=False)[1]
        module = submodule(net, self.layer)
        captured: list[Tensor] = []

        def capture(_module, _inputs, output):
            captured.append(output)
            # Later in-place ops (ReLU(inplace=True) after a conv) would overwrite the captured
            # activations; the rest of the network runs on a copy instead.
            return output.clone()

        handle = module.register_forward_hook(capture)
        try:
            # The input requires grad so the activations do even when the weights are frozen.
            logits = net(input_leaf(images))
        finally:
            handle.remove()
        self._require_one_map([output.shape for output in captured])
        scores = logits.gather(1, targets.view(-1, 1)).squeeze(1)
        return gradcam_from_activations(captured[0], scores, self.mode, normalize=False)

    def check_layer(self, net):
        if self.layer is not None:
            self._require_one_map(layer_output_shapes(net, self.layer))

    def _require_one_map(self, shapes: list) -> None:
        """``shapes``: the layer's outputs in one forward pass."""
        if len(shapes) != 1 or len(shapes[0]) != 4:
            raise ValueError(
                f"Grad-CAM layer {self.layer!r} must run once per forward pass and output "
                f"[B, C, h, w]; it ran {len(shapes)} time(s)"
                + (f" with output shape {tuple(shapes[0])}" if shapes else "")
            )
