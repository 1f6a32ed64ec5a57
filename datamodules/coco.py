"""COCO instances annotations: the multi-label classification data, the per-class masks of the
localisation trials, and MS-COCO as a datamodule. The synthetic data is read by the same code."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from .base import ClassificationDataModule, existing_dir
from .images import (
    Sample,
    Transform,
    imagenet_eval_transform,
    imagenet_train_transform,
    load_rgb_or_skip,
    make_trial,
    paired_eval_transform,
)


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


class CocoMultiLabelDataset(Dataset):
    """Multi-label images of a COCO split: target = multi-hot over the categories present.

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

        labels: dict[int, set[int]] = {}
        for ann in self.coco.dataset["annotations"]:
            if ann["category_id"] not in index_of:
                raise ValueError(
                    f"annotation {ann.get('id')} in {self.ann_file} has category_id "
                    f"{ann['category_id']}, which is not among the file's categories"
                )
            labels.setdefault(ann["image_id"], set()).add(index_of[ann["category_id"]])
        self.image_ids: list[int] = sorted(image_id for image_id in labels if image_id in self.coco.imgs)
        if not self.image_ids:
            raise ValueError(f"no annotated images in COCO annotation file {self.ann_file}")
        # Paths and targets are precomputed so that __getitem__ never touches the large COCO
        # index (forked workers would otherwise copy its pages as reference counts change).
        self.paths = [self.image_dir / self.coco.imgs[image_id]["file_name"] for image_id in self.image_ids]
        self.targets = torch.zeros(len(self.image_ids), self.num_classes, dtype=torch.bool)
        for row, image_id in enumerate(self.image_ids):
            self.targets[row, sorted(labels[image_id])] = True

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def label_sets(self) -> torch.Tensor:
        """bool ``[N, K]``: the categories present in each image."""
        return self.targets.clone()

    def keys(self) -> list[str]:
        """A name per image that does not depend on the order of the json: its file name."""
        return [str(self.coco.imgs[image_id]["file_name"]) for image_id in self.image_ids]

    def __getitem__(self, index: int) -> Sample | None:
        image = load_rgb_or_skip(self.paths[index], self.skip_corrupt)
        if image is None:
            return None
        return {"image": self.transform(image), "target": self.targets[index].to(torch.float32)}


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
        instance = coco.annToMask(ann).astype(bool)
        masks[index] = masks[index] | instance if index in masks else instance
    return masks


class CocoMaskDataset(Dataset):
    """Trials ``{"image": [3,H,W] in [0,1], "target": class index, "mask": bool [H,W]}``, one per
    (image, annotated class) pair, the mask being the union of the class's instance masks.

    ``category_ids[k]`` is the COCO category id of class ``k``; categories outside it are not
    evaluated. With ``image_size`` the image and its mask go through the validation geometry
    together (:func:`paired_eval_transform`); with None images keep their size (the synthetic
    images all have one size already). With ``skip_corrupt`` a corrupt image gives None.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        category_ids: Sequence[int],
        image_size: int | None,
        skip_corrupt: bool,
    ) -> None:
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {self.image_dir}")
        self.skip_corrupt = skip_corrupt
        self.coco = load_coco(ann_file)
        self.category_ids = list(category_ids)
        index_of = {cat_id: index for index, cat_id in enumerate(self.category_ids)}
        self.trials: list[tuple[int, int]] = sorted(
            {(ann["image_id"], index_of[ann["category_id"]]) for ann in self.coco.dataset.get("annotations", [])
             if ann["category_id"] in index_of}
        )
        if not self.trials:
            raise ValueError(f"no annotated objects of the evaluated classes in {ann_file}")
        self.transform = paired_eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, index: int) -> Sample | None:
        image_id, class_index = self.trials[index]
        path = self.image_dir / self.coco.loadImgs(image_id)[0]["file_name"]
        image = load_rgb_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        mask = coco_masks(self.coco, image_id, {class_index: self.category_ids[class_index]})[class_index]
        return make_trial(path, image, mask, class_index, self.transform)


class COCODataModule(ClassificationDataModule):
    """Images in ``data_dir/<split>/``, annotations in ``data_dir/annotations/instances_<split>.json``.

    Targets are multi-hot over the categories (see :class:`CocoMultiLabelDataset` for the handling
    of crowd annotations and unannotated images). The transforms are ImageNet's. The class list is
    read from the validation annotations; the training file must have the same categories.
    """

    name = "coco"
    multilabel = True

    def __init__(self, data_dir: str | Path, *, train_split: str, val_split: str, **loading) -> None:
        """``train_split``, ``val_split``: folder names (``train2017``, ``val2017``); ``loading``:
        the options of :class:`ClassificationDataModule`."""
        super().__init__(data_dir, **loading)
        self.train_split = train_split
        self.val_split = val_split
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

    def _build_localization_dataset(self) -> CocoMaskDataset:
        """One trial per (validation image, ground-truth class), with the class's segmentation
        mask, resized and centre-cropped with the image."""
        return CocoMaskDataset(self.data_dir / self.val_split, self.val_annotation_file,
                               self.val_dataset().category_ids, self.image_size, self.skip_corrupt)

    def _ann_file(self, split: str) -> Path:
        return self.data_dir / "annotations" / f"instances_{split}.json"

    def _dataset(self, split: str, transform: Transform) -> CocoMultiLabelDataset:
        existing_dir("data_dir", self.data_dir)
        return CocoMultiLabelDataset(self.data_dir / split, self._ann_file(split), transform, self.skip_corrupt)

    def _build_val_dataset(self) -> CocoMultiLabelDataset:
        return self._dataset(self.val_split, imagenet_eval_transform(self.image_size))

    def _build_train_dataset(self) -> CocoMultiLabelDataset:
        val_set = self.val_dataset()
        train_set = self._dataset(self.train_split, imagenet_train_transform(self.image_size))
        if train_set.category_ids != val_set.category_ids or train_set.classes != val_set.classes:
            raise ValueError(
                f"the categories of {train_set.ann_file} differ from those of {val_set.ann_file}; "
                "class indices would not agree"
            )
        return train_set
