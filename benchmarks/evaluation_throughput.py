"""Throughput (images/s) of checkpoint evaluation, per metric group, on the synthetic data.

    python benchmarks/evaluation_throughput.py [--model resnet18] [--size 224] [--images 64]
                                               [--batch 32] [--explainer gradcam] [--threads N]

Runs the engine of ``python -m evaluation`` (``ExplanationEvaluator``, the same loops, metrics and
explainers; without the start-up, checkpoint loading and report files) on a randomly initialised
network, which costs the same as a trained one. The validation images are generated once into
``data/`` like ``python train.py`` does. Groups: accuracy; PG + SPG (5 runs of 100 points) + CH;
NQH (composites at twice the size); FGSM at 6 eps; and all of them in one pass.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.synthetic import SyntheticDataModule, generator_options  # noqa: E402
from evaluation.evaluator import ExplanationEvaluator  # noqa: E402
from evaluation.explainers import build_explainer  # noqa: E402
from evaluation.settings import default_settings  # noqa: E402
from gcmodels.config import compose_group  # noqa: E402
from gcmodels.networks import build_network  # noqa: E402

GROUPS = {
    "acc": ["acc"],
    "pg+spg+ch": ["pg", "spg", "ch"],
    "nqh": ["nqh"],
    "fgsm (6 eps)": ["fgsm"],
    "all": ["acc", "pg", "spg", "ch", "nqh", "fgsm"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--explainer", default="gradcam")
    parser.add_argument("--output-stride", type=int, default=None, help="ResNet: 32 (default), 16 or 8")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    num_classes = 10
    datamodule = SyntheticDataModule(ROOT / "data", num_classes=num_classes, image_size=args.size, train_per_class=1,
                                     val_per_class=math.ceil(args.images / num_classes), context_bias=0.0, seed=0,
                                     **generator_options(),
                                     batch_size=args.batch, num_workers=0, skip_corrupt=False)
    datamodule.prepare_data()
    datamodule.setup("validate")
    net = build_network(args.model, num_classes, output_stride=args.output_stride).to(device).eval()
    explainer = build_explainer(**compose_group("explainer", args.explainer))

    print(f"{args.model} at {args.size} px, {args.explainer}, {args.images} images in batches of {args.batch}, "
          f"{device} ({torch.get_num_threads()} threads)")
    # Warm-up (thread pools, first allocations, the files' page cache), not timed.
    settings = default_settings(seed=0, batch_size=args.batch)
    ExplanationEvaluator(explainer, ["acc", "pg"], num_classes, False, settings).run(
        net, datamodule, max_images=args.batch, progress=False)
    print(f"{'metrics':<16}{'seconds':>10}{'images/s':>10}")
    for name, metrics in GROUPS.items():
        evaluator = ExplanationEvaluator(explainer, metrics, num_classes, False, settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        evaluator.run(net, datamodule, max_images=args.images, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        print(f"{name:<16}{elapsed:>10.1f}{args.images / elapsed:>10.2f}")


if __name__ == "__main__":
    main()
