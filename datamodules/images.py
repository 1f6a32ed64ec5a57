"""Image files and samples: decoding, the collate of every loader, ImageNet-style transforms, and
the localisation trials' common form.

Conventions shared by every dataset of this package:
- an image is a float32 tensor in [0, 1] of shape [3, H, W], NOT normalised (the network
  normalises inside, so explainers and FGSM can work in pixel space);
- a sample is ``{"image": Tensor, "target": Tensor}`` (localisation trials add ``"mask"``); a
  single-label target is an int64 scalar, a multi-label target a float32 multi-hot vector [K];
- :func:`load_rgb` is the only place where image files are decoded, and datasets reach it only
  through :func:`load_rgb_or_skip`, which looks it up in this module at call time: wrapping
  ``datamodules.images.load_rgb`` (e.g. to count decodes) sees every call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # compared lower-cased

Sample = dict[str, Tensor]
Transform = Callable[[Image.Image], Tensor | dict[str, Tensor]]


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


def load_rgb_or_skip(path: str | os.PathLike, skip_corrupt: bool) -> Image.Image | None:
    """Decode through ``load_rgb``; with ``skip_corrupt`` a corrupt file gives None (logged)."""
    try:
        return load_rgb(path)
    except CorruptImageError as err:
        if not skip_corrupt:
            raise
        log.warning("skipping %s", err)
        return None


def collate_samples(samples: Sequence[Sample | None]) -> dict[str, Any]:
    """Stack samples into a batch, dropping the None that datasets return for corrupt files.

    Every key of the samples is stacked (``"image"`` [B, 3, H, W], ``"target"`` [B] or [B, K],
    and ``"mask"`` [B, H, W] for localisation trials); ``"skipped"`` is the number dropped. When
    every sample was dropped, "image" and "target" are empty tensors of shape [0]: the trainer
    recognises and skips such a batch (there is no H, W or K to shape them with).
    """
    kept = [sample for sample in samples if sample is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        return {"image": torch.empty(0), "target": torch.empty(0), "skipped": skipped}
    return {**{key: torch.stack([sample[key] for sample in kept]) for key in kept[0]}, "skipped": skipped}


class LoaderStream:
    """A random stream for a dataset's own draws (not the augmentation's), reproducible under
    ``seed_everything(workers=True)`` and different in every loader worker and process.

    ``torch.initial_seed()`` follows seed_everything and differs in every loader worker (base seed
    plus worker id; also per rank under Lightning's worker seeding), and ``rank`` separates
    processes that load without workers. A different seed (a new worker) starts a new stream."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._seed: int | None = None
        self._generator: torch.Generator | None = None

    def generator(self) -> torch.Generator:
        seed = torch.initial_seed()
        if seed != self._seed:
            mixed = np.random.SeedSequence([seed, self.rank]).generate_state(1, np.uint64)[0]
            self._seed, self._generator = seed, torch.Generator().manual_seed(int(mixed))
        return self._generator


def labelled_classes(targets: Tensor) -> Tensor:
    """The class each image is explained for: its label, or a multi-hot target's first label."""
    return targets if targets.dim() == 1 else targets.float().argmax(1)


def unit_range(image: Tensor) -> Tensor:
    # Divided, as torchvision's old ToTensor did: v2.ToDtype(scale=True) multiplies by 1/255, which
    # differs in the last bit for some intensities.
    return image.to(torch.float32).div(255)


def to_float_image(*steps: v2.Transform) -> v2.Compose:
    """``steps`` on the PIL image, then a float tensor ``[3, H, W]`` in [0, 1]."""
    return v2.Compose([*steps, v2.PILToTensor(), v2.Lambda(unit_range)])


def center_crop_geometry(image_size: int) -> list[v2.Transform]:
    """Resize(256) + CenterCrop(224) at 224 px, scaled the same way for other sizes."""
    return [v2.Resize(int(image_size * 256 / 224)), v2.CenterCrop(image_size)]


def image_sample(transform: Transform, image: Image.Image) -> Sample:
    """A sample's image fields: ``{"image": transform(image)}``, or the fields a transform that
    makes several views returns (:class:`datamodules.views.ContrastiveViews`)."""
    transformed = transform(image)
    return transformed if isinstance(transformed, dict) else {"image": transformed}


# --------------------------------------------------------------------------- localisation trials
# Every (image, ground-truth class) pair is one trial, as in TorchRay's pointing game: a
# single-object synthetic image gives one trial, a COCO image one per class, an ImageNet image one
# (its class, masked by the union of its boxes of that class).


PROTOCOLS = ("standard", "authors")


class TrialGeometry(NamedTuple):
    """How a localisation trial's image and mask are sized (``evaluation.protocol``).

    - ``standard``: the image and its mask go together through the validation geometry
      (Resize(256/224 * size) + CenterCrop(size)) of ``image_size``, or keep their size where it is
      None (the synthetic images have theirs already);
    - ``authors``: the authors' scripts: the image's shorter side resized to ``short_side`` (None
      keeps it), no crop, with PIL's bilinear resize as torchvision's ``Resize`` does it; the mask
      stays at the image's original size, and the explanation is resized to it for scoring.
    """

    protocol: str = "standard"
    image_size: int | None = None
    short_side: int | None = None

    def apply(self, image: Image.Image, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The network's input (uint8 ``[3, H', W']``) and the scored mask (bool) of one trial."""
        if self.protocol == "authors":
            if self.short_side is not None:
                image = v2.functional.resize(image, self.short_side)
            return v2.functional.pil_to_tensor(image), mask
        tv_image, tv_mask = tv_tensors.Image(v2.functional.pil_to_tensor(image)), tv_tensors.Mask(mask)
        if self.image_size is not None:
            size = self.image_size
            tv_image, tv_mask = v2.Compose(center_crop_geometry(size))(tv_image, tv_mask)
        return tv_image.as_subclass(torch.Tensor), tv_mask.as_subclass(torch.Tensor)


def make_trial(
    path: Path, image: Image.Image, mask: np.ndarray | Tensor, class_index: int, geometry: TrialGeometry,
    pointing: bool = True,
) -> Sample:
    """``{"image": [3,H,W] in [0,1], "target": class index, "mask": bool [h,w], "pointing": bool}``
    of one trial, from the decoded PIL ``image`` of ``path`` and its mask at the image's size.
    ``pointing`` False: the trial counts for CH only, not for PG and SPG (the authors' ImageNet
    images whose boxes of the class are all "difficult")."""
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != (image.height, image.width):
        raise ValueError(f"mask of size {tuple(mask.shape)} does not fit image {path} of size "
                         f"{(image.height, image.width)}")
    image, mask = geometry.apply(image, mask)
    return {
        "image": v2.functional.to_dtype(image, torch.float32, scale=True),
        "target": torch.tensor(class_index),
        "mask": mask.bool(),
        "pointing": torch.tensor(pointing),
    }


class DifficultFlags:
    """TorchRay's table of a pointing benchmark's "difficult" subset
    (``pointing_game_ebp_{voc07,coco}_difficult.txt``, ``data.difficult_flags``): a line per
    image, its name (the file name without extension) and a 0/1 flag per class. Called with an
    image's name and a class: whether the pair is in the subset; an image the table has no line
    for is in it, as TorchRay keeps it (counted in the log and in :meth:`describe`). A table that
    names none of the split's ``images`` is refused: it belongs to another split."""

    def __init__(self, path: Path, num_classes: int, images: Sequence[str]):
        if not path.is_file():
            raise FileNotFoundError(f"data.difficult_flags: file not found: {path}")
        self.path, self.rows = path, {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 1 + num_classes or any(flag not in ("0", "1") for flag in fields[1:]):
                raise ValueError(f"data.difficult_flags: {path}, line {number}: an image id and {num_classes} flags "
                                 f"0/1 expected, got {line!r}")
            self.rows[fields[0]] = [flag == "1" for flag in fields[1:]]
        if not self.rows.keys() & set(images):
            raise ValueError(f"data.difficult_flags: {path} has a line for none of the split's images "
                             f"(e.g. {images[0]}): a table of another split?")
        self.unflagged = sorted(set(images) - self.rows.keys())
        if self.unflagged:
            log.warning("data.difficult_flags: %d image(s) of the split have no line in %s (e.g. %s): their trials "
                        "count in the difficult subset, as in TorchRay", len(self.unflagged), path, self.unflagged[0])

    def __call__(self, image: str, class_index: int) -> bool:
        row = self.rows.get(image)
        return row is None or row[class_index]

    def describe(self) -> str:
        unflagged = f", and the {len(self.unflagged)} image(s) it has no line for" if self.unflagged else ""
        return f"the flags of {self.path.name}{unflagged}"


class MultiLabelImages(Dataset):
    """Multi-label images (COCO's, VOC's): ``paths``, ``instances`` (float ``[N, K]``, the objects
    of each class in each image) and ``targets`` (their multi-hot), set by the subclass with
    ``transform`` and ``skip_corrupt``. A sample: the image, target = the multi-hot, and
    ``"instances"`` (the GC composites draw the explained class over them, ``loss.positive``)."""

    paths: list[Path]
    instances: Tensor
    targets: Tensor
    transform: Transform
    skip_corrupt: bool

    @property
    def num_classes(self) -> int:
        return self.instances.shape[1]

    def __len__(self) -> int:
        return len(self.paths)

    def label_sets(self) -> Tensor:
        """bool ``[N, K]``: the classes present in each image."""
        return self.targets.clone()

    def label_pairs(self) -> tuple[Tensor, Tensor]:
        """long ``([P], [P])``: the (image, class index) pairs present, ordered by image."""
        return self.targets.nonzero(as_tuple=True)

    def __getitem__(self, index: int) -> Sample | None:
        image = load_rgb_or_skip(self.paths[index], self.skip_corrupt)
        if image is None:
            return None
        return {**image_sample(self.transform, image), "target": self.targets[index].to(torch.float32),
                "instances": self.instances[index]}


def size_buckets(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of indices whose items have equal ``sizes``, in order of first appearance, at most
    ``batch_size`` each: images of different sizes cannot be stacked, and padding them would
    change what the network sees at the borders (the authors explain one image at a time)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(index)
    return [group[start:start + batch_size] for group in groups.values()
            for start in range(0, len(group), batch_size)]
