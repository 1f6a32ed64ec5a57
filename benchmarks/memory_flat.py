"""Memory that does not grow: over GC training steps, and with the number of evaluated images.

    python benchmarks/memory_flat.py [--steps 400] [--warmup 100] [--size 32] [--batch 8]
                                     [--images 100] [--threads 1] [--device cpu|cuda]

1. Training: ``--steps`` GC steps (``GCClassifier``'s ResNet18 and optimizer, ``gc_objective``,
   a fresh composite layout per step) on the synthetic training images of ``--size`` px, read
   through the datamodule's loader. The process's resident memory (RSS; psutil where installed,
   else ``/proc/self/statm``) is sampled every 10 steps: printed after ``--warmup`` steps and at
   the end, with the least-squares slopes after the warm-up and over its last half, in MB per
   100 steps. A batch kept per
   step (8 images of 32 px) would add about 10 MB per 100 steps, a kept graph far more; the
   allocator's noise moves the RSS by a few MB. On CUDA also ``torch.cuda.max_memory_allocated``
   and the memory allocated after the warm-up and at the end.
2. Evaluation: ``ExplanationEvaluator.run`` with every metric (accuracy, PG, SPG, CH, NQH, FGSM
   and the reference maps) on ``--images`` and on 4x as many validation images, each in a fresh
   process (the same data set and network), reporting the RSS before the run, the peak during it
   (the kernel's high-water mark, reset before the run) and the growth of that peak from N to 4N
   images. The metrics keep sums of per-image scalars, never maps: the element count of all their
   states, printed for both runs, must not change with N.

Linux only (``/proc``). One thread by default: on a shared machine more threads make the steps
erratic. About 2.5 minutes on one CPU core with the defaults.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.synthetic import SyntheticDataModule, generator_options  # noqa: E402
from evaluation.evaluator import ExplanationEvaluator  # noqa: E402
from evaluation.explainers import build_explainer  # noqa: E402
from evaluation.metrics.registry import METRICS  # noqa: E402
from evaluation.settings import default_settings  # noqa: E402
from gcmodels.config import compose_group  # noqa: E402
from gcmodels.module import GCClassifier  # noqa: E402
from gcmodels.objectives import gc_objective  # noqa: E402
from losses import random_layout  # noqa: E402

try:
    import psutil
except ImportError:
    psutil = None

NUM_CLASSES = 4
MB = 2**20


def rss_mb() -> float:
    if psutil is not None:
        return psutil.Process().memory_info().rss / MB
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the high-water mark to the current RSS


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kib) * 1024 / MB


def slope_per_100(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``steps``, per 100 steps."""
    mean_step, mean_value = sum(steps) / len(steps), sum(values) / len(values)
    covariance = sum((s - mean_step) * (v - mean_value) for s, v in zip(steps, values))
    return 100 * covariance / sum((s - mean_step) ** 2 for s in steps)


def datamodule(root: Path, size: int, batch: int, val_images: int) -> SyntheticDataModule:
    # Objects of at least 14 px (the generator's minimum) on images as small as 32 px.
    options = {**generator_options(), "object_scale": (0.45, 0.7)}
    module = SyntheticDataModule(root, num_classes=NUM_CLASSES, image_size=size, train_per_class=16,
                                 val_per_class=math.ceil(val_images / NUM_CLASSES), context_bias=0.0, seed=0,
                                 **options, batch_size=batch, num_workers=0, skip_corrupt=False)
    module.prepare_data()
    module.setup("fit")
    return module


def classifier() -> GCClassifier:
    torch.manual_seed(0)
    return GCClassifier(
        model={"name": "resnet18", "pooling": "avg", "pretrained": False, "output_stride": 16},
        loss={"name": "gc", "lambda": 25.0, "cam_mode": "elementwise", "detach_target": False,
              "positive": "instances", "composite_source": "batch", "composites": "per_sample"},
        optimizer={"name": "adamw", "lr": 1e-3}, scheduler={"name": "none"}, num_classes=NUM_CLASSES,
        multilabel=False, layout_seed=0,
    )


