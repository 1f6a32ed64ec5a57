"""COCO instances annotations: the multi-label classification data, the per-class masks of the
localisation trials, and MS-COCO as a datamodule. The synthetic data is read by the same code."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pycocotools.coco import COCO
from pydantic import ValidationInfo, field_validator
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .base import DATASETS, ClassificationDataModule, DataOptions, existing_dir
from .guidance import CocoTrainingMasks
from .images import (
    DifficultFlags,
    MultiLabelImages,
    Sample,
    Transform,
    TrialGeometry,
    load_rgb_or_skip,
    make_trial,
    to_float_image,
)

log = logging.getLogger(__name__)


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """Load a COCO instances json into a pycocotools ``COCO`` index, with errors naming the file."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with ann_file.open("rb") as handle:
            dataset = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"malformed COCO annotation file {ann_file}: {err}") from err
    if not isinstance(dataset, dict):
        raise ValueError(f"malformed COCO annotation file {ann_file}: top level is not an object")
    missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
    if missing:
        raise ValueError(f"COCO annotation file {ann_file} lacks the key(s) {missing}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


class CocoMultiLabelDataset(MultiLabelImages):
    """Multi-label images of a COCO split: target = multi-hot over the categories present, and
    ``"instances"``, the number of annotations of each category (float ``[K]``).

    Categories are mapped to contiguous indices 0..K-1 in increasing category id (COCO's ids have
    gaps). Choices:
    - crowd annotations (iscrowd=1) count: a crowd of people still means "person" is in the
      image, and the evaluation masks (:func:`coco_masks`) include them likewise;
    - images without any annotation are dropped: they have no class for the classification loss
      or for the GC loss to explain (about 1% of COCO 2017 train).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transform: Transform,
        skip_corrupt: bool,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image directory not found: {self.image_dir}")
        self.coco = load_coco(self.ann_file)
        self.category_ids: list[int] = sorted(self.coco.getCatIds())
        if not self.category_ids:
            raise ValueError(f"COCO annotation file {self.ann_file} has no categories")
        self.classes: list[str] = [self.coco.cats[cat_id]["name"] for cat_id in self.category_ids]
        index_of = {cat_id: index for index, cat_id in enumerate(self.category_ids)}

        instances: dict[int, torch.Tensor] = {}
        for ann in self.coco.dataset["annotations"]:
            if ann["category_id"] not in index_of:
                raise ValueError(
                    f"annotation {ann.get('id')} in {self.ann_file} has category_id "
                    f"{ann['category_id']}, which is not among the file's categories"
                )
            counts = instances.setdefault(ann["image_id"], torch.zeros(len(self.category_ids)))
            counts[index_of[ann["category_id"]]] += 1
        self.image_ids: list[int] = sorted(image_id for image_id in instances if image_id in self.coco.imgs)
        if not self.image_ids:
            raise ValueError(f"no annotated images in COCO annotation file {self.ann_file}")
        # Paths and targets are precomputed so that __getitem__ never touches the large COCO
        # index (forked workers would otherwise copy its pages as reference counts change).
        self.paths = image_paths(self.coco, self.image_ids, self.image_dir, self.ann_file)
        # Instances per class: the authors draw the explained class over annotations (loss.positive).
        self.instances = torch.stack([instances[image_id] for image_id in self.image_ids])
        self.targets = self.instances > 0

    def keys(self) -> list[str]:
        """A name per image that does not depend on the order of the json: its file name."""
        return [str(self.coco.imgs[image_id]["file_name"]) for image_id in self.image_ids]



def image_paths(coco: COCO, image_ids: Sequence[int], image_dir: Path, ann_file: Path) -> list[Path]:
    """The files of ``image_ids``, checked against ``image_dir`` in one listing: an entry whose
    ``file_name`` leaves the folder (absolute, ``..``) or has no file is an error naming it."""
    present = {entry.name for entry in os.scandir(image_dir)}
    paths, missing = [], []
    for image_id in image_ids:
        name = str(coco.imgs[image_id].get("file_name", ""))
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"image {image_id} in {ann_file} has file_name {name!r}, which does not name a file "
                             f"inside {image_dir}")
        if Path(name).parts[0] not in present:
            missing.append(name)
        paths.append(image_dir / name)
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {ann_file} are not in {image_dir}, e.g. "
                                f"{missing[:5]}: the json and the image folder do not match (another split "
                                f"or year?)")
    return paths


def coco_masks(
    coco: COCO, image_id: int, category_index_to_id: Sequence[int] | Mapping[int, int]
) -> dict[int, np.ndarray]:
    """Per-class ground-truth masks of one image: ``{class index: bool array [H, W]}``.

    Each mask is the union of the instance masks of that category (crowd regions included, as in
    :class:`CocoMultiLabelDataset`). ``category_index_to_id`` maps class index to COCO category
    id: a list such as ``CocoMultiLabelDataset.category_ids`` or an explicit mapping. Only the
    classes present in the image appear in the result.
    """
    pairs: Iterable[tuple[int, int]] = (
        category_index_to_id.items()
        if isinstance(category_index_to_id, Mapping)
        else enumerate(category_index_to_id)
    )
    index_of = {cat_id: index for index, cat_id in pairs}
    masks: dict[int, np.ndarray] = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
        index = index_of.get(ann["category_id"])
        if index is None:
            continue  # a category outside the classes being evaluated
        instance = coco.annToMask(ann if ann.get("segmentation") else box_as_polygon(ann)).astype(bool)
        masks[index] = masks[index] | instance if index in masks else instance
    return masks


def box_as_polygon(ann: dict) -> dict:
    """``ann`` with its box as its segmentation, for annotations that have none."""
    x, y, w, h = ann["bbox"]
    return {**ann, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


class CocoMaskDataset(Dataset):
    """Trials ``{"image": [3,H,W] in [0,1], "target": class index, "mask": bool [H,W]}``, one per
    (image, annotated class) pair, the mask being the union of the class's instance masks.

    ``category_ids[k]`` is the COCO category id of class ``k``; categories outside it are not
    evaluated. ``geometry`` (:class:`TrialGeometry`) sizes the image and its mask: the standard
    validation geometry, or the authors' (masks at the image's original size). With
    ``skip_corrupt`` a corrupt image gives None. ``coco``: the index of ``ann_file`` where the
    caller has loaded it already (a COCO 2014 val json takes seconds and gigabytes to index).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        category_ids: Sequence[int],
        geometry: TrialGeometry,
        skip_corrupt: bool,
        coco: COCO | None = None,
        difficult_flags: Path | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {self.image_dir}")
        self.geometry = geometry
        self.skip_corrupt = skip_corrupt
        self.coco = load_coco(ann_file) if coco is None else coco
        self.category_ids = list(category_ids)
        index_of = {cat_id: index for index, cat_id in enumerate(self.category_ids)}
        self.trials: list[tuple[int, int]] = sorted(
            {(ann["image_id"], index_of[ann["category_id"]]) for ann in self.coco.dataset.get("annotations", [])
             if ann["category_id"] in index_of}
        )
        if not self.trials:
            raise ValueError(f"no annotated objects of the evaluated classes in {ann_file}")
        image_ids = sorted({image_id for image_id, _ in self.trials})
        self.paths = dict(zip(image_ids, image_paths(self.coco, image_ids, self.image_dir, Path(ann_file))))
        # TorchRay's difficult subset, keyed by file name without extension.
        self.flags, self.stems = None, {}
        if difficult_flags is not None:
            self.stems = {image_id: Path(self.coco.imgs[image_id]["file_name"]).stem for image_id in image_ids}
            self.flags = DifficultFlags(difficult_flags, len(self.category_ids), list(self.stems.values()))
        boxes_only = sum(not ann.get("segmentation") for ann in self.coco.dataset["annotations"])
        if boxes_only:
            log.warning("%d annotation(s) of %s have no segmentation: their boxes serve as masks", boxes_only,
                        ann_file)

    def __len__(self) -> int:
        return len(self.trials)

    def sizes(self) -> list[tuple[int, int]]:
        """Each trial's image size (height, width) as the json states it."""
        images = self.coco.imgs
        return [(images[image_id]["height"], images[image_id]["width"]) for image_id, _ in self.trials]

    def __getitem__(self, index: int) -> Sample | None:
        image_id, class_index = self.trials[index]
        path = self.paths[image_id]
        image = load_rgb_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        mask = coco_masks(self.coco, image_id, {class_index: self.category_ids[class_index]})[class_index]
        trial = make_trial(path, image, mask, class_index, self.geometry)
        if self.flags is None:
            return trial
        return {**trial, "difficult": torch.tensor(self.flags(self.stems[image_id], class_index))}

    @property
    def mask_source(self) -> str | None:
        """The difficult subset, for the report, where there is one."""
        return None if self.flags is None else f"PG (difficult): {self.flags.describe()}"


