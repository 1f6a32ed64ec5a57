"""The Hydra configs compose as documented: each default lives in one place, derived values follow
the choices they depend on, and the evaluation settings are one object shared by every user."""
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import train  # noqa: F401  (registers the validation_metric resolver, as running train.py does)
from evaluation.callbacks import ExplanationMetricsCallback, FGSMRobustnessCallback
from evaluation.settings import CONFIG_FILE, EvaluationSettings, default_settings
from tests.conftest import ROOT


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("model, lr", [("resnet18", 0.1), ("resnet50", 0.1), ("alexnet", 0.01)])
def test_sgd_recipes_take_the_papers_learning_rate_of_the_architecture(model, lr):
    for optimizer in ("sgd", "imagenet"):
        cfg = compose_config("train", f"model={model}", f"optimizer={optimizer}")
        assert cfg.optimizer.lr == lr and cfg.optimizer.name == "sgd"
    assert compose_config("train", f"model={model}", "data=coco").optimizer.lr == 0.01  # COCO fine-tunes
    assert set(compose_config("train", f"model={model}").model) == {"name", "pooling", "pretrained", "output_stride"}


@pytest.mark.parametrize("data, metric", [("synthetic", "val/acc"), ("imagenet", "val/acc"), ("coco", "val/f1")])
def test_checkpoints_watch_the_data_sets_validation_score(data, metric):
    cfg = compose_config("train", f"data={data}")
    assert cfg.callbacks.model_checkpoint.monitor == metric
    assert "monitor" not in cfg.data


def test_losses_carry_only_their_own_options():
    assert OmegaConf.to_container(compose_config("train", "loss=ce").loss) == {"name": "ce"}
    assert set(compose_config("train", "loss=gc").loss) == {"name", "lambda", "cam_mode", "detach_target"}


def test_one_settings_object_for_the_callbacks_and_the_evaluation_script():
    cfg = compose_config("train", "seed=7", "data.batch_size=5", "evaluation.fgsm_eps=[2,4]")
    callbacks = {name: instantiate(cfg.callbacks[name]) for name in ("explanation_metrics", "fgsm_robustness")}
    assert isinstance(callbacks["explanation_metrics"], ExplanationMetricsCallback)
    assert isinstance(callbacks["fgsm_robustness"], FGSMRobustnessCallback)
    expected = EvaluationSettings(tolerance=15, tolerance_at=224, spg_samples=100, spg_runs=5, fgsm_eps=(2.0, 4.0), fgsm_space="pixel",
                                  seed=7, batch_size=5, noise_seeds=3)
    assert all(callback.settings == expected for callback in callbacks.values())
    evaluate = compose_config("evaluate", "ckpt_path=x.ckpt", "seed=7", "data.batch_size=5", "evaluation.fgsm_eps=[2,4]")
    assert instantiate(evaluate.evaluation) == expected
    assert default_settings(seed=7, batch_size=5, fgsm_eps=[2, 4]) == expected
    # The FGSM eps list is written once, in conf/evaluation/default.yaml.
    eps_files = [path.relative_to(ROOT) for path in (ROOT / "conf").rglob("*.yaml") if "[1, 2, 8" in path.read_text()]
    assert eps_files == [CONFIG_FILE.relative_to(ROOT)]


@pytest.mark.parametrize(
    "override, message",
    [("evaluation.tolerance=0", "evaluation.tolerance must be a number > 0, got 0"),
     ("evaluation.spg_runs=1", "evaluation.spg_runs must be an integer >= 2, got 1"),
     ("evaluation.fgsm_eps=[1,-2]", "evaluation.fgsm_eps must be a non-empty list of numbers >= 0"),
     ("evaluation.tolerance_at=abc", "evaluation.tolerance_at must be a number > 0 or null, got 'abc'")],
)
def test_bad_settings_name_the_key(override, message):
    cfg = compose_config("evaluate", "ckpt_path=x.ckpt", override)
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
        instantiate(cfg.evaluation)
