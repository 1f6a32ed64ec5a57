"""Options that used to fail only after training: those of the one-command reproduction's later
steps (evaluation, consensus, report), refused by ``plan``, and the committee of the training's
consensus callback, refused before the first training step. The report step on hand-made step
outputs."""
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

import reproduce
import train
from gcmodels.module import GCClassifier
from gcmodels.options import ConfigError
from gcmodels.preflight import check_writable
from reproduce import consensus_arguments, evaluation_arguments, plan
from tests.conftest import TINY
from tests.test_config import compose_config
from tests.test_config_values import train_base


@pytest.mark.parametrize("overrides, keys", [
    (["little_top1=3"], ["little_top1"]), (["little_top1=-0.01"], ["little_top1"]),
    (["little_top1=abc"], ["little_top1"]),
    (["heatmap_images=-1"], ["heatmap_images"]), (["seed=-1"], ["seed", "evaluation.seed"]),
    (["seeds=[]"], ["seeds"]), (["seeds=[0,1,0]"], ["seeds"]), (["seeds=[0,-1]"], ["seeds.1"]),
    (["seeds=3"], ["seeds"]),
    (["epochs=0"], ["epochs"]), (["image_size=abc"], ["image_size"]), (["batch_size=0"], ["batch_size"]),
    (["train_per_class=0"], ["train_per_class"]), (['data_overrides="data.val_per_class=5"'], ["data_overrides"]),
    (["~variants.gmp"], ["variants"]), (['variants.gc="loss=gc"'], ["variants.gc"]),
    # The evaluation and consensus steps' settings, as they will check them; a null batch_size is
    # allowed here (each step's data batch) and nowhere else.
    (["evaluation.spg_runs=1"], ["evaluation.spg_runs"]), (["evaluation.batch_size=0"], ["evaluation.batch_size"]),
    (["+explainer.colour=red"], ["explainer.colour"]), (["explainer.name=nope"], ["explainer.name"]),
    (["consensus_explainer=limee"], ["consensus_explainer"]),
    # The consensus step selects it as a config group: a name, not a mapping of options.
    (["consensus_explainer={name:lime}"], ["consensus_explainer"]),
    (["consensus=no"], ["consensus"]), (["+epoch=3"], ["epoch"]),
    # Every refused value at once.
    (["little_top1=3", "seeds=[1,1]", "evaluation.tolerance=0"], ["little_top1", "seeds", "evaluation.tolerance"]),
    # Rules across the steps.
    (["evaluation.protocol=authors"], ["evaluation.protocol"]),
    (['gc_overrides=["loss.composites=shared"]', 'variants.gc=["loss=ce"]', 'variants.gmp_gc=["loss=ce"]'],
     ["gc_overrides"]),
    # As the evaluation steps will resolve it: not a device, or one past the last CUDA device of
    # this machine (cuda:0 on a machine without one).
    (["device=gpu"], ["device"]), ([f"device=cuda:{torch.cuda.device_count()}"], ["device"]),
])
def test_plan_refuses_what_a_later_step_would_refuse(tmp_path, overrides, keys):
    with pytest.raises(ConfigError) as err:
        plan(compose_config("reproduce", f"output_dir={tmp_path}", *overrides))
    assert sorted(err.value.keys) == sorted(keys)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides", [
    ["little_top1=0"], ["heatmap_images=0"], ["evaluation.batch_size=5"], ["consensus_explainer=lime"],
    ["epochs=2", "image_size=48", "batch_size=8", "train_per_class=3", "data_dir=somewhere"],
    # Only the consensus is limited to the standard geometry; without it the authors' protocol runs.
    ["evaluation.protocol=authors", "consensus=false"],
])
def test_plan_takes_valid_step_options(tmp_path, overrides):
    assert len(plan(compose_config("reproduce", f"output_dir={tmp_path}", *overrides))) == 18  # 6 variants x 3 seeds


