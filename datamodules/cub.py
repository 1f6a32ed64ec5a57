"""CUB-200-2011 as distributed: single-label classification over 200 bird species, with each
image's box and, from the separately distributed ``segmentations/``, its bird's mask."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import DATASETS, ClassificationDataModule, DataOptions, existing_dir
from .guidance import grow
from .imagefolder import LabelledImageDataset
from .images import Sample, TrialGeometry, load_rgb_or_skip, make_trial, to_float_image

log = logging.getLogger(__name__)

CUB_LAYOUT = """\
data.data_dir must hold CUB-200-2011 as distributed (CUB_200_2011/ of CUB_200_2011.tgz):
  <data_dir>/images/<class>/<file>.jpg
  <data_dir>/images.txt  classes.txt  image_class_labels.txt  train_test_split.txt  bounding_boxes.txt
and, for data.mask=segmentation, the separately distributed segmentations.tgz unpacked:
  <data_dir>/segmentations/<class>/<file>.png  (or data.segmentation_dir)"""

# A segmentation PNG averages several annotators' masks (0 to 255): a pixel is the bird's where
# most of them said so.
SEGMENTATION_THRESHOLD = 128


class CubImage(NamedTuple):
    path: Path  # under images/
    label: int  # 0-based class index
    train: bool
    box: tuple[float, float, float, float]  # x, y, width, height in pixels, 0-based


def _read_table(path: Path, columns: int) -> dict[int, list[str]]:
    """``<image or class id> <value>...`` per line, by id; an error names the file and the line."""
    if not path.is_file():
        raise FileNotFoundError(f"data.data_dir: {path} not found.\n{CUB_LAYOUT}")
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1) if columns == 2 else line.split()
        try:
            if len(fields) != columns:
                raise ValueError(f"{columns} fields expected")
            key = int(fields[0])
        except ValueError as err:
            raise ValueError(f"{path}, line {number}: {line!r}: {err}") from None
        if key in rows:
            raise ValueError(f"{path}, line {number}: id {key} appears twice")
        rows[key] = fields[1:]
    return rows


def read_cub(root: Path) -> tuple[list[str], list[CubImage]]:
    """The class names (in ``classes.txt``'s id order) and every image, in ``images.txt``'s id
    order. Every table must name exactly ``images.txt``'s ids: an error names the file and the
    first id it lacks or adds."""
    existing_dir("data_dir", root)
    classes = _read_table(root / "classes.txt", 2)
    class_ids = sorted(classes)
    class_index = {class_id: index for index, class_id in enumerate(class_ids)}
    images = _read_table(root / "images.txt", 2)
    tables = {name: _read_table(root / name, columns) for name, columns in
              (("image_class_labels.txt", 2), ("train_test_split.txt", 2), ("bounding_boxes.txt", 5))}
    for name, table in tables.items():
        if table.keys() != images.keys():
            extra, missing = sorted(table.keys() - images.keys()), sorted(images.keys() - table.keys())
            what = f"image id {extra[0]}, which images.txt does not list" if extra else \
                f"no line for image id {missing[0]} of images.txt"
            raise ValueError(f"data.data_dir: {root / name} has {what}")
    records = []
    for image_id in sorted(images):
        try:
            label = int(tables["image_class_labels.txt"][image_id][0])
            box = tuple(float(value) for value in tables["bounding_boxes.txt"][image_id])
        except ValueError as err:
            raise ValueError(f"data.data_dir: image id {image_id} of {root}: a label or box that is no number: "
                             f"{err}") from None
        if label not in class_index:
            raise ValueError(f"data.data_dir: {root / 'image_class_labels.txt'} gives image id {image_id} class "
                             f"{label}, which classes.txt does not list")
        train = tables["train_test_split.txt"][image_id][0].strip() == "1"
        records.append(CubImage(root / "images" / images[image_id][0].strip(), class_index[label], train, box))
    return [classes[class_id][0].strip() for class_id in class_ids], records


def box_mask(box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """bool ``[height, width]``: every pixel the box (x, y, width, height) touches."""
    x, y, box_width, box_height = box
    mask = torch.zeros(height, width, dtype=torch.bool)
    top, left = max(0, int(np.floor(y))), max(0, int(np.floor(x)))
    mask[top:int(np.ceil(y + box_height)), left:int(np.ceil(x + box_width))] = True
    return mask


class CubMasks:
    """Each image's bird: its segmentation (``kind="segmentation"``, pixels at or above
    :data:`SEGMENTATION_THRESHOLD`), or its box where it has no segmentation file or
    ``kind="box"``, grown on every side by ``dilation`` of the box's width and height (whole
    pixels, rounded down; the guidance objectives' ``loss.mask_dilation``). ``missing`` counts
    the images whose segmentation file is absent."""

    def __init__(self, records: Sequence[CubImage], images_dir: Path, segmentation_dir: Path, kind: str,
                 dilation: float = 0.0):
        self.records, self.kind, self.dilation = list(records), kind, dilation
        self.files = [segmentation_dir / record.path.relative_to(images_dir).with_suffix(".png") for record in records]
        self.missing = sum(not file.is_file() for file in self.files) if kind == "segmentation" else 0
        if self.missing:
            log.warning("%d of %d CUB image(s) have no segmentation in %s: their boxes serve as masks", self.missing,
                        len(self.files), segmentation_dir)

    def __call__(self, index: int, class_index: int | None = None) -> torch.Tensor:
        """The mask of image ``index`` at its own size (``class_index``: its class; the bird is
        its one object)."""
        record, file = self.records[index], self.files[index]
        if self.kind == "segmentation" and file.is_file():
            with Image.open(file) as segmentation:
                mask = np.asarray(segmentation.convert("L")) >= SEGMENTATION_THRESHOLD
        else:
            with Image.open(record.path) as image:  # the header alone: its size
                width, height = image.size
            mask = box_mask(record.box, height, width).numpy()
        _, _, box_width, box_height = record.box
        return torch.from_numpy(grow(mask, int(self.dilation * box_height), int(self.dilation * box_width)))


class CubTrials(Dataset):
    """One trial per test image: the image, its class and its bird's mask (:class:`CubMasks`)."""

    def __init__(self, masks: CubMasks, geometry: TrialGeometry, skip_corrupt: bool):
        self.masks, self.geometry, self.skip_corrupt = masks, geometry, skip_corrupt

    def __len__(self) -> int:
        return len(self.masks.records)

    @property
    def mask_source(self) -> str:
        """What the trials' masks are, for the report."""
        if self.masks.kind == "box":
            return "the bird's box (bounding_boxes.txt)"
        return (f"the bird's segmentation (most annotators); its box for the {self.masks.missing} of {len(self)} "
                f"images without one")

    def sizes(self) -> list[tuple[int, int]]:
        """Each trial's image size (height, width), from the image files' headers."""
        sizes = []
        for record in self.masks.records:
            with Image.open(record.path) as image:
                sizes.append((image.height, image.width))
        return sizes

    def __getitem__(self, index: int) -> Sample | None:
        record = self.masks.records[index]
        image = load_rgb_or_skip(record.path, self.skip_corrupt)
        if image is None:
            return None
        return make_trial(record.path, image, self.masks(index), record.label, self.geometry)


