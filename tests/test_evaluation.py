"""Checkpoint evaluation: the engine on data with known answers, the report files, the script."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from datamodules import ClassificationDataModule
from evaluation.composites import dataset_layout
from evaluation.evaluator import ExplanationEvaluator
from evaluation.metrics.faithfulness import MAX_BLOCKS
from evaluation.metrics.registry import METRICS
from evaluation.preflight import unsupported_metrics
from evaluation.report import write_reports
from evaluation.settings import default_settings
from gcmodels.checkpoints import read_hparams
from gcmodels.objectives import OBJECTIVES
from tests.conftest import assert_ok, read_summary, run_module, tiny_net, train
from tests.test_metrics import SINE_EPS, SINE_SUCCESS, SINE_TOP1, SignOfSine, sine_case

ROOT = Path(__file__).resolve().parents[1]


class SquaresData(Dataset):
    """Dark images with one bright square (channel 0) whose pixels are the mask; 4 classes. Each
    image has a key (its name), which travels with it when ``order`` lists the images differently."""

    def __init__(self, count=12, size=32, order=None, num_classes=4):
        generator = torch.Generator().manual_seed(0)
        self.items, self.names = [], []
        for index in range(count):
            image = torch.zeros(3, size, size)
            top, left = torch.randint(0, size - 8, (2,), generator=generator).tolist()
            image[0, top:top + 8, left:left + 8] = 1.0
            self.items.append({"image": image, "target": torch.tensor(index % num_classes), "mask": image[0] > 0})
            self.names.append(f"square_{index:02d}.png")
        order = list(range(count)) if order is None else list(order)
        self.items, self.names = [self.items[i] for i in order], [self.names[i] for i in order]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def label_sets(self):
        return torch.nn.functional.one_hot(torch.stack([item["target"] for item in self.items]), 4).bool()

    def keys(self):
        return list(self.names)


class SquaresModule:
    """The datamodule interface the engine uses, over SquaresData (validation set and trials)."""

    name = "squares"
    num_classes = 4
    class_names = ["a", "b", "c", "d"]
    multilabel = False
    collate_fn = staticmethod(default_collate)
    localization_unavailable = ClassificationDataModule.localization_unavailable

    def __init__(self, **options):
        self.data = SquaresData(**options)

    def val_dataset(self):
        return self.data

    def localization_dataset(self, geometry=None):
        return self.data


def evaluator(explainer, metrics, batch_size=5, **settings):
    return ExplanationEvaluator(explainer, metrics, 4, False,
                                default_settings(seed=0, batch_size=batch_size, **settings))


def oracle(net, images, classes):
    """Heatmap = the bright square itself: every localisation metric must score 100%."""
    return images[:, 0]


def uniform(net, images, classes):
    return torch.ones(images.shape[0], images.shape[2] // 4, images.shape[3] // 4)


def test_oracle_explainer_scores_100_and_uniform_nqh_is_75():
    net = tiny_net(num_classes=4)
    results = evaluator(oracle, ["pg", "spg", "ch"]).run(net, SquaresModule(), progress=False)
    assert results["pg"] == pytest.approx(1.0)
    assert results["spg"] == pytest.approx(1.0) and results["spg_std"] == pytest.approx(0.0)
    assert results["ch"] == pytest.approx(1.0)
    results = evaluator(uniform, ["nqh", "ch"]).run(net, SquaresModule(), progress=False)
    assert results["nqh"] == pytest.approx(0.75)
    assert results["ch"] == pytest.approx(64 / 32**2)  # square area over image area


def naive_hit(mask: torch.Tensor, y: int, x: int, tolerance: float) -> bool:
    ys, xs = mask.nonzero(as_tuple=True)
    return bool((((ys - y) ** 2 + (xs - x) ** 2).double().sqrt() < tolerance).any())


def test_nqh_composites_do_not_depend_on_batch_size_or_file_order():
    """Each image's composite (cell, distractors from the whole set) is a function of the image's
    key: other batch sizes or another order of the files give the same NQH (up to float32
    summation order)."""
    net = tiny_net(num_classes=4)

    def square_plus_texture(net, images, classes):  # depends on which images fill the cells
        return images[:, 0] + 0.05 * images[:, 0].flip(-1) + 0.001

    reference = evaluator(square_plus_texture, ["nqh"], batch_size=8).run(net, SquaresModule(), progress=False)
    shuffled = SquaresModule(order=[5, 2, 11, 0, 7, 1, 9, 3, 10, 4, 8, 6])
    for batch_size, data in ((4, SquaresModule()), (12, SquaresModule()), (5, shuffled)):
        again = evaluator(square_plus_texture, ["nqh"], batch_size=batch_size).run(net, data, progress=False)
        assert again["nqh"] == pytest.approx(reference["nqh"], abs=1e-6)
    assert reference["skipped"]["nqh_without_composite"] == 0


def test_evaluation_composites_take_other_classes_from_the_whole_set():
    data = SquaresData(count=40)
    layout = dataset_layout(data.label_sets(), data.keys(), list(range(40)), seed=0)
    labels = data.label_sets().long().argmax(1)
    assert layout.valid.all() and torch.equal(layout.samples, torch.arange(40))
    assert torch.equal(layout.classes, labels)
    assert (labels[layout.distractors] != labels.unsqueeze(1)).all()  # never the explained class
    assert all(len(set(row)) == 3 for row in layout.distractors.tolist())  # distinct
    # Distractors come from the whole set, not from neighbours in the listing (which are class by class).
    assert (layout.distractors - layout.samples.unsqueeze(1)).abs().max() > 8
    # The same image gets the same composite wherever it is listed.
    order = list(range(40))[::-1]
    reversed_data = SquaresData(count=40, order=order)
    again = dataset_layout(reversed_data.label_sets(), reversed_data.keys(), list(range(40)), seed=0)
    names = data.keys()
    for row in range(40):
        original = order[row]
        assert int(again.cells[row]) == int(layout.cells[original])
        assert [reversed_data.keys()[i] for i in again.distractors[row]] == \
            [names[i] for i in layout.distractors[original]]
    # A set of one class has no image to put beside any other: every image is counted, none scored.
    single = SquaresData(count=6, num_classes=1)
    lonely = dataset_layout(single.label_sets(), single.keys(), list(range(6)), seed=0)
    assert not lonely.valid.any()


def test_images_without_a_composite_are_counted():
    net = tiny_net(num_classes=4)
    results = evaluator(oracle, ["nqh"]).run(net, SquaresModule(num_classes=1), progress=False)
    assert results["skipped"]["nqh_without_composite"] == 12 and math.isnan(results["nqh"])


def test_reference_maps_are_scored_on_the_same_trials():
    """A centred peak hits exactly the squares within the tolerance of the image's centre pixel;
    uniform noise puts the mask's share of the area inside it (CH), up to sampling noise."""
    net = tiny_net(num_classes=4)
    data = SquaresModule()
    results = evaluator(oracle, ["pg", "spg", "ch"]).run(net, data, progress=False)
    tolerance = 15 * 32 / 224
    masks = [item["mask"] for item in data.data.items]
    centre_hits = [naive_hit(mask, 15, 15, tolerance) for mask in masks]  # 32 px: centre pixels 15-16
    per_class = [sum(h for h, i in zip(centre_hits, range(12)) if i % 4 == k) / 3 for k in range(4)]
    assert results["pg_center"] == pytest.approx(sum(per_class) / 4)
    assert results["pg_micro_center"] == pytest.approx(sum(centre_hits) / 12)
    assert results["ch_noise"] == pytest.approx(64 / 32**2, abs=0.01)
    assert 0 <= results["spg_noise"] < results["spg"] == pytest.approx(1.0)
    assert results["pg"] == pytest.approx(1.0) and "pg_noise" in results and "spg_std_center" in results
    # Scored again from a clean state: the same reference numbers (seeded), whatever the explainer.
    again = evaluator(uniform, ["pg", "spg", "ch"]).run(net, data, progress=False)
    assert all(again[key] == results[key] for key in results if key.endswith(("_center", "_noise")))


