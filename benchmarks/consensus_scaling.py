"""What a committee costs, per member and image, and its wall time on 1 and 2 processes.

    python benchmarks/consensus_scaling.py [--members 4] [--images 8] [--size 64] [--device cpu]

Trains ``--members`` tiny ResNet18 checkpoints (one epoch each, different seeds) on the synthetic
data, then runs ``python -m evaluation.consensus`` as a user would, in one run:

- per explainer (Grad-CAM, SmoothGrad with 25 samples, LIME with 1,000 perturbations: the
  configs' defaults), seconds per member per image: the wall time of a run on an empty store less
  that of the same run on the filled store (start-up and scoring), over members x images;
- the arithmetic of the forward passes side by side (``evaluation.channels_last=true``,
  ``evaluation.precision=bf16-mixed``) against the default, per member per image, for SmoothGrad
  (gradients: channels_last only) and LIME with 250 perturbations;
- the committee's wall time on an empty store with 1 and with 2 processes (``devices=2``: gloo on
  the CPU, NCCL on GPUs), side by side, for LIME with 250 perturbations; on the CPU each of the
  2 processes gets half the cores' threads (``OMP_NUM_THREADS``, as torchrun sets it);
- the papers' committee projected from the measured per-member cost: 81 members, 1,000 images,
  LIME and SmoothGrad, on 8 processes (one 8-GPU node when measured with ``--device cuda``).

The numbers are this machine's; on a 2-core CPU two processes share the two cores.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPLAINERS = {"gradcam": ["explainer=gradcam"], "smoothgrad": ["explainer=smoothgrad"], "lime": ["explainer=lime"]}
LIME_250 = [*EXPLAINERS["lime"], "explainer.num_samples=250"]
ARITHMETIC = {"default": [], "channels_last": ["evaluation.channels_last=true"],
              "bf16-mixed": ["evaluation.precision=bf16-mixed"]}
PAPERS_COMMITTEE = {"members": 81, "images": 1000, "processes": 8}


def run(command: list[str], env: dict | None = None) -> float:
    """Seconds of a command, which must succeed."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="consensus_scaling_"))
    data = [f"data.data_dir={work / 'data'}", f"data.image_size={args.size}", "data.num_classes=3",
            "data.train_per_class=4", f"data.val_per_class={max(2, args.images // 3 + 1)}", "data.num_workers=0"]
    checkpoints = []
    for seed in range(args.members):
        out = work / f"member{seed}"
        run([sys.executable, "train.py", f"hydra.run.dir={out}", *data, "data.batch_size=6", "trainer.max_epochs=1",
             f"seed={seed}", "loss=ce", "~callbacks.explanation_metrics", "~callbacks.fgsm_robustness",
             "heatmap_images=0"])
        checkpoints.append(str(out / "checkpoints" / "last.ckpt"))

    def consensus(name: str, store: Path, *options: str, env: dict | None = None) -> float:
        return run([sys.executable, "-m", "evaluation.consensus", f"hydra.run.dir={work / name}", *data,
                    f"ckpts=[{','.join(checkpoints)}]", f"num_images={args.images}", f"store_dir={store}",
                    f"device={args.device}", "convergence.enabled=false", *options], env)

    def per_member_image(name: str, *options: str) -> tuple[float, float, float]:
        """Wall times on an empty and on the filled store, and their difference per member per image."""
        empty = consensus(f"{name}_empty", work / f"store_{name}", *options)
        filled = consensus(f"{name}_filled", work / f"store_{name}", *options)
        return empty, filled, (empty - filled) / (args.members * args.images)

    print(f"{args.members} ResNet18 members, {args.images} images of {args.size} px, device {args.device}")
    per_image = {}
    print(f"{'explainer':>11} {'empty store s':>14} {'filled store s':>15} {'s / member / image':>19}")
    for name, options in EXPLAINERS.items():
        empty, filled, per_image[name] = per_member_image(name, *options)
        print(f"{name:>11} {empty:14.1f} {filled:15.1f} {per_image[name]:19.3f}")

    print(f"{'explainer':>11} {'arithmetic':>14} {'s / member / image':>19} {'/ default':>10}")
    for name, options in (("smoothgrad", EXPLAINERS["smoothgrad"]), ("lime_250", LIME_250)):
        default = None
        for arithmetic, extra in ARITHMETIC.items():
            if name == "smoothgrad" and arithmetic == "bf16-mixed":
                continue  # its passes need gradients: they stay in float32
            cost = per_member_image(f"{name}_{arithmetic}", *options, *extra)[2]
            if default is None:
                default = cost
            print(f"{name:>11} {arithmetic:>14} {cost:19.3f} {cost / default:10.2f}")

    one = consensus("one", work / "store_one", *LIME_250)
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    two = consensus("two", work / "store_two", *LIME_250, "devices=2", env={**os.environ, "OMP_NUM_THREADS": threads})
    print(f"LIME (250 perturbations) committee on an empty store: 1 process {one:.1f} s, 2 processes of "
          f"{threads} thread(s) {two:.1f} s (speed-up {one / two:.2f}x)")
    members, images, processes = PAPERS_COMMITTEE.values()
    for name in ("lime", "smoothgrad"):
        hours = per_image[name] * members * images / processes / 3600
        print(f"projected: {name} for {members} members x {images} images on {processes} processes of this kind: "
              f"{hours:.1f} h")
    print(f"(files under {work})")


if __name__ == "__main__":
    main()
