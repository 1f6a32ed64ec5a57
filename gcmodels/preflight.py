"""The rules of a training run that span several objects (the data and the loss, the checkpoint
monitors and the callbacks, the trainer and the schedule), checked together by :func:`preflight`
after everything is built and before any data is generated or read. Each rule's facts live with
their owner: the per-process batch in the datamodule (:meth:`set_world_size`), what the objective
needs of the data with the objective (:meth:`Objective.check_data`: GC's image size and batch), the
logged scores with the
module and the callbacks (``validation_scores``/``logged_scores``) and their directions with the
metrics."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_warn

from datamodules import ClassificationDataModule
from gcmodels.module import GCClassifier
from gcmodels.options import ConfigError

# ModelCheckpoint's own candidates besides the logged values, in either mode (step with max: keep
# the latest save_top_k checkpoints).
COUNTER_MONITORS = ("epoch", "step")


def validation_scores(multilabel: bool, callbacks: dict[str, pl.Callback]) -> dict[str, tuple[bool, str | None]]:
    """Every score logged by the end of a validation epoch, where ModelCheckpoint chooses the best
    checkpoint: whether higher is better, and the name of the callback that logs it (None: the
    module's ``val/*``)."""
    scores = {name: (higher, None) for name, higher in GCClassifier.validation_scores(multilabel).items()}
    for name, callback in callbacks.items():
        if hasattr(callback, "logged_scores"):
            scores.update({score: (higher, name) for score, higher in callback.logged_scores(multilabel).items()})
    return scores


def check_checkpoint_monitors(callbacks: dict[str, pl.Callback], multilabel: bool, trainer: pl.Trainer) -> None:
    """Each ModelCheckpoint's ``monitor`` must be a score logged at every validation, and its
    ``mode`` the direction in which that score improves. Lightning finds out at the end of the
    first epoch, without saving a checkpoint, or never (the best checkpoint is then the worst)."""
    scores = validation_scores(multilabel, callbacks)
    # None: validation every val_check_interval steps, in any epoch.
    validation_epochs = trainer.check_val_every_n_epoch or 1
    problems = []
    for name, callback in callbacks.items():
        if not isinstance(callback, ModelCheckpoint) or callback.monitor in (None, *COUNTER_MONITORS):
            continue
        key, monitor = f"callbacks.{name}", callback.monitor
        if monitor not in scores:
            problems.append((f"{key}.monitor", f"{monitor!r} is not a score logged at validation, where the best "
                             f"checkpoint is chosen; scores logged there: {sorted(scores)}"))
            continue
        higher, source = scores[monitor]
        mode = "max" if higher else "min"
        if callback.mode != mode:
            problems.append((f"{key}.mode", f"{callback.mode} keeps the checkpoint of the "
                             f"{'highest' if callback.mode == 'max' else 'lowest'} {monitor}, which is better "
                             f"{'higher' if higher else 'lower'}: set {mode}"))
        every = 1 if source is None else callbacks[source].every_n_epochs
        if validation_epochs % every:
            problems.append((f"callbacks.{source}.every_n_epochs",
                             f"{every} logs {monitor} ({key}.monitor) on fewer validations than the best "
                             f"checkpoint is chosen at (every {validation_epochs} epoch(s), "
                             f"trainer.check_val_every_n_epoch): it must divide {validation_epochs}"))
    if problems:
        raise ConfigError(problems)


def warn_unaligned_evaluations(callbacks: dict[str, pl.Callback], trainer: pl.Trainer) -> None:
    """An evaluation callback runs at the end of a validation epoch that is a multiple of its
    ``every_n_epochs``: warn when none comes before the last epoch."""
    validation_epochs, epochs = trainer.check_val_every_n_epoch, trainer.max_epochs
    if validation_epochs is None or epochs < 1:  # validation by steps; unlimited (-1), or no epoch at all
        return
    for name, callback in callbacks.items():
        every = getattr(callback, "every_n_epochs", None)
        if hasattr(callback, "logged_scores") and every is not None and math.lcm(every, validation_epochs) > epochs:
            rank_zero_warn(f"callbacks.{name}.every_n_epochs={every} with trainer.check_val_every_n_epoch="
                           f"{validation_epochs}: callbacks.{name} would first run at epoch "
                           f"{math.lcm(every, validation_epochs)}, after the last (trainer.max_epochs={epochs}), "
                           f"and logs nothing")


def check_writable(cfg: DictConfig) -> None:
    """Create and write once every folder the run writes to (output, checkpoints, the consensus
    callback's explanation store, loggers), before any data is generated or read: a run must not
    train for hours and then fail to save."""
    folders = {"output_dir": cfg.output_dir}
    for group, key in (("callbacks", "dirpath"), ("callbacks", "store_dir"), ("logger", "save_dir")):
        folders.update({f"{group}.{name}.{key}": conf[key] for name, conf in cfg[group].items() if conf.get(key)})
    for key, folder in folders.items():
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise OSError(f"{key}={folder} cannot be written ({type(err).__name__}: {err.strerror or err}); "
                          f"choose a writable folder") from err


def preflight(cfg: DictConfig, datamodule: ClassificationDataModule, module: GCClassifier,
              callbacks: dict[str, pl.Callback], trainer: pl.Trainer) -> None:
    """Every cross-object rule of a training run; sets each process's share of the batch."""
    datamodule.set_world_size(trainer.world_size)
    module.objective.check_data(datamodule, module.hparams.model, trainer.world_size)
    if cfg.scheduler.name == "cosine" and (trainer.max_epochs is None or trainer.max_epochs < 1):
        raise ConfigError([("trainer.max_epochs", f"{trainer.max_epochs}: scheduler=cosine decays over "
                            f"trainer.max_epochs, which must be >= 1 (or use another scheduler)")])
    check_checkpoint_monitors(callbacks, datamodule.multilabel, trainer)
    warn_unaligned_evaluations(callbacks, trainer)
