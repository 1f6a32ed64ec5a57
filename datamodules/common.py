"""Pieces shared by the datamodules: argument checks, the ImageNet-style transforms, loaders."""

from __future__ import annotations

import numbers
from pathlib import Path

import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from . import readers


def check_int(key: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """Validate an integer config value; the error names the key as ``data.<key>``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"data.{key} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"data.{key} must be {allowed}, got {value}")
    return int(value)


def existing_dir(key: str, path: str | Path) -> Path:
    """Path of a directory that must exist; the error names the key and the path."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"data.{key}: directory not found: {path}")
    return path


def imagenet_train_transform(image_size: int) -> transforms.Compose:
    """The paper's training augmentation: RandomResizedCrop + horizontal flip, no normalisation."""
    return transforms.Compose(
        [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )


def imagenet_eval_transform(image_size: int) -> transforms.Compose:
    """Resize(256) + CenterCrop(224) at 224 px, scaled the same way for other sizes."""
    return transforms.Compose(
        [
            transforms.Resize(int(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
        ]
    )


class ImageDataModule(LightningDataModule):
    """Loaders over ``self.train_set`` and ``self.val_set``, which subclasses build in ``setup``.

    The test loader is the validation set: ImageNet's and COCO's test labels are not public, and
    the synthetic data has no third split.
    """

    multilabel = False

    def __init__(self, batch_size: int, num_workers: int, skip_corrupt: bool) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.skip_corrupt = bool(skip_corrupt)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no {split} set, call setup() first")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=readers.collate_skipping_corrupt,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
