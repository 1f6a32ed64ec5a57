"""What every datamodule provides (:class:`ClassificationDataModule`), and config argument checks."""

from __future__ import annotations

import abc
import numbers
from pathlib import Path
from typing import ClassVar

import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from .distractors import DistractorDataset
from .images import TrialGeometry, collate_samples


def is_number(value: object) -> bool:
    # bool is a number to Python, but true for a count or a rate is a mistake, not 1.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(key: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """Validate an integer config value; the error names ``key`` (the full config key)."""
    if not is_integer(value):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{key} must be {allowed}, got {value}")
    return int(value)


def check_number(key: str, value: object, minimum: float, exclusive: bool = False) -> float:
    """Validate a real config value ``>= minimum`` (``> minimum`` when ``exclusive``); the error
    names ``key`` (the full config key)."""
    if not is_number(value) or value < minimum or (exclusive and value == minimum):
        raise ValueError(f"{key} must be a number {'>' if exclusive else '>='} {minimum}, got {value!r}")
    return float(value)


def check_bool(key: str, value: object) -> bool:
    """Validate a boolean config value; the error names ``key`` (the full config key)."""
    # bool(value) would take `no`, `off` or `'false'` (strings to Hydra) for true.
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def check_int(key: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """:func:`check_integer` of the ``data`` group's ``key``."""
    return check_integer(f"data.{key}", value, minimum, maximum)


def existing_dir(key: str, path: str | Path) -> Path:
    """Path of a directory that must exist; the error names the key and the path."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"data.{key}: directory not found: {path}")
    return path


class ClassificationDataModule(LightningDataModule, abc.ABC):
    """An image classification data set: what the trainer, the callbacks and the evaluation use.

    - ``name``: the config name (``data.name``); ``multilabel``: multi-hot float targets [B, K]
      (BCE, F1) instead of int64 class indices [B].
    - ``num_classes``, ``class_names``: known before ``prepare_data`` where the config says them,
      otherwise read from the data on disk (ImageNet: the training folders; COCO: the validation
      annotations), since the model is built from them first.
    - ``val_dataset()``: the validation set, usable once ``prepare_data()`` has run (built on
      first use when ``setup()`` has not built it yet). It also provides ``label_sets()`` (bool
      ``[N, K]``) and ``keys()`` (a stable name per image), from which evaluation composites
      draw their distractors over the whole set, whatever the order of the files.
    - ``localization_dataset(geometry)``: validation trials ``{"image", "target", "mask",
      "pointing"}`` for PG, SPG and CH, sized as the :class:`TrialGeometry` (the evaluation
      protocol) says, or None when the data has no masks or boxes. Under the authors' protocol
      images keep their aspect and masks their original size: the set's ``sizes()`` (each trial's
      original height and width, from the annotations) let loaders batch equal sizes together.
    - ``collate_fn``: the collate function of every loader, trial loaders included.

    Samples are ``{"image": [3, H, W] float in [0, 1], "target": ...}``, or None for a corrupt
    file when ``skip_corrupt``. The test loader is the validation set: ImageNet's and COCO's test
    labels are not public, and the synthetic data has no third split. ``batch_size`` is
    what each process loads: ``train.py`` sets it to the process's share of the global
    ``data.batch_size``.

    Subclasses build their sets in ``_build_train_dataset``, ``_build_val_dataset`` and
    ``_build_localization_dataset``; the results are kept in ``train_set`` (by ``setup("fit")``),
    ``val_set`` and the localisation set.
    """

    name: ClassVar[str]
    multilabel: ClassVar[bool]

    collate_fn = staticmethod(collate_samples)

    def __init__(self, data_dir: str | Path, *, image_size: int, batch_size: int, num_workers: int,
                 skip_corrupt: bool) -> None:
        """The loading options every data set takes (the keys of its ``data`` config group that
        subclasses do not name themselves): ``data_dir``; ``image_size``, the side of the images the
        network sees; ``batch_size`` per process (train.py divides the config's global batch); ``num_workers`` loader processes; with
        ``skip_corrupt`` a corrupt image file is dropped from its batch and counted instead of
        stopping the run."""
        super().__init__()
        self.data_dir = Path(data_dir)
        self.image_size = check_int("image_size", image_size, minimum=8)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.skip_corrupt = check_bool("data.skip_corrupt", skip_corrupt)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._localization_sets: dict[TrialGeometry, Dataset | None] = {}
        self.train_distractors: str | None = None

    @property
    @abc.abstractmethod
    def num_classes(self) -> int: ...

    @property
    @abc.abstractmethod
    def class_names(self) -> list[str]: ...

    def localization_dataset(self, geometry: TrialGeometry = TrialGeometry()) -> Dataset | None:
        """Validation trials with the mask of their class, or None without masks or boxes.
        ``geometry``'s ``image_size`` is the datamodule's own (set here)."""
        # Built once per geometry and kept: reading the annotations (50,000 ILSVRC XML files, a
        # COCO json) is slow, and the training callbacks ask for the trials after every epoch.
        geometry = geometry.check()._replace(image_size=None)
        if geometry not in self._localization_sets:
            self._localization_sets[geometry] = self._build_localization_dataset(geometry)
        return self._localization_sets[geometry]

    @abc.abstractmethod
    def _build_localization_dataset(self, geometry: TrialGeometry) -> Dataset | None:
        """The trials under ``geometry`` (its ``image_size`` is None: set the data set's own where
        the images are resized for the standard protocol)."""

    @abc.abstractmethod
    def _build_train_dataset(self) -> Dataset: ...

    @abc.abstractmethod
    def _build_val_dataset(self) -> Dataset: ...

    def val_dataset(self) -> Dataset:
        # Built on first use and kept: some datamodules read their classes from it before setup().
        if self.val_set is None:
            self.val_set = self._build_val_dataset()
        return self.val_set

    def setup(self, stage: str | None = None) -> None:
        # The validation set first: its checks (class lists that must agree, files that must
        # exist) fail fast, before a possibly long listing of the training set.
        self.val_dataset()
        # Listing a large training set (ImageNet: 1.28M files) takes a while: only to fit, once.
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._build_train_dataset()

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=torch.cuda.is_available(),
            # Workers start anew with every loop, seeded from the main process's random state, which
            # a checkpoint restores: persistent ones would carry their own streams over epochs, and
            # a resumed run, whose loaders start fresh, would draw seeds the uninterrupted run did
            # not (tests/test_resume.py).
            persistent_workers=False,
        )

    def set_train_distractors(self, positive: str | None) -> None:
        """``loss.composite_source=dataset``: every training sample also brings the class it explains
        (on multi-label data drawn as ``positive``, ``loss.positive``, says), its cell and 3
        distractors loaded from the training set (:class:`DistractorDataset`). None: plain samples."""
        self.train_distractors = positive

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}: no train set, call setup('fit') first")
        dataset = self.train_set
        if self.train_distractors is not None:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            dataset = DistractorDataset(dataset, self.multilabel, self.train_distractors, rank)
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset(), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
