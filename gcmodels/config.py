"""The config module every entry point (and test) imports: the ``validation_metric`` resolver, the
train schema, and the step that validates a resolved Hydra config against an entry point's schema.

An entry point calls :func:`check_config` first, before it builds anything or reads any data: every
refused value is reported at once, as a :class:`ConfigError` naming its key. Groups with a
``_target_`` (callbacks, loggers, the trainer) are validated against the options their class
declares (``options``, an :class:`Options` model), or left to the class where it declares none.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue
from pydantic import ConfigDict, Field, create_model

from datamodules import DATASETS
from evaluation.settings import EvaluationSettings
from gcmodels.networks import ARCHITECTURES
from gcmodels.objectives import OBJECTIVES
from gcmodels.optim import OPTIMIZERS, SCHEDULERS
from gcmodels.options import ConfigError, Options, validate

__all__ = ["ConfigError", "check_config", "compose_group", "train_schema", "validation_metric"]

# Keys that tell Hydra how to build a group, not options of what it builds.
HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_", "_args_")


def validation_metric(data_name: str) -> str:
    """The checkpointed validation score of data set ``data_name`` (``${validation_metric:...}``):
    top-1 accuracy, or micro F1 on multi-label data."""
    if data_name not in DATASETS:
        raise ConfigError([("data.name", f"{data_name!r}: allowed: {DATASETS.names()}")])
    return "val/f1" if DATASETS[data_name].target.multilabel else "val/acc"


OmegaConf.register_new_resolver("validation_metric", validation_metric, replace=True)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_group(group: str, option: str, **values: Any) -> dict:
    """Config group ``group`` with ``option`` (``conf/<group>/<option>.yaml`` and its defaults), as
    Hydra composes it, with ``values`` set: for code outside an entry point's own config
    (benchmarks, tests, the reproduction's checks of the configs it will run)."""
    overrides = [f"{group}.{key}={value if value is not None else 'null'}" for key, value in values.items()]

    def composed() -> dict:
        # The group's file composed alone sits under its package, the group's name.
        return OmegaConf.to_container(compose(f"{group}/{option}", overrides=overrides)[group], resolve=True)

    if GlobalHydra.instance().is_initialized():  # inside an entry point: its search path is conf/
        return composed()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return composed()


def resolved(cfg: DictConfig) -> tuple[dict, list[tuple[str, str]]]:
    """``cfg`` as plain containers, interpolations resolved, top-level key by top-level key, and
    the keys that could not be: a required value left at ``???`` (scheduler=multistep's
    milestones), or an interpolation that names a missing key (``${resnet_output_stride.${data.name}}``
    with an unknown data set)."""
    values, problems = {}, []
    for key in cfg:
        if key == "hydra":
            continue
        try:
            node = cfg[key]
            values[key] = OmegaConf.to_container(node, resolve=True, throw_on_missing=True) \
                if isinstance(node, Container) else node
        except MissingMandatoryValue as err:
            problems.append((err.full_key or key, "required: give it a value (it is ??? in conf/)"))
        except InterpolationResolutionError as err:
            cause = err
            while cause is not None and not isinstance(cause, ConfigError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:  # raised by a resolver (validation_metric)
                problems += cause.problems
            else:
                problems.append((err.full_key or key, f"cannot be resolved: {str(err.msg).splitlines()[0]}"))
    return values, problems


def options_of(values: dict) -> dict:
    return {key: value for key, value in values.items() if key not in HYDRA_KEYS}


def check_targets(group: dict, prefix: str) -> None:
    """Validate each ``_target_`` entry of ``group`` (``callbacks``, ``logger``) against the
    options its class declares; a class without ``options`` checks its own arguments."""
    problems = []
    for name, values in group.items():
        if not isinstance(values, dict) or "_target_" not in values:
            problems.append((f"{prefix}.{name}", "needs a _target_ (the class to build)"))
            continue
        schema = getattr(get_class(values["_target_"]), "options", None)
        if schema is None:
            continue
        try:
            validate(schema, options_of(values), f"{prefix}.{name}")
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)


class TrainerOptions(Options):
    """The Lightning Trainer's arguments that it takes untyped ("abc" epochs pass) or checks only
    when it uses them; Lightning checks the others itself."""

    model_config = ConfigDict(extra="allow")

    # -1: unlimited (or, for num_sanity_val_steps, every batch).
    max_epochs: Annotated[int, Field(ge=-1)] | None = None
    num_sanity_val_steps: Annotated[int, Field(ge=-1)] | None = None
    log_every_n_steps: Annotated[int, Field(ge=1)] | None = None
    num_nodes: Annotated[int, Field(ge=1)] = 1
    # None: validation every val_check_interval steps, in any epoch.
    check_val_every_n_epoch: Annotated[int, Field(ge=1)] | None = 1


def train_schema() -> type[Options]:
    """The schema of ``conf/train.yaml``, of the kinds registered now (a test may register more)."""
    return create_model(
        "TrainConfig", __base__=Options,
        seed=(Annotated[int, Field(ge=0)], ...),
        ckpt_path=(str | None, ...),
        output_dir=(str, ...),
        heatmap_images=(Annotated[int, Field(ge=0)], ...),
        # The recipes' tables (conf/train.yaml): read through interpolations by the groups.
        paper_lr=(dict[str, Annotated[float, Field(gt=0)]], ...),
        resnet_output_stride=(dict[str, int], ...),
        model=(ARCHITECTURES.union(), ...),
        data=(DATASETS.union(), ...),
        loss=(OBJECTIVES.union(), ...),
        optimizer=(OPTIMIZERS.union(), ...),
        scheduler=(SCHEDULERS.union(), ...),
        evaluation=(EvaluationSettings, ...),
        trainer=(TrainerOptions, ...),
        callbacks=(dict[str, Any], ...),
        logger=(dict[str, Any], ...),
    )


def check_config(cfg: DictConfig, schema: type[Options], targets: tuple[str, ...] = ()) -> Any:
    """``cfg`` resolved and validated as ``schema`` (each group's Hydra keys left out), with the
    ``_target_`` entries of each group in ``targets`` validated against their classes' options.
    Every refused value is reported at once, in one :class:`ConfigError`."""
    values, problems = resolved(cfg)
    unresolved = set(cfg) - set(values)
    values = {key: options_of(value) if isinstance(value, dict) else value for key, value in values.items()}
    try:
        checked = validate(schema, values)
    except ConfigError as err:
        # A group that could not be resolved is reported as such, not as missing.
        problems += [(key, reason) for key, reason in err.problems if key not in unresolved]
    for group in targets:
        if group not in values:
            continue
        try:
            check_targets(values[group], group)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return checked
