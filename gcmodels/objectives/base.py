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
    """A training objective, built from its options (the ``loss`` group less ``name``).

    - ``title`` names its models in tables and pictures;
    - ``second_order``: whether its loss differentiates an explanation taken with
      ``create_graph=True``, so that the step's one ``backward()`` is a second-order backward;
    - :meth:`batch_keys`: what each training batch must carry, which :meth:`setup` asks the
      datamodule for; :meth:`check_batch` refuses a batch without it."""

    title: ClassVar[str]
    second_order: ClassVar[bool] = True

    def __init__(self, **options: Any):
        self.options = options

    def setup(self, datamodule, seed: int) -> None:
        """What the objective needs from the data before training (nothing by default); ``seed``
        is the run's."""

    def batch_keys(self) -> tuple[str, ...]:
        return ("image", "target")

    def check_batch(self, name: str, batch: dict) -> None:
        """Refuse a training batch without :meth:`batch_keys` (``name``: the ``loss.name``)."""
        missing = [key for key in self.batch_keys() if key not in batch]
        if missing:
            raise ValueError(f"loss={name} needs {missing} in each training batch, which this one lacks: the "
                             "objective's setup(datamodule, seed) asks the datamodule for them (train.py calls it)")

    def check_data(self, datamodule, model: dict, world_size: int) -> None:
        """Refuse data and a network it cannot train on (a :class:`ConfigError`), before any data
        is read; ``datamodule.batch_size`` is each process's batch."""

    def step(self, module, batch: dict) -> TrainingStep:
        """One training step of ``module`` (the :class:`gcmodels.module.GCClassifier`) on a
        non-empty ``batch``."""
        raise NotImplementedError