class CUBOptions(DataOptions):
    # What the localisation metrics and the guidance objectives take as the bird: its segmentation
    # (box where an image has none, counted in the log) or its box.
    mask: Literal["segmentation", "box"]
    # The unpacked segmentations.tgz; None: <data_dir>/segmentations.
    segmentation_dir: str | None


@DATASETS.register("cub", CUBOptions)
class CUBDataModule(ClassificationDataModule):
    """CUB-200-2011 (``data_dir`` is its ``CUB_200_2011/`` folder): the train/test split of
    ``train_test_split.txt``, the test images as the validation set, labels from
    ``image_class_labels.txt``, classes in ``classes.txt``'s order. Training RandomResizedCrop +
    flip, validation Resize(256/224 * size) + CenterCrop(size). Localisation trials and guidance
    masks: the bird's segmentation or box (``mask``)."""

    name = "cub"
    multilabel = False
    guidance_masks = "masks"

    def __init__(self, data_dir: str | Path, *, mask: str, segmentation_dir: str | None, **loading) -> None:
        super().__init__(data_dir, **loading)
        self.mask = mask
        self.segmentation_dir = Path(segmentation_dir) if segmentation_dir else self.data_dir / "segmentations"
        self.save_hyperparameters()
        self._table: tuple[list[str], list[CubImage]] | None = None

    def _read(self) -> tuple[list[str], list[CubImage]]:
        if self._table is None:
            self._table = read_cub(self.data_dir)
        return self._table

    @property
    def class_names(self) -> list[str]:
        return self._read()[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _split(self, train: bool) -> list[CubImage]:
        return [record for record in self._read()[1] if record.train == train]

    def _dataset(self, train: bool, transform) -> LabelledImageDataset:
        records = self._split(train)
        return LabelledImageDataset(self.data_dir / "images", [(record.path, record.label) for record in records],
                                    self.class_names, transform, self.skip_corrupt)

    def _masks(self, train: bool, dilation: float = 0.0) -> CubMasks:
        if self.mask == "segmentation":
            existing_dir("segmentation_dir", self.segmentation_dir)
        return CubMasks(self._split(train), self.data_dir / "images", self.segmentation_dir, self.mask, dilation)

    def _build_val_dataset(self) -> LabelledImageDataset:
        return self._dataset(False, to_float_image(*self.eval_geometry()))

    def _build_train_dataset(self) -> LabelledImageDataset:
        return self._dataset(True, to_float_image(*self.train_geometry()))

    def _build_localization_dataset(self, geometry: TrialGeometry) -> CubTrials:
        return CubTrials(self._masks(False), geometry._replace(image_size=self.image_size), self.skip_corrupt)

    def training_masks(self, dilation: float) -> CubMasks:
        return self._masks(True, dilation)
