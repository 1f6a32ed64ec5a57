"""Training loader of the two composite sources, side by side: samples/s delivered and images
decoded per sample.

    python benchmarks/composite_source.py [--size 80] [--batch 32] [--workers 0 2] [--epochs 2]

``loss.composite_source=batch`` takes distractors from the batch, so the loader decodes one image
per sample; ``dataset`` decodes three more per sample (the authors' composites). Decodes are
counted at ``datamodules.images.load_rgb``, the one decode point of every dataset, through a
counter in shared memory so that forked loader workers add to it. Data: the quick start's
synthetic training set (``conf/data/synthetic.yaml``), generated into ``data/`` like
``python train.py`` does; timings as in ``benchmarks/loader_speed.py``.
"""
from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader_speed import loader_arguments, loader_epochs  # noqa: E402

from datamodules import images as image_io  # noqa: E402

# loss.composite_source -> what train.py passes to set_train_distractors (loss.positive; the
# synthetic data is single-label, so its value does not matter).
SOURCES = {"batch": None, "dataset": "instances"}


def main() -> None:
    args = loader_arguments(__doc__)
    decodes = multiprocessing.Value("q", 0)
    original = image_io.load_rgb

    def counting_load(path):
        with decodes.get_lock():
            decodes.value += 1
        return original(path)

    image_io.load_rgb = counting_load
    print(f"synthetic training set of conf/data/synthetic.yaml at {args.size} px, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {multiprocessing.cpu_count()} CPUs")
    print(f"{'composite_source':<17} {'workers':>7} {'samples/s per epoch':>22} {'decoded per sample':>19}")
    try:
        for workers in args.workers:
            for source, distractors in SOURCES.items():
                decodes.value = 0
                epochs = loader_epochs(args.size, args.batch, workers, args.epochs, distractors)
                rates = ", ".join(f"{images / seconds:.0f}" for images, seconds in epochs)
                per_sample = decodes.value / sum(images for images, _ in epochs)
                print(f"{source:<17} {workers:>7} {rates:>22} {per_sample:>19.2f}")
    finally:
        image_io.load_rgb = original


if __name__ == "__main__":
    main()
