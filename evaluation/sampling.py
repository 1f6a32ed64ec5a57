"""Which validation images an evaluation sees: spread evenly over the set (sorted by class), shared
out among DDP processes, each with its index as the seed of its random draws."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from datamodules import ClassificationDataModule
from evaluation.composites import key_seed


def spread_indices(length: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(length)``: validation sets are sorted by class,
    so a capped evaluation or a picture then still sees every class."""
    return torch.linspace(0, length - 1, min(count, length)).round().long().unique().tolist()


def validation_sample(datamodule: ClassificationDataModule, count: int) -> dict:
    """One batch of ``count`` validation images spread over the set: localisation trials (with
    their ``mask``) where a single-label data set has masks. Multi-label trials are (image, class)
    pairs whose targets lose the image's other labels, which composites need: validation images."""
    trials = None if datamodule.multilabel else datamodule.localization_dataset()
    dataset = trials if trials is not None else datamodule.val_dataset()
    return datamodule.collate_fn([dataset[i] for i in spread_indices(len(dataset), count)])


def shard_indices(length: int, rank: int, world_size: int, max_images: int | None) -> list[int]:
    """This process's share (every ``world_size``-th item) of ``max_images`` indices spread evenly
    over ``range(length)``."""
    return spread_indices(length, length if max_images is None else max_images)[rank::world_size]


def shard(dataset: Dataset, rank: int, world_size: int, max_images: int | None) -> Dataset:
    return Subset(dataset, shard_indices(len(dataset), rank, world_size, max_images))


class Indexed(Dataset):
    """``dataset``'s samples with their index in it (``"index"``, long): the seed of a trial's
    random draws (SPG's points, its noise maps), which then do not depend on the batch, the
    process or the order. A sample that is None (a corrupt file) stays None."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.dataset[index]
        return None if sample is None else {**sample, "index": torch.tensor(index)}




def other_indices(length: int, index: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices of ``range(length)`` other than ``index``, drawn by a generator
    seeded by ``(seed, index)`` alone: an image's other images do not depend on the batch, the
    process or ``max_images``."""
    if count > length - 1:
        raise ValueError(f"evaluation.other_images={count} needs {count + 1} validation images; the data has {length}")
    generator = torch.Generator().manual_seed(key_seed(seed, f"others/{index}"))
    return [pick + (pick >= index) for pick in torch.randperm(length - 1, generator=generator)[:count].tolist()]


class WithOthers(Dataset):
    """``dataset``'s samples with their index (``"index"``) and ``count`` other images of the
    whole set (``"others"`` ``[K, C, H, W]``, ``"other_targets"``, ``"other_index"``;
    :func:`other_indices`), whose maps stand in for the image's own in the other-image baseline.
    A sample with a corrupt image among them is None (the collate drops and counts it)."""

    def __init__(self, dataset: Dataset, count: int, seed: int):
        self.dataset = dataset
        self.count = count
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.dataset[index]
        others = [(other, self.dataset[other]) for other in other_indices(len(self), index, self.count, self.seed)]
        if sample is None or any(other is None for _, other in others):
            return None
        if not others:
            return {**sample, "index": torch.tensor(index)}
        return {**sample, "index": torch.tensor(index), "others": torch.stack([other["image"] for _, other in others]),
                "other_targets": torch.stack([torch.as_tensor(other["target"]) for _, other in others]),
                "other_index": torch.tensor([position for position, _ in others])}