def test_an_evaluation_batch_size_reaches_the_evaluation_and_consensus_steps(tmp_path):
    """It was dropped: every step used the data's batch whatever evaluation.batch_size said."""
    for value, passed in (("null", []), ("5", ["evaluation.batch_size=5"])):
        cfg = compose_config("reproduce", f"output_dir={tmp_path}", f"evaluation.batch_size={value}")
        runs = plan(cfg)
        evaluation = OmegaConf.to_container(cfg.evaluation, resolve=True)
        explainer = OmegaConf.to_container(cfg.explainer, resolve=True)
        for arguments in (evaluation_arguments(cfg, runs[0], evaluation, explainer),
                          consensus_arguments(cfg, runs, evaluation)):
            assert [item for item in arguments if item.startswith("evaluation.batch_size=")] == passed


def step_result(acc: float, **extra) -> dict:
    return {"acc": acc, "pg": 0.5, "spg": 0.5, "ch": 0.5, "nqh": 0.5, "fgsm": {"eps=0": acc, "eps=8": acc / 2},
            **{f"{key}_{reference}": 0.25 for key in ("pg", "spg", "ch") for reference in ("center", "noise")},
            **extra}


def faithfulness_result(run) -> dict:
    """A faithfulness step's results: GC's insertion a point above the baseline's on each seed."""
    insertion = 0.6 + (0.01 if run.variant == "gc" else 0.0) + 0.02 * run.seed
    return {"insertion": insertion, "insertion_others": 0.5, "insertion_minus_others": insertion - 0.5,
            "deletion": 0.2, "deletion_others": 0.25, "deletion_minus_others": -0.05, "mprt": 0.3,
            "mprt_unchanged": 0.0, "insertion_center": 0.55, "insertion_others_center": 0.55,
            "insertion_minus_others_center": 0.0, "skipped": {"mprt": 0}}


def write_step_outputs(cfg, result_of) -> list:
    """What the training, evaluation and faithfulness steps leave, written by hand:
    ``result_of(run)`` is the run's evaluation results."""
    saved = {"model": {"name": "resnet18", "output_stride": 16}, "trainer": {"max_epochs": 1},
             "data": {"image_size": 64, "train_per_class": 4, "batch_size": 6}}
    runs = plan(cfg)
    for run in runs:
        loss = next(item.split("=", 1)[1] for item in cfg.variants[run.variant] if item.startswith("loss="))
        saved["loss"] = {"name": loss, **({} if loss == "ce" else {"lambda": 25.0})}
        for folder in (run.evaluation_dir, run.faithfulness_dir, run.directory / ".hydra", run.checkpoint.parent):
            folder.mkdir(parents=True)
        run.checkpoint.write_bytes(b"")
        (run.evaluation_dir / "report.json").write_text(json.dumps({"checkpoints": [{"results": result_of(run)}]}))
        (run.faithfulness_dir / "report.json").write_text(json.dumps(
            {"checkpoints": [{"results": faithfulness_result(run)}]}))
        OmegaConf.save(saved, run.directory / ".hydra" / "config.yaml")
    return runs


def test_no_heatmap_images_leave_the_heatmaps_figure_out(tmp_path, monkeypatch):
    """heatmap_images=0 crashed the report, after every step had run; now it means no heatmaps.png,
    as it does for train.py and python -m evaluation."""
    cfg = compose_config("reproduce", f"output_dir={tmp_path}", "seeds=[0]", "heatmap_images=0", "consensus=false")
    write_step_outputs(cfg, lambda run: step_result(0.5))
    monkeypatch.setattr(reproduce, "run_step", lambda *arguments, **options: 0.0)
    summary = reproduce.run(cfg)
    assert set(summary["figures"]) == {"fgsm"} and (tmp_path / "fgsm.png").is_file()
    assert not (tmp_path / "heatmaps.png").exists() and "heatmaps.png" not in (tmp_path / "report.md").read_text()


