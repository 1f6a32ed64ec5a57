"""``loss.composite_source=dataset``: distractors loaded from the training set with each sample
(datamodules/distractors.py), the training step that uses them, and a run of ``python train.py``."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

import gcmodels.objectives.gc
from datamodules import COCODataModule
from datamodules.distractors import MAX_CORRUPT_DRAWS, DistractorDataset
from datamodules.images import collate_samples
from gcmodels.module import GCClassifier
from gcmodels.objectives import gc_objective
from losses.composite import own_distractors_layout
from tests.conftest import assert_ok, logged_metrics, tiny_net, train
from tests.formats import write_coco


class Tagged(Dataset):
    """Image ``i`` is the constant ``i``, so a distractor tells which image it is. ``labels`` bool
    ``[N, K]``; ``single``: int64 class targets, else multi-hot targets (with ``instances`` when
    given). Files in ``corrupt`` read as None; ``reads`` records every read."""

    def __init__(self, labels: torch.Tensor, instances: torch.Tensor | None = None, single: bool = False):
        self.labels, self.instances, self.single = labels, instances, single
        self.corrupt: set[int] = set()
        self.classes = [f"class{k}" for k in range(labels.shape[1])]
        self.reads: list[int] = []

    def __len__(self):
        return len(self.labels)

    def label_pairs(self):
        return self.labels.nonzero(as_tuple=True)

    def __getitem__(self, index):
        self.reads.append(index)
        if index in self.corrupt:
            return None
        sample = {"image": torch.full((3, 2, 2), float(index))}
        if self.single:
            return {**sample, "target": self.labels[index].nonzero()[0, 0]}
        sample["target"] = self.labels[index].float()
        return sample if self.instances is None else {**sample, "instances": self.instances[index]}


def single_label(classes: list[int]) -> Tagged:
    return Tagged(torch.nn.functional.one_hot(torch.tensor(classes)).bool(), single=True)


def ids(sample: dict) -> list[int]:
    return sample["distractors"][:, 0, 0, 0].long().tolist()


def random_labels(images: int, classes: int, seed: int) -> torch.Tensor:
    labels = torch.rand(images, classes, generator=torch.Generator().manual_seed(seed)) < 0.4
    labels[~labels.any(1), 0] = True
    labels[0] = False  # no class is carried by every image
    labels[0, 1] = True
    return labels


def test_the_nth_image_without_a_class_is_found_for_every_class_and_n():
    labels = random_labels(40, 6, seed=0)
    wrapped = DistractorDataset(Tagged(labels), multilabel=True, positive="labels")
    for k in range(6):
        lacking = (~labels[:, k]).nonzero().flatten().tolist()
        assert [wrapped.lacking(k, nth) for nth in range(len(lacking))] == lacking


def test_each_sample_brings_its_class_cell_and_three_distinct_distractors_without_the_class():
    labels = random_labels(30, 5, seed=1)
    data = Tagged(labels)
    wrapped = DistractorDataset(data, multilabel=True, positive="labels")
    torch.manual_seed(0)
    for index in range(30):
        data.reads.clear()
        sample = wrapped[index]
        assert len(data.reads) == 4  # the sample and its 3 distractors
        positive = int(sample["positive"])
        assert labels[index, positive] and 0 <= sample["cell"] < 4
        assert not labels[ids(sample), positive].any() and len(set(ids(sample))) == 3
        assert (torch.equal(sample["image"], data[index]["image"])
                and torch.equal(sample["target"], labels[index].float()))
    batch = collate_samples([wrapped[0], wrapped[1]])
    assert batch["distractors"].shape == (2, 3, 3, 2, 2) and batch["positive"].shape == batch["cell"].shape == (2,)


def test_distractors_and_cells_are_uniform_and_repeat_only_below_three_candidates():
    # Classes of 6, 2 and 2 images: a class-0 image draws from 4 images, each of them first with
    # probability 1/4 (uniform over images, not over their classes).
    wrapped = DistractorDataset(single_label([0] * 6 + [1] * 2 + [2] * 2), multilabel=False, positive="instances")
    torch.manual_seed(0)
    draws = [wrapped[0] for _ in range(4000)]
    first = torch.bincount(torch.tensor([ids(s)[0] for s in draws]), minlength=10).double() / 4000
    # 4000 draws: the standard deviation of a frequency is at most 0.0069; bounds at 4.5 of them.
    assert torch.allclose(first[6:], torch.full((4,), 0.25, dtype=torch.float64), atol=0.031) and first[:6].sum() == 0
    cells = torch.bincount(torch.stack([s["cell"] for s in draws]), minlength=4).double() / 4000
    assert torch.allclose(cells, torch.full((4,), 0.25, dtype=torch.float64), atol=0.031)
    assert all(s["positive"] == 0 and len(set(ids(s))) == 3 for s in draws)
    # Two images without class 0: the three distractors are drawn from them with repeats.
    few = DistractorDataset(single_label([0] * 8 + [1, 2]), multilabel=False, positive="instances")
    assert all(set(ids(few[0])) <= {8, 9} for _ in range(20))
    assert any(len(set(ids(few[0]))) < 3 for _ in range(20))


@pytest.mark.parametrize("positive, expected", [("instances", [0.75, 0.0, 0.25]), ("labels", [0.5, 0.0, 0.5])])
def test_the_explained_class_is_drawn_as_loss_positive_says(positive, expected):
    labels = torch.tensor([[True, False, True], [False, True, False], [False, True, True], [True, True, False]])
    instances = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    wrapped = DistractorDataset(Tagged(labels, instances), multilabel=True, positive=positive)
    torch.manual_seed(0)
    drawn = torch.bincount(torch.stack([wrapped[0]["positive"] for _ in range(4000)]), minlength=3).double() / 4000
    assert torch.allclose(drawn, torch.tensor(expected, dtype=torch.float64), atol=0.031), drawn
    if positive == "instances":
        with pytest.raises(ValueError, match="loss.positive=instances .* no 'instances'"):
            DistractorDataset(Tagged(labels), multilabel=True, positive=positive)[0]


def test_a_class_that_every_image_carries_is_refused_when_wrapping():
    labels = torch.tensor([[True, True, False], [True, False, True], [True, False, False]])
    with pytest.raises(ValueError, match="every training image carries class\\(es\\) \\['class0'\\]"):
        DistractorDataset(Tagged(labels), multilabel=True, positive="labels")


def test_corrupt_distractors_are_redrawn_a_bounded_number_of_times():
    data = single_label([0, 0, 1, 1, 1, 1, 2, 2])
    data.corrupt = {2, 3, 7}
    wrapped = DistractorDataset(data, multilabel=False, positive="labels")
    torch.manual_seed(0)
    for _ in range(30):
        sample = wrapped[0]
        assert not set(ids(sample)) & data.corrupt and len(set(ids(sample))) == 3
    assert wrapped[2] is None  # a corrupt sample is dropped by the collate, as without distractors
    data.corrupt = {2, 3, 4, 5, 6, 7}
    with pytest.raises(RuntimeError, match=f"{MAX_CORRUPT_DRAWS} distractors drawn for training image 0 "
                                           "\\(class 'class0'\\) were corrupt"):
        wrapped[0]


def test_draws_are_reproducible_under_the_seed_and_differ_per_rank_and_worker():
    data = single_label([0] * 50 + [1] * 50)

    def draws(rank: int, workers: int) -> list[list[int]]:
        pl.seed_everything(0, workers=True)
        loader = DataLoader(DistractorDataset(data, multilabel=False, positive="labels", rank=rank), batch_size=10,
                            num_workers=workers, collate_fn=collate_samples)
        return [ids for batch in loader for ids in (batch["distractors"][:, :, 0, 0, 0].long().tolist())]

    assert draws(0, 0) == draws(0, 0) and draws(0, 0) != draws(1, 0)
    in_workers = draws(0, 2)
    assert in_workers == draws(0, 2) and in_workers != draws(1, 2)
    # Batches alternate between the two workers: the first sample of each sees another stream.
    assert in_workers[0] != in_workers[10]


def gc_classifier(multilabel: bool, composite_source: str, num_classes: int = 3) -> GCClassifier:
    torch.manual_seed(0)
    return GCClassifier(
        model={"name": "tiny"}, loss={"name": "gc", "lambda": 2.0, "cam_mode": "elementwise", "detach_target": False,
                                      "positive": "instances", "composite_source": composite_source,
                                      "composites": "per_sample"},
        optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "none"}, num_classes=num_classes,
        multilabel=multilabel, layout_seed=0, net=tiny_net(num_classes),
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a step outside a Trainer logs nothing
def test_training_step_builds_each_composite_from_the_samples_own_distractors(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, 8, 8, generator=generator), "target": torch.tensor([0, 1, 2, 0]),
             "positive": torch.tensor([0, 1, 2, 0]), "cell": torch.tensor([3, 0, 2, 1]),
             "distractors": torch.rand(4, 3, 3, 8, 8, generator=generator)}
    outputs = []
    monkeypatch.setattr(gcmodels.objectives.gc, "gc_objective",
                        lambda *args: outputs.append(gc_objective(*args)) or outputs[-1])
    module = gc_classifier(multilabel=False, composite_source="dataset")
    loss = module.training_step(batch, 0)
    layout = own_distractors_layout(batch["positive"], batch["cell"])
    expected = gc_objective(module.net, batch["image"], batch["target"], layout, 2.0, "elementwise", False,
                            batch["distractors"])
    assert torch.equal(loss, expected.loss) and outputs[-1].num_composites == 4
    without = {key: batch[key] for key in ("image", "target")}
    with pytest.raises(ValueError, match=r"loss=gc needs \[.positive., .cell., .distractors.\] in each training batch"):
        module.training_step(without, 0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_coco_samples_bring_distractors_without_their_drawn_class(tmp_path, monkeypatch):
    write_coco(tmp_path, year=2014)
    datamodule = COCODataModule(tmp_path, train_split="train2014", val_split="val2014", val_transform="square",
                                image_size=32, batch_size=5, num_workers=0, skip_corrupt=False)
    datamodule.set_train_distractors("instances")
    datamodule.setup("fit")
    labels = datamodule.train_set.label_sets()
    loader = datamodule.train_dataloader()
    wrapped = loader.dataset
    assert isinstance(wrapped, DistractorDataset)
    chosen = []
    lacking = wrapped.lacking
    monkeypatch.setattr(wrapped, "lacking", lambda positive, nth: chosen.append((positive, lacking(positive, nth)))
                        or chosen[-1][1])
    pl.seed_everything(0)
    batch = next(iter(loader))
    assert batch["distractors"].shape == (5, 3, 3, 32, 32) and batch["instances"].shape == (5, 3)
    assert all(batch["target"][b, batch["positive"][b]] == 1 for b in range(5))
    assert len(chosen) == 15 and not any(labels[image, positive] for positive, image in chosen)
    outputs = []
    monkeypatch.setattr(gcmodels.objectives.gc, "gc_objective",
                        lambda *args: outputs.append(gc_objective(*args)) or outputs[-1])
    assert torch.isfinite(gc_classifier(multilabel=True, composite_source="dataset").training_step(batch, 0))
    assert outputs[-1].num_composites == 5
    # Without the call, the training loader is the plain training set.
    datamodule.set_train_distractors(None)
    assert datamodule.train_dataloader().dataset is datamodule.train_set


@pytest.mark.slow
def test_train_py_runs_with_distractors_from_the_dataset(tmp_path, data_dir):
    run = train(tmp_path, data_dir, "loss.composite_source=dataset")
    assert_ok(run)
    rows = logged_metrics(tmp_path)
    left_out = [float(row["train/gc_left_out"]) for row in rows if row.get("train/gc_left_out")]
    gc = [float(row["train/gc_epoch"]) for row in rows if row.get("train/gc_epoch")]
    assert left_out == [0.0] and gc and gc[0] > 0
