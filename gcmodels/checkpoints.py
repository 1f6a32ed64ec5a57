"""Reading checkpoints written by :class:`gcmodels.module.GCClassifier`, with clear errors."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from gcmodels.networks import ARCHITECTURES, explained_stride, network_options
from gcmodels.objectives import OBJECTIVES


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint of this project as a dict, its hyper-parameters in today's form
    (:func:`upgrade_hparams`); errors name the file.

    Read with ``weights_only=True``: tensors, numbers, strings and plain containers only, which is
    all this project's checkpoints hold, so a file that carries anything else (a pickled object
    whose loading would run code) is refused, naming the type, and nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # mmap: tensors are read from the file when used, so a check that needs only the
        # hyper-parameters (read_hparams) does not read a 680 MB AlexNet checkpoint whole.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a refused type: a file that is no checkpoint
            raise ValueError(f"not a readable PyTorch checkpoint: {path} ({_offending_type(err)})") from err
        raise ValueError(
            f"refusing to load {path}: it holds a type that a checkpoint of this project never contains, so "
            f"loading it could run code ({_offending_type(err)}); docs/checkpoints.md says what a checkpoint "
            f"holds and how to convert one you trust"
        ) from err
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"not a readable PyTorch checkpoint: {path} ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"not a checkpoint of this project (no hyper_parameters/state_dict): {path}")
    checkpoint["hyper_parameters"] = upgrade_hparams(dict(checkpoint["hyper_parameters"]))
    return checkpoint


def _offending_type(err: pickle.UnpicklingError) -> str:
    """What torch's refusal names (the refused global, or the unpickler's error), without its
    general advice about weights_only."""
    text = str(err)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"type {refused.group(1)}"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return detail.group(1).strip() if detail else text.strip().splitlines()[0]


# GC options that checkpoints written before the loss became one config dict kept at the top level.
_FLAT_GC_OPTIONS = {"lam": "lambda", "cam_mode": "cam_mode", "detach_target": "detach_target"}


def upgrade_hparams(hparams: dict) -> dict:
    """Hyper-parameters of older checkpoints in today's form: ``loss="gc", lam=..., cam_mode=...,
    detach_target=...`` becomes the ``loss`` config dict (``ce`` keeps only its name); a model
    without ``output_stride`` (older than the option) had its architecture's own; one without
    ``init_from`` started from fresh (or torchvision) weights; a GC loss without ``positive``
    drew the explained class of a multi-label image uniformly over its labels, and one without
    ``composite_source`` took its distractors from the batch, one without ``composites`` built one
    composite per sample."""
    model = hparams.get("model")
    if isinstance(model, dict) and "output_stride" not in model and model.get("name") in ARCHITECTURES:
        model = hparams["model"] = {**model, "output_stride": explained_stride({**model, "output_stride": None})}
    if isinstance(model, dict) and "init_from" not in model:
        hparams["model"] = {**model, "init_from": None}
    if isinstance(hparams.get("loss"), str):
        loss = {"name": hparams["loss"]}
        flat = {new: hparams.pop(old) for old, new in _FLAT_GC_OPTIONS.items() if old in hparams}
        if loss["name"] == "gc":
            loss.update(flat)
        hparams["loss"] = loss
    loss = hparams.get("loss")
    if isinstance(loss, dict) and loss.get("name") == "gc":
        hparams["loss"] = {"positive": "labels", "composite_source": "batch", "composites": "per_sample",
                           **loss}
    return hparams


def describe_checkpoint(path: str | Path, hparams: dict) -> dict:
    """A report row's description of a checkpoint: path, architecture, pooling, loss, lambda (None
    for an objective without one)."""
    loss = hparams["loss"]
    return {"checkpoint": str(path), "model": hparams["model"]["name"], "pooling": hparams["model"]["pooling"],
            "loss": loss["name"], "lambda": loss.get("lambda")}


def checkpoint_label(description: dict) -> str:
    """A checkpoint's name in tables and pictures, from its ``model``, ``pooling``, ``loss`` and
    ``lambda`` (a report row's description), e.g. 'resnet18+GMP GC (lambda=1)', 'resnet18 baseline'
    (``loss=ce``): the objective's title, and its weight where it has one."""
    pooling = "+GMP" if description.get("pooling") == "max" else ""
    name, weight = description.get("loss"), description.get("lambda")
    if name not in OBJECTIVES.entries:
        return f"{description.get('model', '?')}{pooling} {name}"
    entry = OBJECTIVES[name]
    weighted = weight is not None and "lambda" in {field.alias for field in entry.options.model_fields.values()}
    loss = f" {entry.target.title} (lambda={weight:g})" if weighted else f" {entry.target.title}"
    return f"{description.get('model', '?')}{pooling}{loss}"


def read_hparams(path: str | Path) -> dict:
    """Hyper-parameters stored in a checkpoint of this project; errors name the file."""
    return load_checkpoint(path)["hyper_parameters"]


def _same_file(one: str | Path | None, other: str | Path | None) -> bool:
    if one is None or other is None:
        return one is other
    return Path(one).resolve() == Path(other).resolve()


# Config groups a resumed run must keep: Lightning restores the optimizer's and the scheduler's state
# over the config's values, which the new checkpoints would record all the same, and a loss changed
# midway would be recorded as the whole run's.
RESUMED_GROUPS = ("loss", "optimizer", "scheduler")


def _group_differences(group: str, saved: dict, config: dict) -> list[str]:
    """``group.key: checkpoint has ..., config has ...`` for each key of the checkpoint whose value
    the config changes or drops. Options added since the checkpoint was written hold what its run
    did (:func:`upgrade_hparams`: an old GC run's ``loss.positive`` is ``labels``), so they are
    compared too; keys only the config has are options that had no effect then, not compared."""
    return [f"{group}.{key}: checkpoint has {saved[key]!r}, config has "
            f"{repr(config[key]) if key in config else 'no such key'}"
            for key in sorted(saved) if key not in config or saved[key] != config[key]]


def check_resume_compatible(path: str | Path, model: dict, num_classes: int, multilabel: bool,
                            settings: dict[str, dict] | None = None) -> None:
    """Refuse to resume from a checkpoint of another architecture, network option (pooling, output
    stride, sizes) or class count, or of a run started from other weights (``model.init_from``: a
    resumed run is the same run, so it must name the checkpoint's own starting point, or none when
    it had none; the weights come from ``path`` either way). ``settings``: the run's config groups of
    :data:`RESUMED_GROUPS` (``{"loss": {...}, ...}``), whose every value must be the checkpoint's
    (None: not compared)."""
    saved = read_hparams(path)
    saved_model = dict(saved.get("model") or {})
    problems = []
    for key in sorted(set(network_options(saved_model)) | set(network_options(model))):
        if saved_model.get(key) != model.get(key):
            problems.append(f"model.{key}: checkpoint has {saved_model.get(key)!r}, config has {model.get(key)!r}")
    if not _same_file(saved_model.get("init_from"), model.get("init_from")):
        problems.append(f"model.init_from: the checkpoint's run started from {saved_model.get('init_from')!r}, config "
                        f"has {model.get('init_from')!r} (ckpt_path resumes that run with its own weights: give "
                        f"model.init_from={saved_model.get('init_from')}, or start a new run without ckpt_path)")
    if saved.get("num_classes") != num_classes:
        problems.append(f"number of classes: checkpoint has {saved.get('num_classes')}, data has {num_classes}")
    if bool(saved.get("multilabel", False)) != bool(multilabel):
        problems.append(f"multilabel: checkpoint has {saved.get('multilabel')}, data has {multilabel}")
    changed = [difference for group, values in (settings or {}).items()
               for difference in _group_differences(group, dict(saved.get(group) or {}), dict(values))]
    if changed:
        problems += changed
        problems.append(f"ckpt_path continues the checkpoint's run, with its optimizer and scheduler state (over "
                        f"the new values, which its checkpoints would record all the same) and its loss: give the "
                        f"checkpoint's values to continue it, or, to train these weights with new settings, start "
                        f"a new run from them with model.init_from={path} instead of ckpt_path")
    if problems:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(problems))


