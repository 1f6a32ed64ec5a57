"""Speed of a training step of every objective (``loss=<name>``, with its conf/loss defaults)
against a CE step, ResNet18, in one run.

    python benchmarks/objective_speed.py [--geometries 80:16:32 224:32:16] [--steps 5] [--device cpu]

A geometry is ``size:output_stride:batch``: 80:16:32 is the synthetic quick start's, 224:32:16
ImageNet's at a batch that fits a CPU. The objectives' steps alternate within each timed round, so
the ratios are robust to machine noise. Targets (issue 20) at 224 px: CGC <= 3.5x a CE step (three
forwards, and a second-order backward through two of them), each guidance loss <= 1.5x.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gcmodels.config import compose_group  # noqa: E402
from gcmodels.networks import build_network  # noqa: E402
from gcmodels.objectives import OBJECTIVES  # noqa: E402

NUM_CLASSES = 10


def batch_for_every_objective(size: int, batch: int, device: torch.device) -> dict:
    """One batch with every field an objective reads: CGC's views, crop boxes and flips, and a
    guided class's mask (a centred square covering a quarter of the image)."""
    generator = torch.Generator().manual_seed(0)
    sides = torch.randint(size // 3, size + 1, (batch, 2), generator=generator)
    corners = (torch.rand(batch, 2, generator=generator) * (size + 1 - sides)).long()
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    mask[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = True
    targets = torch.arange(batch) % NUM_CLASSES
    fields = {"image": torch.rand(batch, 3, size, size, generator=generator),
              "view": torch.rand(batch, 3, size, size, generator=generator),
              "augmented": torch.rand(batch, 3, size, size, generator=generator),
              "box": torch.cat([corners, sides], dim=1), "flip": torch.rand(batch, generator=generator) < 0.5,
              "target": targets, "guide_class": targets, "mask": mask,
              "annotated": torch.ones(batch, dtype=torch.bool)}
    return {key: value.to(device) for key, value in fields.items()}


def step_times(size: int, output_stride: int, batch: int, steps: int, device: torch.device,
               names: list[str]) -> dict[str, float]:
    """Median seconds of a training step (forward, backward, SGD update) of each objective."""
    torch.manual_seed(0)
    net = build_network("resnet18", NUM_CLASSES, output_stride=output_stride).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    layouts = torch.Generator().manual_seed(0)
    # What an objective's step reads of the LightningModule.
    module = SimpleNamespace(net=net, hparams=SimpleNamespace(multilabel=False, num_classes=NUM_CLASSES),
                             layout_generator=lambda: layouts)
    objectives = {}
    for item in names:
        # "energy:input_x_gradient": a guidance loss on another attribution.
        name, _, attribution = item.partition(":")
        options = compose_group("loss", name)
        options.pop("name")
        if attribution:
            options["attribution"] = attribution
        objectives[item] = OBJECTIVES[name].build(**options)
    batch_fields = batch_for_every_objective(size, batch, device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(steps + 1):  # the first round warms up
        for name, objective in objectives.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            objective.step(module, batch_fields).loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometries", nargs="+", default=["80:16:32", "224:32:16"],
                        help="size:output_stride:batch per geometry")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--objectives", nargs="+",
                        default=["ce", "gc", "cgc", "energy", "l1", "rrr", "ppce", "energy:input_x_gradient"],
                        help="loss names; name:attribution for a guidance loss on another attribution")
    args = parser.parse_args()
    if args.objectives[0] != "ce":
        parser.error("--objectives must start with ce, the reference of every ratio")
    device = torch.device(args.device)
    print(f"ResNet18, {args.steps} timed steps each, device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; each objective with its conf/loss defaults")
    for geometry in args.geometries:
        size, stride, batch = (int(part) for part in geometry.split(":"))
        times = step_times(size, stride, batch, args.steps, device, args.objectives)
        print(f"\n{size} px, output stride {stride}, batch {batch}")
        print(f"{'loss':>24} {'img/s':>8} {'time / CE':>10} {'second-order backward':>22}")
        for item, seconds in times.items():
            second = "yes" if OBJECTIVES[item.partition(":")[0]].target.second_order else "no"
            print(f"{item:>24} {batch / seconds:>8.1f} {seconds / times['ce']:>10.2f} {second:>22}")


if __name__ == "__main__":
    main()
