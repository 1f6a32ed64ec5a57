"""What the evaluation entry points and callbacks check before any image is read: metrics the data
cannot serve, the device, a checkpoint's classes against the data's, and the explainer's layer
on a checkpoint's network."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules import ClassificationDataModule
from datamodules.images import TrialGeometry
from evaluation.explainers.base import check_explainer
from evaluation.metrics.registry import METRICS, family_members
from gcmodels.networks import network_from_config
from gcmodels.options import ConfigError


def unsupported_metrics(datamodule: ClassificationDataModule, metrics: Sequence[str],
                        geometry: TrialGeometry = TrialGeometry()) -> dict[str, str]:
    """The metrics of ``metrics`` that ``datamodule`` cannot serve, each with the reason; callers
    decide whether that is an error (``python -m evaluation``) or a warning (training callbacks).
    ``geometry``: the protocol's, so that the trials built to answer are those used next."""
    reasons = {}
    localization = family_members(metrics, "localization")
    # Only asked when needed: building the trials reads every annotation file.
    if localization and datamodule.localization_dataset(geometry) is None:
        for name in localization:
            reasons[name] = datamodule.localization_unavailable()
    if datamodule.multilabel:
        for name in metrics:
            if METRICS[name].single_label_only:
                reasons[name] = (f"is defined for single-label data (top-1); data {datamodule.name!r} is "
                                 f"multi-label")
    return reasons


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise the named device, which must exist on
    this machine (a :class:`ConfigError` of the ``device`` key)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError([("device", f"{name!r} is not a device: auto, cpu, cuda or cuda:<index> ({err})")]) from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError([("device", f"{name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")])
    return device


def check_trained_classes(path, hparams: dict, datamodule: ClassificationDataModule) -> None:
    """Refuse the checkpoint at ``path`` (its hyper-parameters ``hparams``) where it was trained on
    another class set than ``datamodule``'s: another count, or other names where the checkpoint
    records them (a checkpoint of other classes of the same count would be scored on labels it
    never learnt)."""
    if hparams.get("num_classes") != datamodule.num_classes:
        raise ValueError(f"checkpoint {path} has {hparams.get('num_classes')} classes, but data "
                         f"{datamodule.name!r} has {datamodule.num_classes}")
    names = hparams.get("class_names")
    if names is not None and list(names) != list(datamodule.class_names):
        raise ValueError(f"checkpoint {path} was trained on other classes than data {datamodule.name!r}: "
                         f"{list(names)[:5]}... against {list(datamodule.class_names)[:5]}...")


def check_checkpoint_explainer(explainer, path, hparams: dict, key: str = "explainer") -> None:
    """:func:`~evaluation.explainers.check_explainer` on the network of the checkpoint at ``path``
    (its hyper-parameters ``hparams``), built on the meta device: its modules and shapes without
    weights (nothing is allocated or downloaded), before any data is read. The error names the
    checkpoint (members of a committee may differ in architecture) and ``key``, where the caller's
    config holds the explainer."""
    model = hparams["model"]
    with torch.device("meta"):
        net = network_from_config(model, hparams["num_classes"], pretrained=False)
    try:
        check_explainer(explainer, net, key)
    except (ValueError, NotImplementedError) as err:
        raise type(err)(f"{err} (checkpoint {path}, a {model['name']})") from None