def correlation(x: str, pearson: float, **extra) -> dict:
    return {"x": x, "y": "accuracy", "n": 3, "pearson": pearson, "pearson_p": 0.5, "spearman": pearson,
            "spearman_p": 0.5, "note": None, **extra}


def test_the_report_gives_retention_success_intervals_and_group_correlations(tmp_path, monkeypatch):
    """On hand-made step outputs: an evaluation report without fgsm_success (older ones) and a seed
    with a clean top-1 of 0 are said so, not crashed on; every number reaches report.json as JSON."""
    cfg = compose_config("reproduce", f"output_dir={tmp_path}", "seeds=[0,1,2]", "heatmap_images=0",
                         "consensus_explainer=gradcam")

    def result_of(run):
        acc = 0.0 if (run.variant, run.seed) == ("gmp_gc", 2) else 0.4 + 0.1 * run.seed
        success = {} if run.variant == "gc" else {"fgsm_success": {"eps=0": 0.0, "eps=8": 0.5}}
        return step_result(acc, **success)

    runs = write_step_outputs(cfg, result_of)
    consensus = tmp_path / "consensus"
    consensus.mkdir()
    members = [{"checkpoint": str(run.checkpoint), "rank": rank, "consensus_score": 0.1, "accuracy": 0.5}
               for rank, run in enumerate(runs, 1)]
    (consensus / "consensus.json").write_text(json.dumps({
        "summary": {}, "members": members, "correlations": [correlation("consensus_score", 0.84)],
        "group_correlations": [correlation("consensus_score", 0.1, group="pooling=avg"),
                               correlation("consensus_score", None, group="pooling=max", note="'accuracy' constant")]}))
    monkeypatch.setattr(reproduce, "run_step", lambda *arguments, **options: 0.0)
    reproduce.run(cfg)
    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    robust = report["fgsm_robustness"]
    assert robust["baseline"]["mean_retention"] == pytest.approx([0.5, 0.5, 0.5])
    assert robust["gmp_gc"]["mean_retention"] == [0.5, 0.5, None]  # clean top-1 0: undefined
    assert robust["gc"]["success"] == [None, None, None] and robust["gmp"]["success"][0]["eps=8"] == 0.5
    fgsm = [claim for claim in report["claims"] if "under FGSM" in claim["claim"]]
    assert [claim["verdict"] for claim in fgsm] == ["does not hold", "inconclusive", "inconclusive"]
    assert fgsm[0]["interval"] == [0.0, 0.0] and fgsm[1]["mean"] is None
    for claim in report["claims"]:
        assert {"interval", "sign_test_p", "differences", "verdict"} <= set(claim)
    markdown = (tmp_path / "report.md").read_text()
    assert "| claim | verdict | mean difference (points) | 95% interval (points) | sign test p |" in markdown
    assert "smallest possible p is 0.25, so it can never reject at 5%" in markdown
    assert "Retention is undefined (clean top-1 0, shown as -) for GMP+GC seed 2" in markdown
    assert "| GC | missing | missing |" in markdown and "has no `fgsm_success`" in markdown
    assert "a Grad-CAM committee" in markdown
    assert "| pooling=max | consensus_score | accuracy | 3 | - (0.5) | - (0.5) | 'accuracy' constant |" in markdown
    assert math.isclose(report["consensus"]["group_correlations"][0]["pearson"], 0.1)
    # Faithfulness: GC's insertion a point above the baseline's on every seed, its deletion equal.
    faithful = {claim["claim"].split(": ")[1]: claim for claim in report["claims"] if "faithful" in claim["claim"]}
    assert faithful["insertion AUC not lower"]["differences"] == pytest.approx([0.01] * 3)
    assert [claim["verdict"] for claim in faithful.values()] == ["holds", "holds"]
    assert "## Faithfulness (60 validation images per checkpoint)" in markdown
    assert "| variant | Insertion | Insertion (others) | Insertion - others | Deletion |" in markdown
    assert "| GC | 63.0 ± 2.0 | 50.0 ± 0.0 | 13.0 ± 2.0 | 20.0 ± 0.0 |" in markdown
    assert "| reference: centred peak | 55.0 | 55.0 | 0.0 | - |" in markdown


