"""2x2 composites, their target maps and the choice of distractors (pure tensor functions).

Cells are numbered row by row: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
"""
from __future__ import annotations

from collections.abc import Mapping
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

    ``groups[r]`` (``loss.composites=shared``): rows with the same group describe the same picture
    and share one composite, which goes through the network once; None: every row has its own.
    """

    samples: torch.Tensor
    classes: torch.Tensor
    cells: torch.Tensor
    distractors: torch.Tensor
    valid: torch.Tensor
    groups: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.samples.shape[0]

    def select(self, rows: torch.Tensor) -> CompositeLayout:
        """The rows ``rows`` (a bool mask or indices) of this layout."""
        return CompositeLayout(self.samples[rows], self.classes[rows], self.cells[rows], self.distractors[rows],
                               self.valid[rows], None if self.groups is None else self.groups[rows])

    def valid_subset(self) -> CompositeLayout:
        """The rows that have a composite."""
        return self.select(self.valid)


def label_sets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean ``[B, K]`` label sets from class indices ``[B]`` or multi-hot targets ``[B, K]``."""
    if targets.dim() == 1:
        return F.one_hot(targets.long(), num_classes).bool()
    return targets > 0.5


def choose_positive(
    labels: torch.Tensor, generator: torch.Generator | None = None, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """One of each image's labels at random (``-1`` for an image without labels).

    ``weights`` None: uniformly over the labels. ``weights`` ``[B, K]`` (instance counts per class):
    with probability proportional to the weight, among the image's labels only, so each annotation
    is equally likely to be the one explained (the authors' draw over COCO annotations); a class
    of weight 0 is never drawn.
    """
    if weights is None:
        weights = labels.float()
    else:
        if weights.shape != labels.shape:
            raise ValueError(f"instance counts {tuple(weights.shape)} do not match the labels {tuple(labels.shape)}")
        weights = weights.float() * labels
        # multinomial would fail on a zero row with a message that names neither the image nor the counts.
        unweighted = labels.any(1) & (weights.sum(1) == 0)
        if unweighted.any():
            raise ValueError(
                f"batch images {unweighted.nonzero().flatten().tolist()} have labels but no instance of any of them"
            )
    weights = weights.cpu()
    has_label = weights.sum(1) > 0
    positive = torch.full((labels.shape[0],), -1, dtype=torch.long)
    if has_label.any():
        positive[has_label] = torch.multinomial(weights[has_label], 1, generator=generator).squeeze(1)
    return positive.to(labels.device)


def positive_weights(batch: Mapping[str, torch.Tensor], multilabel: bool, positive: str) -> torch.Tensor | None:
    """The weights :func:`choose_positive` draws a multi-label explained class by, as ``loss.positive``
    says: the batch's (or sample's) per-class instance counts ``"instances"`` for ``instances``,
    None (uniformly over the labels) for ``labels`` and for single-label data."""
    if not multilabel or positive != "instances":
        return None
    if "instances" not in batch:
        raise ValueError(
            "loss.positive=instances draws the explained class by instance count, but this multi-label "
            "data has no 'instances' (per-class counts); use loss.positive=labels"
        )
    return batch["instances"]


def explained_classes(
    targets: torch.Tensor, num_classes: int, generator: torch.Generator | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The class each image explains, on the CPU: its label for class indices ``[B]``; for
    multi-hot targets ``[B, K]`` one of its labels drawn by :func:`choose_positive` with
    ``weights`` (-1 for an image without labels)."""
    if targets.dim() == 1:
        return targets.long().cpu()
    return choose_positive(label_sets(targets, num_classes), generator, weights).cpu()


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
    targets: torch.Tensor,
    num_classes: int,
    generator: torch.Generator | None = None,
    weights: torch.Tensor | None = None,
) -> CompositeLayout:
    """A random layout for a batch, one row per sample: the class it explains, its cell and its
    distractors (``classes`` is -1 and ``valid`` False for a multi-label sample without labels).

    ``weights``: per-class instance counts ``[B, K]`` of multi-label targets, to draw the explained
    class by instance count rather than uniformly over the labels (:func:`choose_positive`);
    ignored for single-label targets, whose explained class is their label.
    """
    labels = label_sets(targets, num_classes)
    positive = explained_classes(targets, num_classes, generator, weights)
    distractors, valid = choose_distractors(labels, positive, generator)
    cells = torch.randint(0, 4, (targets.shape[0],), generator=generator)
    device = targets.device
    samples = torch.arange(targets.shape[0], device=device)
    return CompositeLayout(samples, positive.to(device), cells.to(device), distractors.to(device), valid.to(device))


def _reciprocal_groups(labels: list[set[int]], positive: list[int], order: list[int]) -> list[list[int]]:
    """Groups of 4 batch indices, first fit in ``order``: a sample joins the first open group none of
    whose members carries its class and whose members' classes it does not carry."""
    groups: list[list[int]] = []
    full = []
    for sample in order:
        if positive[sample] < 0:
            continue
        for group in groups:
            if all(positive[sample] not in labels[other] and positive[other] not in labels[sample] for other in group):
                group.append(sample)
                if len(group) == 4:
                    groups.remove(group)
                    full.append(group)
                break
        else:
            groups.append([sample])
    return full


def shared_layout(
    targets: torch.Tensor,
    num_classes: int,
    generator: torch.Generator | None = None,
    weights: torch.Tensor | None = None,
) -> CompositeLayout:
    """Like :func:`random_layout`, but the batch is partitioned at random into groups of 4 that can
    all be each other's distractors, and each group's composite serves its 4 members
    (``loss.composites=shared``): the members fill the cells in random order, so a member's
    distractors are the group's other 3. Samples that no group takes get a per-sample composite
    from the batch, as :func:`random_layout` draws it, in a group of their own."""
    labels = label_sets(targets, num_classes).cpu()
    positive = explained_classes(targets, num_classes, generator, weights)
    batch = targets.shape[0]
    order = torch.randperm(batch, generator=generator).tolist()
    label_lists = [set(row.nonzero().flatten().tolist()) for row in labels]
    groups = torch.tensor(_reciprocal_groups(label_lists, positive.tolist(), order), dtype=torch.long).view(-1, 4)
    # Row g of cell_members: the batch indices in cells 0-3 of group g's composite.
    shuffle = torch.rand(groups.shape, generator=generator).argsort(1)
    cell_members = groups.gather(1, shuffle)
    distractors, valid = choose_distractors(labels, positive, generator)
    cells = torch.randint(0, 4, (batch,), generator=generator)
    group_of = batch + torch.arange(batch)  # a fallback sample's own group, apart from the shared ones
    members = cell_members.flatten()
    cells[members] = torch.arange(4).repeat(groups.shape[0])
    group_of[members] = torch.arange(groups.shape[0]).repeat_interleave(4)
    others = torch.tensor([[c for c in range(4) if c != cell] for cell in range(4)])
    distractors[members] = cell_members.repeat_interleave(4, 0).gather(1, others.repeat(groups.shape[0], 1))
    valid[members] = True
    device = targets.device
    return CompositeLayout(torch.arange(batch, device=device), positive.to(device), cells.to(device),
                           distractors.to(device), valid.to(device), group_of.to(device))


def own_distractors_layout(classes: torch.Tensor, cells: torch.Tensor) -> CompositeLayout:
    """The layout of a batch of ``B`` samples that bring their explained class, their cell and their
    own 3 distractors (``loss.composite_source=dataset``). Its distractor indices point past the
    batch, into the distractor images stacked after it: sample ``b``'s are ``B + 3b``, ``B + 3b + 1``,
    ``B + 3b + 2`` of ``torch.cat([images, distractor_images.flatten(0, 1)])``. Every row is valid."""
    batch = classes.shape[0]
    device = classes.device
    distractors = batch + torch.arange(batch * NUM_DISTRACTORS, device=device).view(batch, NUM_DISTRACTORS)
    return CompositeLayout(torch.arange(batch, device=device), classes.long(), cells.long().to(device), distractors,
                           torch.ones(batch, dtype=torch.bool, device=device))


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


def composite_target(maps: torch.Tensor, cells: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``comp(k, g, 0, 0, 0)`` on the composite's map of size ``size = (H_c, W_c)``: each ``h x w``
    map goes where the network sees its cell, at row and column offsets 0 and ``H_c - h`` /
    ``W_c - w``, zeros elsewhere.

    When the image side is a multiple of the network's output stride, the far cell's features are
    the image's own shifted by ``side / stride`` cells (the layers are shift-invariant; only
    receptive fields that reach across a cell border differ), so they end at the composite's far
    edge and start at ``H_c - h``. ResNet: ``H_c = 2h``, so the offsets are 0 and ``h``. AlexNet at
    448 px: 13x13 maps at offsets 0 and 14 of 27x27; row and column 13, whose receptive fields
    straddle two images, are a seam with zero target. (An earlier rule resized the placed 26x26 map
    to 27x27, which misplaced it by up to half a cell.)
    """
    h, w = maps.shape[-2:]
    height, width = size
    if height < 2 * h or width < 2 * w:
        raise ValueError(
            f"the composite's map ({height}x{width}) is smaller than two image maps ({h}x{w}) side by side: "
            "its cells overlap and no placement is exact; use an image side that is a multiple of the "
            "network's output stride"
        )
    rows = torch.cat([torch.arange(h), torch.arange(height - h, height)]).to(maps.device)
    cols = torch.cat([torch.arange(w), torch.arange(width - w, width)]).to(maps.device)
    target = maps.new_zeros(maps.shape[0], height, width)
    target[:, rows[:, None], cols] = place_in_cell(maps, cells)
    return target
