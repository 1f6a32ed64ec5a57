"""Data sets by config name (``data.name``)."""
from __future__ import annotations

import importlib
from typing import Mapping

import pytorch_lightning as pl

DATAMODULES = {
    "synthetic": ("datamodules.synthetic", "SyntheticDataModule"),
    "imagenet": ("datamodules.imagenet", "ImageNetDataModule"),
    "coco": ("datamodules.coco", "COCODataModule"),
}


def datamodule_from_config(config: Mapping) -> pl.LightningDataModule:
    """The datamodule a ``data`` config group describes (``name`` picks it; ``monitor`` is the
    metric the checkpoint callback watches, not an argument)."""
    kwargs = {key: value for key, value in config.items() if key not in ("name", "monitor")}
    return build_datamodule(config["name"], **kwargs)


def build_datamodule(name: str, **kwargs) -> pl.LightningDataModule:
    """The datamodule called ``name``; its constructor validates ``kwargs`` before any I/O."""
    if name not in DATAMODULES:
        raise ValueError(f"data.name={name!r} is unknown; allowed: {sorted(DATAMODULES)}")
    module_name, class_name = DATAMODULES[name]
    return getattr(importlib.import_module(module_name), class_name)(**kwargs)
