"""LIME for images (Ribeiro et al., KDD 2016), written here rather than taken from Captum: the
perturbations of a whole batch share forward passes, and the signed superpixel weights are
available to the caller (the consensus compares them across models)."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from skimage.segmentation import quickshift, slic
from torch import Tensor, nn

from evaluation.explainers.base import EXPLAINERS, Explainer, images_per_pass, require_eval
from evaluation.metrics.functional import forward_precision

SCORES = ("probability", "logit")
SEGMENTATIONS = ("slic", "quickshift")
FILLS = ("segment", "image")


@EXPLAINERS.register("lime")
@dataclass
class Lime(Explainer):
    """LIME on superpixels, as the ``lime`` package's ``lime_image`` computes it.

    For each image: superpixels (``segmentation``: ``"slic"`` with ``num_segments`` and
    ``compactness``, or ``"quickshift"`` with ``kernel_size``, ``max_dist`` and ``ratio``, called as
    ``lime_image`` calls it); ``num_samples`` binary vectors ``z`` over them, the first all ones (the
    image itself), the others uniform on/off; each perturbed image keeps the "on" superpixels and
    paints the "off" ones with ``fill`` (``"segment"``: each superpixel's own mean colour,
    ``lime_image``'s ``hide_color=None``; ``"image"``: the whole image's mean colour; a number: that
    grey level); the net's ``score`` of the target class (``"probability"``: softmax, LIME's choice;
    ``"logit"``); sample weights ``pi = exp(-d^2 / kernel_width^2)``, ``d`` the cosine distance
    between ``z`` and all ones; a weighted ridge fit ``score ~ z . beta + c`` with L2 penalty
    ``ridge`` on ``beta`` only (``lime_image``: ``Ridge(alpha=1)`` on every superpixel).
    ``docs/departures.md`` lists what still differs from ``lime_image``.

    The kernel is the paper's. The ``lime`` package's ``kernel_fn`` takes a square root of it
    (weights ``exp(-d^2 / (2 w^2))``): its ``kernel_width=w`` is ``kernel_width=w * sqrt(2)`` here.

    ``explain`` paints each pixel with ``relu(beta)`` of its superpixel, because the metrics need
    non-negative maps; the signed weights come from ``superpixel_weights``.

    ``seed``: image ``b``'s perturbations are drawn from a generator seeded by a hash of ``seed``
    and the image's bytes, so an image gets the same perturbations at any position in any batch
    (the consensus compares models on the same image, whatever the batching). ``samples_per_pass``:
    perturbed images per forward pass, mixing images of the batch; by default as many as keep a
    pass near ``base.images_per_pass``. The weights do not depend on it, provided the net treats
    images independently (batch norm in eval mode: refused otherwise).
    """

    # At least the image itself and one perturbation.
    num_samples: Annotated[int, Field(ge=2)]
    kernel_width: Annotated[float, Field(gt=0)]
    segmentation: Literal[SEGMENTATIONS]
    num_segments: Annotated[int, Field(ge=1)]
    compactness: Annotated[float, Field(gt=0)]
    kernel_size: Annotated[float, Field(gt=0)]
    max_dist: Annotated[float, Field(gt=0)]
    # 0 would leave colour out of quickshift's distance: the superpixels would ignore the image.
    ratio: Annotated[float, Field(gt=0, le=1)]
    # Hashed as 8 signed bytes (_image_seed): any such integer, negatives included.
    seed: Annotated[int, Field(ge=-2**63, le=2**63 - 1)]
    fill: Literal[FILLS] | float
    score: Literal[SCORES]
    ridge: Annotated[float, Field(ge=0)]
    samples_per_pass: Annotated[int, Field(ge=1)] | None = None

    # Its perturbations' forward passes (no gradient): at_precision sets it; not an option of
    # the explainer's config but the evaluation's (evaluation.precision).
    pass_precision = "32"

    def at_precision(self, precision: str) -> Lime:
        explainer = copy.copy(self)
        explainer.pass_precision = precision
        return explainer

    # ------------------------------------------------------------------------------ the steps

    def segment(self, images: Tensor) -> Tensor:
        """The superpixels of ``segmentation``, long ``[B, H, W]`` on the images' device, ids
        ``0 .. S_b - 1``."""
        pixels = images.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
        segments = []
        for image in pixels:
            if self.segmentation == "slic":
                labels = slic(image, n_segments=self.num_segments, compactness=self.compactness,
                              start_label=0, channel_axis=-1)
            else:
                # lime_image's call. Its random_seed reaches no quickshift argument since
                # scikit-image renamed it rng (lime's wrapper drops it), so both break ties with
                # rng's default. Colours are compared in Lab, and rgb2lab reads a float image as
                # [0, 1] and a uint8 one as [0, 255]: our [0, 1] images get the superpixels that
                # lime_image finds in the same picture as uint8 (the references pass uint8).
                labels = quickshift(image, kernel_size=self.kernel_size, max_dist=self.max_dist,
                                    ratio=self.ratio, channel_axis=-1)
            # Relabelled whatever the algorithm returns: every id is a column of the design
            # matrix, so a gap would be a column of zeros.
            segments.append(np.unique(labels, return_inverse=True)[1].reshape(labels.shape))
        return torch.from_numpy(np.stack(segments)).long().to(images.device)

    def fill_images(self, images: Tensor, segments: Tensor) -> Tensor:
        """What an off superpixel is painted with, broadcastable to ``images``: per pixel its
        superpixel's mean colour (``fill="segment"``), the image's mean colour, or the grey level."""
        if self.fill == "image":
            return images.mean(dim=(2, 3), keepdim=True)
        if self.fill != "segment":
            return torch.full_like(images[:, :, :1, :1], float(self.fill))
        # One index_add over the whole batch: image b's ids are shifted past those of images < b.
        sizes = segments.flatten(1).amax(dim=1) + 1
        ids = (segments + (sizes.cumsum(0) - sizes).view(-1, 1, 1)).flatten()
        pixels = images.detach().permute(0, 2, 3, 1).reshape(len(ids), -1).double()
        sums = pixels.new_zeros(int(sizes.sum()), pixels.shape[1]).index_add_(0, ids, pixels)
        counts = pixels.new_zeros(len(sums)).index_add_(0, ids, torch.ones_like(pixels[:, 0]))
        # An id missing from given segments divides 0 by 0, but no pixel reads it.
        means = (sums / counts.unsqueeze(1))[ids]
        return means.view(images.shape[0], *images.shape[2:], -1).permute(0, 3, 1, 2).to(images.dtype)

    def perturbations(self, images: Tensor, segments: Tensor) -> list[Tensor]:
        """Per image, the on/off vectors: bool ``[num_samples, S_b]``, row 0 all on."""
        masks = []
        for image, image_segments in zip(images, segments):
            generator = torch.Generator().manual_seed(self._image_seed(image))
            size = int(image_segments.max()) + 1
            mask = torch.randint(0, 2, (self.num_samples, size), generator=generator).bool()
            mask[0] = True
            masks.append(mask.to(images.device))
        return masks

    def superpixel_weights(self, net: nn.Module, images: Tensor, targets: Tensor,
                           segments: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """The superpixels (``segments``, or those of ``segmentation``) and, per image, the signed
        ridge weights ``beta``: float64 ``[S_b]``, ``S_b`` = the image's largest segment id + 1."""
        require_eval(net, (nn.modules.batchnorm._BatchNorm,), "LIME")
        if segments is None:
            segments = self.segment(images)
        elif segments.shape != (images.shape[0],) + images.shape[2:] or segments.min() < 0:
            raise ValueError(f"LIME segments must be non-negative ids [B, H, W] = "
                             f"{(images.shape[0],) + tuple(images.shape[2:])}; got {tuple(segments.shape)}")
        segments = segments.long().to(images.device)
        masks = self.perturbations(images, segments)
        scores = self._scores(net, images.detach(), targets.long(), segments, masks)
        return segments, [self._fit(mask, score) for mask, score in zip(masks, scores)]

    def explain(self, net, images, targets):
        segments, weights = self.superpixel_weights(net, images, targets)
        maps = [weight.clamp(min=0)[image_segments] for weight, image_segments in zip(weights, segments)]
        return torch.stack(maps).to(images.dtype)

    # ------------------------------------------------------------------------------ helpers

    def _image_seed(self, image: Tensor) -> int:
        digest = hashlib.blake2b(digest_size=8)
        digest.update(int(self.seed).to_bytes(8, "little", signed=True))
        digest.update(f"{image.dtype}{tuple(image.shape)}".encode())
        # Raw bytes through a uint8 view: numpy has no bfloat16.
        digest.update(image.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return int.from_bytes(digest.digest(), "little")

    def _scores(self, net, images, targets, segments, masks) -> list[Tensor]:
        """The score of every perturbation of every image, float64, ``num_samples`` per image."""
        count, samples = len(images), self.num_samples
        fill = self.fill_images(images, segments)
        per_pass = self.samples_per_pass or images_per_pass(images)
        scores = []
        # Only the inputs vary and nothing is differentiated: no graph, even under the base
        # class's enable_grad.
        with torch.no_grad():
            for start in range(0, count * samples, per_pass):
                stop = min(start + per_pass, count * samples)
                batch, batch_targets = [], []
                for index in range(start // samples, (stop - 1) // samples + 1):
                    rows = slice(max(start - index * samples, 0), min(stop - index * samples, samples))
                    keep = masks[index][rows][:, segments[index]].unsqueeze(1)  # [k, 1, H, W]
                    batch.append(torch.where(keep, images[index], fill[index]))
                    batch_targets.append(targets[index].expand(len(keep)))
                with forward_precision(self.pass_precision, images.device):
                    logits = net(torch.cat(batch))
                logits = logits.double()
                if self.score == "probability":
                    logits = logits.softmax(dim=1)
                scores.append(logits.gather(1, torch.cat(batch_targets).view(-1, 1)).squeeze(1))
        return list(torch.cat(scores).view(count, samples))

    def _fit(self, mask: Tensor, score: Tensor) -> Tensor:
        """Weighted ridge, closed form: ``(X^T W X + alpha I') [beta; c] = X^T W y`` with
        ``X = [z, 1]`` and ``I'`` the identity without its intercept entry."""
        design = mask.double()
        size = design.shape[1]
        distance = 1 - torch.sqrt(design.sum(dim=1) / size)  # cosine distance of z to all ones
        sample_weights = torch.exp(-distance ** 2 / self.kernel_width ** 2)
        design = torch.cat([design, torch.ones_like(design[:, :1])], dim=1)
        weighted = design * sample_weights.unsqueeze(1)
        penalty = torch.full((size + 1,), float(self.ridge), dtype=torch.float64, device=design.device)
        penalty[-1] = 0
        solution = torch.linalg.solve(weighted.T @ design + torch.diag(penalty), weighted.T @ score)
        return solution[:size]

