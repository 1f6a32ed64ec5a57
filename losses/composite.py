"""2x2 composites, their target maps and the choice of distractors (pure tensor functions).

Cells are numbered row by row: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_DISTRACTORS = 3


@dataclass
class CompositeLayout:
    """One composite per row: which image is explained, for which class, where it goes and which
    images fill the other cells.

    ``samples[r]``: batch index of the explained image; ``classes[r]``: the class explained;
    ``cells[r]``: its cell; ``distractors[r]``: batch indices of the 3 distractors in the order
    they fill the remaining cells; ``valid[r]``: False when the batch holds no image without class
    ``classes[r]`` (such a row has no composite and its ``classes``/``distractors`` must not be
    used: :meth:`valid_subset` leaves it out).
    """

    samples: torch.Tensor
    classes: torch.Tensor
    cells: torch.Tensor
    distractors: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return self.samples.shape[0]

    def select(self, rows: torch.Tensor) -> "CompositeLayout":
        """The rows ``rows`` (a bool mask or indices) of this layout."""
        return CompositeLayout(self.samples[rows], self.classes[rows], self.cells[rows], self.distractors[rows],
                               self.valid[rows])

    def valid_subset(self) -> "CompositeLayout":
        """The rows that have a composite."""
        return self.select(self.valid)


def label_sets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean ``[B, K]`` label sets from class indices ``[B]`` or multi-hot targets ``[B, K]``."""
    if targets.dim() == 1:
        return F.one_hot(targets.long(), num_classes).bool()
    return targets > 0.5


def choose_positive(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One of each image's labels, uniformly at random (``-1`` for an image without labels)."""
    weights = labels.float().cpu()
    has_label = weights.sum(1) > 0
    positive = torch.full((labels.shape[0],), -1, dtype=torch.long)
    if has_label.any():
        positive[has_label] = torch.multinomial(weights[has_label], 1, generator=generator).squeeze(1)
    return positive.to(labels.device)


def choose_distractors(
    labels: torch.Tensor, positive: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, 3 other batch images that do not carry its positive class.

    Distinct images are drawn when at least 3 candidates exist, otherwise candidates repeat.
    Returns ``(distractors [B, 3], valid [B])``; rows without any candidate are invalid (their
    indices are 0 and must not be used).
    """
    labels = labels.cpu()
    positive = positive.cpu()
    batch = labels.shape[0]
    has_positive = positive >= 0
    # candidate[i, j]: image j lacks sample i's positive class (so j != i automatically).
    candidate = ~labels[:, positive.clamp(min=0)].T & has_positive[:, None]
    counts = candidate.sum(1)
    distractors = torch.zeros(batch, NUM_DISTRACTORS, dtype=torch.long)
    for rows, replacement in ((counts >= NUM_DISTRACTORS, False), ((counts > 0) & (counts < NUM_DISTRACTORS), True)):
        if rows.any():
            distractors[rows] = torch.multinomial(
                candidate[rows].float(), NUM_DISTRACTORS, replacement=replacement, generator=generator
            )
    return distractors, counts > 0


def random_layout(
    targets: torch.Tensor, num_classes: int, generator: torch.Generator | None = None
) -> CompositeLayout:
    """A random layout for a batch, one row per sample: the class it explains, its cell and its
    distractors (``classes`` is -1 and ``valid`` False for a multi-label sample without labels)."""
    labels = label_sets(targets, num_classes)
    positive = targets.long().cpu() if targets.dim() == 1 else choose_positive(labels, generator)
    distractors, valid = choose_distractors(labels, positive, generator)
    cells = torch.randint(0, 4, (targets.shape[0],), generator=generator)
    device = targets.device
    samples = torch.arange(targets.shape[0], device=device)
    return CompositeLayout(samples, positive.to(device), cells.to(device), distractors.to(device), valid.to(device))


def tile_2x2(tiles: torch.Tensor) -> torch.Tensor:
    """``[B, 4, ..., H, W]`` tiles (in cell order) -> ``[B, ..., 2H, 2W]`` grid."""
    b, _, *middle, h, w = tiles.shape
    grid = tiles.reshape(b, 2, 2, -1, h, w).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, *middle, 2 * h, 2 * w)


def _cell_order(cells: torch.Tensor) -> torch.Tensor:
    """``[B, 4]``: for each cell, which slot fills it (slot 0 = positive, slots 1-3 = distractors)."""
    position = torch.arange(4, device=cells.device).expand(cells.shape[0], 4)
    cells = cells.view(-1, 1)
    return torch.where(position == cells, 0, position + (position < cells).long())


def _arrange(slots: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    order = _cell_order(cells).view(cells.shape[0], 4, *([1] * (slots.dim() - 2)))
    return tile_2x2(slots.gather(1, order.expand_as(slots)))


def make_composite(images: torch.Tensor, layout: CompositeLayout) -> torch.Tensor:
    """Composites ``[R, C, 2H, 2W]`` at full resolution, one per row of ``layout`` (take
    :meth:`CompositeLayout.valid_subset` first: invalid rows have no distractors)."""
    slots = torch.cat([images[layout.samples].unsqueeze(1), images[layout.distractors]], dim=1)
    return _arrange(slots, layout.cells)


def place_in_cell(maps: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``comp(k, g, 0, 0, 0)``: maps ``[B, h, w]`` placed in cell ``cells[b]`` of a zero ``[B, 2h, 2w]`` grid."""
    slots = torch.cat([maps.unsqueeze(1), maps.new_zeros(maps.shape[0], 3, *maps.shape[1:])], dim=1)
    return _arrange(slots, cells)


def composite_target(
    maps: torch.Tensor, cells: torch.Tensor, size: tuple[int, int], eps: float = 1e-8
) -> torch.Tensor:
    """Target for the composite's normalised map of size ``size``.

    The single-image maps are placed at ``2h x 2w``. When the composite's feature map is not
    exactly twice the single image's (AlexNet: 27x27 vs 2x13 at 448 px), the placed map is
    resized bilinearly (``align_corners=False``) to ``size`` and renormalised to sum to 1 again,
    so target and composite map stay distributions on the same grid.
    """
    placed = place_in_cell(maps, cells)
    if tuple(placed.shape[-2:]) == tuple(size):
        return placed
    resized = F.interpolate(placed.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)
    resized = resized.squeeze(1)
    return resized / (resized.sum(dim=(1, 2), keepdim=True) + eps)
