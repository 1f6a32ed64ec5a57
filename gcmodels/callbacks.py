"""The training run's checkpoint and safety callbacks: checkpoint files that are never left
half-written, step checkpoints, a stop (or a skipped step) on a non-finite loss or gradient, and
a checkpoint on Ctrl-C. What each guards against, and the test that shows it:
docs/reliability.md."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from gcmodels.files import staged
from gcmodels.options import Options


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in its own folder, syncs it to disk and renames it
    over the destination: the file at the destination is always a complete checkpoint, the old
    one or the new one. Lightning's own save builds its temporary file in the system's temporary
    folder; where that is another filesystem (tmpfs, a local disk beside network storage) its
    rename becomes a copy onto the destination, which a crash or a full disk leaves truncated.
    Other URLs (``s3://``) are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for a local path")
        with staged(path) as partial, partial.open("wb") as handle:
            torch.save(checkpoint, handle)


class StepCheckpointOptions(Options):
    """The options of :class:`EpochAndStepCheckpoint` that Lightning compares without a type check
    (a string would fail with a bare TypeError); Lightning checks the others."""

    model_config = ConfigDict(extra="allow")

    save_top_k: Annotated[int, Field(ge=-1)] = 1
    save_last: bool | None = None
    every_n_train_steps: Annotated[int, Field(ge=1)] | None = None

    @field_validator("every_n_train_steps")
    @classmethod
    def steps_write_last(cls, steps: int | None, info: ValidationInfo) -> int | None:
        if steps is not None and not info.data.get("save_last"):
            raise ValueError("the step checkpoints are last.ckpt: it needs save_last=true")
        return steps


class EpochAndStepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (best by the monitored score, ``last.ckpt``) with ``last.ckpt``
    rewritten at every epoch end, and also every ``every_n_train_steps`` training steps (None:
    never), so that a run killed mid-epoch loses at most that many steps.

    Lightning 2.6 rewrites ``last.ckpt`` only when a top-k checkpoint is saved at the same step:
    after an epoch that does not improve the monitored score, ``last.ckpt`` would still be the best
    epoch's, and resuming from it would silently redo epochs. Its own ``every_n_train_steps``
    replaces the epoch-end saves (the triggers are exclusive) and, while the monitored score has
    not been logged (the whole first epoch), defers every save to the end of validation."""

    options = StepCheckpointOptions

    def __init__(self, *args, save_top_k: int = 1, every_n_train_steps: int | None = None, **kwargs):
        super().__init__(*args, save_top_k=save_top_k, **kwargs)
        self.step_interval = every_n_train_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Not on the epoch's last batch: the epoch-end save follows, and a save at the same global
        # step would suppress it (Lightning saves once per step).
        if self.step_interval and not trainer.global_step % self.step_interval \
                and batch_idx + 1 < trainer.num_training_batches:
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    def _save_last(self, trainer: pl.Trainer) -> None:
        # Skipped where Lightning already saved at this step (a new best writes last.ckpt too).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class NonFiniteOptions(Options):
    mode: Literal["stop", "skip"]
    dirpath: str


def _learning_rates(optimizer) -> str:
    return ", ".join(f"{group['lr']:g}" for group in optimizer.param_groups)


