"""Explanation-quality metrics as torchmetrics ``Metric``s (paper section 4.3), as fractions in
[0, 1] (torchmetrics' convention; reports print percent).

Every state is a sum (``dist_reduce_fx="sum"``), so under DDP each process scores its own images
and ``compute()`` adds the counts over processes. Heatmaps ``[B, h, w]`` may be smaller than the
masks: they are upsampled bilinearly to the mask size before scoring. Images that cannot be
scored (all-zero heatmap, empty mask) are skipped; ``compute()`` reports how many as "skipped".
PG, SPG and CH take ``zero_maps="uniform"`` to score an all-zero heatmap as a constant map instead,
as the authors' scripts do (:func:`functional.uniform_where_zero`), and then report how many they
scored so as "uniform". Results are float64 tensors (counts included), ready for ``log_dict``.

Pointing-game tolerance: ``tolerance`` pixels at an image side of ``tolerance_at`` pixels (the
papers: 15 px at 224 px); each update scales it to its masks, ``tolerance * min(H, W) /
tolerance_at``, so small images are not scored leniently. ``tolerance_at=None`` takes
``tolerance`` in the masks' own pixels.

Options (tolerance, SPG points and runs, ``zero_maps``, FGSM eps and space) are taken as given:
``from_settings`` builds each metric from :class:`evaluation.settings.EvaluationSettings`, whose
schema checks them. The updates check their tensors.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric, MetricCollection

from evaluation.attacks import fgsm_attacks
from evaluation.metrics import functional
from evaluation.metrics.registry import Score, register_metric
from gcmodels.accuracy import PER_CLASS_F1_NAME, accuracy_metric, accuracy_name, per_class_f1_metric


def _count() -> torch.Tensor:
    return torch.tensor(0, dtype=torch.long)


def _fraction(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """part / whole in float64; NaN when nothing was scored."""
    return part.double() / whole.double()


def _scaled_tolerance(tolerance: float, tolerance_at: float | None, masks: torch.Tensor) -> float:
    if tolerance_at is None:
        return tolerance
    return tolerance * min(masks.shape[-2:]) / tolerance_at


# What the localisation metrics do with an all-zero heatmap: leave it out and count it, or score it
# as a constant map, as the authors' ``+1e-8`` does (``evaluation.zero_maps``, whose schema
# checks it: the metrics take the settings' values as they are).
ZERO_MAPS = ("skip", "uniform")


class _ZeroMaps:
    """The ``zero_maps`` option of the localisation metrics (a mixin of ``Metric``s)."""

    def _init_zero_maps(self, zero_maps: str) -> None:
        self.zero_maps = zero_maps
        if zero_maps == "uniform":
            self.add_state("uniform", _count(), dist_reduce_fx="sum")

    def _maps_to_score(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The heatmaps at the masks' size, all-zero ones made constant under ``uniform``, and
        which those were (None under ``skip``)."""
        heatmaps = functional.upsample(heatmaps, masks.shape[-2:])
        if self.zero_maps == "skip":
            return heatmaps, None
        return functional.uniform_where_zero(heatmaps)

    def _count_uniform(self, zero: torch.Tensor | None, scored: torch.Tensor) -> None:
        """Counts the constant maps that were scored: one with an empty mask is skipped all the same."""
        if zero is not None:
            self.uniform += (zero & scored).sum()

    def _with_uniform(self, results: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**results, "uniform": self.uniform.double()} if self.zero_maps == "uniform" else results


def _eps_key(eps: float) -> str:
    return f"eps={eps:g}"


@register_metric("acc")
class Accuracy:
    """The headline score: top-1 accuracy (``acc``), or on multi-label data micro F1 (``f1``) and
    macro F1 (``f1_per_class``), the COCO papers' F1-Overall and F1-PerClass; the module's own
    validation metrics (``gcmodels.module``), as one ``MetricCollection``."""

    family = "accuracy"
    scores = {"acc": Score(True, "Top-1"), "f1": Score(True, "F1 overall"),
              PER_CLASS_F1_NAME: Score(True, "F1 per class")}

    @staticmethod
    def from_settings(settings, num_classes: int, multilabel: bool) -> MetricCollection:
        metrics = {accuracy_name(multilabel): accuracy_metric(num_classes, multilabel)}
        if multilabel:
            metrics[PER_CLASS_F1_NAME] = per_class_f1_metric(num_classes)
        # compute_groups=False: micro and macro F1 keep states of their own.
        return MetricCollection(metrics, compute_groups=False)

    @staticmethod
    def logged_scores(settings, multilabel: bool) -> list[str]:
        return [accuracy_name(multilabel)] + ([PER_CLASS_F1_NAME] if multilabel else [])