def test_nqh_explains_composites_a_quarter_batch_at_a_time():
    """A composite holds four images' pixels, so a pass of composites is no bigger than the
    image batch the user sized; the maps go back together in order."""
    passes = []

    def bright_square_plus_floor(net, images, classes):
        passes.append(len(images))
        return images[:, 0] + 0.01

    net = tiny_net(num_classes=4)
    results = evaluator(bright_square_plus_floor, ["nqh"], batch_size=8).run(net, SquaresModule(), progress=False)
    assert passes == [2] * 6  # 12 composites, a quarter of the 8-image batch per pass
    # Four equal squares, one per cell, on a uniform floor: every cell holds a quarter of the mass.
    assert results["nqh"] == pytest.approx(0.75)


def test_out_of_memory_names_the_batch_key_and_restores_the_mode():
    def too_big(net, images, classes):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    net = tiny_net(num_classes=4).train()
    with pytest.raises(torch.OutOfMemoryError, match=r"8 images per batch .*lower evaluation\.batch_size.*9\.00 GiB"):
        evaluator(too_big, ["pg"], batch_size=8).run(net, SquaresModule(), progress=False)
    assert net.training


def test_one_evaluator_serves_every_epoch_from_a_clean_state():
    """A callback keeps one evaluator for the whole run: each run starts afresh (same images,
    same composites and SPG points, so the same numbers), never accumulating earlier epochs."""
    net = tiny_net(num_classes=4)

    def noisy(net, images, classes):  # depends on the composites' layout, so NQH shows a replay
        return images[:, 0] + 0.1 * images[:, 1]

    reused = evaluator(noisy, ["pg", "spg", "ch", "nqh", "acc"])
    first = reused.run(net, SquaresModule(), progress=False)
    assert reused.run(net, SquaresModule(), progress=False) == first
    assert evaluator(noisy, ["pg", "spg", "ch", "nqh", "acc"]).run(net, SquaresModule(), progress=False) == first
    with pytest.raises(ValueError, match=r"metric\(s\) \['nqh'\] score explanations: give an explainer"):
        evaluator(None, ["acc", "nqh"])
    assert evaluator(None, ["acc", "fgsm"]).run(net, SquaresModule(), progress=False)["fgsm"]


