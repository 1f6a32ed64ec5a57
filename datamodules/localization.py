"""Validation images with ground-truth masks, for the localisation metrics (PG, SPG, CH).

Every (image, ground-truth class) pair is one trial, as in TorchRay's pointing game: a
single-object synthetic image gives one trial, a COCO image one per class, an ImageNet image one
(its class, masked by the union of its boxes of that class).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from . import readers


def paired_eval_transform(image_size: int | None) -> v2.Compose | None:
    """The validation geometry (Resize(256/224 * size) + CenterCrop(size)) for an image and its
    mask together, so they stay aligned; None keeps the images' own size."""
    if image_size is None:
        return None
    return v2.Compose([v2.Resize(int(image_size * 256 / 224)), v2.CenterCrop(image_size)])


def make_trial(path: Path, image, mask, class_index: int, transform: v2.Compose | None) -> dict:
    """``{"image": [3,H,W] in [0,1], "target": class index, "mask": bool [H,W]}`` of one trial,
    from the decoded PIL ``image`` of ``path`` and its mask."""
    image = tv_tensors.Image(v2.functional.pil_to_tensor(image))
    mask = tv_tensors.Mask(torch.as_tensor(mask))
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"mask of size {tuple(mask.shape)} does not fit image {path} of size {tuple(image.shape[-2:])}")
    if transform is not None:
        image, mask = transform(image, mask)
    return {
        "image": v2.functional.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor),
        "target": torch.tensor(class_index),
        "mask": mask.as_subclass(torch.Tensor).bool(),
    }


class CocoMaskDataset(Dataset):
    """Trials ``{"image": [3,H,W] in [0,1], "target": class index, "mask": bool [H,W]}``.

    ``category_ids[k]`` is the COCO category id of class ``k``; categories outside it are not
    evaluated. With ``image_size`` the image and its mask go through the validation geometry
    together (:func:`paired_eval_transform`); without it images keep their size (the synthetic
    images all have one size already).
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, category_ids: Sequence[int],
                 image_size: int | None = None):
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {self.image_dir}")
        self.coco = readers.load_coco(ann_file)
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

    def __getitem__(self, index: int) -> dict:
        image_id, class_index = self.trials[index]
        info = self.coco.loadImgs(image_id)[0]
        mask = readers.coco_masks(self.coco, image_id, {class_index: self.category_ids[class_index]})[class_index]
        path = self.image_dir / info["file_name"]
        return make_trial(path, readers.load_rgb(path), mask, class_index, self.transform)


class BoxMaskDataset(Dataset):
    """ImageNet validation trials: each image with its class, masked by the union of its boxes of
    that class, read from ``box_dir/<image file stem>.xml`` (ILSVRC's validation box files).

    Images whose boxes of the class are all "difficult" are left out, as in the papers' evaluation;
    ``skipped_difficult`` counts them. Boxes are rescaled when the image's size differs from the
    size the XML file states.
    """

    def __init__(self, images: "readers.ClassFolderDataset", box_dir: str | os.PathLike, image_size: int):
        self.box_dir = Path(box_dir)
        if not self.box_dir.is_dir():
            raise FileNotFoundError(f"data.box_dir: directory not found: {self.box_dir}")
        self.transform = paired_eval_transform(image_size)
        self.trials: list[tuple[Path, int, list[tuple[int, int, int, int]], int, int]] = []
        self.skipped_difficult = 0
        for path, class_index in images.samples:
            annotation = readers.read_ilsvrc_boxes(self.box_dir / f"{Path(path).stem}.xml")
            boxes = [b["box"] for b in annotation.boxes if b["name"] == images.classes[class_index] and not b["difficult"]]
            if boxes:
                self.trials.append((Path(path), class_index, boxes, annotation.width, annotation.height))
            else:
                self.skipped_difficult += 1

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, index: int) -> dict:
        path, class_index, boxes, width, height = self.trials[index]
        image = readers.load_rgb(path)
        scale_x, scale_y = image.width / width, image.height / height
        mask = torch.zeros(image.height, image.width, dtype=torch.bool)
        for xmin, ymin, xmax, ymax in boxes:  # inclusive pixel corners
            mask[round(ymin * scale_y):round((ymax + 1) * scale_y), round(xmin * scale_x):round((xmax + 1) * scale_x)] = True
        return make_trial(path, image, mask, class_index, self.transform)