class _MeanScore(Metric):
    """Mean of per-image scores in [0, 1]; NaN scores are skipped and counted."""

    is_differentiable = False
    full_state_update = False
    score_name: str

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scored", _count(), dist_reduce_fx="sum")
        self.add_state("skipped", _count(), dist_reduce_fx="sum")

    def _add_scores(self, scores: torch.Tensor) -> None:
        valid = ~scores.isnan()
        self.score_sum += scores[valid].sum(dtype=torch.float64)
        self.scored += valid.sum()
        self.skipped += (~valid).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        return {self.score_name: _fraction(self.score_sum, self.scored), "skipped": self.skipped.double()}


def _class_mean(hits: torch.Tensor, trials: torch.Tensor) -> torch.Tensor:
    """The mean over the classes that had trials of each class's hits / trials."""
    tried = trials > 0
    return _fraction(hits[tried], trials[tried]).mean()


@register_metric("pg")
class PointingGame(_ZeroMaps, _MeanScore):
    """Pointing game: hit iff the heatmap's maximum lies within the tolerance of the mask (see the
    module docstring for ``tolerance``, ``tolerance_at`` and ``zero_maps``).

    ``update(heatmaps, masks, classes=None)``. Without ``num_classes``, ``compute()`` gives
    ``{"pg": hits / trials, "skipped"}``. With ``num_classes`` every update needs ``classes``
    (long ``[B]``: the class each heatmap explains; on COCO each (image, class) pair is one
    trial) and "pg" is the mean of the per-class accuracies over the classes that had trials
    (TorchRay's COCO convention), with the pooled hits / trials as "pg_micro". ``difficult``
    (bool ``[B]``, with ``classes``): the trials of a difficult subset (TorchRay's VOC 2007
    benchmark), whose per-class mean is "pg_difficult" where any trial was difficult.
    """

    higher_is_better = True
    score_name = "pg"
    family = "localization"
    scores = {"pg": Score(True, "PG"), "pg_micro": Score(True), "pg_difficult": Score(True, "PG (difficult)")}
    # What an update takes besides maps and masks; and whether it scores only the trials that
    # point (the authors' difficult-only ImageNet images count in CH alone).
    trial_inputs = ("classes", "difficult")
    pointing_only = True

    @classmethod
    def logged_scores(cls, settings, multilabel: bool) -> list[str]:
        # Not "pg_difficult": only data with a difficult subset (VOC 2007) logs it, so no
        # checkpoint monitor may name it.
        return [cls.score_name, f"{cls.score_name}_micro"]

    @classmethod
    def from_settings(cls, settings, num_classes: int, multilabel: bool) -> PointingGame:
        return cls(tolerance=settings.tolerance, tolerance_at=settings.scoring_tolerance_at, num_classes=num_classes,
                   zero_maps=settings.zero_maps)

    def __init__(self, *, tolerance: float, tolerance_at: float | None, num_classes: int | None = None,
                 zero_maps: str = "skip", **kwargs):
        super().__init__(**kwargs)
        self._init_zero_maps(zero_maps)
        self.tolerance = tolerance
        self.tolerance_at = tolerance_at
        self.num_classes = num_classes
        if num_classes is not None:
            for state in ("class_hits", "class_trials", "difficult_hits", "difficult_trials"):
                self.add_state(state, torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor | None = None,
               difficult: torch.Tensor | None = None) -> None:
        if (classes is None) != (self.num_classes is None):
            raise ValueError("PointingGame: pass classes to update() if and only if num_classes was given")
        if classes is not None:
            # Before any state changes: a refused update leaves the metric as it was.
            functional._check_per_image(heatmaps, "classes", classes, 0, self.num_classes - 1)
        tolerance = _scaled_tolerance(self.tolerance, self.tolerance_at, masks)
        heatmaps, zero = self._maps_to_score(heatmaps, masks)
        hits, valid = functional.pointing_hits(heatmaps, masks, tolerance)
        self._add_scores(hits.double().masked_fill(~valid, math.nan))
        self._count_uniform(zero, valid)
        if classes is None:
            return
        self.class_trials += torch.bincount(classes[valid], minlength=self.num_classes)
        self.class_hits += torch.bincount(classes[hits], minlength=self.num_classes)
        if difficult is not None:
            self.difficult_trials += torch.bincount(classes[valid & difficult], minlength=self.num_classes)
            self.difficult_hits += torch.bincount(classes[hits & difficult], minlength=self.num_classes)

    def compute(self) -> dict[str, torch.Tensor]:
        pooled = self._with_uniform(super().compute())
        if self.num_classes is None:
            return pooled
        results = {self.score_name: _class_mean(self.class_hits, self.class_trials),
                   f"{self.score_name}_micro": pooled.pop(self.score_name), **pooled}
        if self.difficult_trials.any():
            results[f"{self.score_name}_difficult"] = _class_mean(self.difficult_hits, self.difficult_trials)
        return results


