"""Composite builder and the Grad-CAM consistency loss terms (pure tensor functions)."""
from losses.composite import (
    NUM_DISTRACTORS,
    CompositeLayout,
    choose_distractors,
    choose_positive,
    composite_target,
    label_sets,
    make_composite,
    place_in_cell,
    random_layout,
    shared_layout,
    tile_2x2,
)
from losses.consistency import classification_loss, consistency_l1

__all__ = [
    "NUM_DISTRACTORS",
    "CompositeLayout",
    "choose_distractors",
    "choose_positive",
    "classification_loss",
    "composite_target",
    "consistency_l1",
    "label_sets",
    "make_composite",
    "place_in_cell",
    "random_layout",
    "shared_layout",
    "tile_2x2",
]