def training(data: SyntheticDataModule, steps: int, warmup: int, device: torch.device) -> None:
    module = classifier()
    net = module.net.to(device).train()
    optimizer = module.configure_optimizers()
    samples: dict[int, float] = {}
    start = time.perf_counter()
    # Epoch after epoch through the loader (itertools.cycle would replay the first epoch's batches).
    batches = (batch for _ in itertools.count() for batch in data.train_dataloader())
    for step in range(1, steps + 1):
        batch = next(batches)
        images, targets = batch["image"].to(device), batch["target"].to(device)
        layout = random_layout(targets, NUM_CLASSES, module.layout_generator())
        optimizer.zero_grad(set_to_none=True)
        gc_objective(net, images, targets, layout, lam=25.0).loss.backward()
        optimizer.step()
        if step == warmup and device.type == "cuda":
            warm_cuda = torch.cuda.memory_allocated(device) / MB
        if step % 10 == 0:
            samples[step] = rss_mb()
    seconds = time.perf_counter() - start
    after = [step for step in samples if step >= warmup]
    last_half = after[len(after) // 2:]
    print(f"training: {steps} GC steps, ResNet18 (output stride 16), batch {data.batch_size} of "
          f"{data.image_size} px, {device}, {seconds:.0f} s")
    # The slope of the last half too: the allocator may still be settling on its plateau after
    # the warm-up, which a leak, growing steadily, never reaches.
    print(f"  RSS after {warmup} warm-up steps {samples[after[0]]:.1f} MB, at step {steps} {samples[steps]:.1f} MB, "
          f"range after warm-up {max(samples[s] for s in after) - min(samples[s] for s in after):.1f} MB; "
          f"slope {slope_per_100(after, [samples[s] for s in after]):+.2f} MB per 100 steps after the warm-up, "
          f"{slope_per_100(last_half, [samples[s] for s in last_half]):+.2f} over the last half")
    if device.type == "cuda":
        print(f"  CUDA allocated after warm-up {warm_cuda:.1f} MB, at the end "
              f"{torch.cuda.memory_allocated(device) / MB:.1f} MB, "
              f"max {torch.cuda.max_memory_allocated(device) / MB:.1f} MB")


def evaluation(data: SyntheticDataModule, images: int, device: torch.device) -> dict:
    """One process's evaluation of ``images`` validation images: peak RSS and the metrics' state sizes."""
    torch.manual_seed(0)
    net = classifier().net.to(device)
    evaluator = ExplanationEvaluator(build_explainer(**compose_group("explainer", "gradcam")), METRICS, NUM_CLASSES,
                                     False, default_settings(seed=0, batch_size=data.batch_size))
    before = rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    evaluator.run(net, data, max_images=images, progress=False)
    states = [state for metric in evaluator._all_metrics() for state in metric.metric_state.values()]
    return {"images": images, "seconds": time.perf_counter() - start, "rss_before_mb": before,
            "peak_rss_mb": peak_rss_mb(),
            "state_elements": sum(state.numel() for state in states if torch.is_tensor(state)),
            "list_states": sum(not torch.is_tensor(state) for state in states)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=100, help="N: evaluation on N and 4N images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", type=Path, default=None, help="where to generate the images (a temporary dir)")
    parser.add_argument("--evaluate", type=int, default=None, help=argparse.SUPPRESS)  # one evaluation process
    args = parser.parse_args()
    if args.steps < args.warmup + 40 or args.warmup < 10:
        parser.error("--warmup must be >= 10 and --steps at least 40 more, for the slopes after the warm-up")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data_dir or Path(scratch)
        data = datamodule(root, args.size, args.batch, 4 * args.images)
        if args.evaluate is not None:
            print(json.dumps(evaluation(data, args.evaluate, device)))
            return
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, RSS from "
              f"{'psutil' if psutil is not None else '/proc/self/statm'}")
        training(data, args.steps, args.warmup, device)
        runs = []
        for images in (args.images, 4 * args.images):
            command = [sys.executable, __file__, "--evaluate", str(images), "--data-dir", str(root), "--size",
                       str(args.size), "--batch", str(args.batch), "--images", str(args.images), "--threads",
                       str(args.threads), "--device", args.device]
            runs.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
        print(f"evaluation: every metric ({', '.join(METRICS)} and the reference maps), Grad-CAM, batch {args.batch}, "
              f"one process per run")
        for run in runs:
            print(f"  {run['images']:>4} images: RSS before {run['rss_before_mb']:.1f} MB, peak during the run "
                  f"{run['peak_rss_mb']:.1f} MB, {run['seconds']:.0f} s, "
                  f"metric states {run['state_elements']} elements ({run['list_states']} list states)")
        print(f"  peak RSS growth from {args.images} to {4 * args.images} images: "
              f"{runs[1]['peak_rss_mb'] - runs[0]['peak_rss_mb']:+.1f} MB")


if __name__ == "__main__":
    main()
