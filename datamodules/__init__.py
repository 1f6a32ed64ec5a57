"""Datamodules of the embedded synthetic data, ImageNet, COCO, PASCAL VOC 2007, CUB-200-2011 and a
user's own folders, by config name (``data.name``).

Every datamodule is a :class:`ClassificationDataModule`; the readers of the on-disk formats live
in the modules of their format (:mod:`.images`, :mod:`.imagefolder`, :mod:`.coco`, :mod:`.imagenet`,
:mod:`.voc`, :mod:`.cub`, :mod:`.folder`, :mod:`.shapes` for the synthetic generator).
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import DATASETS, ClassificationDataModule
from .coco import COCODataModule
from .cub import CUBDataModule
from .folder import FolderDataModule
from .imagenet import ImageNetDataModule
from .synthetic import SyntheticDataModule
from .voc import VOC2007DataModule


def build_datamodule(config: Mapping) -> ClassificationDataModule:
    """The datamodule a ``data`` config group (validated by the entry point) describes: ``name``
    picks the data set, every other key is a constructor argument."""
    options = {key: value for key, value in config.items() if key != "name"}
    return DATASETS[config["name"]].build(**options)


__all__ = [
    "COCODataModule",
    "CUBDataModule",
    "FolderDataModule",
    "ClassificationDataModule",
    "DATASETS",
    "ImageNetDataModule",
    "SyntheticDataModule",
    "VOC2007DataModule",
    "build_datamodule",
]
