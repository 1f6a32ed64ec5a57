import pytest
import torch
import torch.nn.functional as F

from gcmodels.gradcam import gradcam
from gcmodels.networks import build_network
from gcmodels.objective import gc_objective
from losses import (
    CompositeLayout,
    choose_distractors,
    classification_loss,
    composite_target,
    consistency_l1,
    label_sets,
    make_composite,
    place_in_cell,
    random_layout,
)
from tests.conftest import tiny_net

# (row, column) of each cell: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
CELL_POSITION = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}


@pytest.mark.parametrize("cell", [0, 1, 2, 3])
def test_target_placement_in_each_cell(cell):
    maps = torch.arange(1.0, 7.0).view(1, 2, 3)  # h=2, w=3, all values distinct
    placed = place_in_cell(maps, torch.tensor([cell]))
    expected = torch.zeros(1, 4, 6)
    row, col = CELL_POSITION[cell]
    expected[0, 2 * row:2 * row + 2, 3 * col:3 * col + 3] = maps[0]
    assert torch.equal(placed, expected)
    # Same size as the composite map: the placed map is the target as it is.
    assert torch.equal(composite_target(maps, torch.tensor([cell]), (4, 6)), expected)


@pytest.mark.parametrize("cell", [0, 1, 2, 3])
def test_composite_puts_positive_in_its_cell_and_distractors_in_order(cell):
    # Image b is constant b+1, so each quadrant tells which image landed there.
    images = torch.stack([torch.full((3, 4, 5), float(b + 1)) for b in range(5)])
    layout = CompositeLayout(
        samples=torch.tensor([2]), classes=torch.tensor([0]), cells=torch.tensor([cell]),
        distractors=torch.tensor([[3, 1, 4]]), valid=torch.tensor([True]),
    )
    composite = make_composite(images, layout)
    assert composite.shape == (1, 3, 8, 10)
    distractor_values = iter([4.0, 2.0, 5.0])
    for k in range(4):
        row, col = CELL_POSITION[k]
        block = composite[0, :, 4 * row:4 * row + 4, 5 * col:5 * col + 5]
        expected = 3.0 if k == cell else next(distractor_values)
        assert torch.all(block == expected), (k, block.unique())


def test_resize_rule_hand_computed_2_to_3():
    # A 1x1 map in cell 0 is [[1,0],[0,0]] at 2x2; bilinear (align_corners=False) to 3x3 samples
    # source coordinates -1/6 (clamped to 0), 1/2 and 7/6 (clamped to 1): weights [1, .5, 0].
    target = composite_target(torch.ones(1, 1, 1), torch.tensor([0]), (3, 3))
    expected = torch.outer(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1.0, 0.5, 0.0])) / 2.25
    assert torch.allclose(target[0], expected, atol=1e-6)


def test_alexnet_size_rule_13_to_27():
    net = build_network("alexnet", 4).eval()
    with torch.no_grad():
        single = net.forward_features(torch.rand(1, 3, 224, 224))
        composite = net.forward_features(torch.rand(1, 3, 448, 448))
    assert single.shape[-1] == 13 and composite.shape[-1] == 27  # not exactly 2x: the rule applies
    maps = torch.rand(4, 13, 13)
    maps = maps / maps.sum(dim=(1, 2), keepdim=True)
    cells = torch.tensor([0, 1, 2, 3])
    target = composite_target(maps, cells, (27, 27))
    assert target.shape == (4, 27, 27)
    assert torch.allclose(target.sum(dim=(1, 2)), torch.ones(4), atol=1e-5)
    # Rule: place at 26x26, resize bilinearly to 27x27, renormalise; checked against F.interpolate.
    for b, cell in enumerate(cells.tolist()):
        placed = torch.zeros(26, 26)
        row, col = CELL_POSITION[cell]
        placed[13 * row:13 * row + 13, 13 * col:13 * col + 13] = maps[b]
        resized = F.interpolate(placed[None, None], size=(27, 27), mode="bilinear", align_corners=False)[0, 0]
        assert torch.allclose(target[b], resized / resized.sum(), atol=1e-6)
        # Nearly all mass stays in the positive cell's quadrant of the 27x27 grid.
        rows = slice(0, 14) if row == 0 else slice(13, 27)
        cols = slice(0, 14) if col == 0 else slice(13, 27)
        assert target[b, rows, cols].sum() > 0.97


def test_distractors_never_share_the_positive_class():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        targets = torch.randint(0, 4, (12,), generator=generator)
        layout = random_layout(targets, 4, generator)
        for b in range(12):
            if layout.valid[b]:
                assert torch.all(targets[layout.distractors[b]] != targets[b])
            else:
                assert torch.all(targets == targets[b])


