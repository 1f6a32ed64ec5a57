"""PASCAL VOC 2007 as distributed: multi-label classification over its 20 classes, and TorchRay's
pointing-game protocol (one trial per image and class present, the "difficult" subset of
Zhang et al.'s excitation backprop paper)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .base import DATASETS, ClassificationDataModule, DataOptions, existing_dir
from .guidance import grow
from .imagenet import IlsvrcBoxes, ilsvrc_box_mask, read_ilsvrc_boxes
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

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_LAYOUT = """\
data.data_dir must hold PASCAL VOC 2007 as distributed (VOCdevkit/VOC2007 of the trainval and
test archives, unpacked into one tree):
  <data_dir>/JPEGImages/<id>.jpg
  <data_dir>/Annotations/<id>.xml
  <data_dir>/ImageSets/Main/{trainval,test}.txt
  <data_dir>/SegmentationClass/<id>.png   (for data.mask=segmentation; boxes where an image has none)"""


def read_split(root: Path, split: str, key: str) -> list[str]:
    """The image ids of ``ImageSets/Main/<split>.txt`` (``data.<key>``)."""
    sets = root / "ImageSets" / "Main"
    if not sets.is_dir():
        raise FileNotFoundError(f"data.data_dir: {sets} not found.\n{VOC_LAYOUT}")
    path = sets / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"data.{key}: {path} not found; splits "
                                f"there: {sorted(file.stem for file in sets.glob('*.txt') if '_' not in file.stem)}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path} names no image")
    return ids


def read_annotations(root: Path, ids: Sequence[str]) -> list[IlsvrcBoxes]:
    """Each image's XML; an object of a class outside VOC's 20 is an error naming the file."""
    annotations = []
    for image_id in ids:
        path = root / "Annotations" / f"{image_id}.xml"
        if not path.is_file():
            raise FileNotFoundError(f"data.data_dir: image {image_id} has no annotation file: expected {path}")
        annotation = read_ilsvrc_boxes(path)
        unknown = [box["name"] for box in annotation.boxes if box["name"] not in VOC_CLASSES]
        if unknown:
            raise ValueError(f"{path}: object class {unknown[0]!r} is not one of VOC's 20 classes")
        if not annotation.boxes:
            raise ValueError(f"{path} names no object: image {image_id} has no label")
        annotations.append(annotation)
    return annotations


def class_boxes(annotation: IlsvrcBoxes, class_index: int) -> list[dict]:
    return [box for box in annotation.boxes if box["name"] == VOC_CLASSES[class_index]]


def ebp_difficult(annotation: IlsvrcBoxes, class_index: int) -> bool:
    """Zhang et al.'s difficult (image, class) pair: the class's boxes cover less than a quarter
    of the image (their union) and another class is present."""
    boxes = [box["box"] for box in class_boxes(annotation, class_index)]
    area = ilsvrc_box_mask(boxes, annotation.width, annotation.height, annotation.width, annotation.height).sum()
    others = {box["name"] for box in annotation.boxes} - {VOC_CLASSES[class_index]}
    return bool(area < annotation.width * annotation.height / 4) and bool(others)


class VOCMultiLabelDataset(MultiLabelImages):
    """Images of a VOC split: target = multi-hot over the 20 classes of its objects ("difficult"
    ones included: the object is there), and ``"instances"``, the number of objects of each."""

    def __init__(self, root: Path, ids: Sequence[str], annotations: Sequence[IlsvrcBoxes], transform: Transform,
                 skip_corrupt: bool):
        self.root, self.ids, self.annotations = root, list(ids), list(annotations)
        self.transform, self.skip_corrupt = transform, skip_corrupt
        self.paths = [root / "JPEGImages" / f"{image_id}.jpg" for image_id in self.ids]
        missing = [path for path in self.paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"data.data_dir: {len(missing)} image(s) of the split are not in "
                                    f"{root / 'JPEGImages'}, e.g. {[path.name for path in missing[:5]]}")
        self.instances = torch.zeros(len(self.ids), len(VOC_CLASSES))
        for row, annotation in enumerate(self.annotations):
            for box in annotation.boxes:
                self.instances[row, VOC_CLASSES.index(box["name"])] += 1
        self.targets = self.instances > 0

    def keys(self) -> list[str]:
        return list(self.ids)


class VOCMasks:
    """The mask of an image's class: the union of its boxes (TorchRay's ``voc_as_mask``, 1-based
    inclusive corners), or its pixels of ``SegmentationClass`` (``kind="segmentation"``; the
    255 borders left out) where the image has a segmentation; boxes grown by ``dilation`` of
    their size for the guidance objectives."""

    def __init__(self, images: VOCMultiLabelDataset, kind: str, dilation: float = 0.0):
        self.images, self.kind, self.dilation = images, kind, dilation
        self.files = [images.root / "SegmentationClass" / f"{image_id}.png" for image_id in images.ids]
        self.segmented = [kind == "segmentation" and file.is_file() for file in self.files]

    def __call__(self, index: int, class_index: int) -> torch.Tensor:
        annotation = self.images.annotations[index]
        if self.segmented[index]:
            with Image.open(self.files[index]) as segmentation:
                labels = np.asarray(segmentation)
            # Palette index k + 1 is class k, 0 the background, 255 the objects' borders.
            return torch.from_numpy(labels == class_index + 1)
        mask = np.zeros((annotation.height, annotation.width), dtype=bool)
        for box in class_boxes(annotation, class_index):
            xmin, ymin, xmax, ymax = box["box"]
            box_mask = ilsvrc_box_mask([box["box"]], annotation.width, annotation.height, annotation.width,
                                       annotation.height).numpy()
            mask |= grow(box_mask, int(self.dilation * (ymax - ymin + 1)), int(self.dilation * (xmax - xmin + 1)))
        return torch.from_numpy(mask)


class VOCTrials(Dataset):
    """TorchRay's pointing-game trials: one per (image, class present), masked by
    :class:`VOCMasks`; a class whose boxes are all "difficult" (PASCAL's flag) has no trial, as
    TorchRay skips it. ``"difficult"``: the pair is in the difficult subset: TorchRay's flags
    file where given (``flags_file``, :class:`DifficultFlags`), else Zhang et al.'s rule
    (:func:`ebp_difficult`). ``boxes_for_masks`` counts the trials masked by boxes under
    ``kind="segmentation"`` (no segmentation PNG)."""

    def __init__(self, masks: VOCMasks, geometry: TrialGeometry, flags_file: Path | None = None):
        self.masks, self.geometry = masks, geometry
        images = masks.images
        self.flags = DifficultFlags(flags_file, len(VOC_CLASSES), images.ids) if flags_file is not None else None
        self.trials: list[tuple[int, int, bool]] = []
        self.skipped_difficult = 0
        for index, annotation in enumerate(images.annotations):
            for class_index in sorted({VOC_CLASSES.index(box["name"]) for box in annotation.boxes}):
                if all(box["difficult"] for box in class_boxes(annotation, class_index)):
                    self.skipped_difficult += 1
                    continue
                difficult = (ebp_difficult(annotation, class_index) if self.flags is None
                             else self.flags(images.ids[index], class_index))
                self.trials.append((index, class_index, difficult))
        self.boxes_for_masks = sum(not masks.segmented[index] for index, _, _ in self.trials) \
            if masks.kind == "segmentation" else 0
        if self.boxes_for_masks:
            log.warning("%d of %d VOC trial(s) have no segmentation: their boxes serve as masks", self.boxes_for_masks,
                        len(self.trials))

    @property
    def mask_source(self) -> str:
        """What the trials' masks and the difficult subset are, for the report."""
        if self.masks.kind == "box":
            masks = "the union of the class's boxes (Annotations)"
        else:
            masks = (f"the class's SegmentationClass pixels; the union of its boxes for the {self.boxes_for_masks} of "
                     f"{len(self.trials)} trials whose image has no segmentation")
        subset = "Zhang et al.'s rule computed from the annotations" if self.flags is None else self.flags.describe()
        return f"{masks}; PG (difficult): {subset}"

    def __len__(self) -> int:
        return len(self.trials)

    def sizes(self) -> list[tuple[int, int]]:
        annotations = self.masks.images.annotations
        return [(annotations[index].height, annotations[index].width) for index, _, _ in self.trials]

    def __getitem__(self, index: int) -> Sample | None:
        image_index, class_index, difficult = self.trials[index]
        images = self.masks.images
        path = images.paths[image_index]
        image = load_rgb_or_skip(path, images.skip_corrupt)
        if image is None:
            return None
        trial = make_trial(path, image, self.masks(image_index, class_index), class_index, self.geometry)
        return {**trial, "difficult": torch.tensor(difficult)}


class VOCOptions(DataOptions):
    # ImageSets/Main/<split>.txt
    train_split: str
    val_split: str
    # The pointing game's masks: boxes (TorchRay's) or SegmentationClass (boxes where an image has
    # no segmentation, counted in the log).
    mask: Literal["box", "segmentation"]
    # TorchRay's pointing_game_ebp_voc07_difficult.txt (the exact difficult subset it ships);
    # None: Zhang et al.'s rule, computed from the annotations.
    difficult_flags: str | None


@DATASETS.register("voc2007", VOCOptions)
class VOC2007DataModule(ClassificationDataModule):
    """PASCAL VOC 2007 (``data_dir`` is its ``VOC2007/`` folder), multi-label over the 20 classes:
    BCE summed over classes, F1, GC composites whose distractors lack the explained class, as on
    COCO. Training RandomResizedCrop + flip; validation Resize((size, size)), no object cut off.
    The localisation trials are TorchRay's pointing game (:class:`VOCTrials`): PG as the mean
    over classes, and ``pg_difficult`` on the difficult subset beside it."""

    name = "voc2007"
    multilabel = True
    guidance_masks = "boxes"

    def __init__(self, data_dir: str | Path, *, train_split: str, val_split: str, mask: str,
                 difficult_flags: str | None, **loading) -> None:
        super().__init__(data_dir, **loading)
        self.train_split, self.val_split, self.mask = train_split, val_split, mask
        self.difficult_flags = Path(difficult_flags) if difficult_flags else None
        self.save_hyperparameters()

    @property
    def class_names(self) -> list[str]:
        return list(VOC_CLASSES)

    @property
    def num_classes(self) -> int:
        return len(VOC_CLASSES)

    def eval_geometry(self) -> list[v2.Transform]:
        return [v2.Resize((self.image_size, self.image_size))]

    def _dataset(self, split: str, key: str, transform: Transform) -> VOCMultiLabelDataset:
        existing_dir("data_dir", self.data_dir)
        ids = read_split(self.data_dir, split, key)
        return VOCMultiLabelDataset(self.data_dir, ids, read_annotations(self.data_dir, ids), transform,
                                    self.skip_corrupt)

    def _build_val_dataset(self) -> VOCMultiLabelDataset:
        return self._dataset(self.val_split, "val_split", to_float_image(*self.eval_geometry()))

    def _build_train_dataset(self) -> VOCMultiLabelDataset:
        return self._dataset(self.train_split, "train_split", to_float_image(*self.train_geometry()))

    def _build_localization_dataset(self, geometry: TrialGeometry) -> VOCTrials:
        return VOCTrials(VOCMasks(self.val_dataset(), self.mask), geometry._replace(image_size=self.image_size),
                         self.difficult_flags)

    def training_masks(self, dilation: float) -> VOCMasks:
        return VOCMasks(self.train_set, "box", dilation)
