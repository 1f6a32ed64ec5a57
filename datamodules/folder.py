"""A user's own images: ``train/<class>/*`` and ``val/<class>/*`` (torchvision's ImageFolder
layout), with optional object masks as a COCO-format instances json per split, the format
annotation tools (CVAT, Label Studio, labelme's converters, ...) export."""

from __future__ import annotations

from pathlib import Path

from pycocotools.coco import COCO
from torch.utils.data import Dataset

from .base import DATASETS, DataOptions
from .coco import CocoMaskDataset, load_coco
from .guidance import CocoTrainingMasks
from .imagefolder import ClassFolderDataModule, ClassFolderDataset
from .images import TrialGeometry, to_float_image

FOLDER_LAYOUT = """\
data=folder reads a folder per split, a folder per class in each (torchvision's ImageFolder):
  <data_dir>/train/<class>/*.jpg
  <data_dir>/val/<class>/*.jpg
and, optionally, COCO-format instances jsons with the objects' masks (data.train_annotations,
data.val_annotations), file names relative to the split's folder: <class>/<file>."""


class FolderOptions(DataOptions):
    # COCO-format instances json of each split's images (None: that split has no masks): each
    # image's file_name is its path under the split's folder (<class>/<file>), each category's
    # name a class folder's.
    train_annotations: str | None
    val_annotations: str | None


def annotation_index(path: Path, dataset: ClassFolderDataset, key: str) -> tuple[COCO, list[int], list[int]]:
    """The COCO index of the json at ``path`` (``data.<key>``) for the images of ``dataset``: the
    index, the category id of each class (a class without a category gets an id no annotation
    has) and the image id of each image of the set (likewise for an image the json does not
    list). A category that is no class, or an image that is not in the set, is an error naming the
    file and the entry."""
    coco = load_coco(path)
    classes = {name: index for index, name in enumerate(dataset.classes)}
    category_ids = [-1 - index for index in range(len(dataset.classes))]
    for category in coco.dataset["categories"]:
        if category.get("name") not in classes:
            raise ValueError(f"data.{key}: category {category.get('id')} of {path} is named {category.get('name')!r}, "
                             f"which is no class folder of {dataset.root} ({dataset.classes[:10]}...)")
        category_ids[classes[category["name"]]] = category["id"]
    position = {name: index for index, name in enumerate(dataset.keys())}
    image_ids = [-1 - index for index in range(len(dataset))]
    for image in coco.dataset["images"]:
        name = str(image.get("file_name", ""))
        if name not in position:
            raise ValueError(f"data.{key}: image {image.get('id')} of {path} is {name!r}, which is not an image of "
                             f"{dataset.root} (file names are paths under it: <class>/<file>)")
        image_ids[position[name]] = image["id"]
    return coco, category_ids, image_ids


@DATASETS.register("folder", FolderOptions)
class FolderDataModule(ClassFolderDataModule):
    """Single-label images in ``data_dir/train/<class>/`` and ``data_dir/val/<class>/`` (classes:
    the sorted training folders; a validation folder must be one of them). Training uses
    RandomResizedCrop + flip, validation Resize(256/224 * size) + CenterCrop(size).

    With ``val_annotations`` the localisation metrics score one trial per (validation image,
    annotated class), masked by the union of that class's instances (segmentation, or the box
    where an instance has none), as on COCO; without it they are refused naming the file, and
    accuracy, FGSM, NQH, faithfulness and consensus run as on any data. With
    ``train_annotations`` the guidance objectives (``loss=energy|l1|rrr|ppce``) guide each training
    image towards its class's instances: its segmentation masks."""

    name = "folder"
    multilabel = False
    layout = FOLDER_LAYOUT

    def __init__(self, data_dir: str | Path, *, train_annotations: str | None, val_annotations: str | None,
                 **loading) -> None:
        super().__init__(data_dir, **loading)
        self.train_annotations = Path(train_annotations) if train_annotations else None
        self.val_annotations = Path(val_annotations) if val_annotations else None
        self.save_hyperparameters()

    @property
    def guidance_masks(self) -> str | None:
        return "masks" if self.train_annotations is not None else None

    def _build_val_dataset(self) -> ClassFolderDataset:
        val_dir = self._split_dir("val")
        try:
            return ClassFolderDataset(val_dir, to_float_image(*self.eval_geometry()), self.skip_corrupt,
                                      class_names=self.class_names)
        except ValueError as err:
            raise ValueError(f"data.data_dir: {err}") from None

    def _build_train_dataset(self) -> ClassFolderDataset:
        return ClassFolderDataset(self._split_dir("train"), to_float_image(*self.train_geometry()), self.skip_corrupt)

    def localization_unavailable(self) -> str:
        if self.val_annotations is None:
            return ("needs object masks, and data.val_annotations is null: give a COCO-format instances json of the "
                    "validation images")
        return f"needs object masks: data.val_annotations: file not found: {self.val_annotations}"

    def _build_localization_dataset(self, geometry: TrialGeometry) -> Dataset | None:
        if self.val_annotations is None or not self.val_annotations.is_file():
            return None
        val_set = self.val_dataset()
        coco, category_ids, _ = annotation_index(self.val_annotations, val_set, "val_annotations")
        return CocoMaskDataset(val_set.root, self.val_annotations, category_ids,
                               geometry._replace(image_size=self.image_size), self.skip_corrupt, coco=coco)

    def training_masks(self, dilation: float) -> CocoTrainingMasks:
        path = self.train_annotations
        if not path.is_file():
            raise FileNotFoundError(f"data.train_annotations: file not found: {path}")
        coco, category_ids, image_ids = annotation_index(path, self.train_set, "train_annotations")
        missing = [key for key, image_id in zip(self.train_set.keys(), image_ids) if image_id < 0]
        if missing:
            raise ValueError(f"data.train_annotations: {len(missing)} training image(s) are not in {path}, e.g. "
                             f"{missing[:5]}: guidance needs each training image's size and masks there (an "
                             f"image without objects of its class: an entry with no annotation)")
        return CocoTrainingMasks(coco, image_ids, category_ids, "masks", dilation)