class SinePixels(SquaresModule):
    """The hand-checked FGSM case of tests/test_metrics.py as a 2-class validation set."""

    num_classes = 2
    class_names = ["a", "b"]

    def __init__(self):
        _, images, targets = sine_case()
        self.data = [{"image": image, "target": target} for image, target in zip(images, targets)]


def test_fgsm_results_give_top1_and_the_success_rate_per_eps_and_the_clean_top1():
    net = SignOfSine()
    net.register_parameter("unused", torch.nn.Parameter(torch.zeros(1)))  # the engine reads the device off it
    settings = default_settings(seed=0, batch_size=3, fgsm_eps=list(SINE_EPS))
    results = ExplanationEvaluator(None, ["acc", "fgsm"], 2, False, settings).run(net, SinePixels(), progress=False)
    assert results["fgsm"] == SINE_TOP1 and results["fgsm_success"] == SINE_SUCCESS
    assert results["fgsm_clean"] == results["acc"] == 3 / 4


def test_all_zero_maps_are_skipped_by_default_and_scored_as_uniform_on_request():
    def zero_for_odd_classes(net, images, classes):
        maps = images[:, 0].clone()
        maps[classes % 2 == 1] = 0
        return maps

    net = tiny_net(num_classes=4)
    metrics = ["pg", "spg", "ch"]
    tolerance = {"tolerance": 8, "tolerance_at": None}  # two of class 1's squares within reach of the top left
    skipping = evaluator(zero_for_odd_classes, metrics, **tolerance).run(net, SquaresModule(), progress=False)
    assert "zero_maps_uniform" not in skipping and skipping["skipped"] == {"pg": 6, "spg": 6, "ch": 6}
    assert skipping["pg"] == skipping["ch"] == 1  # the oracle's maps alone
    scoring = evaluator(zero_for_odd_classes, metrics, zero_maps="uniform", **tolerance).run(net, SquaresModule(),
                                                                                             progress=False)
    assert scoring["zero_maps_uniform"] == {"pg": 6, "spg": 6, "ch": 6}
    assert scoring["skipped"] == {"pg": 0, "spg": 0, "ch": 0}
    data = SquaresData()
    odd = [item for item in data.items if item["target"] % 2 == 1]
    # A uniform map's CH is its mask's share of the image; its PG points at the top-left pixel.
    assert scoring["ch"] == pytest.approx((6 + sum(item["mask"].double().mean().item() for item in odd)) / 12)
    top_left_hits = [sum(naive_hit(item["mask"], 0, 0, 8) for item in odd if item["target"] == k) for k in (1, 3)]
    assert top_left_hits == [2, 0]
    assert scoring["pg"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)  # per-class mean, classes 0..3
    # The reference maps are never all zero: nothing of theirs is counted.
    assert scoring["pg_center"] == skipping["pg_center"] and "uniform_center" not in scoring


