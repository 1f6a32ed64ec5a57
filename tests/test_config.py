"""The Hydra configs compose as documented: each default lives in one place, derived values follow
the choices they depend on, the evaluation settings are one object shared by every user, every
experiment builds the paper's run, and the batch is global."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import train  # also registers the validation_metric resolver, as running train.py does
from datamodules import build_datamodule
from datamodules.voc import VOC_CLASSES
from evaluation.callbacks import ExplanationMetricsCallback, FGSMRobustnessCallback
from evaluation.settings import EvaluationSettings, default_settings
from gcmodels.config import check_config, train_schema
from gcmodels.objectives import OBJECTIVES
from gcmodels.options import ConfigError
from tests.conftest import ROOT
from tests.formats import write_cub, write_voc
from tests.test_datamodules import imagenet_tree, write_coco_split


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def check_train_config(*overrides: str):
    """The train config with ``overrides`` validated as train.py does, its folders out of Hydra's
    (unset) run directory."""
    return check_config(compose_config("train", "output_dir=/nowhere", "data.data_dir=/nowhere", *overrides),
                        train_schema())


@pytest.mark.parametrize("model, lr", [("resnet18", 0.1), ("resnet50", 0.1), ("alexnet", 0.01)])
def test_sgd_recipes_take_the_papers_learning_rate_of_the_architecture(model, lr):
    for optimizer in ("sgd", "imagenet"):
        cfg = compose_config("train", f"model={model}", f"optimizer={optimizer}")
        assert cfg.optimizer.lr == lr and cfg.optimizer.name == "sgd"
    assert compose_config("train", f"model={model}", "data=coco").optimizer.lr == 0.01  # COCO fine-tunes
    assert set(compose_config("train", f"model={model}").model) == {"name", "pooling", "pretrained", "output_stride",
                                                                     "init_from"}
    assert compose_config("train", f"model={model}").model.init_from is None


@pytest.mark.parametrize("data, metric", [("synthetic", "val/acc"), ("imagenet", "val/acc"), ("coco", "val/f1")])
def test_checkpoints_watch_the_data_sets_validation_score(data, metric):
    cfg = compose_config("train", f"data={data}")
    assert cfg.callbacks.model_checkpoint.monitor == metric
    assert "monitor" not in cfg.data


def test_losses_carry_only_their_own_options():
    assert OmegaConf.to_container(compose_config("train", "loss=ce").loss) == {"name": "ce"}
    gc_options = {field.alias or name for name, field in OBJECTIVES["gc"].options.model_fields.items()}
    assert set(compose_config("train", "loss=gc").loss) == gc_options


def test_one_settings_object_for_the_callbacks_and_the_evaluation_script():
    cfg = compose_config("train", "seed=7", "data.batch_size=5", "evaluation.fgsm_eps=[2,4]")
    callbacks = {name: instantiate(cfg.callbacks[name]) for name in ("explanation_metrics", "fgsm_robustness")}
    assert isinstance(callbacks["explanation_metrics"], ExplanationMetricsCallback)
    assert isinstance(callbacks["fgsm_robustness"], FGSMRobustnessCallback)
    expected = EvaluationSettings(protocol="standard", short_side=448, tolerance=15, tolerance_at=224, spg_samples=100,
                                  spg_runs=5, fgsm_eps=(2.0, 4.0), fgsm_space="pixel", seed=7, batch_size=5,
                                  noise_seeds=3)
    assert all(callback.settings == expected for callback in callbacks.values())
    evaluate = compose_config("evaluate", "ckpt_path=x.ckpt", "seed=7", "data.batch_size=5",
                              "evaluation.fgsm_eps=[2,4]")
    assert instantiate(evaluate.evaluation) == expected
    assert default_settings(seed=7, batch_size=5, fgsm_eps=[2, 4]) == expected
    # The FGSM eps list is written once, in conf/evaluation/default.yaml.
    eps_files = [path.relative_to(ROOT) for path in (ROOT / "conf").rglob("*.yaml") if "[1, 2, 8" in path.read_text()]
    assert eps_files == [Path("conf/evaluation/default.yaml")]


@pytest.mark.parametrize("override, key", [
    ("evaluation.tolerance=0", "evaluation.tolerance"), ("evaluation.spg_runs=1", "evaluation.spg_runs"),
    ("evaluation.fgsm_eps=[1,-2]", "evaluation.fgsm_eps.1"),
    ("evaluation.tolerance_at=abc", "evaluation.tolerance_at")])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        check_train_config(override)
    assert error.value.keys == [key]


EXPERIMENTS = sorted(path.stem for path in (ROOT / "conf" / "experiment").glob("*.yaml"))
# The GC paper's runs; the others are the field's benchmarks (TorchRay's pointing table, CUB).
PAPER_EXPERIMENTS = [name for name in EXPERIMENTS if name.startswith(("imagenet_", "coco_"))]
POINTING_EXPERIMENTS = [f"pointing_{data}_{arch}" for data in ("voc2007", "coco") for arch in ("vgg16", "resnet50")]
CUB_EXPERIMENTS = [f"cub_resnet50_{variant}" for variant in ("baseline", "gc", "cgc")]


def test_one_experiment_per_paper_run_and_benchmark():
    imagenet = [f"imagenet_{arch}_{variant}" for arch in ("resnet18", "resnet50", "alexnet")
                for variant in ("baseline", "gc")]
    imagenet += [f"imagenet_{arch}_{variant}" for arch in ("resnet18", "resnet50") for variant in ("gmp", "gmp_gc")]
    assert PAPER_EXPERIMENTS == sorted(imagenet + ["coco_resnet18_baseline", "coco_resnet18_gc"])
    assert EXPERIMENTS == sorted(PAPER_EXPERIMENTS + POINTING_EXPERIMENTS + CUB_EXPERIMENTS)


def learning_rates(module, epochs: int) -> list[float]:
    """The learning rate of each epoch, as the epoch-interval scheduler sets it."""
    schedule = module.configure_optimizers()
    optimizer, scheduler = schedule["optimizer"], schedule["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_every_experiment_builds_the_papers_run(name, tmp_path):
    data, arch, variant = name.split("_", 2)
    overrides = [f"experiment={name}", f"data.data_dir={tmp_path}", "data.num_workers=0"]
    if data == "coco":
        overrides.append("model.init_from=imagenet.ckpt")
    cfg = compose_config("train", *overrides)
    if data == "coco":
        write_coco_split(tmp_path, cfg.data.val_split)
    else:
        imagenet_tree(tmp_path)
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    module = train.build_module(cfg, datamodule)
    hparams = module.hparams
    gc = variant.endswith("gc")
    assert cfg.data.name == data and cfg.trainer.strategy == "ddp"
    assert hparams.model == {"name": arch, "pooling": "max" if "gmp" in variant else "avg", "pretrained": False,
                             "output_stride": 16 if arch == "alexnet" else 32,
                             "init_from": "imagenet.ckpt" if data == "coco" else None}
    assert hparams.loss["name"] == ("gc" if gc else "ce")
    if gc:
        assert hparams.loss["lambda"] == (1.0 if data == "coco" else 25.0)
    assert {key: hparams.optimizer[key] for key in ("name", "momentum", "weight_decay")} == {
        "name": "sgd", "momentum": 0.9, "weight_decay": 1e-4}
    if data == "coco":  # fine-tuning: lr 0.01, x0.1 at epochs 24 and 30 of 36; our global batch of 64
        assert (cfg.trainer.max_epochs, cfg.data.batch_size) == (36, 64)
        expected = [0.01] * 24 + [0.001] * 6 + [0.0001] * 6
    else:  # the architecture's lr (AlexNet 0.01), x0.1 every 30 epochs of 90; the paper's global 256
        assert (cfg.trainer.max_epochs, cfg.data.batch_size) == (90, 256)
        lr = 0.01 if arch == "alexnet" else 0.1
        expected = [lr] * 30 + [lr / 10] * 30 + [lr / 100] * 30
    assert learning_rates(module, cfg.trainer.max_epochs) == pytest.approx(expected)


@pytest.mark.parametrize("name", POINTING_EXPERIMENTS + CUB_EXPERIMENTS)
def test_every_benchmark_experiment_builds_its_run(name, tmp_path):
    """TorchRay's pointing networks fine-tune torchvision's ImageNet weights with BCE; the CUB runs
    fine-tune an ImageNet checkpoint of this project with CE, GC or CGC."""
    pointing = name.startswith("pointing_")
    data, arch = name.split("_")[1:3] if pointing else ("cub", "resnet50")
    cfg = compose_config("train", f"experiment={name}", f"data.data_dir={tmp_path}", "model.init_from=imagenet.ckpt")
    assert cfg.model.pretrained == pointing and cfg.data.name == data and cfg.trainer.strategy == "ddp"
    check_train_config(f"experiment={name}", "model.init_from=imagenet.ckpt")
    # Built without torchvision's weights (no download here): the config is what is checked.
    cfg.model.pretrained = False
    {"voc2007": lambda: write_voc(tmp_path, VOC_CLASSES), "coco": lambda: write_coco_split(tmp_path, "val2014"),
     "cub": lambda: write_cub(tmp_path)}[data]()
    module = train.build_module(cfg, build_datamodule(OmegaConf.to_container(cfg.data, resolve=True)))
    hparams = module.hparams
    assert hparams.model["name"] == arch and cfg.data.batch_size == 64
    assert hparams.optimizer["name"] == "sgd" and hparams.optimizer["lr"] == 0.01
    if pointing:
        assert hparams.loss["name"] == "ce" and cfg.model.get("batch_norm", False) is False
    else:
        variant = name.rsplit("_", 1)[1]
        assert hparams.loss["name"] == {"baseline": "ce", "gc": "gc", "cgc": "cgc"}[variant]
        assert hparams.model["init_from"] == "imagenet.ckpt"
    if data == "coco":
        assert learning_rates(module, 36) == pytest.approx([0.01] * 24 + [0.001] * 6 + [0.0001] * 6)
    else:  # cosine decay to 0 over the run (it takes the length from the trainer)
        assert hparams.scheduler == {"name": "cosine", "eta_min": 0.0}
        assert cfg.trainer.max_epochs == (20 if data == "voc2007" else 60)


@pytest.mark.parametrize("variant", ["baseline", "gc"])
def test_a_coco_experiment_needs_its_imagenet_checkpoint(variant, tmp_path, monkeypatch):
    variable = f"IMAGENET_RESNET18_{variant.upper()}_CKPT"
    monkeypatch.delenv(variable, raising=False)
    cfg = compose_config("train", f"experiment=coco_resnet18_{variant}", f"data.data_dir={tmp_path}")
    write_coco_split(tmp_path, cfg.data.val_split)
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    with pytest.raises(ConfigError) as error:
        check_train_config(f"experiment=coco_resnet18_{variant}")
    assert error.value.keys == ["model.init_from"] and variable in str(error.value)
    monkeypatch.setenv(variable, "imagenet.ckpt")
    assert train.build_module(cfg, datamodule).hparams.model["init_from"] == "imagenet.ckpt"


def test_multistep_milestones_are_required_and_checked():
    with pytest.raises(ConfigError) as error:
        check_train_config("scheduler=multistep")
    assert error.value.keys == ["scheduler.milestones"]
    for milestones, key in (("[30,24]", "scheduler.milestones"), ("[]", "scheduler.milestones"),
                            ("[0,3]", "scheduler.milestones.0"), ("'24'", "scheduler.milestones")):
        with pytest.raises(ConfigError) as error:
            check_train_config("scheduler=multistep", f"scheduler.milestones={milestones}")
        assert error.value.keys == [key]


@pytest.mark.parametrize("batch_size, world_size, per_process", [(256, 1, 256), (256, 8, 32), (6, 2, 3), (64, 16, 4)])
def test_the_batch_is_global(batch_size, world_size, per_process, tmp_path):
    datamodule = build_datamodule(OmegaConf.to_container(
        compose_config("train", f"data.batch_size={batch_size}", f"data.data_dir={tmp_path}").data, resolve=True))
    datamodule.set_world_size(world_size)
    assert datamodule.batch_size == per_process


@pytest.mark.parametrize("batch_size, world_size", [(256, 3), (1, 2), (6, 4)])
def test_a_global_batch_that_does_not_divide_is_refused(batch_size, world_size, tmp_path):
    datamodule = build_datamodule(OmegaConf.to_container(
        compose_config("train", f"data.batch_size={batch_size}", f"data.data_dir={tmp_path}").data, resolve=True))
    with pytest.raises(ConfigError) as error:
        datamodule.set_world_size(world_size)
    assert error.value.keys == ["data.batch_size"]