def final_layer(net: nn.Module) -> str | None:
    """Name of the network's last linear layer: the classifier whose rows are the classes (ResNet's
    ``fc``, AlexNet's last ``classifier`` layer), or None without one."""
    linear = [name for name, layer in net.named_modules() if isinstance(layer, nn.Linear)]
    return linear[-1] if linear else None


def init_from_checkpoint(path: str | Path, net: nn.Module, model: dict, num_classes: int,
                         class_names: list[str] | None = None) -> list[str]:
    """Load into ``net`` (built from the ``model`` config for ``num_classes`` classes) the network
    weights of the checkpoint at ``path`` (``model.init_from``), read safely by :func:`load_checkpoint`.

    The architecture must be the same (``model.name``) and every tensor must have the shape of
    ``net``'s. The final classification layer (:func:`final_layer`) keeps its fresh initialisation
    when the checkpoint was trained on other classes: another count, or other names where both
    are recorded (rows of other classes would be a wrong start, not a neutral one). Pooling and
    output stride may differ: neither changes any tensor (GMP swaps the pooling operation, a
    smaller stride dilates the same kernels). Returns notes for the log: what was not loaded and
    why, and the options that differ."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.init_from: checkpoint not found: {path}")
    checkpoint = load_checkpoint(path)
    saved = checkpoint["hyper_parameters"]
    saved_model = dict(saved.get("model") or {})
    if saved_model.get("name") != model["name"]:
        raise ValueError(f"model.init_from={path} holds a {saved_model.get('name')!r} network, but this run builds "
                         f"model.name={model['name']!r}: weights load only into the same architecture")
    weights = {key[len("net."):]: value for key, value in checkpoint["state_dict"].items() if key.startswith("net.")}
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"model.init_from={path}: its {model['name']} network does not match this run's: "
                         f"tensors missing from the checkpoint {missing[:5]}, not in this network {unexpected[:5]}")
    saved_names = saved.get("class_names")
    if saved.get("num_classes") != num_classes:
        other_classes = f"the checkpoint has {saved.get('num_classes')} classes, this run {num_classes}"
    elif saved_names is not None and class_names is not None and list(saved_names) != list(class_names):
        other_classes = f"the checkpoint's {num_classes} classes are not this run's"
    else:
        other_classes = None
    layer = final_layer(net)
    fresh = sorted(key for key in own if other_classes and key.rsplit(".", 1)[0] == layer)
    wrong_shape = [key for key in sorted(set(own) - set(fresh)) if weights[key].shape != own[key].shape]
    if wrong_shape:
        key = wrong_shape[0]
        raise ValueError(f"model.init_from={path}: tensor {key} has shape {tuple(weights[key].shape)} in the "
                         f"checkpoint and {tuple(own[key].shape)} in this {model['name']} network "
                         f"({len(wrong_shape)} tensors differ; only the final layer {layer} is replaced, when the "
                         f"classes differ)")
    notes = [f"model.{key}: the checkpoint's network used {saved_model.get(key)!r}, this run {model[key]!r} "
             f"(the same tensors; what they compute changes)"
             for key in sorted(set(network_options(model)) - {"name"}) if saved_model.get(key) != model.get(key)]
    if fresh:
        notes.append(f"not loaded: {', '.join(fresh)} "
                     f"(the final layer keeps its fresh initialisation: {other_classes})")
        weights.update({key: own[key] for key in fresh})
    net.load_state_dict(weights)
    return notes
