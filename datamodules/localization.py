"""Validation images with ground-truth masks, for the localisation metrics (PG, SPG, CH).

Every (image, ground-truth class) pair of a COCO instances file is one trial, as in TorchRay's
pointing game: a single-object synthetic image gives one trial, a COCO image one per class.
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


class CocoMaskDataset(Dataset):
    """Trials ``{"image": [3,H,W] in [0,1], "target": class index, "mask": bool [H,W]}``.

    ``category_ids[k]`` is the COCO category id of class ``k``; categories outside it are not
    evaluated. With ``image_size`` the image and its mask go through the same Resize (shorter
    side) + CenterCrop, so they stay aligned and a batch has one size; without it images keep
    their size (the synthetic images all have one size already).
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
        self.transform = (
            v2.Compose([v2.Resize(image_size), v2.CenterCrop(image_size)]) if image_size is not None else None
        )

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, index: int) -> dict:
        image_id, class_index = self.trials[index]
        info = self.coco.loadImgs(image_id)[0]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(readers.load_rgb(self.image_dir / info["file_name"])))
        mask = readers.coco_masks(self.coco, image_id, {class_index: self.category_ids[class_index]})[class_index]
        mask = tv_tensors.Mask(torch.from_numpy(mask))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {
            "image": v2.functional.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor),
            "target": torch.tensor(class_index),
            "mask": mask.as_subclass(torch.Tensor).bool(),
        }