@register_metric("spg")
class StochasticPointingGame(_ZeroMaps, Metric):
    """Stochastic pointing game: ``num_samples`` points drawn from the normalised heatmap, each
    scored like PG; per-image score = hit fraction. ``update(heatmaps, masks, seeds)``.

    ``seeds`` (non-negative integers ``[B]`` or ``[B, k]``, one row per trial; the engine gives
    the trial's index in the data set and the map's number) identify the trials: a trial draws its
    ``num_runs`` independent runs from a generator seeded by ``(seed, its row)`` alone
    (``functional.trial_uniforms``), so the result does not depend on how trials are split into
    batches or processes, nor on their order. ``compute()`` -> ``{"spg": mean over runs of the
    run's mean score, "spg_std": sample standard deviation (n - 1) over runs, "skipped"}``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    family = "localization"
    scores = {"spg": Score(True, "SPG")}
    trial_inputs = ("seeds",)
    pointing_only = True

    @classmethod
    def from_settings(cls, settings, num_classes: int, multilabel: bool) -> StochasticPointingGame:
        return cls(tolerance=settings.tolerance, tolerance_at=settings.scoring_tolerance_at,
                   num_samples=settings.spg_samples, num_runs=settings.spg_runs, seed=settings.seed,
                   zero_maps=settings.zero_maps)

    def __init__(self, *, tolerance: float, tolerance_at: float | None, num_samples: int, num_runs: int, seed: int,
                 zero_maps: str = "skip", **kwargs):
        super().__init__(**kwargs)
        self._init_zero_maps(zero_maps)
        self.tolerance = tolerance
        self.tolerance_at = tolerance_at
        self.num_samples = num_samples
        self.num_runs = num_runs
        self.seed = seed
        self.add_state("run_sums", torch.zeros(num_runs, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scored", _count(), dist_reduce_fx="sum")
        self.add_state("skipped", _count(), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor, seeds: torch.Tensor) -> None:
        functional._check_seeds(heatmaps, seeds)
        heatmaps, zero = self._maps_to_score(heatmaps, masks)
        scores = functional._stochastic_scores(
            heatmaps, masks, self.num_samples, self.num_runs,
            _scaled_tolerance(self.tolerance, self.tolerance_at, masks), None, functional.trial_seeds(self.seed, seeds)
        )
        valid = ~scores[:, 0].isnan()
        self.run_sums += scores[valid].sum(0, dtype=torch.float64)
        self.scored += valid.sum()
        self.skipped += (~valid).sum()
        self._count_uniform(zero, valid)

    def compute(self) -> dict[str, torch.Tensor]:
        run_means = _fraction(self.run_sums, self.scored)
        return self._with_uniform({"spg": run_means.mean(), "spg_std": run_means.std(),
                                   "skipped": self.skipped.double()})


@register_metric("ch")
class ContentHeatmap(_ZeroMaps, _MeanScore):
    """Content heatmap: share of heatmap mass on mask pixels. ``update(heatmaps, masks)``;
    ``compute()`` -> ``{"ch", "skipped"}`` (and "uniform" under ``zero_maps="uniform"``)."""

    higher_is_better = True
    score_name = "ch"
    family = "localization"
    scores = {"ch": Score(True, "CH")}
    trial_inputs = ()
    pointing_only = False

    @classmethod
    def from_settings(cls, settings, num_classes: int, multilabel: bool) -> ContentHeatmap:
        return cls(zero_maps=settings.zero_maps)

    def __init__(self, *, zero_maps: str = "skip", **kwargs):
        super().__init__(**kwargs)
        self._init_zero_maps(zero_maps)

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        heatmaps, zero = self._maps_to_score(heatmaps, masks)
        scores = functional.content_heatmap(heatmaps, masks)
        self._add_scores(scores)
        self._count_uniform(zero, ~scores.isnan())

    def compute(self) -> dict[str, torch.Tensor]:
        return self._with_uniform(super().compute())


@register_metric("nqh")
class NegativeQuadrantsHeatmap(_MeanScore):
    """Negative quadrants heatmap: share of a 2x2 composite's heatmap mass in the three cells
    other than the positive image's. ``update(heatmaps, positive_cell)`` with heatmaps of any size
    (the share does not depend on it); ``count_without_composite(n)`` records images that could not
    get a composite (no image lacks their class). ``compute()`` -> ``{"nqh", "skipped",
    "skipped/nqh_without_composite"}``. Lower is better."""

    higher_is_better = False
    score_name = "nqh"
    family = "composites"
    scores = {"nqh": Score(False, "NQH")}

    @classmethod
    def from_settings(cls, settings, num_classes: int, multilabel: bool) -> NegativeQuadrantsHeatmap:
        return cls()

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("without_composite", _count(), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, positive_cell: torch.Tensor) -> None:
        self._add_scores(functional.negative_quadrants_heatmap(heatmaps, positive_cell))

    def count_without_composite(self, count: int) -> None:
        self.without_composite += count

    def compute(self) -> dict[str, torch.Tensor]:
        return {**super().compute(), "skipped/nqh_without_composite": self.without_composite.double()}


@register_metric("fgsm")
class FGSMRobustness(Metric):
    """Top-1 accuracy under FGSM for each ``eps`` in ``eps_list`` (units of 1/255) in ``space``
    (:mod:`evaluation.attacks`), and the attack's success rate: among the images classified
    correctly on the clean input, the share misclassified under attack.

    ``update(net, images, targets)``: images in pixel space [0, 1], targets class indices ``[B]``;
    put ``net`` in eval mode. Defined for single-label top-1 only: multi-hot targets raise.
    ``compute()`` -> ``{"fgsm/eps=1": top-1 under attack, "fgsm/eps=2": ..., ...,
    "fgsm_success/eps=1": success rate, ..., "fgsm_clean": clean top-1}``; the success rate is NaN
    where no image was correct.

    Its values improve in opposite directions, which torchmetrics' one ``higher_is_better`` cannot
    say: top-1 (under attack or clean) is better higher, the success rate lower (``scores``)."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    family = "robustness"
    scores = {"fgsm": Score(True), "fgsm_success": Score(False), "fgsm_clean": Score(True)}
    # Top-1 under attack: multi-label data has no top-1.
    single_label_only = True

    @classmethod
    def from_settings(cls, settings, num_classes: int, multilabel: bool) -> FGSMRobustness:
        return cls(settings.fgsm_eps, settings.fgsm_space)

    @staticmethod
    def logged_scores(settings, multilabel: bool) -> list[str]:
        keys = [_eps_key(eps) for eps in settings.fgsm_eps]
        return [f"fgsm/{key}" for key in keys] + [f"fgsm_success/{key}" for key in keys] + ["fgsm_clean"]

    def __init__(self, eps_list: Sequence[float], space: str, **kwargs):
        super().__init__(**kwargs)
        self.eps_list = tuple(eps_list)
        self.space = space
        self.add_state("correct", torch.zeros(len(self.eps_list), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", _count(), dist_reduce_fx="sum")
        self.add_state("clean_correct", _count(), dist_reduce_fx="sum")
        # Per eps: correct on the clean input, wrong under attack.
        self.add_state("broken", torch.zeros(len(self.eps_list), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> None:
        if targets.dim() != 1 or targets.is_floating_point():
            raise ValueError(
                "FGSM robustness is defined here for single-label top-1 accuracy: targets must be class "
                f"indices [B], got {targets.dtype} {tuple(targets.shape)} (multi-label targets?)"
            )
        with torch.no_grad():
            clean = net(images).argmax(1) == targets
        attacks = fgsm_attacks(net, images, targets, self.eps_list, space=self.space)
        for index, adversarial in enumerate(attacks):
            with torch.no_grad():
                attacked = net(adversarial).argmax(1) == targets
            self.correct[index] += attacked.sum()
            self.broken[index] += (clean & ~attacked).sum()
        self.clean_correct += clean.sum()
        self.total += targets.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        keys = [_eps_key(eps) for eps in self.eps_list]
        return {**{f"fgsm/{key}": _fraction(correct, self.total) for key, correct in zip(keys, self.correct)},
                **{f"fgsm_success/{key}": _fraction(broken, self.clean_correct)
                   for key, broken in zip(keys, self.broken)},
                "fgsm_clean": _fraction(self.clean_correct, self.total)}
