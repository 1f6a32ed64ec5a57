"""DDP correctness of the double backward: one GC step on 2 CPU processes (gloo) equals one step
of a single process on the combined batch (pytorch/pytorch#47562, #63812, #63929)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcmodels.objectives import gc_objective
from losses import CompositeLayout
from tests.ddp_one_step import LAMBDA, OPTIMIZER, build_module

pytestmark = pytest.mark.slow  # subprocesses: python train.py, DDP

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("composites", ["per_sample", "shared"])
def test_ddp_gc_step_equals_single_process_on_combined_batch(tmp_path, composites):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "tests.ddp_one_step", str(tmp_path), composites], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # DDP broadcast rank 0's initial weights; each rank saw a different half of the data.
    assert not torch.equal(ranks[0]["batch"]["image"], ranks[1]["batch"]["image"])
    assert all(torch.allclose(ranks[0]["after"][k], ranks[1]["after"][k]) for k in ranks[0]["after"])

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
    options = {k: v for k, v in OPTIMIZER.items() if k != "name"}
    optimizer = torch.optim.SGD(module.net.parameters(), **options)
    out = gc_objective(module.net, images, targets, layout, LAMBDA)
    assert out.consistency_loss > 0
    out.loss.backward()
    optimizer.step()
    expected = module.net.state_dict()
    moved = 0
    for name, value in ranks[0]["after"].items():
        assert torch.allclose(value, expected[name], rtol=1e-9, atol=1e-12), name
        moved += int(not torch.allclose(value, ranks[0]["initial"][name]))
    assert moved == len(expected)  # every parameter took a step
