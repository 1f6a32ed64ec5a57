"""ImageNet (ILSVRC-2012 classification) read from the ImageFolder layout."""

from __future__ import annotations

from pathlib import Path

from .common import (
    ImageDataModule,
    check_int,
    existing_dir,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from .localization import BoxMaskDataset
from .readers import ClassFolderDataset, list_class_folders


class ImageNetDataModule(ImageDataModule):
    """``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*.JPEG``.

    The official validation archive is flat (50,000 files plus a label list): it must first be
    sorted into one folder per wnid, as for torchvision's ImageFolder, since labels are read from
    folder names. Validation classes must equal the training classes, so that class indices agree.
    Training uses RandomResizedCrop + flip, validation Resize(256/224 * size) + CenterCrop(size).
    With ``box_dir`` (ILSVRC's validation box XML files, one per image, named after it) the
    localisation metrics are available.
    """

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        skip_corrupt: bool = False,
        box_dir: str | Path | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, skip_corrupt)
        self.data_dir = Path(data_dir)
        self.box_dir = Path(box_dir) if box_dir is not None else None
        self.image_size = check_int("image_size", image_size, minimum=8)
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

    @property
    def has_localization(self) -> bool:
        """Box annotations make the localisation metrics possible (``data.box_dir``)."""
        return self.box_dir is not None

    def localization_dataset(self) -> BoxMaskDataset:
        """Validation images masked by their boxes of their class (``box_dir/<stem>.xml``)."""
        if self.box_dir is None:
            raise ValueError("data.box_dir is not set: ImageNet localisation metrics need the validation box XML files")
        images = ClassFolderDataset(self._split_dir("val"), None, self.skip_corrupt, class_names=self.class_names)
        return BoxMaskDataset(images, self.box_dir, self.image_size)

    def _split_dir(self, split: str) -> Path:
        existing_dir("data_dir", self.data_dir)
        return existing_dir("data_dir", self.data_dir / split)

    def setup(self, stage: str | None = None) -> None:
        val_dir = self._split_dir("val")
        val_classes = list_class_folders(val_dir)
        if val_classes != self.class_names:
            missing = sorted(set(self.class_names) - set(val_classes))
            extra = sorted(set(val_classes) - set(self.class_names))
            raise ValueError(
                f"data.data_dir: the classes of {val_dir} differ from those of {self._split_dir('train')}: "
                f"missing in val {missing[:10]}, not in train {extra[:10]}"
            )
        # Listing ImageNet's 1.28M training files takes a while: do it once, and only to fit.
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = ClassFolderDataset(
                self._split_dir("train"), imagenet_train_transform(self.image_size), self.skip_corrupt
            )
        if self.val_set is None:
            val_transform = imagenet_eval_transform(self.image_size)
            self.val_set = ClassFolderDataset(
                val_dir, val_transform, self.skip_corrupt, class_names=self.class_names
            )
