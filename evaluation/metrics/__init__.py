"""Explanation-quality metrics: pure functions in ``functional``, torchmetrics classes here."""
from evaluation.metrics import functional
from evaluation.metrics.classes import (
    ContentHeatmap,
    FGSMRobustness,
    NegativeQuadrantsHeatmap,
    PointingGame,
    StochasticPointingGame,
)

__all__ = [
    "ContentHeatmap",
    "FGSMRobustness",
    "NegativeQuadrantsHeatmap",
    "PointingGame",
    "StochasticPointingGame",
    "functional",
]
