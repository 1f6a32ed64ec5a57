"""Faithfulness metrics as torchmetrics ``Metric``s: insertion and deletion AUC, ROAD and the
model-parameter randomisation test (the functions: :mod:`evaluation.metrics.functional`).

Insertion, deletion and ROAD take, beside each image's own map, the maps of ``K`` other
validation images (the other-image baseline: a generic map, a centred blob, scores as well on
another image's pixels as on its own); ``compute()`` gives ``<name>`` (own maps),
``<name>_others`` (the others' maps on the same images) and ``<name>_minus_others``, the part of
the score owed to the map being this image's. Every state is a sum or a list of rows (DDP adds
or gathers them); results are float64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from evaluation.metrics import functional
from evaluation.metrics.registry import Score, register_metric


def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64)


# The most parameter blocks (randomisation steps) the randomisation metric keeps sums for.
MAX_BLOCKS = 256


def fraction_key(fraction: float) -> str:
    return f"{fraction:.4f}"


def percent_key(percentage: float) -> str:
    return f"p={percentage:g}"


class _OtherImageBaseline(Metric):
    """What every perturbation metric shares: sums over the images of its curves and of its
    per-image headline values (areas), for their own maps and for the others' maps. Subclasses
    define ``_score(net, images, maps, classes, seeds) -> (curves [B, P], values [B, A])`` and
    ``headlines`` (the A names) and ``_curve_keys`` (the P names)."""

    is_differentiable = False
    full_state_update = False
    family = "faithfulness"
    headlines: tuple[str, ...]

    def __init__(self, points: int, *, multilabel: bool, score: str, batch_size: int, precision: str = "32",
                 **kwargs):
        super().__init__(**kwargs)
        self.multilabel = multilabel
        self.score = score
        self.batch_size = batch_size
        self.precision = precision  # of the forward passes (functional.forward_precision)
        for prefix in ("", "others_"):
            self.add_state(f"{prefix}curve_sum", _zeros(points), dist_reduce_fx="sum")
            self.add_state(f"{prefix}value_sum", _zeros(len(self.headlines)), dist_reduce_fx="sum")
            self.add_state(f"{prefix}scored", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, net: torch.nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
               seeds: torch.Tensor, other_heatmaps: torch.Tensor | None = None) -> None:
        """``heatmaps`` ``[B, H, W]`` at the images' size; ``other_heatmaps`` ``[B, K, H, W]``: the
        maps of ``K`` other images, scored on these images with their classes and seeds (the tie
        order is the trial's, so a map equal to the image's own scores exactly as it does: such
        maps are not sent through the network again)."""
        if other_heatmaps is not None and (other_heatmaps.dim() != 4 or other_heatmaps.shape[0] != len(heatmaps)
                                           or other_heatmaps.shape[2:] != heatmaps.shape[1:]):
            raise ValueError(f"other_heatmaps must be [B, K, H, W] with the heatmaps' B, H, W {tuple(heatmaps.shape)}, "
                             f"got {tuple(other_heatmaps.shape)}")
        curves, values = self._score(net, images, heatmaps, classes, seeds)
        self.curve_sum += curves.sum(0, dtype=torch.float64)
        self.value_sum += values.sum(0, dtype=torch.float64)
        self.scored += len(curves)
        if other_heatmaps is None:
            return
        count = other_heatmaps.shape[1]
        same = (other_heatmaps == heatmaps.unsqueeze(1)).flatten(2).all(2)  # [B, K]
        other_curves = curves.unsqueeze(1).repeat(1, count, 1)
        other_values = values.unsqueeze(1).repeat(1, count, 1)
        pending = (~same).nonzero()
        if len(pending):
            image, other = pending[:, 0], pending[:, 1]
            other_curves[image, other], other_values[image, other] = self._score(
                net, images[image], other_heatmaps[image, other], classes[image], seeds[image])
        # An image whose others are all its own map keeps its own values exactly (a mean of K
        # copies can round), so that a map shared by every image scores 0 beyond the others.
        shared = same.all(1, keepdim=True)
        self.others_curve_sum += torch.where(shared, curves, other_curves.mean(1)).sum(0, dtype=torch.float64)
        self.others_value_sum += torch.where(shared, values, other_values.mean(1)).sum(0, dtype=torch.float64)
        self.others_scored += len(other_curves)

    @classmethod
    def logged_scores(cls, settings, multilabel: bool) -> list[str]:
        """Each headline and its excess over the others (the others' own score ranks nothing)."""
        return [name for headline in cls.headlines for name in (headline, f"{headline}_minus_others")]

    def _score(self, net, images, heatmaps, classes, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _curve_keys(self) -> list[str]:
        raise NotImplementedError

    def compute(self) -> dict[str, torch.Tensor]:
        own = dict(zip(self.headlines, self.value_sum / self.scored))
        results = dict(own)
        if self.others_scored > 0:
            for name, value in zip(self.headlines, self.others_value_sum / self.others_scored):
                results[f"{name}_others"] = value
                results[f"{name}_minus_others"] = own[name] - value
        results.update(zip(self._curve_keys(), self.curve_sum / self.scored))
        return results


class _PerturbationAUC(_OtherImageBaseline):
    """Insertion or deletion: ``compute()`` -> ``{name: mean AUC, name_others, name_minus_others,
    "<name>_curve/<k / steps>": the mean curve}``."""

    insertion: bool

    @classmethod
    def from_settings(cls, settings, num_classes: int, multilabel: bool):
        substrate = settings.insertion_substrate if cls.insertion else settings.deletion_substrate
        return cls(steps=settings.perturbation_steps, substrate_name=substrate, score=settings.faithfulness_score,
                   multilabel=multilabel, batch_size=settings.batch_size, precision=settings.precision)

    def __init__(self, *, steps: int, substrate_name: str, score: str, multilabel: bool, batch_size: int, **kwargs):
        super().__init__(steps + 1, multilabel=multilabel, score=score, batch_size=batch_size, **kwargs)
        self.steps = steps
        self.substrate_name = substrate_name

    def _score(self, net, images, heatmaps, classes, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        fractions, curves = functional.perturbation_curves(
            net, images, heatmaps, classes, seeds, insertion=self.insertion, steps=self.steps,
            substrate_name=self.substrate_name, score=self.score, multilabel=self.multilabel,
            batch_size=self.batch_size, precision=self.precision)
        return curves, functional.curve_area(fractions, curves).unsqueeze(1)

    def _curve_keys(self) -> list[str]:
        # The nominal share moved after step k (the exact one differs by less than a pixel's share).
        return [f"{self.headlines[0]}_curve/{fraction_key(k / self.steps)}" for k in range(self.steps + 1)]


def _baseline_scores(name: str, higher_is_better: bool) -> dict[str, Score]:
    """A faithfulness score, its others' score (ranks nothing) and its excess over them."""
    return {name: Score(higher_is_better), f"{name}_minus_others": Score(higher_is_better)}


@register_metric("insertion")
class InsertionAUC(_PerturbationAUC):
    """Insertion AUC (RISE): the class score as the image's pixels are put back, first-ranked
    first, onto the substrate (``evaluation.insertion_substrate``); higher is better."""

    insertion = True
    headlines = ("insertion",)
    higher_is_better = True
    scores = _baseline_scores("insertion", True)


@register_metric("deletion")
class DeletionAUC(_PerturbationAUC):
    """Deletion AUC (RISE): the class score as the image's pixels are replaced by the substrate
    (``evaluation.deletion_substrate``), first-ranked first; lower is better."""

    insertion = False
    headlines = ("deletion",)
    higher_is_better = False
    scores = _baseline_scores("deletion", False)


@register_metric("road")
class ROAD(_OtherImageBaseline):
    """ROAD (Rong et al., ICML 2022): the class score after removing each percentage of the
    pixels by noisy linear imputation, most relevant first (MoRF: lower is better) and least
    relevant first (LeRF: higher is better). ``compute()`` -> ``{"road_morf", "road_lerf": the mean
    curves' areas over the percentages' span (their mean height), with _others and _minus_others,
    "road_morf_curve/p=10": the mean MoRF curve, ...}``."""

    higher_is_better = None
    headlines = ("road_morf", "road_lerf")
    scores = {**_baseline_scores("road_morf", False), **_baseline_scores("road_lerf", True)}

    @classmethod
    def from_settings(cls, settings, num_classes: int, multilabel: bool) -> ROAD:
        return cls(percentages=settings.road_percentages, noise=settings.road_noise,
                   score=settings.faithfulness_score, multilabel=multilabel, batch_size=settings.batch_size,
                   precision=settings.precision)

    def __init__(self, *, percentages: Sequence[float], noise: float, score: str, multilabel: bool, batch_size: int,
                 **kwargs):
        super().__init__(2 * len(percentages), multilabel=multilabel, score=score, batch_size=batch_size, **kwargs)
        self.percentages = tuple(percentages)
        self.noise = noise

    def _score(self, net, images, heatmaps, classes, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 2P]``: MoRF's points, then LeRF's; ``[B, 2]``: their areas."""
        halves = [functional.road(net, images, heatmaps, classes, seeds, percentages=self.percentages, order=order,
                                  noise=self.noise, score=self.score, multilabel=self.multilabel,
                                  batch_size=self.batch_size, precision=self.precision)
                  for order in functional.ROAD_ORDERS]
        if len(self.percentages) == 1:
            areas = [half[:, 0] for half in halves]
        else:
            fractions = torch.tensor(self.percentages, dtype=torch.float64) / 100
            areas = [functional.curve_area(fractions, half) for half in halves]
        return torch.cat(halves, 1), torch.stack(areas, 1)

    def _curve_keys(self) -> list[str]:
        return [f"road_{order}_curve/{percent_key(p)}" for order in functional.ROAD_ORDERS for p in self.percentages]


@register_metric("mprt")
class ModelParameterRandomisation(Metric):
    """Model-parameter randomisation (Adebayo et al. 2018): the explainer's maps recomputed after
    each step of re-initialising the network's blocks from the logits down (``cascading``, or each
    block alone), compared to the original maps. ``update(net, explainer, images, classes)``.

    ``compute()`` -> ``{"mprt": the mean rank correlation of |map| with the original over the steps
    (lower: the maps depend more on the weights), "mprt_unchanged": how many steps left the mean
    correlation at or above ``threshold`` (0 passes the check), "mprt_spearman_abs/<block>", ... per
    step and similarity, "skipped/mprt": undefined similarities (a constant map)}``."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    family = "randomisation"
    scores = {"mprt": Score(False), "mprt_unchanged": Score(False)}

    @classmethod
    def from_settings(cls, settings, num_classes: int, multilabel: bool) -> ModelParameterRandomisation:
        return cls(cascading=settings.mprt_variant == "cascading", threshold=settings.mprt_threshold,
                   seed=settings.seed)

    def __init__(self, *, cascading: bool, threshold: float, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.cascading = cascading
        self.threshold = threshold
        self.seed = seed
        self.blocks: list[str] | None = None
        # Sums per step, sized for any network here (ResNet50 has 19 blocks): states of one shape
        # on every process, whatever network or images it sees.
        for name in functional.SIMILARITIES:
            self.add_state(f"{name}_sum", _zeros(MAX_BLOCKS), dist_reduce_fx="sum")
            self.add_state(f"{name}_count", torch.zeros(MAX_BLOCKS, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, net: torch.nn.Module, explainer, images: torch.Tensor, classes: torch.Tensor) -> None:
        blocks, similarity = functional.randomisation_similarity(net, explainer, images, classes, seed=self.seed,
                                                                 cascading=self.cascading)
        if len(blocks) > MAX_BLOCKS:
            raise ValueError(f"mprt: the network has {len(blocks)} parameter blocks, more than the {MAX_BLOCKS} it "
                             f"can keep (evaluation.metrics.faithfulness.MAX_BLOCKS)")
        if self.blocks is not None and blocks != self.blocks:
            raise ValueError(f"mprt: one metric scores one network; got blocks {blocks} after {self.blocks}")
        self.blocks = blocks
        for name, values in similarity.items():
            defined = ~values.isnan()
            getattr(self, f"{name}_sum")[:len(blocks)] += values.nan_to_num().sum(0)
            getattr(self, f"{name}_count")[:len(blocks)] += defined.sum(0)

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(math.nan, dtype=torch.float64)
        if self.blocks is None:
            return {"mprt": nan, "mprt_unchanged": nan}
        steps = len(self.blocks)
        means = {name: getattr(self, f"{name}_sum")[:steps] / getattr(self, f"{name}_count")[:steps]
                 for name in functional.SIMILARITIES}
        counts = self.spearman_abs_count[:steps]
        results: dict[str, torch.Tensor] = {
            "mprt": means["spearman_abs"].nanmean(),
            "mprt_unchanged": (means["spearman_abs"] >= self.threshold).sum().double(),
            # Undefined similarities (a constant map), over every step.
            "skipped": (counts.max() - counts).sum().double(),
        }
        for name, mean in means.items():
            results.update({f"mprt_{name}/{block}": value for block, value in zip(self.blocks, mean)})
        return results
