"""What a training objective (``loss=<name>``) is: it registers itself in :data:`OBJECTIVES` with
its options and gives the module one training step (:class:`Objective`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gcmodels.options import Registry

# The training objectives by config name (``loss=``), with their options.
OBJECTIVES = Registry("loss")


@dataclass
class TrainingStep:
    """One training step of an objective: the ``loss`` to minimise, the ``logits`` (the training
    accuracy), and what the module logs: ``terms``, the loss terms (per step and epoch; checked for
    non-finite values before the optimiser step), ``sums`` (per-epoch totals) and ``means``
    (per-epoch averages)."""

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor]
    sums: dict[str, float] = field(default_factory=dict)
    means: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    """A training objective, built from its options (the ``loss`` group less ``name``); ``title``
    names its models in tables and pictures."""

    title: ClassVar[str]

    def __init__(self, **options: Any):
        self.options = options

    def setup(self, datamodule, seed: int) -> None:
        """What the objective needs from the data before training (nothing by default); ``seed``
        is the run's."""

    def check_data(self, datamodule, model: dict, world_size: int) -> None:
        """Refuse data and a network it cannot train on (a :class:`ConfigError`), before any data
        is read; ``datamodule.batch_size`` is each process's batch."""

    def step(self, module, batch: dict) -> TrainingStep:
        """One training step of ``module`` (the :class:`gcmodels.module.GCClassifier`) on a
        non-empty ``batch``."""
        raise NotImplementedError


