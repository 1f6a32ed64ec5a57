"""The three views of a training image that the contrastive Grad-CAM consistency loss (``loss=cgc``)
compares, with the crop and flip that relate two of them (the authors'
``datasets/imagefolder_cgc_ssl.py``, on this package's image conventions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms import v2

from .images import Sample, Transform, to_float_image

# RandomResizedCrop's range of the crop's share of the view and of its aspect ratio (the authors').
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


class ContrastiveViews:
    """A training image's views as one sample's fields:

    - ``"image"``: ``train_transform`` of the image (the training augmentation; only the
      classification loss sees it);
    - ``"view"``: the image in the validation geometry (``eval_geometry``, steps on the PIL image,
      e.g. Resize + CenterCrop, leaving it ``size x size``);
    - ``"augmented"``: a RandomResizedCrop of the view (scale :data:`CROP_SCALE`, ratio
      :data:`CROP_RATIO`) resized to ``size x size`` with PIL's bilinear filter, flipped
      left-right with probability 0.5;
    - ``"box"`` long ``[4]``: the crop (top, left, height, width) in the view's pixels, and
      ``"flip"`` bool: whether it was flipped; :func:`losses.cgc.warp_maps` applies both to the
      view's map.

    Draws come from torch's global generator, as the training augmentation's do, so they follow
    the seed, each loader worker's stream and a checkpoint's random state."""

    def __init__(self, train_transform: Transform, eval_geometry: Sequence[v2.Transform], size: int) -> None:
        self.train_transform = train_transform
        self.geometry = list(eval_geometry)
        self.size = size
        self.to_float = to_float_image()

    def __call__(self, image: Image.Image) -> Sample:
        view = image
        for step in self.geometry:
            view = step(view)
        if view.size != (self.size, self.size):
            raise ValueError(f"loss=cgc: the validation geometry leaves a training image {view.size[0]}x"
                             f"{view.size[1]}, not data.image_size={self.size} square")
        # torchvision's own draw (the authors' call), from torch's global generator.
        top, left, height, width = v1.RandomResizedCrop.get_params(view, scale=CROP_SCALE, ratio=CROP_RATIO)
        augmented = v2.functional.resized_crop(view, top, left, height, width, [self.size, self.size])
        flip = bool(torch.rand(()) < 0.5)
        if flip:
            augmented = v2.functional.horizontal_flip(augmented)
        return {"image": self.train_transform(image), "view": self.to_float(view),
                "augmented": self.to_float(augmented), "box": torch.tensor([top, left, height, width]),
                "flip": torch.tensor(flip)}
