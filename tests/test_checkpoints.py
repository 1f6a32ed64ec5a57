"""Checkpoints: a module rebuilds itself from its own file, files written before the loss options
became one config dict still load, with the same weights and options, and a file that carries code
is refused everywhere without running it."""
import pathlib
import re

import pytest
import torch

from gcmodels.checkpoints import read_hparams
from gcmodels.module import GCClassifier
from tests.conftest import run_module, train

MODEL = {"name": "resnet18", "pooling": "max", "pretrained": False, "output_stride": 32}
OPTIM = {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "scheduler": {"name": "none"}}


def module(loss: dict) -> GCClassifier:
    torch.manual_seed(0)
    return GCClassifier(model=MODEL, loss=loss, **OPTIM, num_classes=3, multilabel=False, layout_seed=4)


def save(path, hparams: dict, state_dict: dict) -> None:
    torch.save({"hyper_parameters": hparams, "state_dict": state_dict}, path)


def assert_same_weights(one: GCClassifier, other: GCClassifier) -> None:
    assert one.state_dict().keys() == other.state_dict().keys()
    assert all(torch.equal(value, other.state_dict()[key]) for key, value in one.state_dict().items())


def test_a_checkpoint_rebuilds_its_network_and_options(tmp_path):
    loss = {"name": "gc", "lambda": 25.0, "cam_mode": "standard", "detach_target": True}
    original = module(loss)
    save(tmp_path / "new.ckpt", dict(original.hparams), original.state_dict())
    loaded = GCClassifier.from_checkpoint(tmp_path / "new.ckpt")
    assert loaded.hparams.loss == loss and loaded.hparams.model == MODEL and loaded.hparams.layout_seed == 4
    assert_same_weights(loaded, original)


@pytest.mark.parametrize("flat, expected", [
    ({"loss": "gc", "lam": 25.0, "cam_mode": "standard", "detach_target": True},
     {"name": "gc", "lambda": 25.0, "cam_mode": "standard", "detach_target": True}),
    # The old ce checkpoints carried GC options they never used: they are dropped.
    ({"loss": "ce", "lam": 1.0, "cam_mode": "elementwise", "detach_target": False}, {"name": "ce"}),
])
def test_checkpoints_with_the_old_flat_loss_options_still_load(tmp_path, flat, expected):
    original = module(expected)
    # Older still: no model.output_stride either (the architecture's own, 32 for ResNet, was used).
    old_model = {key: value for key, value in MODEL.items() if key != "output_stride"}
    old_hparams = {"model": old_model, "num_classes": 3, "multilabel": False, **OPTIM, "layout_seed": 4, **flat}
    save(tmp_path / "old.ckpt", old_hparams, original.state_dict())
    hparams = read_hparams(tmp_path / "old.ckpt")
    assert hparams["loss"] == expected and not {"lam", "cam_mode", "detach_target"} & set(hparams)
    assert hparams["model"] == {**old_model, "output_stride": 32}
    loaded = GCClassifier.from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.hparams.loss == expected
    assert_same_weights(loaded, original)


def test_a_state_dict_of_another_network_is_refused(tmp_path):
    other = GCClassifier(model={**MODEL, "name": "alexnet", "pooling": "avg", "output_stride": 16}, loss={"name": "ce"}, **OPTIM,
                         num_classes=3, multilabel=False, layout_seed=0)
    save(tmp_path / "mixed.ckpt", {**dict(module({"name": "ce"}).hparams)}, other.state_dict())
    with pytest.raises(RuntimeError, match="state_dict"):
        GCClassifier.from_checkpoint(tmp_path / "mixed.ckpt")


class Payload:
    """Unpickling this creates ``marker``: a stand-in for code a shared checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def payload_checkpoint(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    original = module({"name": "ce"})
    marker = tmp_path / "payload_ran"
    path = tmp_path / "payload.ckpt"
    torch.save({"hyper_parameters": {**dict(original.hparams), "note": Payload(marker)},
                "state_dict": original.state_dict()}, path)
    return path, marker


def test_a_checkpoint_carrying_code_is_refused_and_nothing_runs(tmp_path):
    path, marker = payload_checkpoint(tmp_path)
    for load in (read_hparams, GCClassifier.from_checkpoint):
        with pytest.raises(ValueError, match=rf"refusing to load {re.escape(str(path))}.*type getattr"):
            load(path)
    assert not marker.exists()
    # The same content without the payload loads: the refusal is about the payload only.
    original = module({"name": "ce"})
    save(tmp_path / "plain.ckpt", dict(original.hparams), original.state_dict())
    assert_same_weights(GCClassifier.from_checkpoint(tmp_path / "plain.ckpt"), original)


@pytest.mark.slow
def test_evaluation_and_resume_refuse_a_checkpoint_carrying_code(tmp_path, data_dir):
    path, marker = payload_checkpoint(tmp_path)
    evaluated = run_module("evaluation", tmp_path / "eval", data_dir, f"ckpt_path={path}", "metrics=[acc]")
    resumed = train(tmp_path / "resume", data_dir, f"ckpt_path={path}", "model.output_stride=32", "data.num_classes=3")
    for run in (evaluated, resumed):
        assert run.returncode != 0 and "refusing to load" in run.stderr and "type getattr" in run.stderr
    assert not marker.exists()
