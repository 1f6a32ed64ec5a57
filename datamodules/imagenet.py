"""ImageNet (ILSVRC-2012 classification) as distributed, and its validation box XML files for the
labels of a flat validation folder and the localisation trials."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from .base import DATASETS, DataOptions, existing_dir
from .imagefolder import ClassFolderDataModule, ClassFolderDataset, LabelledImageDataset, list_class_folders
from .images import (
    IMAGE_EXTENSIONS,
    Sample,
    TrialGeometry,
    load_rgb_or_skip,
    make_trial,
    to_float_image,
)


class IlsvrcBoxes(NamedTuple):
    """Boxes of one ILSVRC/PASCAL-VOC XML file and the size of the image they refer to."""

    boxes: list[dict[str, Any]]  # dict(name=wnid, box=(xmin, ymin, xmax, ymax), difficult=bool)
    width: int
    height: int


def read_ilsvrc_boxes(xml_path: str | os.PathLike) -> IlsvrcBoxes:
    """Parse an ILSVRC (PASCAL-VOC style) box annotation file.

    Coordinates are returned as written in the file (1-based, inclusive pixel corners, in the
    image's own size): :func:`ilsvrc_box_mask` turns them into a mask.
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


def ilsvrc_box_mask(boxes: Sequence[tuple[int, int, int, int]], width: int, height: int,
                    image_width: int, image_height: int) -> torch.Tensor:
    """bool ``[image_height, image_width]``: the union of ``boxes``, ILSVRC corners (1-based and
    inclusive, as the XML files write them) in an image of ``width`` x ``height``, rescaled when
    the decoded image has another size."""
    scale_x, scale_y = image_width / width, image_height / height
    mask = torch.zeros(image_height, image_width, dtype=torch.bool)
    for xmin, ymin, xmax, ymax in boxes:
        # Pixel x covers [x - 1, x) in 0-based edges: the box spans edges [xmin - 1, xmax).
        mask[round((ymin - 1) * scale_y):round(ymax * scale_y),
             round((xmin - 1) * scale_x):round(xmax * scale_x)] = True
    return mask


class BoxMaskDataset(Dataset):
    """ImageNet validation trials: each image with its class, masked by its boxes of that class,
    from ILSVRC's validation box XML files (``annotations[path]``, parsed by the datamodule).

    ``geometry.protocol`` decides which boxes and which images count, as each protocol does:
    - ``standard``: the union of the class's boxes that are not "difficult"; an image whose boxes
      of the class are all difficult is left out of every metric;
    - ``authors``: the union of all the class's boxes (the authors' ``imagenet_as_mask``); an image
      whose boxes of the class are all difficult is kept for CH but left out of PG and SPG
      (``"pointing"`` False), as their scripts do.
    ``skipped_difficult`` counts the images left out of PG and SPG that way, ``skipped_no_box``
    those with no box of the class at all (an annotation problem rather than a hard image; left
    out of every metric). Corrupt images are skipped (None) or raise as ``images.skip_corrupt``
    says.
    """

    def __init__(self, images: LabelledImageDataset, annotations: Mapping[Path, IlsvrcBoxes],
                 geometry: TrialGeometry):
        self.geometry = geometry
        self.skip_corrupt = images.skip_corrupt
        authors = geometry.protocol == "authors"
        # (path, class, boxes, XML width, XML height, counts for PG and SPG)
        self.trials: list[tuple[Path, int, list[tuple[int, int, int, int]], int, int, bool]] = []
        self.skipped_difficult = 0
        self.skipped_no_box = 0
        for path, class_index in images.samples:
            annotation = annotations[path]
            of_class = [b for b in annotation.boxes if b["name"] == images.classes[class_index]]
            usable = [b["box"] for b in of_class if not b["difficult"]]
            if not of_class:
                self.skipped_no_box += 1
                continue
            if not usable:
                self.skipped_difficult += 1
                if not authors:
                    continue
            boxes = [b["box"] for b in of_class] if authors else usable
            self.trials.append((Path(path), class_index, boxes, annotation.width, annotation.height, bool(usable)))

    def __len__(self) -> int:
        return len(self.trials)

    def sizes(self) -> list[tuple[int, int]]:
        """Each trial's image size (height, width) as its XML file states it."""
        return [(height, width) for _, _, _, width, height, _ in self.trials]

    def __getitem__(self, index: int) -> Sample | None:
        path, class_index, boxes, width, height, pointing = self.trials[index]
        image = load_rgb_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        if self.geometry.protocol == "authors" and image.size != (width, height):
            # Maps are scored at the XML's size there, and batches are grouped by it.
            raise ValueError(f"image {path} is {image.width}x{image.height} but its box file states "
                             f"{width}x{height}")
        mask = ilsvrc_box_mask(boxes, width, height, image.width, image.height)
        return make_trial(path, image, mask, class_index, self.geometry, pointing)


VAL_LAYOUT = """data.data_dir must hold ImageNet as distributed:
  <data_dir>/train/<wnid>/*.JPEG                 (one folder per class)
  <data_dir>/val/ILSVRC2012_val_*.JPEG           (flat, as the archive unpacks; labels and boxes from
  <box_dir or data_dir/val>/ILSVRC2012_val_*.xml  the ILSVRC2012 box XML files), or
  <data_dir>/val/<wnid>/*.JPEG                   (sorted into class folders)"""


class ImageNetOptions(DataOptions):
    # The validation box XML files; None: next to the images.
    box_dir: str | None


@DATASETS.register("imagenet", ImageNetOptions)
class ImageNetDataModule(ClassFolderDataModule):
    """ILSVRC-2012 classification: ``data_dir/train/<wnid>/*.JPEG``, and the validation images
    either flat (``data_dir/val/*.JPEG``, as the archive unpacks) or in class folders
    (``data_dir/val/<wnid>/*.JPEG``). Classes are the sorted training wnids.

    Box files (ILSVRC2012 validation XML, one per image, named after it) are read from ``box_dir``,
    or next to the images where it is None. A flat validation folder takes each image's label from
    its box file (the class of its first object, as the authors' scripts do; every object of an
    ILSVRC validation image is of its class), so every image needs one. In class folders the box
    files are optional: without any, the localisation metrics are unavailable; with some, every
    image needs its own. Training uses RandomResizedCrop + flip, validation Resize(256/224 * size)
    + CenterCrop(size).
    """

    name = "imagenet"
    multilabel = False
    layout = VAL_LAYOUT

    def __init__(self, data_dir: str | Path, *, box_dir: str | Path | None, **loading) -> None:
        """``box_dir``: the validation box XML files, or None (next to the images); ``loading``:
        the options of :class:`ClassificationDataModule`."""
        super().__init__(data_dir, **loading)
        self.box_dir = Path(box_dir) if box_dir is not None else None
        self.save_hyperparameters()
        self._annotations: dict[Path, IlsvrcBoxes] | None = None

    def _xml_path(self, image: Path) -> Path:
        return (self.box_dir if self.box_dir is not None else image.parent) / f"{image.stem}.xml"

    def _read_annotations(self, images: Sequence[Path]) -> dict[Path, IlsvrcBoxes]:
        """The box file of every image in ``images`` (an error names the first image without one)."""
        annotations = {}
        for image in images:
            xml = self._xml_path(image)
            if not xml.is_file():
                raise FileNotFoundError(f"validation image {image} has no box file: expected {xml}")
            annotations[image] = read_ilsvrc_boxes(xml)
        return annotations

    def _build_localization_dataset(self, geometry: TrialGeometry) -> BoxMaskDataset | None:
        """Validation images masked by their boxes of their class, or None without box files."""
        val_set = self.val_dataset()
        if self._annotations is None:
            paths = [path for path, _ in val_set.samples]
            if self.box_dir is None and not any(self._xml_path(path).is_file() for path in paths):
                return None  # class folders without box files: no localisation
            self._annotations = self._read_annotations(paths)
        return BoxMaskDataset(val_set, self._annotations, geometry._replace(image_size=self.image_size))

    def _build_val_dataset(self) -> LabelledImageDataset:
        # Here, although class-folder validation images read their box files only for the
        # localisation trials: setup() builds this set first, so a mistyped box_dir fails before
        # the training set is listed and an epoch is trained.
        if self.box_dir is not None:
            existing_dir("box_dir", self.box_dir)
        val_dir = self._split_dir("val")
        transform = to_float_image(*self.eval_geometry())
        flat = sorted(entry for entry in val_dir.iterdir()
                      if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
        folders = [entry.name for entry in val_dir.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
        if flat and folders:
            raise ValueError(f"{val_dir} holds both image files and folders {sorted(folders)[:5]}: use one layout."
                             f"\n{VAL_LAYOUT}")
        if not flat and not folders:
            raise ValueError(f"no validation images in {val_dir}.\n{VAL_LAYOUT}")
        if folders:
            val_classes = list_class_folders(val_dir)
            extra = sorted(set(val_classes) - set(self.class_names))
            if extra:
                raise ValueError(
                    f"data.data_dir: class folder(s) {extra[:10]} of {val_dir} are not among the training classes "
                    f"of {self._split_dir('train')}"
                )
            return ClassFolderDataset(val_dir, transform, self.skip_corrupt, class_names=self.class_names)
        # Flat: labels from the box files, read once and kept for the localisation trials.
        self._annotations = self._read_annotations(flat)
        index_of = {wnid: index for index, wnid in enumerate(self.class_names)}
        samples = []
        for path in flat:
            objects = self._annotations[path].boxes
            if not objects:
                raise ValueError(f"box file {self._xml_path(path)} of {path} names no object: no label")
            wnid = objects[0]["name"]
            if wnid not in index_of:
                raise ValueError(f"box file {self._xml_path(path)} labels {path} as {wnid!r}, which is not among "
                                 f"the {len(index_of)} training classes of {self._split_dir('train')}")
            samples.append((path, index_of[wnid]))
        return LabelledImageDataset(val_dir, samples, self.class_names, transform, self.skip_corrupt)

    def _build_train_dataset(self) -> ClassFolderDataset:
        return ClassFolderDataset(
            self._split_dir("train"), to_float_image(*self.train_geometry()), self.skip_corrupt
        )
