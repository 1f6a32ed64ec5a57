"""Speed of a GC training step against a CE step, and images decoded per training sample.

    python benchmarks/gc_step_speed.py [--models resnet18 vgg16 convnext_tiny vit] [--sizes 128 224]
        [--batch 16] [--steps 5] [--device cpu]

The three step kinds (CE, GC with per-sample composites, GC with shared composites) are timed in
the same run, alternating, so the ratios are robust to machine noise. Targets (ResNet18): per-sample
GC/CE <= 5.5 at 224 px (issue 2: each composite has 4x the pixels, so about 5 is the floor);
shared GC/CE <= 2.5 at 224 px (issue 12: a quarter as many composites); 1.0 decoded image per
sample (distractors come from the batch). ``vit`` is conf/model/vit.yaml's small ViT made for the
side it runs at, ``vit_b_16`` torchvision's ViT-B/16; a ViT's GC step runs attention on the math
kernel (the fused ones have no double backward), its CE step on the fused ones.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import images as image_io  # noqa: E402
from datamodules.synthetic import SyntheticDataModule, generator_options  # noqa: E402
from gcmodels.module import GCClassifier  # noqa: E402
from gcmodels.networks import build_network  # noqa: E402
from gcmodels.networks.vit import VIT_B_16  # noqa: E402
from gcmodels.objectives import gc_objective  # noqa: E402
from losses import classification_loss, random_layout, shared_layout  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# conf/model/vit.yaml's sizes.
SMALL_VIT = {"patch_size": 8, "num_layers": 4, "num_heads": 4, "hidden_dim": 128, "mlp_dim": 256}


def network(model: str, size: int, output_stride: int | None):
    if model == "vit":
        return build_network("vit", 10, **SMALL_VIT, image_size=size)
    if model == "vit_b_16":
        return build_network("vit", 10, **VIT_B_16)
    return build_network(model, 10, **({"output_stride": output_stride} if output_stride else {}))


def step_times(model: str, size: int, batch: int, steps: int, device: torch.device, precision: str,
               output_stride: int | None = None) -> dict[str, float]:
    """Median seconds of a CE step and of GC steps with per-sample and shared composites (forward,
    backward, SGD update) for ``model``."""
    torch.manual_seed(0)
    net = network(model, size, output_stride).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    images = torch.rand(batch, 3, size, size, device=device)
    targets = torch.arange(batch, device=device) % 10
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def ce_step():
        with autocast:
            loss = classification_loss(net(images), targets)
        return loss

    def gc_step(draw):
        with autocast:
            return gc_objective(net, images, targets, draw(targets, 10, generator), lam=1.0).loss

    kinds = {"ce": ce_step, "gc": lambda: gc_step(random_layout), "shared": lambda: gc_step(shared_layout)}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for index in range(steps + 1):  # the first round warms up
        for name, step in kinds.items():
            synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step().backward()
            optimizer.step()
            synchronize(device)
            if index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def decoded_per_sample(batches: int = 4) -> float:
    """Images decoded per training sample during GC training on the synthetic data (reader calls
    counted through ``datamodules.images.load_rgb``, the one decode point of every dataset)."""
    calls = 0
    original = image_io.load_rgb

    def counting_load(path):
        nonlocal calls
        calls += 1
        return original(path)

    image_io.load_rgb = counting_load
    try:
        with tempfile.TemporaryDirectory() as root:
            data = SyntheticDataModule(root, num_classes=4, image_size=64, train_per_class=8, val_per_class=1,
                                       **generator_options(),
                                       context_bias=0.0, seed=0, batch_size=8, num_workers=0, skip_corrupt=False)
            module = GCClassifier(
                model={"name": "resnet18", "pooling": "avg", "pretrained": False, "output_stride": 32},
                loss={"name": "gc", "lambda": 1.0, "cam_mode": "elementwise", "detach_target": False,
                      "positive": "instances", "composite_source": "batch", "composites": "per_sample"},
                optimizer={"name": "sgd", "lr": 0.01}, scheduler={"name": "none"}, num_classes=4, multilabel=False,
                layout_seed=0,
            )
            samples = 0

            class CountSamples(pl.Callback):
                def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                    nonlocal samples
                    samples += batch["image"].shape[0]

            trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=batches, limit_val_batches=0,
                                 logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=[CountSamples()])
            trainer.fit(module, datamodule=data)
    finally:
        image_io.load_rgb = original
    return calls / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Sides must be multiples of the output stride (composite_target refuses overlapping cells):
    # 112 px needs --output-stride 16.
    parser.add_argument("--models", nargs="+", default=["resnet18"],
                        choices=["resnet18", "resnet50", "alexnet", "vgg16", "convnext_tiny", "vit", "vit_b_16"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--output-stride", type=int, default=None,
                        help="ResNet output stride (32 default; 16: the synthetic quick start's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"batch {args.batch}, {args.steps} timed steps each, device {device}, {args.precision}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; ResNet output stride "
          f"{args.output_stride or 32}")
    print(f"{'model':>14} {'size':>5} {'CE img/s':>10} {'GC img/s':>10} {'shared img/s':>13} {'GC/CE time':>11} "
          f"{'shared/CE time':>15}")
    for model in args.models:
        for size in args.sizes:
            times = step_times(model, size, args.batch, args.steps, device, args.precision, args.output_stride)
            print(f"{model:>14} {size:>5} {args.batch / times['ce']:>10.1f} {args.batch / times['gc']:>10.1f} "
                  f"{args.batch / times['shared']:>13.1f} {times['gc'] / times['ce']:>11.2f} "
                  f"{times['shared'] / times['ce']:>15.2f}")
    print(f"decoded images per training sample in GC mode: {decoded_per_sample():.2f}")


if __name__ == "__main__":
    main()
