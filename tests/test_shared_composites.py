"""``loss.composites=shared``: one composite serves the four images it shows."""

import pytest
import torch
from torch import nn

from gcmodels.module import GCClassifier
from gcmodels.networks import build_network
from gcmodels.objectives import OBJECTIVES, gc_objective
from gcmodels.options import ConfigError
from losses import label_sets, make_composite, shared_layout
from tests.conftest import tiny_net

GC_OPTIONS = {"name": "gc", "lambda": 1.0, "cam_mode": "elementwise", "detach_target": False, "positive": "labels",
              "composite_source": "batch", "composites": "shared"}


def check_groups(layout, labels):
    """Every shared group: 4 members in cells 0-3 that are each other's distractors, in cell order."""
    shared = layout.groups < len(layout)
    for group in layout.groups[shared].unique():
        members = (layout.groups == group).nonzero().flatten()
        assert sorted(layout.cells[members].tolist()) == [0, 1, 2, 3]
        in_cells = members[layout.cells[members].argsort()]
        for member in members:
            others = in_cells[in_cells != member]
            assert torch.equal(layout.distractors[member], others)
            assert not labels[others, layout.classes[member]].any()
        pictures = [make_composite(IMAGES, layout.select(member.view(1))) for member in members]
        assert all(torch.equal(picture, pictures[0]) for picture in pictures)
    alone = layout.groups[~shared]
    assert torch.equal(alone, len(layout) + (~shared).nonzero().flatten())  # a group of its own each
    return shared


IMAGES = torch.rand(32, 3, 2, 2)


def test_single_label_groups_are_four_different_classes_in_random_cells():
    targets = torch.arange(32) % 7
    cells_of_zero = set()
    for seed in range(20):
        layout = shared_layout(targets, 7, torch.Generator().manual_seed(seed))
        assert layout.valid.all() and torch.equal(layout.classes, targets)
        shared = check_groups(layout, label_sets(targets, 7))
        assert shared.sum() >= 24  # first fit over 7 classes leaves few out
        cells_of_zero.add(int(layout.cells[0]))
        # The fallback samples' distractors are drawn from the batch, without their class.
        assert not (targets[layout.distractors[~shared]] == targets[~shared, None]).any()
    assert cells_of_zero == {0, 1, 2, 3}


def test_multilabel_members_do_not_carry_each_others_explained_class():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(32, 12, generator=generator) < 0.15).float()
    targets[0] = 0  # no label: no composite
    layout = shared_layout(targets, 12, torch.Generator().manual_seed(1))
    labels = label_sets(targets, 12)
    shared = check_groups(layout, labels)
    assert shared.sum() >= 16 and not shared[0] and not layout.valid[0] and layout.valid[1:].any()
    members = shared.nonzero().flatten()
    assert labels[members, layout.classes[members]].all()


def test_too_few_classes_leave_everyone_to_per_sample_composites():
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    layout = shared_layout(targets, 3, torch.Generator().manual_seed(0))
    assert torch.equal(layout.groups, 6 + torch.arange(6)) and layout.valid.all()


def _no_dropout(net: nn.Module) -> nn.Module:
    """Training mode (batch statistics) without dropout, whose masks depend on how many composites run."""
    net.train()
    for layer in net.modules():
        if isinstance(layer, nn.Dropout):
            layer.eval()
    return net.double()


def _fully_grouped(targets, num_classes):
    for seed in range(100):
        layout = shared_layout(targets, num_classes, torch.Generator().manual_seed(seed))
        if (layout.groups < len(targets)).all():
            return layout
    raise AssertionError("no seed groups the whole batch")


MULTILABEL = torch.tensor([[1, 0, 0, 0, 1], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0],
                           [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 1], [0, 0, 0, 1, 1]]).double()


@pytest.mark.parametrize("name, pooling, stride, targets", [
    ("resnet18", "avg", 32, torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])),
    ("resnet18", "max", 16, torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])),
    ("alexnet", "avg", None, torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])),
    ("resnet18", "avg", 32, MULTILABEL),
], ids=["resnet18-avg-os32", "resnet18-max-os16", "alexnet", "multilabel"])
def test_shared_loss_and_gradients_equal_per_sample_on_the_same_composites(name, pooling, stride, targets):
    """With each member's per-sample composite the group's picture (every group's composite once per
    member, so batch norm sees the same statistics), the shared mode's loss and gradients are the
    per-sample mode's: sharing changes the cost, not the objective."""
    torch.manual_seed(0)
    num_classes = 5
    net = _no_dropout(build_network(name, num_classes, pooling=pooling, output_stride=stride))
    images = torch.rand(8, 3, 64, 64, dtype=torch.float64)
    layout = _fully_grouped(targets, num_classes)
    per_sample = layout.select(torch.arange(8))
    per_sample.groups = None
    results = []
    for rows in (layout, per_sample):
        out = gc_objective(net, images, targets, rows, lam=25.0)
        results.append((out, torch.autograd.grad(out.loss, list(net.parameters()))))
    (shared, shared_grads), (single, single_grads) = results
    assert shared.num_composites == single.num_composites == 8
    assert shared.consistency_loss > 0
    torch.testing.assert_close(shared.loss, single.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(shared.consistency_loss, single.consistency_loss, rtol=1e-12, atol=0)
    for one, other in zip(shared_grads, single_grads):
        torch.testing.assert_close(one, other, rtol=1e-9, atol=1e-14)


def test_shared_composites_need_batch_distractors():
    OBJECTIVES.validate(GC_OPTIONS)
    OBJECTIVES.validate({**GC_OPTIONS, "composites": "per_sample", "composite_source": "dataset"})
    # Each sample loads its own distractors there: no batch image is another's to share with.
    with pytest.raises(ConfigError) as error:
        OBJECTIVES.validate({**GC_OPTIONS, "composite_source": "dataset"})
    assert error.value.keys == ["loss.composites"]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a step outside a Trainer logs nothing
def test_training_step_shares_composites():
    module = GCClassifier(model={"name": "tiny"}, loss=GC_OPTIONS, optimizer={"name": "sgd", "lr": 0.1},
                          scheduler={"name": "none"}, num_classes=4, multilabel=False, layout_seed=0,
                          net=tiny_net(4))
    composites = []
    module.net.features.register_forward_hook(lambda layer, inputs, output: composites.append(len(output)))
    loss = module.training_step({"image": torch.rand(8, 3, 8, 8), "target": torch.arange(8) % 4}, 0)
    loss.backward()
    assert composites == [8, 2]  # the batch, then one composite per group of four


def test_training_step_logs_the_share_of_samples_that_fall_back_to_per_sample_composites(monkeypatch):
    module = GCClassifier(model={"name": "tiny"}, loss=GC_OPTIONS, optimizer={"name": "sgd", "lr": 0.1},
                          scheduler={"name": "none"}, num_classes=4, multilabel=False, layout_seed=0,
                          net=tiny_net(4))
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: logged.__setitem__(name, value))
    passes = []
    module.net.features.register_forward_hook(lambda layer, inputs, output: passes.append(len(output)))
    # Classes 1-3 once each: at most one group of four, so at least four samples fall back.
    module.training_step({"image": torch.rand(8, 3, 8, 8), "target": torch.tensor([0, 0, 0, 0, 0, 1, 2, 3])}, 0)
    composites = passes[1]  # groups + fallbacks, with 4 * groups + fallbacks = 8
    groups = (8 - composites) // 3
    assert float(logged["train/gc_fallback"]) == (8 - 4 * groups) / 8 >= 0.5