VAL_TRANSFORMS = ("square", "center_crop")


class COCOOptions(DataOptions):
    # Folder names: train2014, val2017, ...
    train_split: str
    val_split: str
    val_transform: Literal[VAL_TRANSFORMS]
    # TorchRay's pointing_game_ebp_coco_difficult.txt: PG on its difficult subset beside PG.
    difficult_flags: str | None = None

    @field_validator("val_split")
    @classmethod
    def not_the_training_split(cls, val_split: str, info: ValidationInfo) -> str:
        if val_split == info.data.get("train_split"):
            raise ValueError(f"data.train_split is {val_split!r} too: the validation scores would be measured on "
                             f"the training images")
        return val_split


@DATASETS.register("coco", COCOOptions)
class COCODataModule(ClassificationDataModule):
    """Images in ``data_dir/<split>/``, annotations in ``data_dir/annotations/instances_<split>.json``
    (COCO 2014 or 2017: ``train_split``/``val_split`` name the folders, e.g. ``train2014``).

    Targets are multi-hot over the categories (see :class:`CocoMultiLabelDataset` for the handling
    of crowd annotations and unannotated images). Training: RandomResizedCrop + flip.
    Validation (``val_transform``): ``square``, Resize((size, size)) as the authors' COCO script,
    or ``center_crop``, ImageNet's Resize(256/224 * size) + CenterCrop(size), which can cut
    objects at the borders off. The class list is read from the validation annotations; the
    training file must have the same categories.
    """

    name = "coco"
    multilabel = True
    guidance_masks = "boxes"

    def __init__(self, data_dir: str | Path, *, train_split: str, val_split: str, val_transform: str,
                 difficult_flags: str | None = None, **loading) -> None:
        """``train_split``, ``val_split``: folder names (``train2014``, ``val2017``, ...);
        ``val_transform``: ``square`` or ``center_crop``; ``difficult_flags``: TorchRay's table
        of the pointing game's difficult subset (:class:`DifficultFlags`); ``loading``: the
        options of :class:`ClassificationDataModule`."""
        super().__init__(data_dir, **loading)
        self.train_split = train_split
        self.val_split = val_split
        self.val_transform = val_transform
        self.difficult_flags = Path(difficult_flags) if difficult_flags else None
        self.save_hyperparameters()

    @property
    def class_names(self) -> list[str]:
        return self.val_dataset().classes

    @property
    def num_classes(self) -> int:
        return self.val_dataset().num_classes

    @property
    def val_annotation_file(self) -> Path:
        return self._ann_file(self.val_split)

    def _build_localization_dataset(self, geometry: TrialGeometry) -> CocoMaskDataset:
        """One trial per (validation image, ground-truth class), with the class's segmentation
        mask."""
        val_set = self.val_dataset()
        return CocoMaskDataset(self.data_dir / self.val_split, self.val_annotation_file, val_set.category_ids,
                               geometry._replace(image_size=self.image_size), self.skip_corrupt, coco=val_set.coco,
                               difficult_flags=self.difficult_flags)

    def _ann_file(self, split: str) -> Path:
        return self.data_dir / "annotations" / f"instances_{split}.json"

    def _dataset(self, split: str, transform: Transform) -> CocoMultiLabelDataset:
        existing_dir("data_dir", self.data_dir)
        image_dir, ann_file = self.data_dir / split, self._ann_file(split)
        if not image_dir.is_dir() or not ann_file.is_file():
            raise FileNotFoundError(f"COCO split {split!r} needs {image_dir}/ and {ann_file}.\n{COCO_LAYOUT}")
        return CocoMultiLabelDataset(image_dir, ann_file, transform, self.skip_corrupt)

    def eval_geometry(self) -> list[v2.Transform]:
        if self.val_transform == "square":
            return [v2.Resize((self.image_size, self.image_size))]
        return super().eval_geometry()

    def _build_val_dataset(self) -> CocoMultiLabelDataset:
        return self._dataset(self.val_split, to_float_image(*self.eval_geometry()))

    def training_masks(self, dilation: float) -> CocoTrainingMasks:
        """The boxes of each class's instances (the authors guide with boxes on COCO)."""
        train_set = self.train_set
        return CocoTrainingMasks(train_set.coco, train_set.image_ids, train_set.category_ids, "boxes", dilation)

    def _build_train_dataset(self) -> CocoMultiLabelDataset:
        val_set = self.val_dataset()
        train_set = self._dataset(self.train_split, to_float_image(*self.train_geometry()))
        if train_set.category_ids != val_set.category_ids or train_set.classes != val_set.classes:
            raise ValueError(
                f"the categories of {train_set.ann_file} differ from those of {val_set.ann_file}; "
                "class indices would not agree"
            )
        return train_set


COCO_LAYOUT = """\
data.data_dir must hold MS-COCO as distributed (2014 or 2017; data.train_split / data.val_split):
  <data_dir>/train2014/*.jpg
  <data_dir>/val2014/*.jpg
  <data_dir>/annotations/instances_train2014.json
  <data_dir>/annotations/instances_val2014.json"""
