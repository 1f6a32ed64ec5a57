"""``python -m evaluation`` and ``python -m evaluation.consensus`` refuse bad options (by their keys,
all at once), a checkpoint of other classes and an explainer layer the network does not have before
any data is generated or read (the entries' run() is called directly on stand-in checkpoints that
hold only hyper-parameters: nothing gets as far as their weights)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from datamodules import build_datamodule
from evaluation.__main__ import run as evaluate
from evaluation.consensus.__main__ import run as consensus
from evaluation.distributed import start_processes
from evaluation.explainers import ContrastiveExcitationBackprop, GradCAM, Gradient, check_explainer
from evaluation.metrics.registry import score_of
from evaluation.preflight import resolve_device
from gcmodels.networks import ExplainableNet, build_network
from gcmodels.options import ConfigError
from tests.conftest import TINY
from tests.test_config import compose_config

DATA = [item for item in TINY if item.startswith("data.")]


def data_overrides(tmp_path: Path) -> list[str]:
    return [f"data.data_dir={tmp_path / 'data'}", *DATA]


def class_names(tmp_path: Path) -> list[str]:
    cfg = compose_config("evaluate", "ckpt_path=x.ckpt", *data_overrides(tmp_path))
    return list(build_datamodule(dict(cfg.data)).class_names)


def stand_in(path: Path, names: list[str] | None, marker: float = 0.0, num_classes: int = 3) -> str:
    """A checkpoint file with a ResNet18's hyper-parameters and no weights of it."""
    hparams = {"model": {"name": "resnet18", "pooling": "avg", "pretrained": False, "output_stride": 32,
                         "init_from": None},
               "loss": {"name": "ce"}, "num_classes": num_classes, "multilabel": False, "layout_seed": 0,
               "class_names": names}
    torch.save({"hyper_parameters": hparams, "state_dict": {"net.marker": torch.tensor([marker])}}, path)
    return str(path)


def assert_no_data(tmp_path: Path) -> None:
    assert not (tmp_path / "data").exists(), "data was generated before the check"


def evaluation_config(tmp_path: Path, *overrides: str, names: list[str] | None = None):
    checkpoint = stand_in(tmp_path / "model.ckpt", class_names(tmp_path) if names is None else names)
    return compose_config("evaluate", f"ckpt_path={checkpoint}", *data_overrides(tmp_path), "device=cpu",
                          f"output_dir={tmp_path / 'out'}", *overrides)


def consensus_config(tmp_path: Path, *overrides: str):
    names = class_names(tmp_path)
    members = [stand_in(tmp_path / f"member{index}.ckpt", names, marker=index) for index in range(2)]
    return compose_config("consensus", f"ckpts=[{','.join(members)}]", *data_overrides(tmp_path), "device=cpu",
                          f"store_dir={tmp_path / 'store'}", f"output_dir={tmp_path / 'out'}", *overrides)


def refuses(error: ConfigError, key: str) -> bool:
    """Whether ``error`` refuses ``key`` (or an item of it: ``convergence.sizes.1``)."""
    return any(refused == key or refused.startswith(f"{key}.") for refused in error.keys)


# ------------------------------------------------------------------------------- python -m evaluation


@pytest.mark.parametrize("overrides, keys", [
    (["max_images=0"], ["max_images"]), (["max_images=-2"], ["max_images"]), (["max_images=abc"], ["max_images"]),
    (["max_images=true"], ["max_images"]), (["heatmap_images=-1"], ["heatmap_images"]),
    (["heatmap_images=abc"], ["heatmap_images"]), (["heatmap_composites=-1"], ["heatmap_composites"]),
    (["heatmap_composites=1.5"], ["heatmap_composites"]), (["seed=-1"], ["seed", "evaluation.seed"]),
    (["ckpt_path=[]"], ["ckpt_path"]),
    (["metrics=[acc,iou]"], ["metrics"]), (["metrics=[]"], ["metrics"]), (["metrics=pg"], ["metrics"]),
    (["explainer.name=nope"], ["explainer.name"]), (["+explainer.colour=red"], ["explainer.colour"]),
    (["evaluation.zero_maps=ones"], ["evaluation.zero_maps"]), (["data.image_size=abc"], ["data.image_size"]),
    (["+max_image=3"], ["max_image"]),
    # Every refused value at once.
    (["max_images=0", "heatmap_images=-1", "evaluation.tolerance=0"],
     ["evaluation.tolerance", "max_images", "heatmap_images"]),
])
def test_evaluation_options_are_checked_before_the_data(tmp_path, overrides, keys):
    # Before: max_images=0 reported acc 0 and NaN, heatmap_composites=-1 drew no composite, and the
    # rest failed after the data was prepared (heatmap_images=abc after a whole evaluation).
    with pytest.raises(ConfigError) as err:
        evaluate(evaluation_config(tmp_path, *overrides))
    assert sorted(err.value.keys) == sorted(keys)
    assert_no_data(tmp_path)


def test_one_checkpoint_or_several(tmp_path):
    """``ckpt_path`` is one path or a list of them; either way each is checked before the data."""
    names = class_names(tmp_path)
    paths = [stand_in(tmp_path / f"model{index}.ckpt", names if index else ["cat", "dog", "fish"])
             for index in range(2)]
    for value in (paths[0], f"[{paths[1]},{paths[0]}]"):
        with pytest.raises(ValueError, match=f"^checkpoint {re.escape(paths[0])} was trained on other classes"):
            evaluate(evaluation_config(tmp_path, f"ckpt_path={value}"))
    assert_no_data(tmp_path)