def test_accuracy_and_capped_evaluation_spread_over_classes():
    net = tiny_net(num_classes=4)
    data = SquaresModule()
    results = evaluator(oracle, ["acc"]).run(net, data, progress=False)
    with torch.no_grad():
        predicted = torch.stack([net(item["image"][None])[0] for item in data.data.items]).argmax(1)
    expected = (predicted == torch.tensor([item["target"] for item in data.data.items])).float().mean()
    assert results["acc"] == pytest.approx(float(expected))
    capped = evaluator(oracle, ["pg"]).run(net, data, max_images=4, progress=False)
    assert capped["pg"] == pytest.approx(1.0)


def test_metrics_the_data_cannot_serve():
    class NoMasks(SquaresModule):
        name = "imagenet"

        def localization_dataset(self, geometry=None):
            return None

    reasons = unsupported_metrics(NoMasks(), ["acc", "pg", "ch", "nqh"])
    assert sorted(reasons) == ["ch", "pg"]
    assert "needs ground-truth object masks or boxes, and data 'imagenet' provides none" in reasons["pg"]

    class MultiLabel(SquaresModule):
        name = "coco"
        multilabel = True

    assert list(unsupported_metrics(MultiLabel(), ["acc", "pg", "fgsm"])) == ["fgsm"]
    assert unsupported_metrics(SquaresModule(), list(("acc", "pg", "spg", "ch", "nqh", "fgsm"))) == {}


def test_report_files_follow_the_papers_tables(tmp_path):
    rows = [
        {"checkpoint": "a.ckpt", "model": "resnet18", "pooling": "avg", "loss": "ce", "lambda": 0.0,
         "results": {"acc": 0.694, "pg": 0.798, "spg": 0.605, "spg_std": 0.001, "ch": 0.544, "nqh": 0.244,
                     "fgsm": {"eps=1": 0.30, "eps=2": 0.10}, "skipped": {"pg": 0, "nqh": 2},
                     "pg_center": 0.88, "spg_center": 0.5, "spg_std_center": 0.002, "ch_center": 0.3,
                     "pg_noise": 0.35, "spg_noise": 0.3, "spg_std_noise": 0.001, "ch_noise": 0.2}},
        {"checkpoint": "b.ckpt", "model": "resnet18", "pooling": "max", "loss": "gc", "lambda": 25.0,
         "results": {"acc": 0.690, "pg": 0.796, "spg": 0.687, "spg_std": 0.002, "ch": 0.654, "nqh": 0.312,
                     "fgsm": {"eps=1": 0.40, "eps=2": 0.20}, "skipped": {"pg": 1, "nqh": 0}}},
    ]
    paths = write_reports(rows, tmp_path, {"explainer": "gradcam", "data": "synthetic"})
    markdown = paths["md"].read_text()
    assert "| model | Top-1 | PG | SPG | CH | NQH |" in markdown
    assert "| resnet18 baseline | 69.40 | 79.80 | 60.50 ± 0.10 | 54.40 | 24.40 |" in markdown
    assert "| resnet18+GMP GC (lambda=25) | 69.00 | 79.60 | 68.70 ± 0.20 | 65.40 | 31.20 |" in markdown
    # The reference maps, once, on the same columns (they do not depend on the model).
    assert "| reference: centred peak | - | 88.00 | 50.00 ± 0.20 | 30.00 | - |" in markdown
    assert "| reference: uniform noise | - | 35.00 | 30.00 ± 0.10 | 20.00 | - |" in markdown
    assert "| model | eps=1 | eps=2 |" in markdown and "| resnet18+GMP GC (lambda=25) | 40.00 | 20.00 |" in markdown
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["checkpoint"] for row in table] == ["a.ckpt", "b.ckpt"]
    # The CSV, for machines, keeps the fractions; only report.md prints percent.
    assert table[1]["spg_std"] == "0.002" and table[0]["fgsm_eps=2"] == "0.1" and table[0]["skipped_nqh"] == "2"
    assert table[0]["pg_center"] == "0.88" and table[0]["ch_noise"] == "0.2" and table[1]["pg_center"] == ""
    assert json.loads(paths["json"].read_text())["checkpoints"][1]["results"]["skipped"] == {"pg": 1, "nqh": 0}


