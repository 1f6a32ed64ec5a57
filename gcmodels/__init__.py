"""Networks split at the explained layer, the differentiable Grad-CAM and the LightningModule."""
from gcmodels.gradcam import gradcam, gradcam_from_activations
from gcmodels.module import GCClassifier
from gcmodels.networks import ARCHITECTURES, ExplainableNet, build_network
from gcmodels.objective import gc_objective

__all__ = [
    "ARCHITECTURES",
    "ExplainableNet",
    "GCClassifier",
    "build_network",
    "gc_objective",
    "gradcam",
    "gradcam_from_activations",
]
