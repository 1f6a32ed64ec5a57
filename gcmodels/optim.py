"""The optimizers (``optimizer=``) and learning-rate schedules (``scheduler=``) a run may use, with
their options: the torch classes' arguments that a config may set, typed and ranged."""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, field_validator

from gcmodels.options import Options, Registry, Sequence

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


class SGDOptions(Options):
    lr: Positive
    momentum: NonNegative = 0.0
    dampening: NonNegative = 0.0
    weight_decay: NonNegative = 0.0
    nesterov: bool = False


class AdamWOptions(Options):
    lr: Positive
    betas: Annotated[Sequence[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = (0.9, 0.999)
    eps: Positive = 1e-8
    weight_decay: NonNegative = 1e-2
    amsgrad: bool = False


OPTIMIZERS.register("sgd", SGDOptions)(torch.optim.SGD)
OPTIMIZERS.register("adamw", AdamWOptions)(torch.optim.AdamW)


class StepOptions(Options):
    step_size: Annotated[int, Field(ge=1)]
    gamma: Positive


class MultiStepOptions(Options):
    milestones: Annotated[Sequence[Annotated[int, Field(ge=1)]], Field(min_length=1)]
    gamma: Positive

    @field_validator("milestones")
    @classmethod
    def increasing(cls, milestones: tuple[int, ...]) -> tuple[int, ...]:
        if list(milestones) != sorted(set(milestones)):
            raise ValueError("epochs must increase")
        return milestones


class CosineOptions(Options):
    """Decays over ``trainer.max_epochs`` (``T_max``), which the module passes."""

    eta_min: NonNegative


class NoScheduleOptions(Options):
    pass


SCHEDULERS.register("step", StepOptions)(torch.optim.lr_scheduler.StepLR)
SCHEDULERS.register("multistep", MultiStepOptions)(torch.optim.lr_scheduler.MultiStepLR)
SCHEDULERS.register("cosine", CosineOptions)(torch.optim.lr_scheduler.CosineAnnealingLR)
SCHEDULERS.register("none", NoScheduleOptions)(None)


def build_optimizers(parameters, optimizer: dict, scheduler: dict, max_epochs: int | None):
    """What ``configure_optimizers`` returns for the ``optimizer`` and ``scheduler`` groups; the
    cosine schedule spans ``max_epochs`` (trainer.max_epochs, >= 1: the train preflight checks it)."""
    options = {key: value for key, value in optimizer.items() if key != "name"}
    built = OPTIMIZERS[optimizer["name"]].build(parameters, **options)
    if scheduler["name"] == "none":
        return built
    options = {key: value for key, value in scheduler.items() if key != "name"}
    if scheduler["name"] == "cosine":
        options["T_max"] = max_epochs
    schedule = SCHEDULERS[scheduler["name"]].build(built, **options)
    return {"optimizer": built, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
