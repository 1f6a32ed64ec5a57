"""Checkpoints: a module rebuilds itself from its own file, files written before the loss options
became one config dict still load, with the same weights and options, a file that carries code
is refused everywhere without running it, and a run starts from another run's weights
(``model.init_from``) only where they fit."""
import pathlib
import re

import pytest
import torch

from gcmodels.checkpoints import check_resume_compatible, init_from_checkpoint, read_hparams
from gcmodels.module import GCClassifier
from tests.conftest import run_module, train

MODEL = {"name": "resnet18", "pooling": "max", "pretrained": False, "output_stride": 32, "init_from": None}
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
    loss = {"name": "gc", "lambda": 25.0, "cam_mode": "standard", "detach_target": True, "positive": "instances",
            "composite_source": "dataset", "composites": "per_sample"}
    original = module(loss)
    save(tmp_path / "new.ckpt", dict(original.hparams), original.state_dict())
    loaded = GCClassifier.from_checkpoint(tmp_path / "new.ckpt")
    assert loaded.hparams.loss == loss and loaded.hparams.model == MODEL and loaded.hparams.layout_seed == 4
    assert_same_weights(loaded, original)


@pytest.mark.parametrize("flat, expected", [
    ({"loss": "gc", "lam": 25.0, "cam_mode": "standard", "detach_target": True},
     # Before loss.positive, the explained class was drawn uniformly over an image's labels; before
     # loss.composite_source, distractors came from the batch.
     {"name": "gc", "lambda": 25.0, "cam_mode": "standard", "detach_target": True, "positive": "labels",
      "composite_source": "batch", "composites": "per_sample"}),
    # The old ce checkpoints carried GC options they never used: they are dropped.
    ({"loss": "ce", "lam": 1.0, "cam_mode": "elementwise", "detach_target": False}, {"name": "ce"}),
])
def test_checkpoints_with_the_old_flat_loss_options_still_load(tmp_path, flat, expected):
    original = module(expected)
    # Older still: no model.output_stride either (the architecture's own, 32 for ResNet, was used),
    # and no model.init_from (none was used).
    old_model = {key: value for key, value in MODEL.items() if key not in ("output_stride", "init_from")}
    old_hparams = {"model": old_model, "num_classes": 3, "multilabel": False, **OPTIM, "layout_seed": 4, **flat}
    save(tmp_path / "old.ckpt", old_hparams, original.state_dict())
    hparams = read_hparams(tmp_path / "old.ckpt")
    assert hparams["loss"] == expected and not {"lam", "cam_mode", "detach_target"} & set(hparams)
    assert hparams["model"] == {**old_model, "output_stride": 32, "init_from": None}
    loaded = GCClassifier.from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.hparams.loss == expected
    assert_same_weights(loaded, original)


def test_a_state_dict_of_another_network_is_refused(tmp_path):
    other = GCClassifier(model={**MODEL, "name": "alexnet", "pooling": "avg", "output_stride": 16}, loss={"name": "ce"},
                         **OPTIM, num_classes=3, multilabel=False, layout_seed=0)
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


def saved_module(tmp_path, name="source.ckpt", **changes) -> tuple[pathlib.Path, GCClassifier]:
    source = module({"name": "ce"})
    path = tmp_path / name
    save(path, {**dict(source.hparams), **changes}, source.state_dict())
    return path, source


def fresh_module(num_classes: int, model: dict = MODEL, class_names=None) -> GCClassifier:
    torch.manual_seed(1)
    return GCClassifier(model={**model, "init_from": "source.ckpt"}, loss={"name": "ce"}, **OPTIM,
                        num_classes=num_classes, multilabel=False, layout_seed=0, class_names=class_names)


def test_init_from_loads_every_tensor_of_the_same_network(tmp_path):
    path, source = saved_module(tmp_path)
    target = fresh_module(3, {**MODEL, "pooling": "avg"})
    notes = init_from_checkpoint(path, target.net, target.hparams.model, 3)
    assert_same_weights(target, source)
    # Pooling holds no tensor: allowed, and said.
    assert notes == ["model.pooling: the checkpoint's network used 'max', this run 'avg' (the same tensors; what they "
                     "compute changes)"]


