"""The metric registry: what a metric declares is what it logs, and registering one is all it takes
to be computed, reported and monitored."""
import pytest
import torch
from hydra.utils import instantiate

import train
from evaluation.callbacks import flatten
from evaluation.metrics import PointingGame
from evaluation.metrics.registry import METRICS, Score, register_metric, score_of, table1_columns
from evaluation.report import write_reports
from evaluation.settings import default_settings
from reproduce import table1
from tests.conftest import tiny_net
from tests.test_build_checks import build, refused
from tests.test_config import compose_config
from tests.test_config_values import train_base
from tests.test_evaluation import SquaresModule, evaluator, oracle


def beside_square_maps(net, images, classes):
    """A peak 8 px beside each square: within PG's 15 px, outside a third of it."""
    maps = torch.zeros(images.shape[0], images.shape[2], images.shape[3])
    for index, image in enumerate(images):
        ys, xs = image[0].nonzero(as_tuple=True)
        x = int(xs.max()) + 8 if int(xs.max()) + 8 < images.shape[3] else int(xs.min()) - 8
        maps[index, int(ys.float().mean()), x] = 1
    return maps


def test_every_registered_score_is_logged_with_the_name_it_declares():
    settings = default_settings(seed=0, batch_size=5)
    results = flatten(evaluator(oracle, list(METRICS)).run(tiny_net(num_classes=4), SquaresModule(), progress=False))
    for spec in METRICS.values():
        logged = spec.logged_scores(settings, False)
        assert logged and set(logged) <= set(results), spec.name
        assert all(score_of(name) is spec.score(name) for name in logged)
    unscored = {name for name in results if score_of(name) is None}
    assert unscored >= {"skipped/pg", "spg_std", "pg_center", "ch_noise", "skipped/nqh_without_composite"}


@pytest.fixture
def near_pointing_game():
    """PG at a third of the configured tolerance, registered as a user's new metric would be."""

    @register_metric("pg_near")
    class NearPointingGame(PointingGame):
        score_name = "pg_near"
        scores = {"pg_near": Score(True, "PG at 1/3 tolerance"), "pg_near_micro": Score(True)}

        @classmethod
        def from_settings(cls, settings, num_classes, multilabel):
            return cls(tolerance=settings.tolerance / 3, tolerance_at=settings.scoring_tolerance_at,
                       num_classes=num_classes, zero_maps=settings.zero_maps)

    yield NearPointingGame
    del METRICS["pg_near"]


def test_a_registered_metric_is_computed_reported_and_monitored(tmp_path, near_pointing_game):
    results = evaluator(beside_square_maps, ["pg", "pg_near"], tolerance_at=None).run(
        tiny_net(num_classes=4), SquaresModule(), progress=False)
    # 8 px from the square: a hit at 15 px, a miss at 5 px.
    assert results["pg"] == 1 and results["pg_near"] == 0
    assert results["skipped"] == {"pg": 0, "pg_near": 0} and "pg_near_center" in results

    rows = [{"checkpoint": "a.ckpt", "model": "resnet18", "pooling": "avg", "loss": "ce", "lambda": 0.0,
             "results": results}]
    markdown = write_reports(rows, tmp_path, {"explainer": "x", "data": "squares"})["md"].read_text()
    assert "| model | PG | PG at 1/3 tolerance |" in markdown
    assert "| PG at 1/3 tolerance" in table1({"baseline": [results]})[0]
    assert ("pg_near", "PG at 1/3 tolerance") in table1_columns(["pg_near"])

    metrics = "callbacks.explanation_metrics.metrics=[pg,pg_near]"
    build(tmp_path, metrics, "callbacks.model_checkpoint.monitor=explain/pg_near")
    error = refused(tmp_path, metrics, "callbacks.model_checkpoint.monitor=explain/pg_near",
                    "callbacks.model_checkpoint.mode=min")
    assert error.keys == ["callbacks.model_checkpoint.mode"] and "set max" in str(error)


def test_a_callbacks_scores_follow_its_metrics_and_settings(tmp_path):
    cfg = compose_config("train", *train_base(tmp_path, "evaluation.fgsm_eps=[4]"))
    callbacks = {name: instantiate(conf) for name, conf in cfg.callbacks.items()}
    assert callbacks["fgsm_robustness"].logged_scores(False) == {
        "explain/fgsm/eps=4": True, "explain/fgsm_success/eps=4": False, "explain/fgsm_clean": True}
    assert callbacks["explanation_metrics"].logged_scores(False) == {
        "explain/pg": True, "explain/pg_micro": True, "explain/spg": True, "explain/ch": True, "explain/nqh": False}
    assert train.GCClassifier.validation_scores(True) == {"val/f1": True, "val/loss": False, "val/f1_per_class": True}