def test_evaluation_refuses_a_checkpoint_of_other_classes(tmp_path):
    # Before: a checkpoint of 3 other classes was scored on the 3 synthetic classes, exit 0.
    cfg = evaluation_config(tmp_path, names=["cat", "dog", "fish"])
    with pytest.raises(ValueError, match="was trained on other classes than data 'synthetic'"):
        evaluate(cfg)
    assert_no_data(tmp_path)


@pytest.mark.parametrize("overrides, error, message", [
    (["explainer.layer=layer4"], ValueError, "layer 'layer4' is not a submodule"),
    (["explainer.layer=head.1"], ValueError, "output [B, C, h, w]"),  # the flattened features
    (["explainer.layer=features.7.0.relu"], ValueError, "ran 2 time(s)"),  # a block's ReLU runs twice
    (["explainer=cmwp", "explainer.layer=features.7.0.conv1"], NotImplementedError, "c-MWP cannot stop at layer"),
])
def test_evaluation_refuses_an_explainer_layer_of_another_network(tmp_path, overrides, error, message):
    # Before: found only after the classification and FGSM passes of the first checkpoint.
    layer = overrides[-1].split("=")[1]
    with pytest.raises(error, match=rf"^explainer\.layer='{re.escape(layer)}': .*{re.escape(message)}"):
        evaluate(evaluation_config(tmp_path, *overrides))
    assert_no_data(tmp_path)


# ----------------------------------------------------------------------- python -m evaluation.consensus


@pytest.mark.parametrize("key, value", [
    ("subcommittees.size", "2"), ("subcommittees.size", "abc"), ("subcommittees.draws", "0"),
    ("convergence.trials", "0"), ("convergence.trials", "true"), ("convergence.sizes", "[2,abc]"),
    ("convergence.sizes", "[1,2]"), ("convergence.sizes", "[]"), ("convergence.sizes", "3"),
    ("picture_images", "0"), ("picture_images", "-1"), ("leave_one_out", "no"), ("convergence.enabled", "off"),
])
def test_consensus_options_are_checked_before_the_members(tmp_path, key, value):
    # Before: refused (without the full key) after every member had been explained, or, for
    # picture_images, a crash after the csv, json and md were written.
    with pytest.raises(ConfigError) as err:
        consensus(consensus_config(tmp_path, f"{key}={value}"))
    assert refuses(err.value, key), err.value.keys
    assert_no_data(tmp_path)


@pytest.mark.parametrize("overrides, key", [
    (["subcommittees.size=3"], "subcommittees.size"), (["convergence.sizes=[2,3]"], "convergence.sizes"),
])
def test_consensus_checks_the_sizes_against_the_committee(tmp_path, overrides, key):
    # A rule across the options and the committee (2 distinct members here).
    with pytest.raises(ConfigError) as err:
        consensus(consensus_config(tmp_path, *overrides))
    assert err.value.keys == [key]
    assert_no_data(tmp_path)


def test_consensus_checks_the_explainer_layer_on_every_member(tmp_path):
    with pytest.raises(ValueError, match=r"^explainer\.layer='layer4': .*not a submodule"):
        consensus(consensus_config(tmp_path, "explainer=gradcam", "explainer.layer=layer4"))
    assert_no_data(tmp_path)


# --------------------------------------------------------------------------------- check_explainer


def test_check_explainer_leaves_a_training_network_as_it_was():
    """The dry run that finds a layer's output shape runs on the meta device: the batch-norm
    statistics of a network in training mode (as the training callbacks have it) do not move."""
    net = build_network("resnet18", 3).train()
    before = {name: value.clone() for name, value in net.state_dict().items()}
    for explainer in (GradCAM(layer="features.6"), ContrastiveExcitationBackprop("features.6"), GradCAM(),
                      Gradient()):
        check_explainer(explainer, net)
    assert net.training and all(torch.equal(value, before[name]) for name, value in net.state_dict().items())


def test_check_explainer_names_the_callers_key():
    net = ExplainableNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 3)))
    with pytest.raises(ValueError, match=re.escape("callbacks.explanation_metrics.explainer.layer='layer4': ")):
        check_explainer(GradCAM(layer="layer4"), net, key="callbacks.explanation_metrics.explainer")
    with pytest.raises(ValueError, match=re.escape("explainer.layer='head.1': c-MWP maps need a layer with output")):
        check_explainer(ContrastiveExcitationBackprop("head.1"), net)
    check_explainer(GradCAM(layer="features.0"), net)


@pytest.mark.parametrize("name", ["gpu", f"cuda:{torch.cuda.device_count()}"])
def test_a_device_this_machine_lacks_is_named_by_every_script(name):
    """The evaluation, consensus and reproduce scripts resolve ``device`` through one function:
    not a device, or one past the last CUDA device of this machine (cuda:0 without one)."""
    with pytest.raises(ConfigError) as err:
        resolve_device(name)
    assert err.value.keys == ["device"]


def test_monitors_on_fgsm_scores_take_their_own_direction():
    """Top-1 under attack is better higher, the attack's success rate lower; the counts of all-zero
    maps scored as uniform rank no model."""
    assert score_of("fgsm/eps=8").higher_is_better and score_of("fgsm_clean").higher_is_better
    assert not score_of("fgsm_success/eps=8").higher_is_better
    assert score_of("zero_maps_uniform/pg") is None and score_of("pg_center") is None


def test_the_process_options_name_their_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError) as error:
        start_processes("cuda:0", 2, 1)
    assert error.value.keys == ["device"] and "names one GPU, and devices=2" in str(error.value)
    with pytest.raises(ConfigError) as error:
        start_processes("cuda", 2, 1)
    assert error.value.keys == ["devices"] and "this machine has 1 GPU(s)" in str(error.value)
