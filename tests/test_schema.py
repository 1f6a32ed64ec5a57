"""The config schema covers conf/ and conf/ covers the schema: every option file of every group
validates, every field of every registered kind is set in its config file, and for each field a
value of the wrong type, one out of its range and an unknown key beside it are refused, the error
naming the key (``ConfigError.keys``), before any data is generated or read."""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
import pytest
from omegaconf import OmegaConf
from pydantic import BaseModel

import train
from datamodules import DATASETS
from evaluation.callbacks import EvaluationCallbackOptions, ExplanationMetricsOptions
from evaluation.explainers import EXPLAINERS
from evaluation.settings import EvaluationSettings
from gcmodels.callbacks import NonFiniteOptions, StepCheckpointOptions
from gcmodels.config import TrainerOptions, check_config, train_schema
from gcmodels.networks import ARCHITECTURES
from gcmodels.objectives import OBJECTIVES
from gcmodels.optim import OPTIMIZERS, SCHEDULERS
from gcmodels.options import ConfigError, validate
from tests.test_config import compose_config as compose_entry
from tests.test_config_values import REQUIRED, options

REGISTRIES = {"model": ARCHITECTURES, "data": DATASETS, "loss": OBJECTIVES, "optimizer": OPTIMIZERS,
              "scheduler": SCHEDULERS, "explainer": EXPLAINERS}


def compose_config(name: str, *overrides: str):
    """The entry config ``name``, its folders away from Hydra's (unset) run directory."""
    folders = ["output_dir=/nowhere", "data.data_dir=/nowhere"] + (["ckpt_path=x.ckpt"] if name == "evaluate" else [])
    return compose_entry(name, *folders, *overrides)


def composed(group: str, option: str) -> dict:
    """The ``group`` of the train config (the evaluate config for explainers) with ``option``."""
    overrides = [f"{group}={option}", *REQUIRED.get(f"{group}={option}", [])]
    config = compose_config("evaluate" if group == "explainer" else "train", *overrides)
    return OmegaConf.to_container(config[group], resolve=True)


# ------------------------------------------------------------------ bad values, from the annotation


