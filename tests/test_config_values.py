"""Every numeric config value, set out of range (a string, a negative number, zero where it must be
positive), is an error naming its key, raised while the run is built (train.build_run) or the
explainer is (as ``python -m evaluation`` does), before any data is generated or read."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

import train
from datamodules.base import is_number
from evaluation.explainers import build_explainer
from tests.conftest import ROOT
from tests.test_config import compose_config

CONF = ROOT / "conf"

# Keys where a negative value means something: -1 = unlimited epochs, every validation batch in
# the sanity check, every device, every checkpoint kept; LIME hashes any signed 64-bit seed.
NEGATIVE_ALLOWED = {
    "trainer.max_epochs", "trainer.num_sanity_val_steps", "trainer.devices",
    "callbacks.model_checkpoint.save_top_k", "explainer[lime].seed",
}
# Keys where zero is a legal setting (no workers, no decay, no cue, no overlays, unperturbed
# gradients, eps 0 = clean accuracy, seed 0, ...).
ZERO_ALLOWED = {
    "seed", "heatmap_images", "data.num_workers", "data.context_bias", "data.seed", "data.decoys",
    "loss.lambda", "optimizer.momentum", "optimizer.weight_decay", "scheduler.eta_min",
    "trainer.max_epochs", "trainer.num_sanity_val_steps", "evaluation.seed", "evaluation.fgsm_eps",
    "callbacks.model_checkpoint.save_top_k", "callbacks.explanation_metrics.overlay_images",
    "explainer[smoothgrad].stdev", "explainer[smoothgrad].seed", "explainer[lime].ridge", "explainer[lime].seed",
}
# Numeric options whose default is null, so the walk over the config cannot find them; with a
# valid value to vary.
NULL_DEFAULTS = {"callbacks.model_checkpoint.every_n_train_steps": 5}
# Top-level tables that only feed other keys by interpolation (optimizer.lr, model.output_stride),
# whose own checks are tested through those keys.
FEEDERS = {"paper_lr", "resnet_output_stride"}
# Required values (???) an option leaves to the user, given so that the option builds.
REQUIRED = {"scheduler=multistep": ["scheduler.milestones=[2,4]"]}
# Train config groups walked, with the options tried; ImageNet and COCO stop at their datamodule's
# constructor, which checks its values before it reads anything.
GROUPS = ["model", "data", "loss", "optimizer", "scheduler", "trainer"]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def numeric_leaves(node: DictConfig, prefix: str) -> dict[str, object]:
    """``{full key: value}`` of every number and list of numbers under ``node``; interpolations of
    whole groups (a callback's ``settings: ${evaluation}``) and required values are left out."""
    leaves = {}
    for key in node:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        if isinstance(value, DictConfig) and OmegaConf.is_interpolation(node, key):
            continue
        if isinstance(value, DictConfig):
            leaves.update(numeric_leaves(value, f"{full}."))
        elif isinstance(value, ListConfig):
            if len(value) and all(is_number(item) for item in value):
                leaves[full] = list(value)
        elif is_number(value):
            leaves[full] = value
    return leaves


def bad_values(value: object, rule_key: str) -> list[object]:
    """A string, then a negative value and zero unless ``rule_key`` allows them."""
    bad: list[object] = ["abc"]
    if isinstance(value, list):
        if rule_key not in NEGATIVE_ALLOWED:
            bad.append([-abs(item) - 1 for item in value])
        if rule_key not in ZERO_ALLOWED:
            bad.append([0] * len(value))
        return bad
    if rule_key not in NEGATIVE_ALLOWED:
        bad.append(-abs(value) - 1)
    if rule_key not in ZERO_ALLOWED:
        bad.append(0)
    return bad


def names_key(message: str, key: str) -> bool:
    """The full key, or its leaf and the path above it (Hydra's ``full_key: callbacks.<name>``)."""
    parent, _, leaf = key.rpartition(".")
    return key in message or (leaf in message and parent in message)


def override(key: str, value: object) -> str:
    return f"{key}={value}" if not isinstance(value, list) else f"{key}=[{','.join(map(str, value))}]"


def failures(config: str, base: list[str], keys: dict[str, object], rule_keys: dict[str, str], check,
             data_dir: Path) -> list[str]:
    """Each bad value of each key: what went wrong where the check did not name the key."""
    problems = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for key, value in keys.items():
            for bad in bad_values(value, rule_keys[key]):
                cfg = compose(config_name=config, overrides=[*base, override(key, bad)])
                try:
                    check(cfg)
                except Exception as err:  # noqa: BLE001 - any error type, as long as it names the key
                    if not names_key(str(err), key):
                        problems.append(f"{key}={bad!r}: {type(err).__name__}: {err}")
                else:
                    problems.append(f"{key}={bad!r}: accepted")
    assert not (data_dir.exists() and any(data_dir.iterdir())), "data was generated or read"
    return problems


def train_base(tmp_path: Path, *choices: str) -> list[str]:
    # No GPU is needed to check a GPU config: the device itself is Lightning's to find.
    return [*choices, f"output_dir={tmp_path / 'out'}", f"data.data_dir={tmp_path / 'data'}", "trainer.accelerator=cpu"]


def test_the_default_run_builds_without_reading_data(tmp_path):
    datamodule, module, trainer = train.build_run(compose_config("train", *train_base(tmp_path)))
    assert module.hparams.num_classes == datamodule.num_classes and trainer.callbacks
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("group, option", [(group, option) for group in GROUPS for option in options(group)])
def test_every_numeric_option_of_a_group_is_checked(group, option, tmp_path):
    base = train_base(tmp_path, f"{group}={option}", *REQUIRED.get(f"{group}={option}", []))
    keys = numeric_leaves(compose_config("train", *base)[group], f"{group}.")
    # ce and scheduler=none have no numeric option; every other option has some.
    assert keys or f"{group}={option}" in {"loss=ce", "scheduler=none"}
    assert not failures("train", base, keys, {key: key for key in keys}, train.build_run, tmp_path / "data")


@pytest.mark.parametrize("epochs", [-1, 0])
def test_a_cosine_schedule_needs_a_number_of_epochs(tmp_path, epochs):
    """-1 (unlimited) and 0 are legal epochs, but a cosine schedule over them would be 1 epoch long."""
    with pytest.raises(ValueError, match=rf"scheduler=cosine decays over trainer\.max_epochs, which is {epochs}"):
        train.build_run(compose_config("train", *train_base(tmp_path, f"trainer.max_epochs={epochs}")))
    train.build_run(compose_config("train", *train_base(tmp_path, f"trainer.max_epochs={epochs}",
                                                        "scheduler=none")))
    assert not (tmp_path / "data").exists()


def test_top_level_callback_and_evaluation_values_are_checked(tmp_path):
    base = train_base(tmp_path)
    cfg = compose_config("train", *base)
    keys = {key: value for key, value in numeric_leaves(cfg, "").items()
            if key.split(".")[0] not in {*GROUPS, *FEEDERS}}
    keys.update(NULL_DEFAULTS)
    assert {"seed", "heatmap_images", "evaluation.spg_runs", "callbacks.explanation_metrics.max_images"} <= set(keys)
    assert not failures("train", base, keys, {key: key for key in keys}, train.build_run, tmp_path / "data")


@pytest.mark.parametrize("name", options("explainer"))
def test_every_numeric_explainer_option_is_checked(name, tmp_path):
    base = [f"explainer={name}", "ckpt_path=x.ckpt", f"data.data_dir={tmp_path / 'data'}"]
    keys = numeric_leaves(compose_config("evaluate", *base).explainer, "explainer.")
    rule_keys = {key: key.replace("explainer.", f"explainer[{name}].") for key in keys}
    assert not failures("evaluate", base, keys, rule_keys,
                        lambda cfg: build_explainer(**OmegaConf.to_container(cfg.explainer, resolve=True)),
                        tmp_path / "data")


def test_consensus_callback_values_are_checked(tmp_path):
    """callbacks=with_consensus scores the model only at the end of training: its options are
    checked when the run is built, so a typo does not cost the run."""
    committee = [tmp_path / f"member{index}.ckpt" for index in range(2)]
    for path in committee:
        path.touch()
    base = train_base(tmp_path, "callbacks=with_consensus", f"callbacks.consensus.committee=[{committee[0]},{committee[1]}]",
                      f"callbacks.consensus.store_dir={tmp_path / 'store'}")
    keys = numeric_leaves(compose_config("train", *base).callbacks.consensus, "callbacks.consensus.")
    assert set(keys) == {"callbacks.consensus.num_images", "callbacks.consensus.sigma"}
    keys["callbacks.consensus.resolution"] = 16  # null by default: the image size
    assert not failures("train", base, keys, {key: key for key in keys}, train.build_run, tmp_path / "data")
