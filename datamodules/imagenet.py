"""ImageNet (ILSVRC-2012 classification) in the ImageFolder layout, and its validation box XML
files for the localisation trials."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from .base import ClassificationDataModule, existing_dir
from .imagefolder import ClassFolderDataset, list_class_folders
from .images import (
    Sample,
    imagenet_eval_transform,
    imagenet_train_transform,
    load_rgb_or_skip,
    make_trial,
    paired_eval_transform,
)


class IlsvrcBoxes(NamedTuple):
    """Boxes of one ILSVRC/PASCAL-VOC XML file and the size of the image they refer to."""

    boxes: list[dict[str, Any]]  # dict(name=wnid, box=(xmin, ymin, xmax, ymax), difficult=bool)
    width: int
    height: int


def read_ilsvrc_boxes(xml_path: str | os.PathLike) -> IlsvrcBoxes:
    """Parse an ILSVRC (PASCAL-VOC style) box annotation file.

    Coordinates are returned as written in the file (inclusive pixel corners, in the image's own
    size), so callers rescale them with ``width`` and ``height`` when the image is resized.
    """
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"box annotation file not found: {xml_path}")
    try:
        root = ElementTree.parse(xml_path).getroot()
        width = _xml_int(root, "size/width")
        height = _xml_int(root, "size/height")
        boxes = [
            {
                "name": _xml_text(obj, "name"),
                "box": tuple(_xml_int(obj, f"bndbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax")),
                "difficult": obj.findtext("difficult", default="0").strip() == "1",
            }
            for obj in root.iter("object")
        ]
    except (ElementTree.ParseError, ValueError, OverflowError) as err:
        raise ValueError(f"malformed box annotation file {xml_path}: {err}") from err
    return IlsvrcBoxes(boxes=boxes, width=width, height=height)


def _xml_text(element: ElementTree.Element, path: str) -> str:
    text = element.findtext(path)
    if text is None or not text.strip():
        raise ValueError(f"missing <{path}>")
    return text.strip()


def _xml_int(element: ElementTree.Element, path: str) -> int:
    # Some VOC-style files write coordinates as "12.0": accept them, reject anything else.
    return int(float(_xml_text(element, path)))


class BoxMaskDataset(Dataset):
    """ImageNet validation trials: each image with its class, masked by the union of its boxes of
    that class, read from ``box_dir/<image file stem>.xml`` (ILSVRC's validation box files).

    Images without a usable box of their class are left out, as in the papers' evaluation, and
    counted apart: ``skipped_difficult`` those whose boxes of the class are all "difficult",
    ``skipped_no_box`` those with no box of the class at all (an annotation problem rather than
    a hard image). Boxes are rescaled when the image's size differs from the size the XML file
    states. Corrupt images are skipped (None) or raise as ``images.skip_corrupt`` says.
    """

    def __init__(self, images: ClassFolderDataset, box_dir: str | os.PathLike, image_size: int):
        self.box_dir = Path(box_dir)
        if not self.box_dir.is_dir():
            raise FileNotFoundError(f"data.box_dir: directory not found: {self.box_dir}")
        self.transform = paired_eval_transform(image_size)
        self.skip_corrupt = images.skip_corrupt
        self.trials: list[tuple[Path, int, list[tuple[int, int, int, int]], int, int]] = []
        self.skipped_difficult = 0
        self.skipped_no_box = 0
        for path, class_index in images.samples:
            annotation = read_ilsvrc_boxes(self.box_dir / f"{Path(path).stem}.xml")
            of_class = [b for b in annotation.boxes if b["name"] == images.classes[class_index]]
            boxes = [b["box"] for b in of_class if not b["difficult"]]
            if boxes:
                self.trials.append((Path(path), class_index, boxes, annotation.width, annotation.height))
            elif of_class:
                self.skipped_difficult += 1
            else:
                self.skipped_no_box += 1

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, index: int) -> Sample | None:
        path, class_index, boxes, width, height = self.trials[index]
        image = load_rgb_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        scale_x, scale_y = image.width / width, image.height / height
        mask = torch.zeros(image.height, image.width, dtype=torch.bool)
        for xmin, ymin, xmax, ymax in boxes:  # inclusive pixel corners
            mask[round(ymin * scale_y):round((ymax + 1) * scale_y), round(xmin * scale_x):round((xmax + 1) * scale_x)] = True
        return make_trial(path, image, mask, class_index, self.transform)


class ImageNetDataModule(ClassificationDataModule):
    """``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*.JPEG``.

    The official validation archive is flat (50,000 files plus a label list): it must first be
    sorted into one folder per wnid, as for torchvision's ImageFolder, since labels are read from
    folder names. Validation classes must equal the training classes, so that class indices agree.
    Training uses RandomResizedCrop + flip, validation Resize(256/224 * size) + CenterCrop(size).
    With ``box_dir`` (ILSVRC's validation box XML files, one per image, named after it) the
    localisation metrics are available; with None they are not.
    """

    name = "imagenet"
    multilabel = False

    def __init__(self, data_dir: str | Path, *, box_dir: str | Path | None, **loading) -> None:
        """``box_dir``: the validation box XML files, or None; ``loading``: the options of
        :class:`ClassificationDataModule`."""
        super().__init__(data_dir, **loading)
        self.box_dir = Path(box_dir) if box_dir is not None else None
        self.save_hyperparameters()
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """The wnids of the training folders, read once (the model is built from their count)."""
        if self._class_names is None:
            self._class_names = list_class_folders(self._split_dir("train"))
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _build_localization_dataset(self) -> BoxMaskDataset | None:
        """Validation images masked by their boxes of their class (``box_dir/<stem>.xml``)."""
        if self.box_dir is None:
            return None
        return BoxMaskDataset(self.val_dataset(), self.box_dir, self.image_size)

    def _split_dir(self, split: str) -> Path:
        existing_dir("data_dir", self.data_dir)
        return existing_dir("data_dir", self.data_dir / split)

    def _build_val_dataset(self) -> ClassFolderDataset:
        val_dir = self._split_dir("val")
        val_classes = list_class_folders(val_dir)
        if val_classes != self.class_names:
            missing = sorted(set(self.class_names) - set(val_classes))
            extra = sorted(set(val_classes) - set(self.class_names))
            raise ValueError(
                f"data.data_dir: the classes of {val_dir} differ from those of {self._split_dir('train')}: "
                f"missing in val {missing[:10]}, not in train {extra[:10]}"
            )
        return ClassFolderDataset(
            val_dir, imagenet_eval_transform(self.image_size), self.skip_corrupt, class_names=self.class_names
        )

    def _build_train_dataset(self) -> ClassFolderDataset:
        return ClassFolderDataset(
            self._split_dir("train"), imagenet_train_transform(self.image_size), self.skip_corrupt
        )
