"""Datamodules of the embedded synthetic data, ImageNet and COCO, by config name (``data.name``).

Every datamodule is a :class:`ClassificationDataModule`; the readers of the on-disk formats live
in the modules of their format (:mod:`.images`, :mod:`.imagefolder`, :mod:`.coco`,
:mod:`.imagenet`, :mod:`.shapes` for the synthetic generator).
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import ClassificationDataModule
from .coco import COCODataModule
from .imagenet import ImageNetDataModule
from .synthetic import SyntheticDataModule

DATAMODULES: dict[str, type[ClassificationDataModule]] = {
    cls.name: cls for cls in (SyntheticDataModule, ImageNetDataModule, COCODataModule)
}


def build_datamodule(config: Mapping) -> ClassificationDataModule:
    """The datamodule a ``data`` config group describes: ``name`` picks the class, every other
    key is a constructor argument. The constructor validates the values before any I/O."""
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    if name not in DATAMODULES:
        raise ValueError(f"data.name={name!r} is unknown; allowed: {sorted(DATAMODULES)}")
    try:
        return DATAMODULES[name](**kwargs)
    except TypeError as err:
        # A missing or misspelt key: say which config it is in, not only which __init__.
        raise ValueError(f"data config of {name!r}: {err}") from err


__all__ = [
    "COCODataModule",
    "ClassificationDataModule",
    "DATAMODULES",
    "ImageNetDataModule",
    "SyntheticDataModule",
    "build_datamodule",
]