def _nonfinite_names(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    return [name for name, tensor in named if not torch.isfinite(tensor).all()]


def _first_of(names: list[str], kind: str) -> str:
    more = f" (and {len(names) - 1} more parameters)" if len(names) > 1 else ""
    return f"{kind} {names[0]}{more}"


class NonFiniteGuard(pl.Callback):
    """Before every optimiser step, checks the step's loss terms (the module's ``loss_terms``:
    ``train/ce``, ``train/gc``) and every gradient element. On a non-finite value, ``mode=stop`` saves the
    state before the step (weights, optimiser, batch-norm statistics) as
    ``dirpath/nonfinite-stepNNNNNN.ckpt`` and raises an error naming the global step, the term or
    parameter and the learning rate; ``mode=skip`` drops the step (no update, batch-norm statistics
    put back), warns and counts it in ``skipped`` (logged as ``train/nonfinite_skipped``).

    Under mixed precision with a gradient scaler, infinite gradients are the scaler's business (it
    skips those steps and lowers the scale): only the loss terms are checked there. Processes
    agree on every decision, so DDP stops or skips on all of them together."""

    options = NonFiniteOptions

    def __init__(self, mode: str, dirpath: str):
        self.mode = mode
        self.dirpath = Path(dirpath)
        self.skipped = 0
        self._buffers: list[torch.Tensor] | None = None

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict["skipped"])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        # The forward pass updates batch-norm statistics before anything can be checked; with
        # gradient accumulation, the first batch of the optimiser step is the one to go back to.
        if self._buffers is None:
            self._buffers = [buffer.detach().clone() for buffer in pl_module.buffers()]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        buffers, self._buffers = self._buffers, None
        terms = list(getattr(pl_module, "loss_terms", {}).items())
        grads = ([(name, param.grad) for name, param in pl_module.named_parameters() if param.grad is not None]
                 if getattr(trainer.precision_plugin, "scaler", None) is None else [])
        # One synchronisation per step: a sum is non-finite wherever an element is (and, rarely,
        # where huge finite values overflow it), so elements are looked at only then.
        sums = [value.detach().float() for _, value in terms] + [grad.detach().sum(dtype=torch.float32)
                                                                  for _, grad in grads]
        suspect = bool(sums) and not bool(torch.stack(sums).isfinite().all())
        what = [f"{name} = {float(value)}" for name, value in terms if suspect and not torch.isfinite(value)]
        bad_grads = _nonfinite_names(grads) if suspect else []
        if bad_grads:
            what.append(_first_of(bad_grads, "the gradient of"))
        if trainer.strategy.reduce_boolean_decision(bool(what), all=False):
            self._stop_or_skip(trainer, pl_module, optimizer, buffers, what)
        if self.mode == "skip":
            pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=False, on_epoch=True, reduce_fx="max")

    def _stop_or_skip(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer,
                      buffers: list[torch.Tensor] | None, what: list[str]) -> None:
        if buffers is not None:
            for buffer, saved in zip(pl_module.buffers(), buffers):
                buffer.copy_(saved)
        message = (f"non-finite {', '.join(what) or 'value on another process'} at global step {trainer.global_step} "
                   f"(epoch {trainer.current_epoch}), learning rate {_learning_rates(optimizer)}")
        bad_params = _nonfinite_names(list(pl_module.named_parameters()))
        if bad_params:
            message += (f"; {_first_of(bad_params, 'parameter')} was already non-finite before this step: an earlier "
                        f"update overflowed (finite gradients times too large a learning rate)")
        if self.mode == "skip" and not bad_params:
            for param in pl_module.parameters():
                param.grad = None  # the optimiser leaves a parameter without gradient untouched
            self.skipped += 1
            rank_zero_warn(f"{message}: step skipped ({self.skipped} so far)")
            return
        path = self.dirpath / f"nonfinite-step{trainer.global_step:06d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        advice = ("skipping cannot help once the weights are non-finite" if bad_params
                  else "callbacks.nonfinite.mode=skip skips such steps instead")
        raise FloatingPointError(f"{message}. Training stopped; the state before this step (weights, optimiser, "
                                 f"batch-norm statistics) is saved in {path}; {advice}")


class InterruptCheckpoint(pl.Callback):
    """Ctrl-C (SIGINT) during training finishes the training step under way, saves
    ``dirpath/last.ckpt`` (a resumable checkpoint, written as every other) and stops the run
    through Lightning's own KeyboardInterrupt path; a second Ctrl-C stops at once, without one.
    ``saved`` is the checkpoint written, if any.

    Lightning alone turns Ctrl-C into a KeyboardInterrupt wherever the program is, possibly in
    the middle of an optimiser step; a checkpoint written then could hold half-updated weights.
    A Ctrl-C during validation or the epoch-end callbacks lets them finish (the epoch's own
    checkpoints are written as usual) and stops after the next training step."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self._requested = False
        self._previous: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self._previous = signal.signal(signal.SIGINT, self._request)

    def _request(self, signum, frame) -> None:
        self._requested = True
        self._restore_handler()
        rank_zero_info("\nCtrl-C: stopping after this training step, with a checkpoint (Ctrl-C again: at once, "
                       "without one)")

    def _restore_handler(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        self.saved = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(self.saved, weights_only=False)
        rank_zero_info(f"Ctrl-C: checkpoint after global step {trainer.global_step} saved in {self.saved}")
        raise KeyboardInterrupt

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
