"""Single-label images in the ImageFolder layout ``root/<class>/<image files>`` (ImageNet, synthetic)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .base import ClassificationDataModule, existing_dir
from .images import IMAGE_EXTENSIONS, Sample, Transform, image_sample, load_rgb_or_skip


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


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively (as ImageFolder does), in sorted order."""
    files = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs.sort()
        files.extend(
            Path(directory, name) for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS)
        )
    return files


class LabelledImageDataset(Dataset):
    """Single-label images: ``samples`` is a list of ``(path, class index)`` into ``classes``.

    With ``skip_corrupt`` a corrupt file yields None instead of raising, and the datamodules'
    ``collate_fn`` drops it from the batch. ``root`` is the folder the paths are named under
    (:meth:`keys`).
    """

    def __init__(self, root: str | os.PathLike, samples: Sequence[tuple[Path, int]], classes: Sequence[str],
                 transform: Transform, skip_corrupt: bool) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        if not self.samples:
            raise ValueError(f"no image files {IMAGE_EXTENSIONS} in {self.root}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def label_sets(self) -> torch.Tensor:
        """bool ``[N, K]``: each image's labels (one per image here)."""
        labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        return torch.nn.functional.one_hot(labels, self.num_classes).bool()

    def label_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """long ``([P], [P])``: the (image, class) pairs of the labels, ordered by image."""
        return torch.arange(len(self.samples)), torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def keys(self) -> list[str]:
        """A name per image that does not depend on where the tree lies or how it is listed: the
        path under the root."""
        return [path.relative_to(self.root).as_posix() for path, _ in self.samples]

    def __getitem__(self, index: int) -> Sample | None:
        path, label = self.samples[index]
        image = load_rgb_or_skip(path, self.skip_corrupt)
        if image is None:
            return None
        return {**image_sample(self.transform, image), "target": torch.tensor(label, dtype=torch.int64)}


class ClassFolderDataset(LabelledImageDataset):
    """Single-label images in the ImageFolder layout ``root/<class>/<image files>``.

    Classes are the sorted folder names, unless ``class_names`` is given (e.g. the training
    classes, so that a validation tree uses the same indices); a folder that is not among
    ``class_names`` is an error naming it. A class of ``class_names`` without a folder simply has
    no samples here.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform,
        skip_corrupt: bool,
        class_names: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        folders = list_class_folders(root)
        if class_names is None:
            classes = folders
        else:
            unknown = sorted(set(folders) - set(class_names))
            if unknown:
                raise ValueError(
                    f"class folder(s) {unknown} in {root} are not among the expected classes "
                    f"({len(class_names)} classes, e.g. those of the training set)"
                )
            classes = list(class_names)
        index_of = {name: index for index, name in enumerate(classes)}
        samples = [(path, index_of[name]) for name in folders for path in image_files(root / name)]
        if not samples:
            raise ValueError(f"no image files {IMAGE_EXTENSIONS} in the class folders of {root}")
        super().__init__(root, samples, classes, transform, skip_corrupt)


class ClassFolderDataModule(ClassificationDataModule):
    """A data set whose classes are the sorted folders of ``data_dir/train`` (ImageNet, a user's
    own folders); ``layout`` is shown where a split's folder is missing."""

    layout: str

    def __init__(self, data_dir, **loading) -> None:
        super().__init__(data_dir, **loading)
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """The training folders' names, read once (the model is built from their count)."""
        if self._class_names is None:
            self._class_names = list_class_folders(self._split_dir("train"))
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _split_dir(self, split: str) -> Path:
        existing_dir("data_dir", self.data_dir)
        split_dir = self.data_dir / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"data.data_dir: {split_dir} not found.\n{self.layout}")
        return split_dir