def test_distractors_are_distinct_when_enough_candidates():
    targets = torch.tensor([0, 1, 2, 3, 4])
    layout = random_layout(targets, 5, torch.Generator().manual_seed(1))
    assert layout.valid.all()
    for b in range(5):
        assert len(set(layout.distractors[b].tolist())) == 3 and b not in layout.distractors[b].tolist()


def test_no_valid_distractor_and_repeats_when_few():
    layout = random_layout(torch.tensor([2, 2, 2, 2]), 3, torch.Generator().manual_seed(0))
    assert not layout.valid.any()
    layout = random_layout(torch.tensor([2, 2, 2, 0]), 3, torch.Generator().manual_seed(0))
    assert layout.valid.tolist() == [True, True, True, True]
    assert torch.all(layout.distractors[:3] == 3)  # the only candidate, repeated
    assert all(targets != 0 for targets in torch.tensor([2, 2, 2, 0])[layout.distractors[3]])


def test_multilabel_distractors_lack_the_positive_class():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(16, 6, generator=generator) < 0.3).float()
    targets[0] = 0  # an image without labels has nothing to explain
    for _ in range(20):
        layout = random_layout(targets, 6, generator)
        labels = label_sets(targets, 6)
        assert not layout.valid[0]
        for b in range(16):
            if not labels[b].any():
                assert layout.classes[b] == -1 and not layout.valid[b]
                continue
            assert labels[b, layout.classes[b]]
            if layout.valid[b]:
                assert not labels[layout.distractors[b], layout.classes[b]].any()
            else:
                assert labels[:, layout.classes[b]].all()


def test_choose_distractors_shapes():
    labels = label_sets(torch.tensor([0, 1, 1]), 2)
    distractors, valid = choose_distractors(labels, torch.tensor([0, 1, 1]))
    assert distractors.shape == (3, 3) and valid.tolist() == [True, True, True]


def test_consistency_l1_is_mean_absolute_difference():
    a, b = torch.rand(3, 4, 4), torch.rand(3, 4, 4)
    assert torch.allclose(consistency_l1(a, b), (a - b).abs().sum() / a.numel())
    with pytest.raises(ValueError, match="differ in shape"):
        consistency_l1(a, b[:, :3])


def _fixed_layout(targets):
    return random_layout(targets, 4, torch.Generator().manual_seed(3))


