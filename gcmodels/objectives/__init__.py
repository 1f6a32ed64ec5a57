"""The training objectives by config name (``loss=<name>``): each module registers its own in
:data:`OBJECTIVES`, with its options, and keeps the glue between the module and the tensor maths
of its loss in :mod:`losses`."""
from .base import OBJECTIVES, Objective, TrainingStep
from .cgc import CGCObjective, cgc_objective
from .gc import ClassificationObjective, GCObjective, ObjectiveOutput, gc_objective
from .guidance import GuidanceObjective, guidance_objective

__all__ = ["OBJECTIVES", "CGCObjective", "ClassificationObjective", "GCObjective", "Objective", "ObjectiveOutput",
           "GuidanceObjective", "TrainingStep", "cgc_objective", "gc_objective", "guidance_objective"]
