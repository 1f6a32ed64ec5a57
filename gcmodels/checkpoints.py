"""Reading checkpoints written by :class:`gcmodels.module.GCClassifier`, with clear errors."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from gcmodels.networks import native_output_stride


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
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
    without ``output_stride`` (older than the option) had its architecture's own."""
    model = hparams.get("model")
    if isinstance(model, dict) and "output_stride" not in model:
        hparams["model"] = {**model, "output_stride": native_output_stride(model.get("name", ""))}
    if isinstance(hparams.get("loss"), str):
        loss = {"name": hparams["loss"]}
        flat = {new: hparams.pop(old) for old, new in _FLAT_GC_OPTIONS.items() if old in hparams}
        if loss["name"] == "gc":
            loss.update(flat)
        hparams["loss"] = loss
    return hparams


def read_hparams(path: str | Path) -> dict:
    """Hyper-parameters stored in a checkpoint of this project; errors name the file."""
    return load_checkpoint(path)["hyper_parameters"]


def check_resume_compatible(path: str | Path, model: dict, num_classes: int, multilabel: bool) -> None:
    """Refuse to resume from a checkpoint of another architecture, pooling, output stride or class
    count."""
    saved = read_hparams(path)
    saved_model = dict(saved.get("model") or {})
    problems = []
    for key in ("name", "pooling", "output_stride"):
        if saved_model.get(key) != model.get(key):
            problems.append(f"model.{key}: checkpoint has {saved_model.get(key)!r}, config has {model.get(key)!r}")
    if saved.get("num_classes") != num_classes:
        problems.append(f"number of classes: checkpoint has {saved.get('num_classes')}, data has {num_classes}")
    if bool(saved.get("multilabel", False)) != bool(multilabel):
        problems.append(f"multilabel: checkpoint has {saved.get('multilabel')}, data has {multilabel}")
    if problems:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(problems))