def test_gc_loss_gradcheck_float64():
    """gradcheck of the whole GC objective w.r.t. the weights: its analytic gradient is the
    second-order backward through dy/dA (create_graph=True), compared to finite differences."""
    torch.manual_seed(0)
    net = tiny_net(num_classes=4).double()
    images = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3])
    layout = _fixed_layout(targets)
    params = list(net.parameters())

    def objective(*weights):
        state = dict(zip([name for name, _ in net.named_parameters()], weights))
        return gc_objective(_Functional(net, state), images, targets, layout, lam=10.0).loss

    assert torch.autograd.gradcheck(objective, [p.detach().clone().requires_grad_() for p in params],
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


class _Functional:
    """An ExplainableNet view whose parameters are the given tensors (for gradcheck)."""

    def __init__(self, net, state):
        self.net, self.state = net, state

    def _call(self, prefix, x):
        sub = {k[len(prefix) + 1:]: v for k, v in self.state.items() if k.startswith(prefix + ".")}
        return torch.func.functional_call(getattr(self.net, prefix), sub, (x,))

    def forward_features(self, images):
        return self._call("features", self.net.normalize(images))

    def head(self, activations):
        return self._call("head", activations)


def test_detached_target_gradient_treats_the_target_as_a_constant():
    torch.manual_seed(0)
    net = tiny_net(num_classes=4).double()
    images, targets = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    layout = _fixed_layout(targets)
    weight = net.head[-1].weight
    detached = gc_objective(net, images, targets, layout, lam=3.0, detach_target=True)
    (grad_detached,) = torch.autograd.grad(detached.loss, weight)
    # Reference: the same loss with the target computed once and frozen as a constant.
    logits, maps = gradcam(net, images, targets, create_graph=True)
    composites = make_composite(images, layout)
    _, composite_maps = gradcam(net, composites, targets, create_graph=True)
    frozen = composite_target(maps, layout.cells, composite_maps.shape[-2:]).detach()
    reference = classification_loss(logits, targets) + 3.0 * consistency_l1(composite_maps, frozen)
    (grad_reference,) = torch.autograd.grad(reference, weight)
    assert torch.allclose(grad_detached, grad_reference)
    attached = gc_objective(net, images, targets, layout, lam=3.0)
    (grad_attached,) = torch.autograd.grad(attached.loss, weight)
    assert not torch.allclose(grad_attached, grad_detached)  # the default lets gradients reach g_x


def _reference_gradcam(net, images, classes, create_graph):
    """Element-wise Grad-CAM written out from its definition, L1-normalised with eps 1e-8."""
    activations = net.features(net.normalize(images))
    scores = net.head(activations)[torch.arange(len(images)), classes].sum()
    (grads,) = torch.autograd.grad(scores, activations, create_graph=create_graph)
    maps = torch.relu((grads * activations).sum(1))
    return maps / (maps.sum(dim=(1, 2), keepdim=True) + 1e-8)


def _reference_consistency_rows(net, images, layout, create_graph=True):
    """Per-row L1 (mean over map cells) between the composite's map and the placed single-image
    map, built cell by cell from the layout; both maps keep their graph as the objective's do."""
    h, w = images.shape[-2:]
    composites = []
    for r in range(len(layout)):
        fill = iter(layout.distractors[r].tolist())
        composite = images.new_zeros(3, 2 * h, 2 * w)
        for cell, (row, col) in CELL_POSITION.items():
            index = layout.samples[r].item() if cell == layout.cells[r] else next(fill)
            composite[:, h * row:h * row + h, w * col:w * col + w] = images[index]
        composites.append(composite)
    maps = _reference_gradcam(net, images[layout.samples], layout.classes, create_graph)
    composite_maps = _reference_gradcam(net, torch.stack(composites), layout.classes, create_graph)
    mh, mw = maps.shape[-2:]
    assert composite_maps.shape[-2:] == (2 * mh, 2 * mw)  # tiny_net halves: no resize rule
    rows = []
    for r, cell in enumerate(layout.cells.tolist()):
        row, col = CELL_POSITION[cell]
        target = torch.zeros_like(composite_maps[r])
        target[mh * row:mh * row + mh, mw * col:mw * col + mw] = maps[r]
        rows.append((composite_maps[r] - target).abs().mean())
    return torch.stack(rows)


def test_gc_term_depends_on_second_order_path():
    """With lambda > 0 the weight gradient differs from the CE gradient by the GC term's own
    gradient, which exists only through dy/dA (the head's weights enter the map via the gradient)."""
    torch.manual_seed(0)
    net = tiny_net(num_classes=4).double()
    images, targets = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    layout = _fixed_layout(targets)
    lam = 2.5  # not 1, so that the factor on the GC gradient is checked too
    out = gc_objective(net, images, targets, layout, lam=lam)
    assert out.num_composites == 4 and out.consistency_loss > 0
    weight = net.head[-1].weight
    (grad_gc,) = torch.autograd.grad(out.consistency_loss, weight, retain_graph=True)
    assert grad_gc.abs().sum() > 0
    # Independent references: CE of the plain forward pass and a GC term written out by hand.
    reference_gc = _reference_consistency_rows(net, images, layout).mean()
    assert torch.allclose(out.consistency_loss, reference_gc)
    (grad_reference_gc,) = torch.autograd.grad(reference_gc, weight)
    assert torch.allclose(grad_gc, grad_reference_gc)
    (grad_ce,) = torch.autograd.grad(F.cross_entropy(net(images), targets), weight)
    (grad_total,) = torch.autograd.grad(out.loss, weight)
    assert torch.allclose(grad_total - grad_ce, lam * grad_reference_gc)
    # With dy/dA taken as a constant the GC term does not reach the head's weights at all.
    first_order = _reference_consistency_rows(net, images, layout, create_graph=False).mean()
    assert torch.allclose(first_order, reference_gc)
    assert torch.autograd.grad(first_order, weight, allow_unused=True) == (None,)


def test_invalid_samples_are_left_out_of_the_gc_term():
    torch.manual_seed(0)
    net = tiny_net(num_classes=4)
    images = torch.rand(4, 3, 8, 8)
    targets = torch.tensor([1, 1, 1, 2])
    layout = _fixed_layout(targets)
    assert layout.valid.all()
    out_all = gc_objective(net, images, targets, layout, lam=1.0)
    layout.valid[3] = False
    out_three = gc_objective(net, images, targets, layout, lam=1.0)
    assert out_three.num_composites == 3
    # Left out means the GC term is the mean over the valid rows alone (each row has as many
    # map cells), with the CE term unchanged.
    rows = _reference_consistency_rows(net, images, layout, create_graph=False).detach()
    assert torch.allclose(out_all.consistency_loss, rows.mean())
    assert torch.allclose(out_three.consistency_loss, rows[:3].mean())
    assert not torch.allclose(rows[:3].mean(), rows.mean())  # leaving row 3 out shows
    ce = F.cross_entropy(net(images), targets)
    assert torch.allclose(out_three.loss, ce + rows[:3].mean())
    layout.valid[:] = False
    out_none = gc_objective(net, images, targets, layout, lam=1.0)
    assert out_none.num_composites == 0 and out_none.consistency_loss == 0
    assert torch.allclose(out_none.loss, out_all.classification_loss)