def unwrap(annotation: Any, constraints: list) -> tuple[Any, list]:
    """The core type of ``annotation`` (Optional and Annotated removed) and its constraints."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation, *extras = typing.get_args(annotation)
            for extra in extras:
                constraints = constraints + list(getattr(extra, "metadata", [extra]))
        elif origin in (Union, types.UnionType) and type(None) in typing.get_args(annotation):
            members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                # A union of a run-time tuple of types: ``Union[...]`` is the way to spell it.
                return Union[tuple(members)], constraints  # noqa: UP007
            annotation = members[0]
        else:
            return annotation, constraints


def outside(constraints: list, integer: bool) -> list:
    """A value beyond each bound of ``constraints``."""
    step = 1 if integer else 0.5
    values = []
    for constraint in constraints:
        if isinstance(constraint, annotated_types.Ge):
            values.append(constraint.ge - step)
        elif isinstance(constraint, annotated_types.Gt):
            values.append(constraint.gt)
        elif isinstance(constraint, annotated_types.Le):
            values.append(constraint.le + step)
        elif isinstance(constraint, annotated_types.Lt):
            values.append(constraint.lt)
    return [int(value) if integer else float(value) for value in values]


def bad_values(field) -> list:
    """A value of the wrong type and each value just out of range of a schema field."""
    core, constraints = unwrap(field.annotation, list(field.metadata))
    origin = typing.get_origin(core)
    if core is bool:
        return ["no", 1]
    if core is str:
        return [3]
    if origin is Literal:
        return ["not-a-choice"]
    if core in (int, float):
        return ["abc", True, *([1.5] if core is int else []), *outside(constraints, core is int)]
    if origin is tuple:
        item, item_constraints = unwrap(typing.get_args(core)[0], [])
        bad = ["abc", ["abc"], *[[value] for value in outside(item_constraints, item is int)]]
        if any(isinstance(constraint, annotated_types.MinLen) for constraint in constraints):
            bad.append([])
        return bad
    if origin is dict:
        return ["abc"]
    if origin in (Union, types.UnionType):  # a choice or a number (LIME's fill)
        return ["not-a-choice", True]
    raise AssertionError(f"no bad value for {field.annotation}")


def refuses(schema: Any, values: dict, prefix: str, key: str, bad: Any) -> str | None:
    """What is wrong when ``values`` with ``key`` set to ``bad`` passes or names other keys."""
    leaf = key.rpartition(".")[2]
    try:
        validate(schema, {**values, leaf: bad}, prefix)
    except ConfigError as error:
        if not any(refused == key or refused.startswith(f"{key}.") for refused in error.keys):
            return f"{key}={bad!r}: refused as {error.keys}"
        return None
    return f"{key}={bad!r}: accepted"


def field_problems(schema: Any, model: type[BaseModel], values: dict, prefix: str) -> list[str]:
    """Every field of ``model``: a wrong type and out-of-range values refused, naming the key; and
    an unknown key beside them."""
    problems = []
    for name, field in model.model_fields.items():
        if name == "name" or field.annotation is Any:
            continue
        key = f"{prefix}.{field.alias or name}"
        problems += [problem for bad in bad_values(field) if (problem := refuses(schema, values, prefix, key, bad))]
    if model.model_config.get("extra") == "forbid":
        if problem := refuses(schema, values, prefix, f"{prefix}.not_an_option", 1):
            problems.append(problem)
    return problems


# ------------------------------------------------------------------------------------- the tests

KINDS = [(group, name) for group, registry in REGISTRIES.items() for name in registry.names()]


@pytest.mark.parametrize("group", REGISTRIES)
def test_every_option_file_is_a_registered_kind_and_validates(group):
    registry = REGISTRIES[group]
    files = options(group)
    kinds = {composed(group, option)["name"] for option in files}
    assert kinds == set(registry.names()), f"conf/{group}/ and the {group} registry differ"
    for option in files:
        registry.validate(composed(group, option))


@pytest.mark.parametrize("group, name", KINDS)
def test_every_field_of_a_kind_is_set_in_its_config_file(group, name):
    fields = {field.alias or key for key, field in REGISTRIES[group][name].options.model_fields.items()}
    assert set(composed(group, name)) == fields


@pytest.mark.parametrize("group, name", KINDS)
def test_each_field_of_a_kind_refuses_a_wrong_type_an_out_of_range_value_and_an_unknown_key(group, name):
    registry = REGISTRIES[group]
    assert not field_problems(registry.union(), registry[name].options, composed(group, name), group)


def test_the_evaluation_settings_and_the_trainer_are_covered_too():
    train_config = compose_config("train")
    settings = {key: value for key, value in OmegaConf.to_container(train_config.evaluation, resolve=True).items()
                if key != "_target_"}
    assert set(settings) == set(EvaluationSettings.model_fields)
    assert not field_problems(EvaluationSettings, EvaluationSettings, settings, "evaluation")
    trainer = OmegaConf.to_container(train_config.trainer, resolve=True)
    assert not field_problems(TrainerOptions, TrainerOptions, trainer, "trainer")


@pytest.mark.parametrize("callback, schema", [("explanation_metrics", ExplanationMetricsOptions),
                                              ("fgsm_robustness", EvaluationCallbackOptions),
                                              ("model_checkpoint", StepCheckpointOptions),
                                              ("nonfinite", NonFiniteOptions)])
def test_the_callbacks_options_are_covered(callback, schema):
    values = OmegaConf.to_container(compose_config("train").callbacks[callback], resolve=True)
    values.pop("_target_")
    assert set(schema.model_fields) <= set(values)
    assert not field_problems(schema, schema, values, f"callbacks.{callback}")


@pytest.mark.parametrize("key, bad", [("seed", -1), ("heatmap_images", "abc"), ("ckpt_path", 3),
                                      ("paper_lr.resnet18", 0)])
def test_the_train_configs_own_keys_are_covered(key, bad):
    with pytest.raises(ConfigError) as error:
        check_config(compose_config("train", f"{key}={bad}"), train_schema())
    assert error.value.key == key


def test_the_entry_point_refuses_every_bad_value_at_once_before_reading_data(tmp_path):
    overrides = ["loss.lambda=-1", "data.image_size=abc", "model.pooling=mean", "optimizer.lr=0",
                 "callbacks.explanation_metrics.every_n_epochs=0", "+data.colour=red"]
    with pytest.raises(ConfigError) as error:
        train.build_run(compose_config("train", *overrides, f"data.data_dir={tmp_path / 'data'}",
                                       f"output_dir={tmp_path / 'out'}"))
    assert sorted(error.value.keys) == sorted(["loss.lambda", "data.image_size", "model.pooling", "optimizer.lr",
                                               "callbacks.explanation_metrics.every_n_epochs", "data.colour"])
    assert not Path(tmp_path / "data").exists()
