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
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .images import LoaderStream, Sample, unit_range

# A training image's mask of a class, at the image's own size: (dataset index, class index) -> bool [H, W].
MaskSource = Callable[[int, int], torch.Tensor]


class CocoTrainingMasks:
    """Masks of training images from COCO-format annotations, for the images ``image_ids`` (one
    per dataset index): the union of a class's instances, each its segmentation
    (``shape="masks"``) or its box (``shape="boxes"``, as the authors guide on COCO and VOC), a box
    covering every pixel it touches. ``dilation`` grows each instance on every side by that share of
    its own box's width and height (whole pixels, rounded down): a box becomes the authors'
    enlarged box (``utils.enlarge_bb``), clipped to the image.

    What ``__call__`` needs is copied out of ``coco`` here, into arrays: loader workers then never
    touch the large COCO index (forked workers would copy its pages as reference counts change)."""

    def __init__(self, coco: COCO, image_ids: Sequence[int], category_ids: Sequence[int], shape: str,
                 dilation: float = 0.0) -> None:
        if shape not in ("masks", "boxes"):
            raise ValueError(f"mask shape {shape!r}: masks or boxes")
        self.shape, self.dilation, self.num_classes = shape, dilation, len(category_ids)
        image_index = {image_id: index for index, image_id in enumerate(image_ids)}
        class_index = {category: index for index, category in enumerate(category_ids)}
        self.sizes = np.array([(coco.imgs[image_id]["height"], coco.imgs[image_id]["width"])
                               for image_id in image_ids], dtype=np.int64).reshape(-1, 2)
        rows, segmentations = [], []
        for ann in coco.dataset.get("annotations", []):
            image, category = image_index.get(ann["image_id"]), class_index.get(ann["category_id"])
            if image is None or category is None:
                continue
            segmentation = ann.get("segmentation") or None
            if segmentation is None and not ann.get("bbox"):
                raise ValueError(f"annotation {ann.get('id')} of image {ann['image_id']} has neither a box nor a "
                                 "segmentation: no mask to guide its class's explanation towards")
            box = ann.get("bbox") or self._extent(segmentation, *self.sizes[image])
            rows.append((image * self.num_classes + category, *box))
            segmentations.append(segmentation if shape == "masks" else None)
        order = sorted(range(len(rows)), key=lambda row: rows[row][0])
        table = np.array([rows[row] for row in order], dtype=np.float64).reshape(-1, 5)
        self.keys, self.boxes = table[:, 0].astype(np.int64), table[:, 1:]
        self.segmentations = [segmentations[row] for row in order]

    @staticmethod
    def _extent(segmentation, height: int, width: int) -> list[float]:
        """The box (x, y, width, height) of a segmentation, for an annotation that states none."""
        rows, cols = segmentation_mask(segmentation, height, width).nonzero()
        if len(rows) == 0:
            return [0.0, 0.0, 0.0, 0.0]
        return [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1),
                float(rows.max() - rows.min() + 1)]

    def __call__(self, index: int, class_index: int) -> torch.Tensor:
        height, width = (int(side) for side in self.sizes[index])
        mask = np.zeros((height, width), dtype=bool)
        key = index * self.num_classes + class_index
        for row in range(np.searchsorted(self.keys, key), np.searchsorted(self.keys, key, side="right")):
            x, y, box_width, box_height = self.boxes[row]
            grow_x, grow_y = int(self.dilation * box_width), int(self.dilation * box_height)
            segmentation = self.segmentations[row]
            if segmentation is not None:
                mask |= grow(segmentation_mask(segmentation, height, width), grow_y, grow_x)
            else:
                # Every pixel the box touches, grown and clipped to the image.
                mask[max(0, math.floor(y) - grow_y):math.ceil(y + box_height) + grow_y,
                     max(0, math.floor(x) - grow_x):math.ceil(x + box_width) + grow_x] = True
        return torch.from_numpy(mask)


def segmentation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a bool ``[height, width]``
    mask, as ``COCO.annToMask`` decodes it."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def grow(mask: np.ndarray, grow_y: int, grow_x: int) -> np.ndarray:
    """``mask`` grown by ``grow_y`` rows and ``grow_x`` columns on each side: a max over a
    (2 grow_y + 1) x (2 grow_x + 1) window, as two one-dimensional passes."""
    if grow_y == 0 and grow_x == 0:
        return mask
    grown = torch.from_numpy(mask)[None, None].float()
    if grow_x:
        grown = F.max_pool2d(grown, (1, 2 * grow_x + 1), stride=1, padding=(0, grow_x))
    if grow_y:
        grown = F.max_pool2d(grown, (2 * grow_y + 1, 1), stride=1, padding=(grow_y, 0))
    return grown[0, 0].bool().numpy()


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
    - ``"mask"`` bool ``[H, W]``: the class's mask from ``masks`` (at the image's own size), moved
      through ``geometry`` (the training augmentation's geometric steps) together with the image;
      all False for an image outside ``annotated``;
    - ``"annotated"`` bool: whether the image's mask is used: it is in ``annotated`` and its mask
      is not empty after the augmentation (a crop that leaves the object out has no mask to
      guide towards, and would otherwise ask for an all-zero map).

    ``dataset`` decodes the image as usual (corrupt files give None with ``skip_corrupt``); a copy
    of it keeps the decoded picture so that the image and its mask take the same random steps.
    Draws come from torch's global generator (the augmentation's steps) and from a
    :class:`LoaderStream` of ``rank`` (the class), as :class:`DistractorDataset`'s do.
    """

    def __init__(self, dataset: Dataset, masks: MaskSource, geometry: Sequence[v2.Transform], annotated: torch.Tensor,
                 multilabel: bool, rank: int = 0) -> None:
        if len(annotated) != len(dataset):
            raise ValueError(f"{len(annotated)} annotation flags for {len(dataset)} training images")
        self.decoded = copy.copy(dataset)
        self.decoded.transform = _keep_pil
        self.masks, self.annotated = masks, annotated
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
        else:
            mask = torch.zeros(picture.height, picture.width, dtype=torch.bool)
        image, mask = self.geometry(picture, tv_tensors.Mask(mask))
        mask = mask.as_subclass(torch.Tensor).bool()
        return {**sample, "image": unit_range(image), "mask": mask, "guide_class": torch.tensor(guided),
                "annotated": torch.tensor(annotated and bool(mask.any()))}


def coco_image_ids(coco: COCO, keys: Sequence[str], ann_file: Path) -> list[int]:
    """The COCO image id of each training image, by its key (the path under the image folder, the
    json's ``file_name``); an image the json does not list is an error naming both."""
    by_name = {str(info["file_name"]): image_id for image_id, info in coco.imgs.items()}
    missing = [key for key in keys if key not in by_name]
    if missing:
        raise ValueError(f"{len(missing)} training image(s) are not in {ann_file}, e.g. {missing[:3]}: no masks")
    return [by_name[key] for key in keys]
