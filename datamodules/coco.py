"""MS-COCO as a multi-label classification data set (instances annotations)."""

from __future__ import annotations

from pathlib import Path

from .common import (
    ImageDataModule,
    check_int,
    existing_dir,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from .localization import CocoMaskDataset
from .readers import CocoMultiLabelDataset, Transform


class COCODataModule(ImageDataModule):
    """Images in ``data_dir/<split>/``, annotations in ``data_dir/annotations/instances_<split>.json``.

    Targets are multi-hot over the categories (see :class:`CocoMultiLabelDataset` for the handling
    of crowd annotations and unannotated images). The transforms are ImageNet's. The class list is
    read from the validation annotations; the training file must have the same categories.
    """

    multilabel = True

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 64,
        num_workers: int = 8,
        image_size: int = 224,
        skip_corrupt: bool = False,
        train_split: str = "train2017",
        val_split: str = "val2017",
    ) -> None:
        super().__init__(batch_size, num_workers, skip_corrupt)
        self.data_dir = Path(data_dir)
        self.image_size = check_int("image_size", image_size, minimum=8)
        self.train_split = train_split
        self.val_split = val_split
        self.save_hyperparameters()

    def _ann_file(self, split: str) -> Path:
        return self.data_dir / "annotations" / f"instances_{split}.json"

    def _dataset(self, split: str, transform: Transform) -> CocoMultiLabelDataset:
        existing_dir("data_dir", self.data_dir)
        image_dir = self.data_dir / split
        return CocoMultiLabelDataset(image_dir, self._ann_file(split), transform, self.skip_corrupt)

    def _val_dataset(self) -> CocoMultiLabelDataset:
        # Built on first use: num_classes is asked for before setup(), to build the model.
        if self.val_set is None:
            self.val_set = self._dataset(self.val_split, imagenet_eval_transform(self.image_size))
        return self.val_set

    @property
    def class_names(self) -> list[str]:
        return self._val_dataset().classes

    @property
    def num_classes(self) -> int:
        return self._val_dataset().num_classes

    @property
    def val_annotation_file(self) -> Path:
        return self._ann_file(self.val_split)

    has_localization = True

    def localization_dataset(self) -> CocoMaskDataset:
        """One trial per (validation image, ground-truth class), with the class's segmentation
        mask, resized and centre-cropped with the image."""
        return CocoMaskDataset(self.data_dir / self.val_split, self.val_annotation_file,
                               self._val_dataset().category_ids, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        val_set = self._val_dataset()
        if stage in (None, "fit") and self.train_set is None:
            train_set = self._dataset(self.train_split, imagenet_train_transform(self.image_size))
            if train_set.category_ids != val_set.category_ids or train_set.classes != val_set.classes:
                raise ValueError(
                    f"the categories of {train_set.ann_file} differ from those of {val_set.ann_file}; "
                    "class indices would not agree"
                )
            self.train_set = train_set
