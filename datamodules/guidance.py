"""Training samples that carry the mask of the class their explanation is guided towards
(``loss=energy|l1|rrr|ppce``: Rao et al., ICCV 2023), the mask moved with the image through the
training augmentation."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .images import LoaderStream, Sample, unit_range

# A training image's mask of a class, at the image's own size: (dataset index, class index) -> bool [H, W].
MaskSource = Callable[[int, int], torch.Tensor]


class CocoTrainingMasks:
    """Masks of training images from COCO-format annotations: the union of a class's instance
    masks (``shape="masks"``: their segmentations) or of their boxes (``shape="boxes"``, as the
    authors guide with on COCO and VOC), for the images ``image_ids`` (one per dataset index)."""

    def __init__(self, coco: COCO, image_ids: Sequence[int], category_ids: Sequence[int], shape: str) -> None:
        if shape not in ("masks", "boxes"):
            raise ValueError(f"mask shape {shape!r}: masks or boxes")
        self.coco, self.image_ids, self.category_ids, self.shape = coco, list(image_ids), list(category_ids), shape

    def __call__(self, index: int, class_index: int) -> torch.Tensor:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), dtype=bool)
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, catIds=[self.category_ids[class_index]])):
            if self.shape == "masks" and ann.get("segmentation"):
                mask |= self.coco.annToMask(ann).astype(bool)
            elif "bbox" in ann:
                x, y, width, height = ann["bbox"]
                # Every pixel the box touches.
                mask[math.floor(y):math.ceil(y + height), math.floor(x):math.ceil(x + width)] = True
            else:  # no box stated: the segmentation's extent
                rows, cols = self.coco.annToMask(ann).astype(bool).nonzero()
                if len(rows):
                    mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        return torch.from_numpy(mask)


def dilate(mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """``mask`` (bool ``[H, W]``) grown on each side by ``fraction`` of its bounding box's height
    and width (whole pixels, rounded down): a box becomes the authors' enlarged box, an exact mask
    grows alike. An empty mask stays empty."""
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    if fraction == 0 or len(rows) == 0:
        return mask
    grow_y = int(fraction * (int(rows[-1]) - int(rows[0]) + 1))
    grow_x = int(fraction * (int(cols[-1]) - int(cols[0]) + 1))
    if grow_y == 0 and grow_x == 0:
        return mask
    grown = F.max_pool2d(mask[None, None].float(), (2 * grow_y + 1, 2 * grow_x + 1), stride=1,
                         padding=(grow_y, grow_x))
    return grown[0, 0].bool()


def annotated_images(count: int, fraction: float, seed: int) -> torch.Tensor:
    """bool ``[count]``: the ``floor(fraction * count)`` training images whose masks are used,
    drawn once from ``seed`` (the others train on the classification loss alone)."""
    chosen = torch.zeros(count, dtype=torch.bool)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    chosen[order[:int(fraction * count)]] = True
    return chosen


def _keep_pil(image: Image.Image) -> Image.Image:
    return image


class GuidedSamples(Dataset):
    """``dataset``'s training samples, each with the class its explanation is guided towards and
    that class's mask:

    - ``"guide_class"``: the label, or on ``multilabel`` data one of the image's labels drawn
      uniformly (the authors' draw);
    - ``"mask"`` bool ``[H, W]``: the class's mask from ``masks`` (at the image's own size), grown
      by ``dilation`` (:func:`dilate`), then moved through ``geometry`` (the training
      augmentation's geometric steps) together with the image; all False for an image outside
      ``annotated``;
    - ``"annotated"`` bool: whether the image's mask is used.

    ``dataset`` decodes the image as usual (corrupt files give None with ``skip_corrupt``); a copy
    of it keeps the decoded picture so that the image and its mask take the same random steps.
    Draws come from torch's global generator (the augmentation's steps) and from a
    :class:`LoaderStream` of ``rank`` (the class), as :class:`DistractorDataset`'s do.
    """

    def __init__(self, dataset: Dataset, masks: MaskSource, geometry: Sequence[v2.Transform], annotated: torch.Tensor,
                 dilation: float, multilabel: bool, rank: int = 0) -> None:
        if len(annotated) != len(dataset):
            raise ValueError(f"{len(annotated)} annotation flags for {len(dataset)} training images")
        self.decoded = copy.copy(dataset)
        self.decoded.transform = _keep_pil
        self.masks, self.annotated, self.dilation = masks, annotated, dilation
        self.geometry = v2.Compose([*geometry, v2.PILToTensor()]) if geometry else v2.PILToTensor()
        self.multilabel = multilabel
        self.stream = LoaderStream(rank)

    def __len__(self) -> int:
        return len(self.decoded)

    def guided_class(self, target: torch.Tensor) -> int:
        if not self.multilabel:
            return int(target)
        labels = target.nonzero().flatten()
        if len(labels) == 0:
            raise ValueError("a training image without a label has no class to guide its explanation towards")
        return int(labels[torch.randint(len(labels), (), generator=self.stream.generator())])

    def __getitem__(self, index: int) -> Sample | None:
        sample = self.decoded[index]
        if sample is None:
            return None
        picture: Image.Image = sample["image"]
        guided = self.guided_class(sample["target"])
        annotated = bool(self.annotated[index])
        if annotated:
            mask = self.masks(index, guided)
            if tuple(mask.shape) != (picture.height, picture.width):
                raise ValueError(f"training image {index}: its mask of class {guided} is {tuple(mask.shape)}, the "
                                 f"image {(picture.height, picture.width)}")
            mask = dilate(mask, self.dilation)
        else:
            mask = torch.zeros(picture.height, picture.width, dtype=torch.bool)
        image, mask = self.geometry(picture, tv_tensors.Mask(mask))
        return {**sample, "image": unit_range(image), "mask": mask.as_subclass(torch.Tensor).bool(),
                "guide_class": torch.tensor(guided), "annotated": torch.tensor(annotated)}


def coco_image_ids(coco: COCO, keys: Sequence[str], ann_file: Path) -> list[int]:
    """The COCO image id of each training image, by its key (the path under the image folder, the
    json's ``file_name``); an image the json does not list is an error naming both."""
    by_name = {str(info["file_name"]): image_id for image_id, info in coco.imgs.items()}
    missing = [key for key in keys if key not in by_name]
    if missing:
        raise ValueError(f"{len(missing)} training image(s) are not in {ann_file}, e.g. {missing[:3]}: no masks")
    return [by_name[key] for key in keys]
