"""Speed of the faithfulness metrics against their floor, the network's batched forward throughput.

    python benchmarks/faithfulness_speed.py [--images 8] [--batch 32] [--steps 28] [--threads 2]

For ResNet18 at 224 px (output stride 32, the paper's) and at the quick start's geometry (80 px,
output stride 16), on random weights and images (speed does not depend on them) with Grad-CAM's
maps, in one run:

- insertion + deletion (``functional.perturbation_curves``, both curves, ``steps + 1`` points each),
- ROAD (MoRF and LeRF at 9 percentages),
- the randomisation test (cascading, Grad-CAM recomputed after each block),

each in images/s beside its floor: the forwards it needs at the network's batched throughput
(measured here on ``--batch`` images). Insertion and deletion also beside the naive way, one
forward per step per image (on 2 images, scaled), and ROAD with the split of its time (ranking,
imputation, forwards). Every metric's result is the same as the naive one's (the tests check
that); only time is measured here.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.explainers import GradCAM  # noqa: E402
from evaluation.metrics import functional  # noqa: E402
from evaluation.metrics.imputation import linear_imputation  # noqa: E402
from gcmodels.networks import build_network  # noqa: E402

PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def forward_throughput(net, size: int, batch: int) -> float:
    """Images per second of batched forwards (after one warm-up batch)."""
    images = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        net(images)
        return 2 * batch / seconds(lambda: (net(images), net(images)))


def naive_perturbation(net, images, maps, classes, seeds, steps: int) -> None:
    """One forward per step per image, for insertion and deletion."""
    pixels = maps[0].numel()
    blurred, black = functional.substrate(images, "blur"), torch.zeros_like(images)
    for b in range(len(images)):
        order = functional.pixel_ranks(maps[b:b + 1], seeds[b:b + 1])[0]
        for start, end in ((blurred[b], images[b]), (images[b], black[b])):
            for step in range(steps + 1):
                moved = (order < (2 * step * pixels + steps) // (2 * steps)).view(1, *images.shape[2:])
                with torch.no_grad():
                    net(torch.where(moved, end, start).unsqueeze(0))


def geometry(name: str, size: int, stride: int, args) -> list[str]:
    torch.manual_seed(0)
    net = build_network("resnet18", 10, output_stride=stride).eval()
    images = torch.rand(args.images, 3, size, size)
    classes = torch.randint(0, 10, (args.images,))
    seeds = torch.arange(args.images)
    explainer = GradCAM()
    maps = functional.upsample(explainer(net, images, classes), (size, size))
    throughput = forward_throughput(net, size, args.batch)
    options = {"steps": args.steps, "batch_size": args.batch}

    def perturbation() -> None:
        for insertion, substrate in ((True, "blur"), (False, "zeros")):
            functional.perturbation_curves(net, images, maps, classes, seeds, insertion=insertion,
                                           substrate_name=substrate, **options)

    perturbation_time = seconds(perturbation)
    naive_images = min(2, args.images)
    naive_time = seconds(lambda: naive_perturbation(net, images[:naive_images], maps[:naive_images],
                                                    classes[:naive_images], seeds[:naive_images], args.steps))
    perturbation_floor = args.images * 2 * (args.steps + 1) / throughput

    road_time = seconds(lambda: [functional.road(net, images, maps, classes, seeds, percentages=PERCENTAGES,
                                                 order=order, batch_size=args.batch)
                                 for order in functional.ROAD_ORDERS])
    ranking_time = seconds(lambda: functional.pixel_ranks(maps, seeds))
    ranks = functional.pixel_ranks(maps, seeds)
    pixels = size * size
    removed = [functional.road_removed(ranks, torch.full((args.images,), round(p / 100 * pixels)), order)
               .view(-1, size, size) for p in PERCENTAGES for order in functional.ROAD_ORDERS]
    imputation_time = seconds(lambda: [linear_imputation(images, holes) for holes in removed])
    road_floor = args.images * 2 * len(PERCENTAGES) / throughput

    blocks = len(functional.parameter_blocks(net))
    mprt_time = seconds(lambda: functional.randomisation_similarity(net, explainer, images, classes, seed=0))
    explain_time = seconds(lambda: explainer(net, images, classes))
    mprt_floor = (blocks + 1) * explain_time

    def rate(elapsed: float, count: int = args.images) -> str:
        return f"{count / elapsed:.2f}"

    return [
        f"| {name} | insertion + deletion | {rate(perturbation_time)} | {rate(perturbation_floor)} | "
        f"{perturbation_time / perturbation_floor:.2f}x | {rate(naive_time, naive_images)} | "
        f"{args.steps + 1} points a curve, forward {throughput:.0f} img/s |",
        f"| {name} | ROAD (MoRF + LeRF, 9 %) | {rate(road_time)} | {rate(road_floor)} | "
        f"{road_time / road_floor:.2f}x | - | ranking {ranking_time:.2f} s, imputation {imputation_time:.2f} s, "
        f"forwards {road_floor:.2f} s of {road_time:.2f} s |",
        f"| {name} | randomisation (cascading, {blocks} blocks) | {rate(mprt_time)} | {rate(mprt_floor)} | "
        f"{mprt_time / mprt_floor:.2f}x | - | floor: {blocks + 1} Grad-CAM passes |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["| geometry | metric | images/s | floor images/s | time / floor | naive images/s | notes |",
             "|---|---|---|---|---|---|---|"]
    lines += geometry("224 px, stride 32", 224, 32, args)
    lines += geometry("80 px, stride 16", 80, 16, args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
