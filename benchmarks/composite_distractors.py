"""How shared composites change the distractors a GC term sees, against per-sample composites.

    python benchmarks/composite_distractors.py [--batches 2000] [--batch 32] [--coco-annotations FILE]

Draws layouts exactly as training does (``losses.random_layout`` for ``loss.composites=per_sample``,
``losses.shared_layout`` for ``shared``) on batches of real label sets, and counts:

- single-label batches (the quick start's synthetic training set: 10 classes x 200 images, shuffled
  into batches as the training loader does): the share of composites whose three distractors
  include two of one class, per-sample against shared; the share of samples that no group of four
  takes and that fall back to a per-sample composite (``train/gc_fallback``);
- multi-label batches: the fallback share, on COCO's label sets when ``--coco-annotations`` names
  an ``instances_*.json`` (read with pycocotools), else on a stated toy model (below) that only
  shows the direction: images that carry several labels clash with more groups.

A statistic of the sampling scheme, not a speed: no timing, so it is exact up to the number of
batches drawn.
"""
from __future__ import annotations

import argparse

import torch

from losses import label_sets, random_layout, shared_layout

SYNTHETIC_CLASSES, SYNTHETIC_PER_CLASS = 10, 200
# The toy multi-label model: 80 classes, class 0 in 55% of images (COCO 2014's "person": 45,174 of
# 82,081 training images), and 1 + Poisson(1.35) further labels uniform over the other 79: 2.9
# labels per image on average, as COCO's images carry 2.9 categories. It has none of COCO's
# co-occurrence, so it understates how often real multi-label batches fall back.
TOY_CLASSES, TOY_FREQUENT, TOY_EXTRA = 80, 0.55, 1.35


def synthetic_batches(batches: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    labels = torch.arange(SYNTHETIC_CLASSES).repeat_interleave(SYNTHETIC_PER_CLASS)
    out = []
    while len(out) < batches:
        epoch = labels[torch.randperm(len(labels), generator=generator)]
        # The last, smaller batch too: the training loader keeps it (drop_last=False).
        out += [epoch[start:start + batch] for start in range(0, len(epoch), batch)]
    return out[:batches]


def toy_multilabel_batches(batches: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    out = []
    for _ in range(batches):
        targets = torch.zeros(batch, TOY_CLASSES)
        targets[:, 0] = (torch.rand(batch, generator=generator) < TOY_FREQUENT).float()
        extra = 1 + torch.poisson(torch.full((batch,), TOY_EXTRA), generator=generator).long()
        for row, count in enumerate(extra.tolist()):
            targets[row, 1 + torch.randperm(TOY_CLASSES - 1, generator=generator)[:count]] = 1
        out.append(targets)
    return out


def coco_batches(path: str, batches: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    from pycocotools.coco import COCO

    coco = COCO(path)
    categories = sorted(coco.getCatIds())
    column = {category: index for index, category in enumerate(categories)}
    images = [image for image in sorted(coco.getImgIds()) if coco.getAnnIds(imgIds=image)]
    targets = torch.zeros(len(images), len(categories))
    for row, image in enumerate(images):
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image)):
            targets[row, column[annotation["category_id"]]] = 1
    return [targets[torch.randperm(len(images), generator=generator)[:batch]] for _ in range(batches)]


def repeated_class(targets: torch.Tensor, layout) -> tuple[int, int]:
    """Single-label: composites whose three distractors hold a class twice, and composites."""
    classes = targets[layout.distractors[layout.valid]]
    repeated = (classes[:, 0] == classes[:, 1]) | (classes[:, 0] == classes[:, 2]) | (classes[:, 1] == classes[:, 2])
    return int(repeated.sum()), len(classes)


def fallbacks(layout) -> tuple[int, int]:
    """Shared composites: samples in a composite of their own, and samples."""
    return int((layout.valid & (layout.groups >= len(layout))).sum()), len(layout)


def percent(counts: list[tuple[int, int]]) -> str:
    """Pooled over batches, so that a smaller last batch weighs by its samples."""
    return f"{100 * sum(part for part, _ in counts) / sum(whole for _, whole in counts):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--coco-annotations", default=None, help="a COCO instances_*.json for the multi-label rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)

    single = synthetic_batches(args.batches, args.batch, generator)
    per_sample = [repeated_class(t, random_layout(t, SYNTHETIC_CLASSES, generator)) for t in single]
    shared = [(t, shared_layout(t, SYNTHETIC_CLASSES, generator)) for t in single]
    print(f"single-label (synthetic, {SYNTHETIC_CLASSES} classes, batch {args.batch}, {args.batches} batches):")
    print(f"  composites with two distractors of one class: per-sample {percent(per_sample)}, "
          f"shared {percent([repeated_class(t, layout) for t, layout in shared])}")
    print(f"  samples falling back to a per-sample composite (shared): "
          f"{percent([fallbacks(layout) for _, layout in shared])}")

    if args.coco_annotations:
        multi, source = coco_batches(args.coco_annotations, args.batches, args.batch, generator), args.coco_annotations
    else:
        multi, source = toy_multilabel_batches(args.batches, args.batch, generator), "toy model, not COCO"
    classes = multi[0].shape[1]
    shares = [fallbacks(shared_layout(t, classes, generator)) for t in multi]
    labels = sum(float(label_sets(t, classes).sum(1).float().mean()) for t in multi) / len(multi)
    print(f"multi-label ({source}; {classes} classes, {labels:.1f} labels per image, batch {args.batch}):")
    print(f"  samples falling back to a per-sample composite (shared): {percent(shares)}")

if __name__ == "__main__":
    main()
