"""Networks split at the explained layer, the differentiable Grad-CAM, the training objectives and
the LightningModule (:mod:`gcmodels.module`), and the config schema (:mod:`gcmodels.config`)."""
