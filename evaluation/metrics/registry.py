"""The metrics an evaluation can compute, each registered where it is defined.

A metric is a torchmetrics ``Metric`` registered with :func:`register_metric` under the name a
config's ``metrics: [...]`` uses. It declares what the evaluator, the reports and the checkpoint
monitors need to know, so that none of them lists metrics by hand:

- ``family``: which data it is updated on, and how (:data:`FAMILIES`);
- ``scores``: the values it logs that rank models, by name (a name ``group`` also stands for
  every ``group/<key>`` it logs, e.g. FGSM's ``fgsm/eps=8``), each with its direction and, where
  it has one, its column in Table 1; what it logs besides (counts, spreads) ranks no model;
- ``from_settings(settings, num_classes, multilabel)``: the metric as configured;
- ``logged_scores(settings, multilabel)``: the names of the scores one evaluation logs;
- ``single_label_only``: defined for single-label data only.

``compute()`` returns a tensor (one score under the metric's name) or a dict: key ``skipped`` and
``uniform`` are counts, filed under ``skipped`` and ``zero_maps_uniform`` by the metric's name;
``group/key`` is filed under ``results[group][key]``; any other key is a value of its own.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field

from gcmodels.options import Sequence

# accuracy: updated with the network's logits on validation images; robustness: with the network
# and the validation images (it attacks them); composites: with maps of 2x2 composites and the
# positive cell; localization: with maps of the localisation trials and their masks (and the
# reference maps' too); faithfulness: with the network, validation images, their maps and the
# maps of other images (and the reference maps'); randomisation: with the network, the explainer
# and validation images (it re-explains them under randomised weights).
FAMILIES = ("accuracy", "robustness", "composites", "localization", "faithfulness", "randomisation")
# Families whose maps come from an explainer.
EXPLAINED_FAMILIES = ("composites", "localization", "faithfulness", "randomisation")
# Counts a metric's compute() may return, and the results group that files them by metric name.
COUNT_GROUPS = {"skipped": "skipped", "uniform": "zero_maps_uniform"}


@dataclasses.dataclass(frozen=True)
class Score:
    """A value that ranks models: better higher or lower, and its Table 1 heading (None: the
    value has a table of its own, or none)."""

    higher_is_better: bool
    heading: str | None = None


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    family: str
    scores: dict[str, Score]
    build: Callable[[Any, int, bool], Any]
    logged_scores: Callable[[Any, bool], list[str]]
    single_label_only: bool = False

    @property
    def explained(self) -> bool:
        return self.family in EXPLAINED_FAMILIES

    def score(self, name: str) -> Score | None:
        """The score that logged value ``name`` (``pg``, ``fgsm/eps=8``) is, or None (a count)."""
        return self.scores.get(name.split("/")[0])


METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str):
    """Class decorator: registers the ``Metric`` class (or factory class) under ``name``."""

    def register(cls):
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice: {METRICS[name].build} and {cls.from_settings}")
        if cls.family not in FAMILIES:
            raise ValueError(f"metric {name!r}: family {cls.family!r} is not one of {list(FAMILIES)}")
        logged = getattr(cls, "logged_scores", None) or (lambda settings, multilabel: list(cls.scores))
        METRICS[name] = MetricSpec(name, cls.family, dict(cls.scores), cls.from_settings, logged,
                                   getattr(cls, "single_label_only", False))
        return cls

    return register


def family_members(metrics: Iterable[str], family: str) -> list[str]:
    """The metrics of ``metrics`` in ``family`` (``evaluation.metrics.registry.FAMILIES``)."""
    return [name for name in metrics if METRICS[name].family == family]


def known_metrics(names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid metrics: {list(METRICS)}")
    return names


# A config's list of metric names (``metrics=[pg, spg]``): registered ones, at least one.
MetricNames = Annotated[Sequence[str], Field(min_length=1), AfterValidator(known_metrics)]


def score_of(name: str) -> Score | None:
    """The score a logged value is (``pg``, ``fgsm_success/eps=8``, without a logger prefix), or
    None: a count, a spread or a reference map's score, which rank no model."""
    for spec in METRICS.values():
        score = spec.score(name)
        if score is not None:
            return score
    return None


def table1_columns(names: list[str] | None = None) -> list[tuple[str, str]]:
    """(key, heading) of the Table 1 columns of the metrics ``names`` (None: all), in registration
    order."""
    return [(key, score.heading) for spec in METRICS.values() if names is None or spec.name in names
            for key, score in spec.scores.items() if score.heading]


def column_metric(key: str) -> MetricSpec:
    """The metric whose Table 1 column (or score) is ``key``."""
    return next(spec for spec in METRICS.values() if key in spec.scores)


def results_of(name: str, computed) -> dict:
    """A metric's ``compute()`` as the evaluator's results (see the module docstring)."""
    if torch.is_tensor(computed):
        return {name: float(computed)}
    results: dict = {}
    for key, value in computed.items():
        if key in COUNT_GROUPS:
            results.setdefault(COUNT_GROUPS[key], {})[name] = int(value)
        elif "/" in key:
            group, sub = key.split("/", 1)
            number = int(value) if group in COUNT_GROUPS.values() else float(value)
            results.setdefault(group, {})[sub] = number
        else:
            results[key] = float(value)
    return results