def test_report_gives_the_attack_success_rate_beside_table_6(tmp_path):
    results = {"acc": 0.75, "fgsm": {"eps=1": 0.5, "eps=8": 0.25}, "fgsm_success": {"eps=1": 1 / 3, "eps=8": 2 / 3},
               "fgsm_clean": 0.75, "skipped": {}}
    rows = [{"checkpoint": "a.ckpt", "model": "resnet18", "pooling": "avg", "loss": "ce", "lambda": 0.0,
             "results": results},
            {"checkpoint": "old.ckpt", "model": "resnet18", "pooling": "max", "loss": "ce", "lambda": 0.0,
             "results": {"acc": 0.5, "fgsm": {"eps=1": 0.4, "eps=8": 0.2}, "skipped": {}}}]  # an older report's
    paths = write_reports(rows, tmp_path, {"explainer": "gradcam", "data": "synthetic"})
    markdown = paths["md"].read_text()
    assert "| model | eps=1 | eps=8 |\n|---|---|---|\n| resnet18 baseline | 50.00 | 25.00 |" in markdown
    assert ("among the images classified correctly before the attack (lower is better)" in markdown
            and "| model | clean top-1 | eps=1 | eps=8 |\n|---|---|---|---|\n"
                "| resnet18 baseline | 75.00 | 33.33 | 66.67 |" in markdown
            and "| resnet18+GMP baseline | - | - | - |" in markdown)
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert table[0]["fgsm_clean"] == "0.75" and float(table[0]["fgsm_success_eps=8"]) == 2 / 3
    assert table[1]["fgsm_success_eps=1"] == "" and table[1]["fgsm_eps=1"] == "0.4"


@pytest.mark.parametrize("zero_maps, heading, counts", [
    ("skip", "| model | PG | PG skipped | SPG | SPG skipped | CH | CH skipped | NQH |",
     "| 3 | 60.00 ± 0.10 | 3 | 54.40 | 1 |"),
    ("uniform", "| model | PG | PG as uniform | SPG | SPG as uniform | CH | CH as uniform | NQH |",
     "| 2 | 60.00 ± 0.10 | 2 | 54.40 | 2 |"),
])
def test_report_under_the_authors_protocol_counts_all_zero_maps_beside_pg_and_ch(tmp_path, zero_maps, heading, counts):
    results = {"pg": 0.8, "spg": 0.6, "spg_std": 0.001, "ch": 0.544, "nqh": 0.25, "pg_center": 0.9, "ch_center": 0.3,
               "skipped": {"pg": 3, "spg": 3, "ch": 1, "nqh": 4}}
    if zero_maps == "uniform":
        results["zero_maps_uniform"] = {"pg": 2, "spg": 2, "ch": 2}
    rows = [{"checkpoint": "a.ckpt", "model": "resnet18", "pooling": "avg", "loss": "ce", "lambda": 0.0,
             "results": results}]
    settings = {"explainer": "gradcam", "data": "imagenet", "protocol": "authors", "zero_maps": zero_maps}
    paths = write_reports(rows, tmp_path, settings)
    markdown = paths["md"].read_text()
    assert heading in markdown and f"| resnet18 baseline | 80.00 {counts} 25.00 |" in markdown
    assert "| reference: centred peak | 90.00 | - | - ± - | - | 30.00 | - | - |" in markdown
    assert ("as the authors' +1e-8 does" in markdown) == (zero_maps == "uniform")
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert ("zero_maps_uniform_ch" in table[0]) == (zero_maps == "uniform")
    standard = write_reports(rows, tmp_path, {**settings, "protocol": "standard"})["md"].read_text()
    assert "| model | PG | SPG | CH | NQH |" in standard


