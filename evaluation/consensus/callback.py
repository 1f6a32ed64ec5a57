"""The training callback of the committee consensus: the trained model's consensus score and rank
in a committee of checkpoints, at the end of training (``callbacks=with_consensus``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from evaluation.consensus import committee as committee_lib
from evaluation.consensus import core as consensus_core
from evaluation.consensus.committee import Checkpoints, CommitteeOptions
from evaluation.consensus.store import ExplanationStore
from evaluation.explainers import EXPLAINERS, build_explainer, check_explainer
from evaluation.preflight import check_checkpoint_explainer, check_trained_classes
from evaluation.settings import EvaluationSettings
from gcmodels.checkpoints import read_hparams
from gcmodels.options import plain


class ConsensusCallbackOptions(CommitteeOptions):
    """The options of ``callbacks.consensus`` (``conf/callbacks/with_consensus.yaml``), validated
    by train.py before anything is built: the committee group's, the committee's checkpoints and
    the explainer."""

    committee: Checkpoints
    # The data and evaluation groups (${data}, ${evaluation}): validated as such.
    data: Any
    settings: Any
    # The explainer group, composed by Hydra (explainer@callbacks.consensus.explainer=<name>).
    explainer: EXPLAINERS.union()


class ConsensusCallback(pl.Callback):
    """At the end of training, score the trained model against a committee of checkpoints
    (``committee``: one or more paths): every member and the model explain the same validation
    images with ``explainer``; the model's consensus score (mean similarity to the consensus of all,
    itself included) and its rank among the ``len(committee) + 1`` are logged as
    ``consensus/score`` and ``consensus/rank``. Committee members' explanations come from the store
    of ``python -m evaluation.consensus`` (``store_dir``), shared with the script for the same data,
    explainer and options. Runs on the main process only; its metrics do not sync. Its options are
    validated by train.py (``options``); the constructor checks the files."""

    options = ConsensusCallbackOptions

    def __init__(self, committee: str | Sequence[str], data: Mapping, explainer: Mapping,
                 settings: EvaluationSettings, num_images: int | None, target: str, resolution: int | None,
                 sigma: float, aggregation: str, store_dir: str):
        # The files are checked here, before training: a typo must not cost the run.
        self.committee = committee_lib.find_checkpoints(committee, None)
        missing = [str(path) for path in self.committee if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"callbacks.consensus.committee: checkpoint(s) not found: {missing}")
        # Plain containers: the data config keys the explanation store's digest (JSON).
        self.data = plain(data)
        self.explainer_options = plain(explainer)
        self.explainer = build_explainer(**self.explainer_options)
        self.consensus_options = committee_lib.consensus_options(committee_lib.explanation_kind(self.explainer),
                                                                 sigma, aggregation)
        self.settings = settings
        self.num_images = num_images
        self.target = target
        self.resolution = resolution
        self.store_dir = store_dir
        # Last, as the slowest check: a file that is not a checkpoint of this project. Its classes
        # are compared with the data's in setup, once the data is known.
        self.member_hparams = {}
        for path in self.committee:
            try:
                self.member_hparams[path] = read_hparams(path)
            except ValueError as err:
                raise ValueError(f"callbacks.consensus.committee: {err}") from err

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the first training step, on every process (one refusing alone would leave the
        # others waiting): a member of other classes, or whose network lacks the explainer's
        # layer, must not cost the run.
        check_explainer(self.explainer, pl_module.net, "callbacks.consensus.explainer")
        for path, hparams in self.member_hparams.items():
            try:
                check_trained_classes(path, hparams, trainer.datamodule)
            except ValueError as err:
                raise ValueError(f"callbacks.consensus.committee: {err}") from None
            check_checkpoint_explainer(self.explainer, path, hparams, "callbacks.consensus.explainer")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        # Read now, not at setup: a member's file (another run's last.ckpt) may have been rewritten
        # during the training, and the store keys explanations by the weights' digest.
        members = committee_lib.load_members(self.committee, datamodule, minimum=1)
        images = committee_lib.committee_images(datamodule, self.num_images)
        resolution = committee_lib.effective_resolution(self.resolution, datamodule)
        store = ExplanationStore(self.store_dir, committee_lib.run_settings(
            self.data, self.explainer_options, self.target, resolution, self.settings.batch_size, len(images),
            self.settings.arithmetic))
        shared = committee_lib.stored_shared_arrays(store, images, datamodule, self.explainer, self.settings.batch_size)
        entries = [committee_lib.member_entry(member, store, self.explainer, images, datamodule, shared, self.target,
                                              resolution, self.settings, pl_module.device)[0]
                   for member in members]
        was_training = pl_module.net.training
        pl_module.net.eval()
        try:
            own, _ = committee_lib.explain_member(pl_module.net, self.explainer, images, datamodule, shared,
                                                  self.target, resolution, self.settings.batch_size)
        finally:
            pl_module.net.train(was_training)
        kind = committee_lib.explanation_kind(self.explainer)
        scores = consensus_core.consensus_scores(
            committee_lib.similarities(entries + [own], shared, kind, self.consensus_options))
        results = {"consensus/score": float(scores[-1]), "consensus/rank": float(consensus_core.ranks(scores)[-1]),
                   "consensus/committee_size": float(len(scores))}
        for logger in trainer.loggers:
            logger.log_metrics(results, step=trainer.global_step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in results.items()})
        rank_zero_info("consensus with the committee: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
