"""Explanation-quality metrics: pure functions in ``functional``, torchmetrics classes in ``classes``
(localisation, FGSM) and ``faithfulness``."""
from evaluation.metrics import functional
from evaluation.metrics.classes import (
    ContentHeatmap,
    FGSMRobustness,
    NegativeQuadrantsHeatmap,
    PointingGame,
    StochasticPointingGame,
)
from evaluation.metrics.faithfulness import ROAD, DeletionAUC, InsertionAUC, ModelParameterRandomisation

__all__ = [
    "ROAD",
    "ContentHeatmap",
    "DeletionAUC",
    "FGSMRobustness",
    "InsertionAUC",
    "ModelParameterRandomisation",
    "NegativeQuadrantsHeatmap",
    "PointingGame",
    "StochasticPointingGame",
    "functional",
]