def evaluate(out: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_module("evaluation", out, data_dir, *overrides)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny trained checkpoints (CE and GC) and their data directory."""
    root = tmp_path_factory.mktemp("trained")
    paths = []
    for loss in ("ce", "gc"):
        assert_ok(train(root / loss, root / "data", f"loss={loss}",
                        "callbacks.explanation_metrics.max_images=12", "callbacks.fgsm_robustness.max_images=12"))
        paths.append(read_summary(root / loss)["last_checkpoint"])
    return paths, root / "data"


@pytest.mark.slow
def test_training_logs_explanation_metrics(checkpoints):
    (ce, _), _ = checkpoints
    out = Path(ce).parents[1]
    with open(next(out.glob("csv/version_*/metrics.csv"))) as handle:
        columns = set(next(csv.reader(handle)))
    assert {"explain/pg", "explain/spg", "explain/spg_std", "explain/ch", "explain/nqh",
            "explain/fgsm/eps=8"} <= columns
    assert list(out.glob("csv/version_*/explanations/epoch000.png"))


@pytest.mark.slow
def test_evaluation_script_writes_reports_for_several_checkpoints(tmp_path, checkpoints):
    (ce, gc), data_dir = checkpoints
    run = evaluate(tmp_path, data_dir, f"ckpt_path=[{ce},{gc}]", "max_images=12", "evaluation.fgsm_eps=[2,8]")
    assert_ok(run)
    for name in ("report.md", "report.csv", "report.json", "heatmaps.png"):
        assert (tmp_path / name).stat().st_size > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["loss"] for row in report["checkpoints"]] == ["ce", "gc"]
    for row in report["checkpoints"]:
        results = row["results"]
        for key in ("acc", "pg", "spg", "ch", "nqh"):
            assert 0.0 <= results[key] <= 1.0, (key, results[key])
        assert set(results["fgsm"]) == {"eps=2", "eps=8"}
        assert results["spg_std"] >= 0 and "skipped" in results
    assert "Table 1" in run.stdout and "Table 6" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cgc", "energy"])
def test_each_objectives_checkpoint_trains_and_evaluates(tmp_path, checkpoints, loss):
    _, data_dir = checkpoints
    assert_ok(train(tmp_path / loss, data_dir, f"loss={loss}", "~callbacks.explanation_metrics",
                    "~callbacks.fgsm_robustness"))
    path = read_summary(tmp_path / loss)["last_checkpoint"]
    run = evaluate(tmp_path / "eval", data_dir, f"ckpt_path={path}", "max_images=12", "evaluation.fgsm_eps=[8]")
    assert_ok(run)
    row, = json.loads((tmp_path / "eval" / "report.json").read_text())["checkpoints"]
    assert row["loss"] == loss and all(0.0 <= row["results"][key] <= 1.0 for key in ("acc", "pg", "ch", "nqh"))
    title = OBJECTIVES[loss].target.title
    assert f"resnet18 {title} (lambda=" in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ckpt_path=/no/such.ckpt"], "checkpoint not found: /no/such.ckpt"),
        (["explainer=nope"], "Could not find 'explainer/nope'"),
        (["data.num_classes=4"], "classes, but data 'synthetic' has 4"),
    ],
)
def test_evaluation_bad_input(tmp_path, checkpoints, overrides, message):
    (ce, _), data_dir = checkpoints
    run = evaluate(tmp_path, data_dir, f"ckpt_path={ce}", *overrides)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-3000:]


@pytest.mark.slow
def test_evaluation_refuses_a_file_that_is_not_a_checkpoint(tmp_path, checkpoints):
    _, data_dir = checkpoints
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a checkpoint")
    run = evaluate(tmp_path / "out", data_dir, f"ckpt_path={bogus}")
    assert run.returncode != 0 and f"not a readable PyTorch checkpoint: {bogus}" in run.stderr


@pytest.mark.slow
def test_localisation_metric_on_data_without_masks(tmp_path, checkpoints):
    (ce, _), _ = checkpoints
    data = tmp_path / "imagenet"
    # Class folders named as the checkpoint's classes: a checkpoint of other classes is refused first.
    for split in ("train", "val"):
        for wnid in read_hparams(ce)["class_names"]:
            (data / split / wnid).mkdir(parents=True)
            Image.new("RGB", (40, 30)).save(data / split / wnid / f"{wnid}.JPEG")  # no box file beside it
    command = [sys.executable, "-m", "evaluation", f"hydra.run.dir={tmp_path / 'out'}", "data=imagenet",
               f"data.data_dir={data}", f"ckpt_path={ce}", "metrics=[acc,pg]"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "metric 'pg' needs ground-truth object masks or boxes, and data 'imagenet' provides none" in run.stderr


def test_pictures_show_the_trials_masks_on_grey_images(tmp_path):
    """The sample a picture explains comes from the localisation trials when masks exist, so each
    panel outlines its own object: every mask pixel has the object's single colour in its image."""
    from datamodules.synthetic import SyntheticDataModule
    from evaluation.explainers import build_explainer
    from evaluation.figures import _grey, save_overlay_grid
    from evaluation.panels import explanation_panels
    from evaluation.sampling import validation_sample

    datamodule = SyntheticDataModule(tmp_path, num_classes=3, image_size=48, train_per_class=1, val_per_class=2,
                                     object_scale=(0.3, 0.5), decoys=(1, 2), context_bias=0.0, seed=0, batch_size=4,
                                     num_workers=0, skip_corrupt=False)
    datamodule.prepare_data()
    datamodule.setup("validate")
    batch = validation_sample(datamodule, 4)
    panels = explanation_panels(tiny_net(3), build_explainer("gradcam"), batch, datamodule.class_names)
    assert len(panels) == 4
    for panel in panels:
        colours = panel.image[:, panel.mask].T.unique(dim=0)
        assert panel.mask.sum() > 0 and len(colours) == 1
        grey = _grey(panel.image)
        assert grey.shape == panel.image.shape[-2:] and 0.25 <= grey.min() and grey.max() <= 0.75
    path = save_overlay_grid([("Grad-CAM", panels)], tmp_path / "grid.png", "test")
    assert path.stat().st_size > 0


def test_multilabel_f1_reads_logits_inside_0_1_as_logits():
    """Logits of 0.3 mean probability 0.57 > 0.5: predicted. torchmetrics alone would read scores
    that all lie in [0, 1] as probabilities and threshold 0.3 raw."""
    from gcmodels.accuracy import accuracy_inputs, accuracy_metric

    logits = torch.tensor([[0.3, 0.3], [0.3, 0.3]])
    targets = torch.ones(2, 2)
    metric = accuracy_metric(2, multilabel=True)
    metric.update(*accuracy_inputs(logits, targets))
    assert float(metric.compute()) == 1.0
    single = accuracy_metric(3, multilabel=False)
    single.update(*accuracy_inputs(torch.tensor([[0.1, 0.5, 0.2]]), torch.tensor([1])))
    assert float(single.compute()) == 1.0


def flatten_states(states: dict, prefix: str = "") -> dict:
    flat = {}
    for key, state in states.items():
        flat.update(flatten_states(state, f"{prefix}{key}.") if isinstance(state, dict) else {prefix + key: state})
    return flat


def test_metric_states_do_not_grow_with_the_number_of_images():
    """Every metric keeps sums (per class, run, eps, curve point or randomised block at most), never
    per-image maps or lists: the states of 48 images have the shapes of those of 12."""
    net = tiny_net(num_classes=4)

    def state_shapes(count: int) -> dict:
        evaluator = ExplanationEvaluator(oracle, list(METRICS), 4, False, default_settings(seed=0, batch_size=5))
        evaluator.run(net, SquaresModule(count=count), progress=False)
        metrics = {**evaluator.state, **{f"{name}_{reference}": metric for reference, group in
                                         evaluator.references.items() for name, metric in group.items()}}
        # The accuracy metric is a MetricCollection: its states are its members'.
        return {(name, key): tuple(state.shape) for name, metric in metrics.items()
                for key, state in flatten_states(metric.metric_state).items()}

    shapes = state_shapes(12)
    assert state_shapes(48) == shapes
    assert {name for name, _ in shapes} >= set(METRICS) | {"pg_noise", "spg_center"}
    # 6 FGSM eps, 4 classes, 5 SPG runs, 29 insertion points, 18 ROAD points, MPRT's block capacity.
    assert max(math.prod(shape) for shape in shapes.values()) <= MAX_BLOCKS
