"""Options that used to pass the build and do harm later: boolean flags given as strings or numbers,
optimizer and scheduler keys their torch class does not take, COCO validated on its training split,
and a mistyped ImageNet box_dir. Each is refused naming its key, before any data is generated or
listed."""
from __future__ import annotations

import pytest
import torch
from omegaconf import DictConfig
from torchvision.models._api import WeightsEnum

import train
from datamodules.imagenet import ImageNetDataModule
from tests.test_config import compose_config
from tests.test_config_values import REQUIRED, options, train_base
from tests.test_datamodules import imagenet_module, imagenet_tree

# Config groups that hold boolean options, each walked with all its options.
BOOLEAN_GROUPS = ["model", "data", "loss"]
# What Hydra makes of `key=no`, `key='false'`, `key=0`, `key=1`: a string or an int, which
# bool() reads as true except for 0.
NOT_BOOLEANS = ["no", "'false'", "0", "1"]


def boolean_leaves(node: DictConfig, prefix: str) -> list[str]:
    return [f"{prefix}{key}" for key in node if isinstance(node[key], bool)]


def test_every_boolean_option_must_be_true_or_false(tmp_path, monkeypatch):
    def download(*args, **kwargs):
        raise AssertionError("model.pretrained was taken for true: the weights were fetched")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", download)
    walked = set()
    for group in BOOLEAN_GROUPS:
        for option in options(group):
            base = train_base(tmp_path, f"{group}={option}")
            for key in boolean_leaves(compose_config("train", *base)[group], f"{group}."):
                walked.add(key)
                for value in NOT_BOOLEANS:
                    with pytest.raises(ValueError, match=rf"{key} must be true or false, got"):
                        train.build_run(compose_config("train", *base, f"{key}={value}"))
    assert walked == {"model.pretrained", "data.skip_corrupt", "loss.detach_target"}
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("overrides, message", [
    # AdamW has no momentum: this failed in configure_optimizers, after the data was set up.
    (["optimizer=sgd", "optimizer.name=adamw"], r"optimizer\.momentum is not an option of optimizer\.name=adamw"),
    (["optimizer=adamw", "+optimizer.nesterov=true"], r"optimizer\.nesterov is not an option of optimizer\.name=adamw"),
    (["optimizer=sgd", "+optimizer.nesterov=no"], r"optimizer\.nesterov must be true or false, got 'no'"),
    (["optimizer=sgd", "+optimizer.params=[]"], r"optimizer\.params cannot be set"),
    (["scheduler=cosine", "+scheduler.T_max=3"], r"scheduler\.T_max cannot be set: .*trainer\.max_epochs"),
    (["scheduler=step", "+scheduler.T_max=3"], r"scheduler\.T_max is not an option of scheduler\.name=step"),
    (["scheduler=step", "+scheduler.last_epoch=2"], r"scheduler\.last_epoch cannot be set"),
    # scheduler=none used to ignore every key given to it.
    (["scheduler=none", "+scheduler.gamma=0.5"],
     r"scheduler\.gamma is not an option of scheduler\.name=none: it takes no options"),
])
def test_optimizer_and_scheduler_keys_their_class_does_not_take_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.build_run(compose_config("train", *train_base(tmp_path, *overrides)))
    assert not (tmp_path / "data").exists()


CLASSES = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "step": torch.optim.lr_scheduler.StepLR,
           "multistep": torch.optim.lr_scheduler.MultiStepLR, "cosine": torch.optim.lr_scheduler.CosineAnnealingLR}


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_every_optimizer_and_scheduler_option_builds_its_class_with_its_keys(tmp_path, optimizer, scheduler):
    choices = [f"optimizer={optimizer}", f"scheduler={scheduler}", *REQUIRED.get(f"scheduler={scheduler}", []),
               "trainer.max_epochs=7"]
    cfg = compose_config("train", *train_base(tmp_path, *choices))
    _, module, trainer = train.build_run(cfg)
    module.trainer = trainer
    schedule = module.configure_optimizers()
    opt = schedule["optimizer"] if isinstance(schedule, dict) else schedule
    assert type(opt) is CLASSES[cfg.optimizer.name]
    assert all(opt.defaults[key] == value for key, value in cfg.optimizer.items() if key != "name")
    if cfg.scheduler.name == "none":
        assert not isinstance(schedule, dict)
        return
    sched = schedule["lr_scheduler"]["scheduler"]
    assert type(sched) is CLASSES[cfg.scheduler.name]
    state = sched.state_dict()
    for key, value in cfg.scheduler.items():
        if key != "name":
            # MultiStepLR keeps its milestones as a Counter of epochs.
            assert (sorted(state[key]) if key == "milestones" else state[key]) == value
    if cfg.scheduler.name == "cosine":
        assert state["T_max"] == 7


def test_optimizer_flags_the_config_adds_reach_the_optimizer(tmp_path):
    cfg = compose_config("train", *train_base(tmp_path, "optimizer=adamw", "+optimizer.amsgrad=true",
                                              "scheduler=none"))
    _, module, _ = train.build_run(cfg)
    assert module.configure_optimizers().defaults["amsgrad"] is True


def test_coco_is_not_validated_on_its_training_split(tmp_path):
    """Both splits naming one folder used to train on the validation annotations, so val F1 and the
    explanation metrics were measured on the training images."""
    with pytest.raises(ValueError, match=r"data\.train_split and data\.val_split are both 'val2014'"):
        train.build_run(compose_config("train", *train_base(tmp_path, "data=coco", "data.train_split=val2014")))
    assert not (tmp_path / "data").exists()


def test_a_missing_imagenet_box_dir_fails_before_the_training_set_is_listed(tmp_path, monkeypatch):
    """Class-folder validation images read their box files only for the localisation trials, which
    the callbacks ask for after the training set is listed (1.28M files on ImageNet)."""
    root = imagenet_tree(tmp_path / "imagenet")
    missing = tmp_path / "boxes"

    def listed():
        raise AssertionError("the training set was listed")

    monkeypatch.setattr(ImageNetDataModule, "_build_train_dataset", lambda self: listed())
    module = imagenet_module(root, box_dir=missing)
    with pytest.raises(FileNotFoundError, match=rf"data\.box_dir: directory not found: .*{missing.name}"):
        module.setup("fit")
