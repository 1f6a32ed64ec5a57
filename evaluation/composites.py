"""Evaluation composites for NQH, drawn over the whole validation set.

Training draws distractors from its (shuffled) batch. An evaluation loader is not shuffled and
validation sets are listed class by class, so in-batch distractors would all come from the next
class or two, and images of a batch with one class would get no composite at all. Here each image's
composite is a function of the image alone: a generator seeded by ``(seed, the image's key)`` picks
its explained class (multi-label: one of its labels), its cell and three distractors among the
images of the whole set that lack that class, taken in the order of their keys. The composites do
not depend on the batch size, the process count or the order of the files.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from losses import NUM_DISTRACTORS, CompositeLayout, make_composite

# Random draws tried before a rare class's candidates are listed exactly.
_ATTEMPTS = 64


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the run's seed and an image's key."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dataset_layout(label_sets: torch.Tensor, keys: Sequence[str], indices: Sequence[int], seed: int) -> CompositeLayout:
    """One composite per image of ``indices`` (dataset indices), with distractors over the whole
    set: ``samples`` and ``distractors`` are dataset indices; ``valid`` is False for an image
    without any image lacking its class (or without labels)."""
    labels = label_sets.bool()
    order = sorted(range(len(keys)), key=keys.__getitem__)  # positions in key order -> dataset index
    rows = {"samples": [], "classes": [], "cells": [], "distractors": [], "valid": []}
    for index in indices:
        generator = torch.Generator().manual_seed(key_seed(seed, keys[index]))
        own = labels[index].nonzero().flatten()
        if own.numel() == 0:
            explained, distractors, valid = -1, [index] * NUM_DISTRACTORS, False
        else:
            explained = int(own[torch.randint(own.numel(), (1,), generator=generator)])
            distractors = _draw_distractors(labels[:, explained], order, generator)
            valid = distractors is not None
            distractors = distractors if valid else [index] * NUM_DISTRACTORS
        rows["samples"].append(index)
        rows["classes"].append(explained)
        rows["cells"].append(int(torch.randint(4, (1,), generator=generator)))
        rows["distractors"].append(distractors)
        rows["valid"].append(valid)
    return CompositeLayout(torch.tensor(rows["samples"], dtype=torch.long), torch.tensor(rows["classes"]),
                           torch.tensor(rows["cells"]), torch.tensor(rows["distractors"], dtype=torch.long).view(-1, 3),
                           torch.tensor(rows["valid"], dtype=torch.bool))


def _draw_distractors(has_class: torch.Tensor, order: list[int], generator: torch.Generator) -> list[int] | None:
    """Three dataset indices of images without the class, distinct when at least three exist:
    uniform over the key-ordered set by rejection (one draw or so for ImageNet's 1000 classes),
    or over the exact candidate list for a class that fills most of the set."""
    chosen: list[int] = []
    for position in torch.randint(len(order), (_ATTEMPTS,), generator=generator).tolist():
        index = order[position]
        if not has_class[index] and index not in chosen:
            chosen.append(index)
            if len(chosen) == NUM_DISTRACTORS:
                return chosen
    candidates = [index for index in order if not has_class[index]]
    if not candidates:
        return None
    picks = torch.multinomial(torch.ones(len(candidates)), NUM_DISTRACTORS,
                              replacement=len(candidates) < NUM_DISTRACTORS, generator=generator)
    return [candidates[int(p)] for p in picks]


class CompositeDataset(Dataset):
    """The valid composites of ``layout`` over ``dataset``: ``{"image": [C, 2H, 2W], "target": the
    explained class, "cell": the image's cell}``; None when one of its four images is corrupt (the
    collate drops and counts it)."""

    def __init__(self, dataset: Dataset, layout: CompositeLayout):
        self.dataset = dataset
        self.layout = layout.valid_subset()

    def __len__(self) -> int:
        return len(self.layout)

    def __getitem__(self, row: int) -> dict | None:
        indices = [int(self.layout.samples[row])] + self.layout.distractors[row].tolist()
        samples = [self.dataset[index] for index in indices]
        if any(sample is None for sample in samples):
            return None
        images = torch.stack([sample["image"] for sample in samples])
        single = CompositeLayout(torch.tensor([0]), self.layout.classes[row:row + 1], self.layout.cells[row:row + 1],
                                 torch.tensor([[1, 2, 3]]), torch.tensor([True]))
        return {"image": make_composite(images, single)[0], "target": self.layout.classes[row],
                "cell": self.layout.cells[row]}
