"""DDP correctness of the double backward: one GC step on 2 CPU processes (gloo) equals one step
of a single process on the combined batch (pytorch/pytorch#47562, #63812, #63929), and one CGC
step equals one process that takes each rank's batch as its negatives."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcmodels.objectives import cgc_objective, gc_objective
from losses import CompositeLayout
from tests.ddp_one_step import CGC_LOSS, LAMBDA, OPTIMIZER, build_module

pytestmark = pytest.mark.slow  # subprocesses: python train.py, DDP

ROOT = Path(__file__).resolve().parents[1]


def one_ddp_step(out: Path, mode: str) -> list[dict]:
    """What each of the two ranks of ``tests.ddp_one_step`` saved."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "tests.ddp_one_step", str(out), mode], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # DDP broadcast rank 0's initial weights; each rank saw a different half of the data.
    assert not torch.equal(ranks[0]["batch"]["image"], ranks[1]["batch"]["image"])
    assert all(torch.allclose(ranks[0]["after"][k], ranks[1]["after"][k]) for k in ranks[0]["after"])
    return ranks


def assert_same_step(ranks: list[dict], module, loss: torch.Tensor) -> None:
    """One SGD step of ``module`` (started from the ranks' initial weights) on ``loss`` gives the
    weights the ranks ended with, and moves every one of them."""
    options = {k: v for k, v in OPTIMIZER.items() if k != "name"}
    optimizer = torch.optim.SGD(module.net.parameters(), **options)
    loss.backward()
    optimizer.step()
    expected = module.net.state_dict()
    moved = 0
    for name, value in ranks[0]["after"].items():
        assert torch.allclose(value, expected[name], rtol=1e-9, atol=1e-12), name
        moved += int(not torch.allclose(value, ranks[0]["initial"][name]))
    assert moved == len(expected)  # every parameter took a step


@pytest.mark.parametrize("composites", ["per_sample", "shared"])
def test_ddp_gc_step_equals_single_process_on_combined_batch(tmp_path, composites):
    ranks = one_ddp_step(tmp_path, composites)

    # Reference: one process, the combined batch, the layouts the ranks drew (indices shifted).
    size = ranks[0]["batch"]["image"].shape[0]
    images = torch.cat([r["batch"]["image"] for r in ranks])
    targets = torch.cat([r["batch"]["target"] for r in ranks])
    fields = {name: torch.cat([r["layout"][name] for r in ranks]) for name in ("classes", "cells", "valid")}
    shifted = {name: torch.cat([r["layout"][name] + i * size for i, r in enumerate(ranks)])
               for name in ("samples", "distractors")}
    # Shared composites: group ids apart per rank (each is below twice the rank's batch).
    groups = None if composites == "per_sample" else torch.cat(
        [r["layout"]["groups"] + i * 2 * size for i, r in enumerate(ranks)])
    layout = CompositeLayout(**shifted, **fields, groups=groups)
    assert layout.valid.all()  # so the per-rank GC means average to the combined mean
    if composites == "shared":
        assert (torch.cat([r["layout"]["groups"] for r in ranks]) < size).all()  # one composite per rank

    module = build_module(composites)
    module.net.load_state_dict(ranks[0]["initial"])
    out = gc_objective(module.net, images, targets, layout, LAMBDA)
    assert out.consistency_loss > 0
    assert_same_step(ranks, module, out.loss)


def test_ddp_cgc_step_equals_one_process_with_each_ranks_negatives(tmp_path):
    ranks = one_ddp_step(tmp_path, "cgc")
    # Reference: one process, each rank's batch its own InfoNCE (its own negatives), the mean of
    # the two losses, as DDP averages the ranks' gradients.
    module = build_module("cgc")
    module.net.load_state_dict(ranks[0]["initial"])
    options = {key: value for key, value in CGC_LOSS.items() if key not in ("name", "lambda")}
    outs = [cgc_objective(module.net, rank["batch"], CGC_LOSS["lambda"], **options) for rank in ranks]
    assert all(out.consistency_loss > 0 for out in outs)
    assert_same_step(ranks, module, (outs[0].loss + outs[1].loss) / 2)