def consensus_run(tmp_path, member) -> list[str]:
    return train_base(tmp_path, *TINY, "callbacks=with_consensus", f"callbacks.consensus.committee=[{member}]",
                      f"callbacks.consensus.store_dir={tmp_path / 'store'}", "~callbacks.explanation_metrics",
                      "~callbacks.fgsm_robustness")


def save_member(path, name: str, output_stride: int, num_classes: int, class_names: list | None) -> str:
    """A committee member: an untrained ``name`` network (``class_names`` None: none recorded, as in
    older checkpoints)."""
    model = {"name": name, "pooling": "avg", "pretrained": False, "output_stride": output_stride, "init_from": None}
    member = GCClassifier(model=model, loss={"name": "ce"}, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
                          scheduler={"name": "none"}, num_classes=num_classes, multilabel=False, layout_seed=0,
                          class_names=class_names)
    torch.save({"hyper_parameters": dict(member.hparams), "state_dict": member.state_dict()}, path)
    return str(path)


def test_a_committee_file_that_is_no_checkpoint_fails_when_the_run_is_built(tmp_path):
    member = tmp_path / "member.ckpt"
    member.write_text("not a checkpoint")
    with pytest.raises(Exception, match="callbacks.consensus.committee: not a readable PyTorch checkpoint"):
        train.build_run(compose_config("train", *consensus_run(tmp_path, member)))
    assert not (tmp_path / "data").exists()


def test_a_member_of_other_classes_fails_before_the_first_training_step(tmp_path):
    """It failed at the end of training, in on_fit_end."""
    member = save_member(tmp_path / "member.ckpt", "resnet18", 32, 4, ["a", "b", "c", "d"])
    datamodule, module, trainer = train.build_run(compose_config("train", *consensus_run(tmp_path, member)))
    with pytest.raises(ValueError, match="callbacks.consensus.committee: checkpoint .* has 4 classes, but data "
                                         "'synthetic' has 3"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


def test_an_explainer_layer_the_network_lacks_fails_before_the_first_training_step(tmp_path):
    """It failed at the end of the first training epoch, before any checkpoint was written."""
    datamodule, module, trainer = train.build_run(compose_config("train", *train_base(
        tmp_path, *TINY, "callbacks.explanation_metrics.explainer={name:gradcam,layer:layer9}")))
    with pytest.raises(ValueError, match="callbacks.explanation_metrics.explainer.layer='layer9'"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


def test_a_consensus_explainer_layer_a_member_lacks_fails_before_the_first_training_step(tmp_path):
    """The trained model is a ResNet18 with the layer; the committee's AlexNet (no class names
    recorded, as in older checkpoints) has no ResNet downsample layer."""
    member = save_member(tmp_path / "member.ckpt", "alexnet", 16, 3, None)
    datamodule, module, trainer = train.build_run(compose_config(
        "train", *consensus_run(tmp_path, member), "explainer@callbacks.consensus.explainer=gradcam",
        "callbacks.consensus.explainer.layer=features.5.0.downsample"))
    with pytest.raises(ValueError, match=f"callbacks.consensus.explainer.layer='features.5.0.downsample'.*{member}"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


def test_an_unwritable_consensus_store_fails_before_any_data_is_read(tmp_path):
    """It failed at the end of training, when the first explanation was stored."""
    member = tmp_path / "member.ckpt"
    member.write_bytes(b"")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = compose_config("train", *consensus_run(tmp_path, member), f"callbacks.consensus.store_dir={blocker}/store")
    with pytest.raises(OSError, match=f"callbacks.consensus.store_dir={blocker}/store cannot be written"):
        check_writable(cfg)
    assert not (tmp_path / "data").exists()