@pytest.mark.parametrize("num_classes, class_names, reason", [
    (5, None, "the checkpoint has 3 classes, this run 5"),
    (3, ["x", "y", "z"], "the checkpoint's 3 classes are not this run's"),
])
def test_init_from_other_classes_keeps_a_fresh_final_layer(tmp_path, num_classes, class_names, reason):
    path, source = saved_module(tmp_path, class_names=["a", "b", "c"])
    target = fresh_module(num_classes, class_names=class_names)
    fresh = {key: value.clone() for key, value in target.state_dict().items()}
    notes = init_from_checkpoint(path, target.net, target.hparams.model, num_classes, class_names)
    final = {"net.head.2.weight", "net.head.2.bias"}  # ResNet's fc
    for key, value in target.state_dict().items():
        assert torch.equal(value, fresh[key] if key in final else source.state_dict()[key]), key
    assert notes == [f"not loaded: head.2.bias, head.2.weight "
                     f"(the final layer keeps its fresh initialisation: {reason})"]


def test_init_from_refuses_another_network(tmp_path):
    path, _ = saved_module(tmp_path)
    alexnet = fresh_module(3, {**MODEL, "name": "alexnet", "pooling": "avg", "output_stride": 16})
    with pytest.raises(ValueError, match=rf"model.init_from={re.escape(str(path))} holds a 'resnet18' network, but "
                                         r"this run builds model.name='alexnet'"):
        init_from_checkpoint(path, alexnet.net, alexnet.hparams.model, 3)
    source = module({"name": "ce"})
    state = source.state_dict()
    state["net.features.0.weight"] = torch.zeros(8, 3, 7, 7)
    save(tmp_path / "wide.ckpt", dict(source.hparams), state)
    target = fresh_module(5)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"tensor features.0.weight has shape \(8, 3, 7, 7\) in the checkpoint and "
                                         r"\(64, 3, 7, 7\) in this resnet18 network"):
        init_from_checkpoint(tmp_path / "wide.ckpt", target.net, target.hparams.model, 5)
    assert_same_weights(target, fresh_module(5))  # nothing was loaded
    assert all(torch.equal(value, before[key]) for key, value in target.state_dict().items())


def test_init_from_refuses_a_checkpoint_carrying_code_and_a_missing_file(tmp_path):
    path, marker = payload_checkpoint(tmp_path)
    target = fresh_module(3)
    with pytest.raises(ValueError, match=rf"refusing to load {re.escape(str(path))}.*type getattr"):
        init_from_checkpoint(path, target.net, target.hparams.model, 3)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="model.init_from: checkpoint not found: .*nope.ckpt"):
        init_from_checkpoint(tmp_path / "nope.ckpt", target.net, target.hparams.model, 3)


def test_a_checkpoint_started_from_other_weights_rebuilds_from_its_own(tmp_path):
    # Its init_from file is gone: rebuilding must not read it.
    path, source = saved_module(tmp_path, model={**MODEL, "init_from": str(tmp_path / "gone.ckpt")})
    assert_same_weights(GCClassifier.from_checkpoint(path), source)


def test_resume_names_the_runs_own_init_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = {**MODEL, "init_from": str(tmp_path / "imagenet.ckpt")}
    path, _ = saved_module(tmp_path, model=started)
    check_resume_compatible(path, {**MODEL, "init_from": "imagenet.ckpt"}, 3, False)  # the same file, relative
    for other in (None, "other.ckpt"):
        with pytest.raises(ValueError, match=rf"cannot resume from .*model.init_from: the checkpoint's run started "
                                             rf"from '{re.escape(started['init_from'])}', config has {other!r}"):
            check_resume_compatible(path, {**MODEL, "init_from": other}, 3, False)


@pytest.mark.parametrize("kept", [0.0, 0.001, 0.5, 0.999])
def test_a_truncated_checkpoint_is_refused_naming_it(tmp_path, kept):
    original = module({"name": "ce"})
    whole = tmp_path / "whole.ckpt"
    save(whole, dict(original.hparams), original.state_dict())
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:int(whole.stat().st_size * kept)])
    for load in (read_hparams, GCClassifier.from_checkpoint,
                 lambda path: check_resume_compatible(path, MODEL, 3, False)):
        with pytest.raises(ValueError, match=rf"not a readable PyTorch checkpoint: {re.escape(str(cut))} "):
            load(cut)
