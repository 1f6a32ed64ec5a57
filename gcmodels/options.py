"""Typed config options and the registries that fill them: the one place a config value's type,
choices and range are declared.

Each config group (``data``, ``model``, ``loss``, ``optimizer``, ``scheduler``, ``explainer``,
``evaluation``, ...) is a pydantic model; a group with several kinds (``name``) is a registry whose
entries register their own options model where the kind is defined, and the group's schema is the
discriminated union of those models (:meth:`Registry.union`). Entry points validate the resolved
config once (:func:`validate`, :mod:`gcmodels.config`); the classes behind the options keep only
the checks that guard their own tensors and files. docs/architecture.md says why pydantic.
"""
from __future__ import annotations

import dataclasses
import typing
from collections import abc
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, TypeVar, Union

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, create_model

__all__ = ["ConfigError", "Options", "Registry", "Sequence", "plain", "validate"]

T = TypeVar("T")


class Options(BaseModel):
    """A config group's options: strict types (``true`` is no number, ``"3"`` no integer), no
    unknown key, read-only once validated."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _as_tuple(value: Any) -> Any:
    # A YAML list (a list, or Hydra's ListConfig) as a tuple, which keeps a frozen options object
    # hashable; a string stays a string, to be refused.
    return tuple(value) if isinstance(value, abc.Sequence) and not isinstance(value, (str, bytes)) else value


# A list option: a tuple of ``T``; a string, a mapping or a single value is refused.
Sequence = Annotated[tuple[T, ...], BeforeValidator(_as_tuple)]


def plain(values: Mapping) -> dict:
    """A config group as a plain dict (Hydra hands a DictConfig to what it instantiates)."""
    return OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)


class ConfigError(ValueError):
    """Config values refused by a schema. ``keys``: the full key of each refused value
    (``loss.lambda``), ``key`` the first; the message is ``<key>: <reason> (got <value>)`` for each.
    A key refused more than once (by every branch of a union, or an unknown ``data.name`` met again
    by the interpolations that use it) is reported once, with its first reason."""

    def __init__(self, problems: list[tuple[str, str]]):
        first: dict[str, str] = {}
        for key, reason in problems:
            first.setdefault(key, reason)
        self.problems = list(first.items())
        self.keys = list(first)
        self.key = self.keys[0]
        super().__init__("; ".join(f"{key}: {reason}" for key, reason in self.problems))


def validate(schema: Any, values: Any, prefix: str = "") -> Any:
    """``values`` as ``schema`` (a model, or a registry's :meth:`Registry.union`), or a
    :class:`ConfigError` naming every refused key under ``prefix`` (the key of ``values`` in the
    config; "" at the top level)."""
    try:
        return TypeAdapter(schema).validate_python(values)
    except ValidationError as err:
        problems = []
        for error in err.errors(include_url=False):
            location = error["loc"]
            reason = error["msg"]
            if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
                # The kind is unknown or missing: the refused key is the group's name.
                location = (*location, "name")
                reason = f"{error['ctx'].get('tag', 'missing')!r}: allowed: {error['ctx']['expected_tags']}" \
                    if error["type"] == "union_tag_invalid" else "missing"
            elif error["type"] == "value_error":
                # A rule of the option's own (a validator): its message, and the value.
                reason = reason.removeprefix("Value error, ")
                if not isinstance(error["input"], Mapping):
                    reason = f"{error['input']!r}: {reason}"
            elif error["type"] not in ("missing", "extra_forbidden"):
                reason += f" (got {error['input']!r})"
            problems.append((config_key(prefix, values, location), reason))
        raise ConfigError(problems) from None


def config_key(prefix: str, values: Any, location: tuple) -> str:
    """The config key of an error's ``location`` in ``values``. Pydantic inserts names of its own:
    a discriminated union the chosen kind after the group (``("loss", "gc", "lambda")``), a plain
    union the branch tried (``"constrained-str"``); neither is a config key."""
    node, parts = values, [prefix] if prefix else []
    for part in location:
        if isinstance(node, Mapping):
            if part not in node and node.get("name") == part:
                continue
            parts.append(str(part))
            node = node.get(part)
        elif isinstance(node, (list, tuple)) and isinstance(part, int):
            parts.append(str(part))
            node = node[part] if part < len(node) else None
        elif not isinstance(part, str):
            parts.append(str(part))
    return ".".join(parts)


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered kind: what builds it, and its options (a model with ``name`` fixed)."""

    name: str
    target: Any
    options: type[Options]
    fixed: Mapping[str, Any]

    def build(self, *args: Any, **options: Any) -> Any:
        """The kind built with ``options`` (its config group less ``name``)."""
        return self.target(*args, **self.fixed, **options)


class Registry:
    """The kinds of one config group by ``name`` (data sets, architectures, losses, explainers, ...),
    each registered where it is defined: ``@REGISTRY.register("name", options=Model)``.

    ``options``: the kind's options besides ``name``; a dataclass target without it takes its
    fields as options (their annotations carry the ranges), less ``fixed`` ones, whose values the
    kind's name implies, and fields marked ``metadata={"option": False}`` (set by code only).
    """

    def __init__(self, group: str):
        self.group = group
        self.entries: dict[str, Entry] = {}

    def register(self, name: str, options: type[Options] | None = None, *,
                 fixed: Mapping[str, Any] | None = None) -> Callable[[T], T]:
        def add(target: T) -> T:
            if name in self.entries:
                raise ValueError(f"{self.group}.name={name!r} is registered twice: {self.entries[name].target} "
                                 f"and {target}")
            base = options if options is not None else _dataclass_options(target, fixed or {})
            model = create_model(f"{self.group.title()}_{name}", __base__=base,
                                 name=(Literal[name], Field(default=name)))
            self.entries[name] = Entry(name, target, model, dict(fixed or {}))
            return target

        return add

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, name: str) -> Entry:
        return self.entries[name]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def union(self) -> Any:
        """The group's schema: one of the registered kinds' options, chosen by ``name``."""
        models = tuple(entry.options for entry in self.entries.values())
        if len(models) == 1:
            return models[0]
        # A union of a run-time tuple of types: ``Union[...]`` is the way to spell it.
        return Annotated[Union[models], Field(discriminator="name")]  # noqa: UP007

    def validate(self, values: Mapping, prefix: str | None = None) -> Options:
        """``values`` (``name`` and options) as their kind's options; errors name keys under
        ``prefix`` (the group's name by default)."""
        return validate(self.union(), dict(values), self.group if prefix is None else prefix)


def _dataclass_options(target: Any, fixed: Mapping[str, Any]) -> type[Options]:
    """The options of a dataclass: its fields (their annotations and defaults), less ``fixed``."""
    if not dataclasses.is_dataclass(target):
        raise TypeError(f"{target} is no dataclass: register it with its options model")
    hints = typing.get_type_hints(target, include_extras=True)
    fields = {}
    for field in dataclasses.fields(target):
        if field.name in fixed or not field.init or not field.metadata.get("option", True):
            continue
        default = field.default if field.default is not dataclasses.MISSING else ...
        fields[field.name] = (hints[field.name], default)
    return create_model(f"{target.__name__}Options", __base__=Options, **fields)
