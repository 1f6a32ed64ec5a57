"""Images/s of the training data loader on the synthetic data.

    python benchmarks/loader_speed.py [--size 80] [--batch 32] [--workers 0 2] [--epochs 2]

Times the synthetic training loader of ``python train.py`` (PNG decode, flip, to tensor, collate)
for each ``--workers`` value over whole epochs (the first epoch of a loader with workers includes
starting them; ``persistent_workers`` keeps them for the next). Set it beside what a training step
consumes (``python benchmarks/gc_step_speed.py --sizes 80 --batch 32 --output-stride 16``): when
the loader delivers several times that, loading does not hold training back. The data set is
generated into ``data/`` like ``python train.py`` does.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules import build_datamodule  # noqa: E402
from datamodules.synthetic import default_config  # noqa: E402


def loader_epochs(size: int, batch: int, workers: int, epochs: int,
                  distractors: str | None = None) -> list[tuple[int, float]]:
    """Samples delivered and seconds of each epoch of the training loader; ``distractors``: the
    ``loss.positive`` of ``loss.composite_source=dataset`` (samples bring 3 distractors each)."""
    config = default_config()  # the quick start's data set
    config.update(data_dir=ROOT / "data", image_size=size, batch_size=batch, num_workers=workers)
    datamodule = build_datamodule(config)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.set_train_distractors(distractors)
    loader = datamodule.train_dataloader()
    timed = []
    for _ in range(epochs):
        start, images = time.perf_counter(), 0
        for batch_data in loader:
            images += batch_data["image"].shape[0]
        timed.append((images, time.perf_counter() - start))
    return timed


def loader_arguments(description: str) -> argparse.Namespace:
    """The command line of the loader benchmarks: ``--size``, ``--batch``, ``--workers``, ``--epochs``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = loader_arguments(__doc__)
    print(f"synthetic training set of conf/data/synthetic.yaml at {args.size} px, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'what':<22} {'img/s per epoch':>30}")
    for workers in args.workers:
        rates = [images / seconds for images, seconds in loader_epochs(args.size, args.batch, workers, args.epochs)]
        print(f"{f'loader, {workers} workers':<22} {', '.join(f'{rate:.0f}' for rate in rates):>30}")


if __name__ == "__main__":
    main()
