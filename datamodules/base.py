"""What every datamodule provides (:class:`ClassificationDataModule`), the options every data set
takes, and the registry of data sets."""

from __future__ import annotations

import abc
import copy
from pathlib import Path
from typing import Annotated, ClassVar

import torch
from pydantic import Field
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from gcmodels.options import ConfigError, Options, Registry

from .distractors import DistractorDataset
from .guidance import GuidedSamples, MaskSource, annotated_images
from .images import TrialGeometry, center_crop_geometry, collate_samples
from .views import ContrastiveViews


class DataOptions(Options):
    """The options every data set takes (the ``data`` group less its own): ``data_dir``;
    ``image_size``, the side of the images the network sees; ``batch_size``, the global batch
    (:meth:`ClassificationDataModule.set_world_size` divides it among the processes);
    ``num_workers`` loader processes; ``skip_corrupt``: a corrupt image file is dropped from its
    batch and counted instead of stopping the run."""

    data_dir: str
    image_size: Annotated[int, Field(ge=8)]
    batch_size: Annotated[int, Field(ge=1)]
    num_workers: Annotated[int, Field(ge=0)]
    skip_corrupt: bool


# The data sets by config name (``data.name``), each registered with its options where it is defined.
DATASETS = Registry("data")


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
    what each process loads: :meth:`set_world_size` sets it to the process's share of the global
    ``data.batch_size`` (``global_batch_size``).

    Subclasses build their sets in ``_build_train_dataset``, ``_build_val_dataset`` and
    ``_build_localization_dataset``; the results are kept in ``train_set`` (by ``setup("fit")``),
    ``val_set`` and the localisation set.
    """

    name: ClassVar[str]
    multilabel: ClassVar[bool]
    # What guides explanations in training (loss=energy|...): "masks" (exact object masks),
    # "boxes", or None where the training images have neither here.
    guidance_masks: ClassVar[str | None] = None

    collate_fn = staticmethod(collate_samples)

    def __init__(self, data_dir: str | Path, *, image_size: int, batch_size: int, num_workers: int,
                 skip_corrupt: bool) -> None:
        """The loading options every data set takes (the keys of its ``data`` config group that
        subclasses do not name themselves): ``data_dir``; ``image_size``, the side of the images the
        network sees; ``batch_size`` per process (train.py divides the config's global batch);
        ``num_workers`` loader processes; with ``skip_corrupt`` a corrupt image file is dropped from
        its batch and counted instead of stopping the run."""
        super().__init__()
        self.data_dir = Path(data_dir)
        self.image_size = image_size
        self.global_batch_size = batch_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skip_corrupt = skip_corrupt
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._localization_sets: dict[TrialGeometry, Dataset | None] = {}
        self.train_distractors: str | None = None
        self.train_views = False
        self.train_masks: tuple[float, float, int] | None = None

    def set_world_size(self, world_size: int) -> None:
        """Load each process's share of the global batch ``data.batch_size`` (the paper's 256 is the
        batch over all GPUs) among ``world_size`` processes (trainer.devices x trainer.num_nodes)."""
        if self.global_batch_size % world_size:
            raise ConfigError([("data.batch_size", f"{self.global_batch_size} is the global batch, split evenly "
                                f"over the {world_size} processes (trainer.devices x trainer.num_nodes): "
                                f"choose a multiple of {world_size}")])
        self.batch_size = self.global_batch_size // world_size

    @property
    @abc.abstractmethod
    def num_classes(self) -> int: ...

    def train_geometry(self) -> list[v2.Transform]:
        """The training augmentation, as steps on a PIL image (and on a mask with it) that leave it
        ``image_size`` square: ImageNet's RandomResizedCrop + horizontal flip unless a data set
        says otherwise."""
        return [v2.RandomResizedCrop(self.image_size), v2.RandomHorizontalFlip()]

    def training_masks(self, dilation: float) -> MaskSource:
        """Each training image's mask of a class, at the image's own size, each instance grown by
        ``dilation`` of its box (``guidance_masks`` says whether a data set has them)."""
        raise NotImplementedError(f"data.name={self.name} gives no masks or boxes of its training images")

    def eval_geometry(self) -> list[v2.Transform]:
        """The validation geometry, as steps on a PIL image that leave it ``image_size`` square:
        ImageNet's Resize(256/224 * size) + CenterCrop(size) unless a data set says otherwise."""
        return center_crop_geometry(self.image_size)

    @property
    @abc.abstractmethod
    def class_names(self) -> list[str]: ...

    def localization_dataset(self, geometry: TrialGeometry = TrialGeometry()) -> Dataset | None:
        """Validation trials with the mask of their class, or None without masks or boxes.
        ``geometry``'s ``image_size`` is the datamodule's own (set here)."""
        # Built once per geometry and kept: reading the annotations (50,000 ILSVRC XML files, a
        # COCO json) is slow, and the training callbacks ask for the trials after every epoch.
        geometry = geometry._replace(image_size=None)
        if geometry not in self._localization_sets:
            self._localization_sets[geometry] = self._build_localization_dataset(geometry)
        return self._localization_sets[geometry]

    def localization_unavailable(self) -> str:
        """Why :meth:`localization_dataset` is None here, for the error that refuses the
        localisation metrics."""
        return (f"needs ground-truth object masks or boxes, and data {self.name!r} provides none (use data with "
                "masks: synthetic, coco, imagenet with data.box_dir, folder with data.val_annotations)")

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

    def set_train_views(self, views: bool) -> None:
        """``loss=cgc``: every training sample brings the views of :class:`ContrastiveViews` (its
        training augmentation as ``"image"``, the validation geometry as ``"view"``, a crop of that
        as ``"augmented"``, with the crop's ``"box"`` and ``"flip"``). False: plain samples."""
        self.train_views = views

    def set_train_masks(self, annotated_fraction: float, dilation: float, seed: int) -> None:
        """``loss=energy|l1|rrr|ppce``: every training sample brings the class its explanation is
        guided towards and that class's mask (:class:`GuidedSamples`), grown by ``dilation``; the
        masks of ``annotated_fraction`` of the images are used, drawn once from ``seed``."""
        self.train_masks = (annotated_fraction, dilation, seed)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}: no train set, call setup('fit') first")
        dataset = self.train_set
        if self.train_views:
            # A copy that decodes each image once and makes every view of it; the set itself keeps
            # its training transform for other users.
            dataset = copy.copy(dataset)
            dataset.transform = ContrastiveViews(dataset.transform, self.eval_geometry(), self.image_size)
        if self.train_masks is not None:
            fraction, dilation, seed = self.train_masks
            dataset = GuidedSamples(dataset, self.training_masks(dilation), self.train_geometry(),
                                    annotated_images(len(dataset), fraction, seed), self.multilabel,
                                    self.trainer.global_rank if self.trainer is not None else 0)
        if self.train_distractors is not None:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            dataset = DistractorDataset(dataset, self.multilabel, self.train_distractors, rank)
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset(), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
