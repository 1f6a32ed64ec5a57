"""Readers of the real on-disk formats: ImageFolder trees, COCO instances json, ILSVRC box XML.

Conventions shared by every dataset of this package:
- an image is a float32 tensor in [0, 1] of shape [3, H, W], NOT normalised (the network
  normalises inside, so explainers and FGSM can work in pixel space);
- a sample is ``{"image": Tensor, "target": Tensor}``; a single-label target is an int64 scalar,
  a multi-label target a float32 multi-hot vector [K];
- :func:`load_rgb` is the only place where image files are decoded. Datasets look it up in this
  module at call time, so wrapping ``readers.load_rgb`` (e.g. to count decodes) sees every call.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # compared lower-cased

Sample = dict[str, Tensor]
Transform = Callable[[Image.Image], Tensor]


class CorruptImageError(ValueError):
    """An image file exists but cannot be decoded; the message names the file."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open ``path``, decode it completely and return it as an RGB image.

    A file that cannot be opened (missing, no permission) raises the usual OSError: that is a
    layout error, never skipped. Any failure to decode raises CorruptImageError naming the file.
    """
    with open(path, "rb") as handle:
        try:
            with Image.open(handle) as image:
                # Image.open only reads the header: load() decodes every pixel, so truncated
                # files fail here and not later inside a transform with an unrelated traceback.
                image.load()
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise CorruptImageError(f"corrupt image file {path}: {err}") from err


def _load_or_skip(path: Path, skip_corrupt: bool) -> Image.Image | None:
    """Decode through ``load_rgb``; with ``skip_corrupt`` a corrupt file gives None (logged)."""
    try:
        return load_rgb(path)
    except CorruptImageError as err:
        if not skip_corrupt:
            raise
        log.warning("skipping %s", err)
        return None


def collate_skipping_corrupt(samples: Sequence[Sample | None]) -> dict[str, Any]:
    """Stack samples into a batch, dropping the None that datasets return for corrupt files.

    Returns ``{"image": [B, 3, H, W], "target": [B] or [B, K], "skipped": number dropped}``.
    When every sample was dropped, "image" and "target" are empty tensors of shape [0]: the
    trainer recognises and skips such a batch (there is no H, W or K to shape them with).
    """
    kept = [sample for sample in samples if sample is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        return {"image": torch.empty(0), "target": torch.empty(0), "skipped": skipped}
    return {
        "image": torch.stack([sample["image"] for sample in kept]),
        "target": torch.stack([sample["target"] for sample in kept]),
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- ImageFolder


def list_class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders of an ImageFolder tree (hidden folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    names = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
    )
    if not names:
        raise ValueError(f"no class folders in image directory {root}")
    return names


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively (as ImageFolder does), in sorted order."""
    files = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs.sort()
        files.extend(
            Path(directory, name) for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS)
        )
    return files


class ClassFolderDataset(Dataset):
    """Single-label images in the ImageFolder layout ``root/<class>/<image files>``.

    Classes are the sorted folder names, unless ``class_names`` is given (e.g. the training
    classes, so that a validation tree uses the same indices); a folder that is not among
    ``class_names`` is an error naming it. A class of ``class_names`` without a folder simply has
    no samples here. With ``skip_corrupt`` a corrupt file yields None instead of raising, and
    :func:`collate_skipping_corrupt` drops it from the batch.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform,
        skip_corrupt: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        folders = list_class_folders(self.root)
        if class_names is None:
            self.classes = folders
        else:
            unknown = sorted(set(folders) - set(class_names))
            if unknown:
                raise ValueError(
                    f"class folder(s) {unknown} in {self.root} are not among the expected classes "
                    f"({len(class_names)} classes, e.g. those of the training set)"
                )
            self.classes = list(class_names)
        index_of = {name: index for index, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = [
            (path, index_of[name]) for name in folders for path in _image_files(self.root / name)
        ]
        if not self.samples:
            raise ValueError(f"no image files {IMAGE_EXTENSIONS} in the class folders of {self.root}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample | None:
        path, label = self.samples[index]
        image = _load_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        return {"image": self.transform(image), "target": torch.tensor(label, dtype=torch.int64)}


# --------------------------------------------------------------------------- COCO


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
        skip_corrupt: bool = False,
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

    def __getitem__(self, index: int) -> Sample | None:
        image = _load_or_skip(self.paths[index], self.skip_corrupt)
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


# --------------------------------------------------------------------------- ILSVRC boxes


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
