"""The default run builds without reading data, and the one rule between trainer and schedule
holds. The types and ranges of every config value are the schema's (tests/test_schema.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

import train
from gcmodels.options import ConfigError
from tests.conftest import ROOT
from tests.test_config import compose_config

CONF = ROOT / "conf"
# Required values (???) an option leaves to the user, given so that the option builds.
REQUIRED = {"scheduler=multistep": ["scheduler.milestones=[2,4]"]}


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def train_base(tmp_path: Path, *choices: str) -> list[str]:
    # No GPU is needed to check a GPU config: the device itself is Lightning's to find.
    return [*choices, f"output_dir={tmp_path / 'out'}", f"data.data_dir={tmp_path / 'data'}", "trainer.accelerator=cpu"]


def test_the_default_run_builds_without_reading_data(tmp_path):
    datamodule, module, trainer = train.build_run(compose_config("train", *train_base(tmp_path)))
    assert module.hparams.num_classes == datamodule.num_classes and trainer.callbacks
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("epochs", [-1, 0])
def test_a_cosine_schedule_needs_a_number_of_epochs(tmp_path, epochs):
    """-1 (unlimited) and 0 are legal epochs, but a cosine schedule over them would be 1 epoch long."""
    with pytest.raises(ConfigError) as error:
        train.build_run(compose_config("train", *train_base(tmp_path, f"trainer.max_epochs={epochs}")))
    assert error.value.keys == ["trainer.max_epochs"]
    train.build_run(compose_config("train", *train_base(tmp_path, f"trainer.max_epochs={epochs}",
                                                        "scheduler=none")))
    assert not (tmp_path / "data").exists()
