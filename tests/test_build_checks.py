"""Config values that are legal one by one but wrong together are refused when the run is built
(train.build_run, or train.run before fitting), naming the keys, before any data is generated or
read: a checkpoint monitor that is never logged or is ranked the wrong way, GC composites that
the batch or the image size cannot make, a resume with other training settings. Evaluation
callbacks that would never run before the last epoch are warned about."""
from __future__ import annotations

import warnings

import pytest
import torch
from hydra.utils import instantiate

import train
from evaluation.metrics.registry import score_of
from gcmodels.checkpoints import check_resume_compatible
from gcmodels.networks import build_network
from gcmodels.options import ConfigError
from gcmodels.preflight import validation_scores
from losses import random_layout, shared_layout
from tests.conftest import TINY, assert_ok, logged_metrics, read_summary
from tests.conftest import train as run_train
from tests.test_config import compose_config
from tests.test_config_values import train_base
from tests.test_datamodules import write_coco_split


def build(tmp_path, *overrides: str):
    return train.build_run(compose_config("train", *train_base(tmp_path, *overrides)))


def refused(tmp_path, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        build(tmp_path, *overrides)
    assert not (tmp_path / "data").exists()
    return error.value


@pytest.mark.parametrize("monitor, mode", [("val/loss", "min"), ("explain/nqh", "min"), ("explain/pg", "max"),
                                           ("val/acc", "max")])
def test_the_checkpoint_mode_must_be_the_monitored_scores_direction(tmp_path, monitor, mode):
    wrong = "max" if mode == "min" else "min"
    error = refused(tmp_path, f"callbacks.model_checkpoint.monitor={monitor}",
                    f"callbacks.model_checkpoint.mode={wrong}")
    assert error.keys == ["callbacks.model_checkpoint.mode"]
    build(tmp_path, f"callbacks.model_checkpoint.monitor={monitor}", f"callbacks.model_checkpoint.mode={mode}")


def test_a_multilabel_runs_checkpoint_watches_its_f1(tmp_path):
    cfg = compose_config("train", *train_base(tmp_path, "data=coco"))
    write_coco_split(tmp_path / "data", cfg.data.val_split)
    build(tmp_path, "data=coco", "callbacks.model_checkpoint.monitor=val/f1_per_class")
    with pytest.raises(ConfigError) as error:
        build(tmp_path, "data=coco", "callbacks.model_checkpoint.monitor=val/acc")
    assert error.value.keys == ["callbacks.model_checkpoint.monitor"]


@pytest.mark.parametrize("overrides, unlogged", [
    (["callbacks.model_checkpoint.monitor=val/accuracy"], "val/accuracy"),  # a typo
    (["callbacks.model_checkpoint.monitor=train/loss"], "train/loss"),  # logged, but not at validation
    (["~callbacks.explanation_metrics", "callbacks.model_checkpoint.monitor=explain/pg"], "explain/pg"),
])
def test_a_monitor_that_is_not_logged_at_validation_is_refused(tmp_path, overrides, unlogged):
    assert refused(tmp_path, *overrides).keys == ["callbacks.model_checkpoint.monitor"]


@pytest.mark.parametrize("logged", ["explain/skipped/pg", "explain/spg_std", "explain/pg_center"])
def test_a_count_a_spread_or_a_reference_is_not_a_score_to_monitor(tmp_path, logged):
    assert (refused(tmp_path, f"callbacks.model_checkpoint.monitor={logged}").keys
            == ["callbacks.model_checkpoint.monitor"])


@pytest.mark.parametrize("monitor", ["step", "epoch"])
def test_lightnings_own_counters_may_be_monitored_in_either_mode(tmp_path, monitor):
    """monitor=step with mode=max keeps the latest checkpoints: Lightning's usual way."""
    for mode in ("max", "min"):
        build(tmp_path, f"callbacks.model_checkpoint.monitor={monitor}", f"callbacks.model_checkpoint.mode={mode}")


def test_a_monitored_explanation_metric_must_be_logged_at_every_validation(tmp_path):
    error = refused(tmp_path, "callbacks.model_checkpoint.monitor=explain/pg",
                    "callbacks.explanation_metrics.every_n_epochs=2")
    assert error.keys == ["callbacks.explanation_metrics.every_n_epochs"]
    build(tmp_path, "callbacks.model_checkpoint.monitor=explain/pg", "callbacks.explanation_metrics.every_n_epochs=2",
          "+trainer.check_val_every_n_epoch=2")


@pytest.mark.slow
def test_the_scores_a_run_is_checked_against_are_those_it_logs(tmp_path, data_dir):
    """The scores build_run derives are the columns a run writes that rank models (the others:
    counts, spreads, reference maps); a run checkpointed by the lowest explain/nqh saves its best
    checkpoint."""
    monitor = ["callbacks.model_checkpoint.monitor=explain/nqh", "callbacks.model_checkpoint.mode=min"]
    assert_ok(run_train(tmp_path / "run", data_dir, *monitor))
    read_summary(tmp_path / "run")
    columns = set().union(*logged_metrics(tmp_path / "run"))
    cfg = compose_config("train", f"output_dir={tmp_path / 'out'}", f"data.data_dir={data_dir}", *TINY, *monitor)
    datamodule, _, _ = train.build_run(cfg)
    callbacks = {name: instantiate(conf) for name, conf in cfg.callbacks.items()}
    scores = validation_scores(datamodule.multilabel, callbacks)
    assert set(scores) == {column for column in columns
                           if column.startswith("val/") or column.startswith("explain/")
                           and score_of(column.removeprefix("explain/"))}
    assert {name for name, (higher, _) in scores.items() if not higher} == {"val/loss", "explain/nqh",
                                                                             *(f"explain/fgsm_success/eps={eps}"
                                                                               for eps in cfg.evaluation.fgsm_eps)}


def test_gc_needs_images_to_compose_in_each_processs_batch(tmp_path):
    # What the check prevents: a lone image has no distractor, and fewer than 4 share no composite.
    assert not random_layout(torch.tensor([0]), 3).valid.any()
    assert shared_layout(torch.arange(3), 3).groups.unique().numel() == 3
    for overrides in (["data.batch_size=1"], ["data.batch_size=2", "trainer=ddp_cpu"],
                      ["data.batch_size=3", "loss.composites=shared"]):
        assert refused(tmp_path, *overrides).keys == ["data.batch_size"]
    # Distractors loaded with each sample, or no composite at all: one image is enough.
    build(tmp_path, "data.batch_size=1", "loss.composite_source=dataset")
    build(tmp_path, "data.batch_size=1", "loss=ce")
    build(tmp_path, "data.batch_size=4", "loss.composites=shared")


@pytest.mark.parametrize("overrides, size, stride", [
    (["model.output_stride=32"], 80, 32),  # the synthetic default's 80 px: 2.5 cells
    (["data.image_size=72"], 72, 16),
    (["model=alexnet", "data.image_size=72"], 72, 16),
])
def test_gc_needs_an_image_side_that_is_a_whole_number_of_cells(tmp_path, overrides, size, stride):
    error = refused(tmp_path, *overrides)
    assert error.keys == ["data.image_size"] and f"model.output_stride={stride}" in str(error)
    build(tmp_path, *overrides, "loss=ce")


@pytest.mark.parametrize("name, stride, size", [("resnet18", 8, 64), ("resnet18", 16, 80), ("resnet18", 32, 96),
                                                ("alexnet", 16, 64), ("alexnet", 16, 224)])
def test_at_a_multiple_of_the_stride_a_composites_map_holds_its_four_images_maps(name, stride, size):
    """The rule the check enforces is enough for composite_target: the composite's map is at least
    two image maps wide (ResNet: exactly; AlexNet: with a seam)."""
    net = build_network(name, 3, output_stride=stride).eval()
    with torch.no_grad():
        side = net.forward_features(torch.zeros(1, 3, size, size)).shape[-1]
        composite = net.forward_features(torch.zeros(1, 3, 2 * size, 2 * size)).shape[-1]
    assert composite >= 2 * side and (name == "alexnet" or composite == 2 * side)
    assert side == (size // stride if name == "resnet18" else size // stride - 1)


def test_evaluation_callbacks_that_never_run_before_the_last_epoch_are_warned_about(tmp_path):
    with pytest.warns(UserWarning, match=r"callbacks.explanation_metrics.every_n_epochs=3 with "
                                         r"trainer.check_val_every_n_epoch=1: .* first run at epoch 3, after the last "
                                         r"\(trainer.max_epochs=2\)"):
        build(tmp_path, "callbacks.explanation_metrics.every_n_epochs=3", "trainer.max_epochs=2")
    with pytest.warns(UserWarning, match=r"callbacks.fgsm_robustness.every_n_epochs=2 with "
                                         r"trainer.check_val_every_n_epoch=3: .* first run at epoch 6"):
        build(tmp_path, "callbacks.fgsm_robustness.every_n_epochs=2", "+trainer.check_val_every_n_epoch=3")
    for aligned in (["callbacks.explanation_metrics.every_n_epochs=3", "trainer.max_epochs=3"],
                    ["callbacks.explanation_metrics.every_n_epochs=3", "trainer.max_epochs=-1", "scheduler=none"]):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="callbacks.")
            build(tmp_path, *aligned)


def test_resuming_with_other_training_settings_is_refused(tmp_path):
    base = [*TINY, "trainer.max_epochs=2"]
    _, module, _ = build(tmp_path, *base)
    path = tmp_path / "saved.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    changed = ["optimizer.lr=0.5", "scheduler.eta_min=0.0001", "loss.lambda=1"]
    with pytest.raises(ValueError) as error:
        train.run(compose_config("train", *train_base(tmp_path, *base, f"ckpt_path={path}", *changed)))
    message = str(error.value)
    assert not (tmp_path / "data").exists()
    for difference in ("optimizer.lr: checkpoint has 0.001, config has 0.5",
                       "scheduler.eta_min: checkpoint has 0.0, config has 0.0001",
                       "loss.lambda: checkpoint has 25.0, config has 1"):
        assert difference in message
    assert f"model.init_from={path} instead of ckpt_path" in message
    with pytest.raises(ValueError) as error:
        train.run(compose_config("train", *train_base(tmp_path, *base, f"ckpt_path={path}", "loss=ce")))
    message = str(error.value)
    assert "loss.name: checkpoint has 'gc', config has 'ce'" in message
    assert "loss.lambda: checkpoint has 25.0, config has no such key" in message
    # The trainer's settings may change (trainer.max_epochs: a longer run).
    _, longer, _ = build(tmp_path, *base, "trainer.max_epochs=4")
    check_resume_compatible(path, longer.hparams.model, longer.hparams.num_classes, longer.hparams.multilabel,
                            {group: longer.hparams[group] for group in train.RESUMED_GROUPS})
    # A checkpoint older than the loss config dict: its options are compared with what its run did
    # (upgrade_hparams), so today's default loss.positive=instances differs; its own value resumes.
    loss = dict(module.hparams.loss)
    older = {**module.hparams, "loss": "gc", "lam": loss["lambda"], "cam_mode": loss["cam_mode"],
             "detach_target": loss["detach_target"]}
    torch.save({"hyper_parameters": older, "state_dict": module.state_dict()}, path)
    settings = {group: dict(longer.hparams[group]) for group in train.RESUMED_GROUPS}
    with pytest.raises(ValueError, match="loss.positive: checkpoint has 'labels', config has 'instances'"):
        check_resume_compatible(path, longer.hparams.model, longer.hparams.num_classes, longer.hparams.multilabel,
                                settings)
    check_resume_compatible(path, longer.hparams.model, longer.hparams.num_classes, longer.hparams.multilabel,
                            {**settings, "loss": {**settings["loss"], "positive": "labels"}})


def test_cgc_needs_negatives_in_each_processs_batch_and_single_label_data(tmp_path):
    for overrides in (["data.batch_size=1"], ["data.batch_size=2", "trainer=ddp_cpu"]):
        assert refused(tmp_path, "loss=cgc", *overrides).keys == ["data.batch_size"]
    # The mean squared ablation has no negatives; any image side will do (the maps are upsampled).
    build(tmp_path, "loss=cgc", "data.batch_size=1", "loss.contrast=false", "data.image_size=72")
    cfg = compose_config("train", *train_base(tmp_path, "data=coco"))
    write_coco_split(tmp_path / "data", cfg.data.val_split)
    with pytest.raises(ConfigError) as error:
        build(tmp_path, "data=coco", "loss=cgc", "callbacks.model_checkpoint.monitor=val/f1_per_class")
    assert error.value.keys == ["loss.name"] and "data.name=coco is multi-label" in str(error.value)
