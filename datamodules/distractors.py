"""Training samples that bring their own composite's distractors, loaded from the training set
(``loss.composite_source=dataset``: the authors' composites, three more images decoded per sample)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from losses.composite import NUM_DISTRACTORS, explained_classes, positive_weights

from .images import LoaderStream, Sample

# Corrupt distractor files one sample may draw (with skip_corrupt) before the run stops: a few are
# replaced by other draws (each logged), a training set where they keep coming is broken.
MAX_CORRUPT_DRAWS = 10


def uniform_draw(count: int, taken: list[int], generator: torch.Generator) -> int:
    """A uniform draw from ``0 .. count - 1`` outside ``taken`` (distinct draws), or from all of
    them once ``taken`` covers them."""
    free = count - len(taken)
    if free <= 0:
        return int(torch.randint(count, (), generator=generator))
    nth = int(torch.randint(free, (), generator=generator))
    # The nth of the values left: step over each taken one at or below it.
    for used in sorted(taken):
        if nth >= used:
            nth += 1
    return nth


class DistractorDataset(Dataset):
    """``dataset``'s samples, each with what its composite needs besides itself.

    ``dataset`` is a training set (samples ``{"image", "target"[, "instances"]}``, or None for a
    corrupt file with ``skip_corrupt``) with ``label_pairs()`` (the (image, class) pairs of its
    labels, ordered by image) and ``classes``.
    Each sample gains:
    - ``"positive"``: the class it explains: its label, or on ``multilabel`` data one of its labels
      drawn as ``positive`` (``loss.positive``) says, the rule of the batch mode
      (:func:`losses.composite.explained_classes`);
    - ``"cell"``: its cell, uniform over 0..3;
    - ``"distractors"`` ``[3, C, H, W]``: images drawn uniformly from the training images whose
      labels lack that class (distinct when at least 3 exist), read through ``dataset[index]``, so
      with its training transform. With ``skip_corrupt`` a corrupt one is replaced by another draw;
      the :data:`MAX_CORRUPT_DRAWS`-th corrupt draw for one sample is an error.

    Draws come from a generator seeded from ``torch.initial_seed()`` and ``rank``: reproducible
    under ``seed_everything(workers=True)``, different in every loader worker and process.
    """

    def __init__(self, dataset: Dataset, multilabel: bool, positive: str, rank: int = 0) -> None:
        self.dataset = dataset
        self.multilabel = multilabel
        self.positive = positive
        # (image, class) pairs rather than label_sets(): ImageNet's [1.28M, 1000] table is 1.28 GB.
        images, classes = dataset.label_pairs()
        count, self.num_classes = len(dataset), len(dataset.classes)
        unlabelled = torch.ones(count, dtype=torch.bool).index_fill_(0, images, False).nonzero().flatten()
        if len(unlabelled):
            raise ValueError(f"loss.composite_source=dataset: training images {unlabelled[:5].tolist()} have no "
                             "label, so no class for their composite to explain")
        carried = torch.bincount(classes, minlength=self.num_classes)
        everywhere = (carried == count).nonzero().flatten().tolist()
        if everywhere:
            raise ValueError(
                f"loss.composite_source=dataset: every training image carries class(es) "
                f"{[dataset.classes[k] for k in everywhere]}, so no image can be a distractor of a composite "
                "that explains them"
            )
        # Each class's carriers, ascending, one class after the other. A distractor of class k is the
        # nth image that lacks k, found by bisection over the carriers: memory grows with the
        # labels (1.28M on ImageNet), not with images x classes.
        order = torch.argsort(classes, stable=True)
        carriers = images[order]
        self._first = torch.cat([carried.new_zeros(1), carried.cumsum(0)])
        # How many images lack the class before each of its carriers.
        self._lacking_before = carriers - (torch.arange(len(order)) - self._first[classes[order]])
        self._lacking = count - carried
        self.stream = LoaderStream(rank)

    def __len__(self) -> int:
        return len(self.dataset)

    def lacking(self, positive: int, nth: int) -> int:
        """Index of the ``nth`` (from 0, ascending) training image whose labels lack ``positive``."""
        carriers_lacking_before = self._lacking_before[self._first[positive]:self._first[positive + 1]]
        return nth + int(torch.searchsorted(carriers_lacking_before, nth, right=True))

    def distractors(self, index: int, positive: int, generator: torch.Generator) -> torch.Tensor:
        count = int(self._lacking[positive])
        distinct = count >= NUM_DISTRACTORS
        taken: list[int] = []
        images = []
        corrupt = 0
        while len(images) < NUM_DISTRACTORS:
            nth = uniform_draw(count, taken if distinct else [], generator)
            taken.append(nth)  # a corrupt draw too: not drawn again
            sample = self.dataset[self.lacking(positive, nth)]
            if sample is not None:
                images.append(sample["image"])
                continue
            corrupt += 1
            if corrupt >= MAX_CORRUPT_DRAWS:
                raise RuntimeError(
                    f"{corrupt} distractors drawn for training image {index} (class "
                    f"{self.dataset.classes[positive]!r}) were corrupt files (data.skip_corrupt=true): too many "
                    "corrupt images among the training images without that class"
                )
        return torch.stack(images)

    def __getitem__(self, index: int) -> Sample | None:
        sample = self.dataset[index]
        if sample is None:
            return None
        generator = self.stream.generator()
        weights = positive_weights(sample, self.multilabel, self.positive)
        positive = explained_classes(sample["target"][None], self.num_classes, generator,
                                     None if weights is None else weights[None])[0]
        cell = torch.randint(4, (), generator=generator)
        return {**sample, "positive": positive, "cell": cell,
                "distractors": self.distractors(index, int(positive), generator)}
