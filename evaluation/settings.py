"""How the evaluation metrics are computed: one frozen object for every entry point.

``python -m evaluation`` and the training callbacks and the consensus script take an
:class:`EvaluationSettings`, built by Hydra from ``conf/evaluation/default.yaml`` (its
``_target_``), so a setting is written once and checked once.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from datamodules.base import is_integer, is_number
from datamodules.images import PROTOCOLS, TrialGeometry
from evaluation.attacks import SPACES
from evaluation.metrics.classes import ZERO_MAPS

CONFIG_FILE = Path(__file__).resolve().parents[1] / "conf" / "evaluation" / "default.yaml"


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """Settings of the metrics; each is checked on construction, errors name ``evaluation.<key>``.

    ``protocol``: the geometry of the localisation trials (PG, SPG, CH): ``standard`` (the
    validation crop; ``tolerance`` pixels at an image side of ``tolerance_at`` pixels, or in the
    masks' own pixels where it is None) or ``authors`` (the authors' scripts: the image's shorter
    side resized to ``short_side``, or kept where it is None, no crop, maps resized to the
    original image, ``tolerance`` in original pixels; ``tolerance_at`` is not used). ``spg_samples`` points per image in each of ``spg_runs`` runs.
    ``fgsm_eps``: FGSM eps in 1/255 units, in ``fgsm_space`` (pixel or normalized). ``seed``: NQH composites, SPG points and the noise
    reference maps. ``batch_size``: images per evaluation batch and process. ``noise_seeds``:
    uniform-noise reference maps per trial (their scores are averaged). ``zero_maps``: an all-zero
    map in PG, SPG and CH is left out and counted (``skip``) or scored as a uniform map, as the
    authors' ``+1e-8`` does (``uniform``).
    """

    protocol: str
    short_side: int | None
    tolerance: float
    tolerance_at: float | None
    spg_samples: int
    spg_runs: int
    fgsm_eps: tuple[float, ...]
    fgsm_space: str
    seed: int
    batch_size: int
    noise_seeds: int
    zero_maps: str = "skip"

    def __post_init__(self) -> None:
        problems = []
        if self.protocol not in PROTOCOLS:
            problems.append(f"evaluation.protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        if self.short_side is not None and not (is_integer(self.short_side) and self.short_side >= 8):
            problems.append(f"evaluation.short_side must be an integer >= 8 or null, got {self.short_side!r}")
        if not (is_number(self.tolerance) and self.tolerance > 0):
            problems.append(f"evaluation.tolerance must be a number > 0, got {self.tolerance!r}")
        if self.tolerance_at is not None and not (is_number(self.tolerance_at) and self.tolerance_at > 0):
            problems.append(f"evaluation.tolerance_at must be a number > 0 or null, got {self.tolerance_at!r}")
        for key, minimum in (("spg_samples", 1), ("spg_runs", 2), ("batch_size", 1), ("seed", 0), ("noise_seeds", 1)):
            value = getattr(self, key)
            if not (is_integer(value) and value >= minimum):
                problems.append(f"evaluation.{key} must be an integer >= {minimum}, got {value!r}")
        eps = self.fgsm_eps
        if isinstance(eps, (str, bytes)) or not isinstance(eps, Sequence) or not eps or \
                not all(is_number(e) and e >= 0 for e in eps):
            problems.append(f"evaluation.fgsm_eps must be a non-empty list of numbers >= 0 (1/255 units), got {eps!r}")
        if self.fgsm_space not in SPACES:
            problems.append(f"evaluation.fgsm_space must be one of {list(SPACES)}, got {self.fgsm_space!r}")
        if self.zero_maps not in ZERO_MAPS:
            problems.append(f"evaluation.zero_maps must be one of {list(ZERO_MAPS)}, got {self.zero_maps!r}")
        if problems:
            raise ValueError("; ".join(problems))
        # Hydra hands over a ListConfig; a tuple keeps the settings frozen and hashable.
        object.__setattr__(self, "fgsm_eps", tuple(float(e) for e in eps))

    @property
    def trial_geometry(self) -> TrialGeometry:
        """How the datamodules size the localisation trials under this protocol."""
        return TrialGeometry(self.protocol, None, self.short_side if self.protocol == "authors" else None)

    @property
    def scoring_tolerance_at(self) -> float | None:
        """The image side the tolerance refers to when scored: None (original pixels) under the
        authors' protocol."""
        return None if self.protocol == "authors" else self.tolerance_at

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_settings(*, seed: int, batch_size: int, **overrides) -> EvaluationSettings:
    """The settings of ``conf/evaluation/default.yaml`` outside Hydra (tests, benchmarks): ``seed``
    and ``batch_size`` come from the run's own config there, so the caller gives them."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.load(CONFIG_FILE)
    config.merge_with({"seed": seed, "batch_size": batch_size, **overrides})
    return instantiate(config)
