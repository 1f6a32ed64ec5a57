"""Seconds per image of Grad-CAM, SmoothGrad and LIME on ResNet18, and what batching LIME's
perturbations buys over one forward pass per perturbation.

    python benchmarks/explainer_speed.py [--images 8] [--size 64] [--lime-samples 1000]
        [--per-sample-images 2] [--threads 1] [--device cpu]

LIME runs twice in the same process: batched on all images (the perturbations of all images share
passes of ``base.images_per_pass`` images) and with ``samples_per_pass=1`` (one forward pass per
perturbation, as a per-sample loop would) on the first ``--per-sample-images`` of them, because
that way costs a pass per perturbation, linear in the images. The speed-up compares seconds per
image. An image draws the same perturbations in either run (they are seeded by its content), so
the weights must agree; the table prints the largest difference. The LIME rows time
``superpixel_weights`` (SLIC, the forward passes and the ridge fits; the map is a gather on top).
Images are smooth random colour fields, since SLIC finds a single superpixel in pure noise;
ResNet18 is untrained, as speed does not depend on the weights. One thread by default: on a shared
machine multi-threaded timings of single-image passes were erratic (3x slower than one thread).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.explainers import build_explainer  # noqa: E402
from gcmodels.config import compose_group  # noqa: E402
from gcmodels.networks import build_network  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, function, *args):
    synchronize(device)
    start = time.perf_counter()
    result = function(*args)
    synchronize(device)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--lime-samples", type=int, default=None,
                        help="perturbations per image (default: conf/explainer/lime.yaml's num_samples)")
    parser.add_argument("--lime-segments", type=int, default=50)
    parser.add_argument("--per-sample-images", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    net = build_network("resnet18", 10).to(device).eval()
    generator = torch.Generator().manual_seed(args.seed)
    coarse = torch.rand(args.images, 3, 6, 6, generator=generator)
    images = F.interpolate(coarse, size=(args.size, args.size), mode="bilinear", align_corners=False).to(device)
    targets = torch.arange(args.images, device=device) % 10

    passes = []
    # On the head: Grad-CAM runs features and head itself, not net.forward.
    net.head.register_forward_hook(lambda _module, _inputs, _output: passes.append(1))

    # The explainers as configured (conf/explainer/*.yaml), sample counts from the command line.
    lime_options = compose_group("explainer", "lime", num_segments=args.lime_segments, seed=args.seed)
    if args.lime_samples is not None:
        lime_options["num_samples"] = args.lime_samples
    batched = build_explainer(**lime_options)
    per_sample = build_explainer(**{**lime_options, "samples_per_pass": 1})
    smoothgrad = compose_group("explainer", "smoothgrad")
    runs = [
        ("gradcam", "", build_explainer(**compose_group("explainer", "gradcam"))),
        ("smoothgrad", f"{smoothgrad['num_samples']} samples, stdev {smoothgrad['stdev']}",
         build_explainer(**smoothgrad)),
    ]
    build_explainer("gradcam")(net, images[:1], targets[:1])  # warm-up: first-call allocations

    rows = []
    for name, note, explainer in runs:
        passes.clear()
        _, seconds = timed(device, explainer, net, images, targets)
        rows.append((name, note, len(passes), len(images), seconds))
    results = {}
    subset = slice(0, args.per_sample_images)
    for name, explainer, part in (("lime", batched, slice(None)), ("lime per sample", per_sample, subset)):
        passes.clear()
        (_, weights), seconds = timed(device, explainer.superpixel_weights, net, images[part], targets[part])
        results[name] = weights
        per_pass = explainer.samples_per_pass or "auto"
        rows.append((name, f"{explainer.num_samples} samples, samples_per_pass={per_pass}", len(passes),
                     len(weights), seconds))
    _, slic_seconds = timed(device, batched.segment, images)
    difference = max(float((a - b).abs().max()) for a, b in zip(results["lime"], results["lime per sample"]))
    segments = [int(w.numel()) for w in results["lime"]]

    print(f"ResNet18 (eval, untrained), {args.images} images of {args.size}x{args.size}, {device}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'explainer':<17}{'images':>7}{'forward passes':>15}{'s total':>10}{'s / image':>11}  options")
    per_image = {}
    for name, note, count, explained, seconds in rows:
        per_image[name] = seconds / explained
        print(f"{name:<17}{explained:>7}{count:>15}{seconds:>10.3f}{per_image[name]:>11.4f}  {note}")
    print(f"LIME batched over per-sample passes: {per_image['lime per sample'] / per_image['lime']:.1f}x "
          f"faster; max |weight difference| {difference:.1e}; superpixels per image {min(segments)}-"
          f"{max(segments)}; SLIC alone {slic_seconds / args.images:.4f} s / image")


if __name__ == "__main__":
    main()
