"""Every optimizer and scheduler option builds its torch class with its keys; COCO is not validated on
its training split, and a mistyped ImageNet box_dir fails before the training set is listed."""
from __future__ import annotations

import pytest
import torch

import train
from datamodules.imagenet import ImageNetDataModule
from gcmodels.options import ConfigError
from tests.test_config import compose_config
from tests.test_config_values import REQUIRED, options, train_base
from tests.test_datamodules import imagenet_module, imagenet_tree

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
    cfg = compose_config("train", *train_base(tmp_path, "optimizer=adamw", "optimizer.amsgrad=true",
                                              "scheduler=none"))
    _, module, _ = train.build_run(cfg)
    assert module.configure_optimizers().defaults["amsgrad"] is True


def test_coco_is_not_validated_on_its_training_split(tmp_path):
    """Both splits naming one folder used to train on the validation annotations, so val F1 and the
    explanation metrics were measured on the training images."""
    with pytest.raises(ConfigError) as error:
        train.build_run(compose_config("train", *train_base(tmp_path, "data=coco", "data.train_split=val2014")))
    assert error.value.keys == ["data.val_split"]
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
