"""How the evaluation metrics are computed: one frozen object for every entry point.

``python -m evaluation`` and the training callbacks and the consensus script take an
:class:`EvaluationSettings`, built by Hydra from ``conf/evaluation/default.yaml`` (its
``_target_``), so a setting is written once and checked once.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BeforeValidator, Field

from datamodules.images import PROTOCOLS, TrialGeometry
from evaluation.attacks import SPACES
from evaluation.metrics.classes import ZERO_MAPS
from evaluation.metrics.functional import PERTURBATION_SCORES, PRECISIONS, SUBSTRATES
from gcmodels.options import Options, Sequence


def increasing(values: tuple[float, ...]) -> tuple[float, ...]:
    if any(later <= earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(f"must increase strictly, got {list(values)}")
    return values


class EvaluationSettings(Options):
    """Settings of the metrics (the ``evaluation`` config group, its schema).

    ``protocol``: the geometry of the localisation trials (PG, SPG, CH): ``standard`` (the
    validation crop; ``tolerance`` pixels at an image side of ``tolerance_at`` pixels, or in the
    masks' own pixels where it is None) or ``authors`` (the authors' scripts: the image's shorter
    side resized to ``short_side``, or kept where it is None, no crop, maps resized to the
    original image, ``tolerance`` in original pixels; ``tolerance_at`` is not used).
    ``spg_samples`` points per image in each of ``spg_runs`` runs (two at least: their spread is
    reported). ``fgsm_eps``: FGSM eps in 1/255 units, in ``fgsm_space`` (pixel or normalized).
    ``seed``: NQH composites, SPG points and the noise reference maps. ``batch_size``: images per
    evaluation batch and process. ``noise_seeds``: uniform-noise reference maps per trial (their
    scores are averaged). ``zero_maps``: an all-zero map in PG, SPG and CH is left out and counted
    (``skip``) or scored as a uniform map, as the authors' ``+1e-8`` does (``uniform``).

    Faithfulness (docs/metrics.md): insertion and deletion move the pixels in
    ``perturbation_steps`` equal steps onto ``insertion_substrate`` / to ``deletion_substrate``;
    ROAD removes each of ``road_percentages`` by noisy linear imputation with noise ``road_noise``;
    all three read ``faithfulness_score`` of the explained class, and score the maps of
    ``other_images`` other validation images on each image too (0: not). ``mprt_variant``
    randomises the blocks cascading from the logits or one at a time; a step whose maps keep a
    mean rank correlation of at least ``mprt_threshold`` with the original fails the check.
    """

    protocol: Literal[PROTOCOLS]
    short_side: Annotated[int, Field(ge=8)] | None
    tolerance: Annotated[float, Field(gt=0)]
    tolerance_at: Annotated[float, Field(gt=0)] | None
    spg_samples: Annotated[int, Field(ge=1)]
    spg_runs: Annotated[int, Field(ge=2)]
    fgsm_eps: Annotated[Sequence[Annotated[float, Field(ge=0)]], Field(min_length=1)]
    fgsm_space: Literal[SPACES]
    seed: Annotated[int, Field(ge=0)]
    batch_size: Annotated[int, Field(ge=1)]
    noise_seeds: Annotated[int, Field(ge=1)]
    zero_maps: Literal[ZERO_MAPS] = "skip"
    perturbation_steps: Annotated[int, Field(ge=1)] = 28
    insertion_substrate: Literal[SUBSTRATES] = "blur"
    deletion_substrate: Literal[SUBSTRATES] = "zeros"
    faithfulness_score: Literal[PERTURBATION_SCORES] = "probability"
    road_percentages: Annotated[Sequence[Annotated[float, Field(gt=0, lt=100)]], Field(min_length=1),
                                AfterValidator(increasing)] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
    road_noise: Annotated[float, Field(ge=0)] = 0.01
    other_images: Annotated[int, Field(ge=0)] = 5
    mprt_variant: Literal["cascading", "independent"] = "cascading"
    mprt_threshold: Annotated[float, Field(gt=-1, le=1)] = 0.5
    # "32" (a command line's 32 is read as the number): the passes without gradients (faithfulness
    # steps, LIME's perturbations) may run in bf16-mixed; every gradient stays in float32.
    precision: Annotated[Literal[PRECISIONS], BeforeValidator(str)] = "32"
    # The networks the scripts load (python -m evaluation, the committee's members) in NHWC: faster
    # convolutions on GPUs (and mostly on CPUs), the same numbers up to float rounding.
    channels_last: bool = False

    @property
    def trial_geometry(self) -> TrialGeometry:
        """How the datamodules size the localisation trials under this protocol."""
        return TrialGeometry(self.protocol, None, self.short_side if self.protocol == "authors" else None)

    @property
    def scoring_tolerance_at(self) -> float | None:
        """The image side the tolerance refers to when scored: None (original pixels) under the
        authors' protocol."""
        return None if self.protocol == "authors" else self.tolerance_at

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format of the networks the scripts load (``channels_last``)."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def arithmetic(self) -> dict:
        """The settings that change the networks' numbers by rounding alone (``precision``,
        ``channels_last``), where they are not the default: part of a consensus store's key, so
        that a store of default runs keeps its key."""
        return {key: getattr(self, key) for key in ("precision", "channels_last")
                if getattr(self, key) != type(self).model_fields[key].default}

    def to_dict(self) -> dict:
        return self.model_dump()


def default_settings(*, seed: int, batch_size: int, **overrides) -> EvaluationSettings:
    """The settings of ``conf/evaluation/default.yaml`` outside Hydra (tests, benchmarks): ``seed``
    and ``batch_size`` come from the run's own config there, so the caller gives them."""
    from gcmodels.config import compose_group, options_of

    return EvaluationSettings(**options_of(compose_group("evaluation", "default", seed=seed, batch_size=batch_size,
                                                         **overrides)))
