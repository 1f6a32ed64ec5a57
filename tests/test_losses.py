import pytest
import torch
import torch.nn.functional as F

import gcmodels.objectives.gc
from gcmodels.gradcam import gradcam
from gcmodels.module import GCClassifier
from gcmodels.networks import build_network
from gcmodels.objectives import OBJECTIVES, gc_objective
from gcmodels.options import ConfigError
from losses import (
    CompositeLayout,
    choose_distractors,
    choose_positive,
    classification_loss,
    composite_target,
    consistency_l1,
    label_sets,
    make_composite,
    place_in_cell,
    random_layout,
    tile_2x2,
)
from losses.composite import own_distractors_layout
from tests.conftest import gradcheck_in_weights, small_vit, tiny_net

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


@pytest.mark.parametrize("cell", [0, 1, 2, 3])
def test_target_offsets_hand_computed(cell):
    # 2x3 maps on a 5x7 composite map: rows at offsets 0 and 3, columns at 0 and 4; row 2 and
    # column 3 are the seam.
    maps = torch.arange(1.0, 7.0).view(1, 2, 3)
    target = composite_target(maps, torch.tensor([cell]), (5, 7))
    expected = torch.zeros(1, 5, 7)
    row, col = CELL_POSITION[cell]
    expected[0, 3 * row:3 * row + 2, 4 * col:4 * col + 3] = maps[0]
    assert torch.equal(target, expected)


def test_target_refuses_a_composite_map_smaller_than_two_cells():
    with pytest.raises(ValueError, match="5x6.*smaller than two image maps \\(3x3\\)"):
        composite_target(torch.rand(1, 3, 3), torch.tensor([0]), (5, 6))


# Receptive field of the explained layer: position i sees input pixels stride*i + first to
# stride*i + last, walked back through every convolution and pooling (kernel, stride, padding).
RECEPTIVE_FIELDS = {"alexnet": (16, -66, 96), "resnet18": (32, -217, 217), "vgg16": (16, -90, 105)}


@pytest.mark.parametrize(
    "name, side, near, far",
    # ResNet18 at 224 px has no such position (its receptive field, 435 px, is wider than the
    # image), hence 320 px.
    [("alexnet", 224, range(8), range(5, 13)), ("resnet18", 320, range(4), range(7, 10)),
     ("vgg16", 224, range(8), range(6, 14))],
)
def test_target_placement_is_where_the_network_sees_each_cell(name, side, near, far):
    """The features of a 2x2 composite equal each image's own features placed by
    ``composite_target``, exactly at every position whose receptive field stays inside its own
    image (so sees neither the neighbouring image nor padding the image alone would see): in a
    cell's near half-axis (offset 0) up to ``near``'s end, in the far half-axis from ``far``'s
    start. Just outside that region the features differ: it is exact, not a safe margin."""
    torch.manual_seed(0)
    net = build_network(name, 5).eval()
    images = torch.rand(4, 3, side, side)
    in_own_cell = CompositeLayout(samples=torch.tensor([0]), classes=torch.tensor([0]), cells=torch.tensor([0]),
                                  distractors=torch.tensor([[1, 2, 3]]), valid=torch.tensor([True]))
    with torch.no_grad():
        own = net.forward_features(images)  # image k sits in cell k of the composite
        composite = net.forward_features(make_composite(images, in_own_cell))[0]
    h, size = own.shape[-1], tuple(composite.shape[-2:])

    def placed(per_cell):
        """Each cell's ``[n, h, h]`` placed in that cell by the rule, the four summed."""
        return sum(composite_target(maps, torch.full((len(maps),), k), size)
                   for k, maps in enumerate(map(per_cell, range(4))))

    stride, first, last = RECEPTIVE_FIELDS[name]
    position = torch.arange(h)
    inside = {0: stride * position + last < side, 1: stride * position + first >= 0}
    assert inside[0].nonzero().flatten().tolist() == list(near)
    assert inside[1].nonzero().flatten().tolist() == list(far)
    region = placed(lambda k: torch.outer(inside[k // 2], inside[k % 2]).float()[None])[0] > 0
    cells = placed(lambda k: torch.ones(1, h, h))[0] > 0
    expected = placed(lambda k: own[k])
    scale = own.abs().max()
    difference = (composite - expected).abs().amax(dim=0) / scale
    print(f"{name}: largest difference where the receptive field stays in the cell {difference[region].max():.2g}, "
          f"smallest just outside {difference[cells & ~region].min():.2g} (of the features' maximum)")
    assert difference[region].max() < 1e-5
    assert difference[cells & ~region].min() > 5e-5
    if name == "alexnet":
        assert size == (27, 27) and not cells[13].any() and not cells[:, 13].any()  # the seam
        # The earlier rule (the 26x26 placement resized to 27x27) puts features half a cell off.
        resized = F.interpolate(tile_2x2(own[None]), size=size, mode="bilinear", align_corners=False)[0]
        assert ((composite - resized).abs().amax(dim=0) / scale)[region].max() > 0.05
    else:
        assert size == (2 * h, 2 * h)


@pytest.mark.parametrize("name", ["convnext_tiny", "vit"])
def test_target_placement_is_nearest_where_every_position_sees_the_whole_composite(name):
    """ConvNeXt's 7x7 depthwise stages and a ViT's global attention see past any cell: no position
    of the composite's features is its image's own exactly. The rule still puts each image where
    the network sees it: in every cell the composite's features are nearer to that image's own,
    placed there by ``composite_target``, than to any other image's."""
    torch.manual_seed(0)
    net, side = (build_network(name, 5), 224) if name == "convnext_tiny" else (small_vit(5), 32)
    for parameter_name, parameter in net.named_parameters():
        if parameter_name.endswith("layer_scale"):
            # torchvision starts them at 1e-6, where every block is nearly the identity and the
            # features nearly local; a trained network's are far from there.
            parameter.data.fill_(1.0)
    net.eval()
    images = torch.rand(4, 3, side, side)
    in_own_cell = CompositeLayout(samples=torch.tensor([0]), classes=torch.tensor([0]), cells=torch.tensor([0]),
                                  distractors=torch.tensor([[1, 2, 3]]), valid=torch.tensor([True]))
    with torch.no_grad():
        own = net.to_grid(net.forward_features(images), (side, side))
        composite = make_composite(images, in_own_cell)
        composite = net.to_grid(net.forward_features(composite), tuple(composite.shape[-2:]))[0]
    size = tuple(composite.shape[-2:])
    assert size == tuple(2 * side for side in own.shape[-2:])
    cells = [composite_target(torch.ones(1, *own.shape[-2:]), torch.tensor([k]), size)[0] > 0 for k in range(4)]
    # distance[k, j]: the composite's features in cell k against image j's placed in cell k.
    distance = torch.tensor([[((composite - composite_target(own[j], torch.full((own.shape[1],), k), size))
                               [:, cells[k]]).norm() / own[j].norm() for j in range(4)] for k in range(4)])
    print(f"{name}: relative distance to the own image's features {distance.diagonal().max():.3g}, "
          f"to another's at least {distance[~torch.eye(4, dtype=torch.bool)].min():.3g}")
    assert (distance.argmin(dim=1) == torch.arange(4)).all()


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


def test_multilabel_classification_loss_sums_over_classes():
    """The authors' COCO objective, ``80 * BCE_mean``: BCE summed over the classes, averaged over
    the batch."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    targets = (torch.rand(5, 7, generator=generator) < 0.4).double()
    loss = classification_loss(logits, targets)
    assert torch.allclose(loss, 7 * F.binary_cross_entropy_with_logits(logits, targets))
    by_hand = 0.0
    for b in range(5):
        for k in range(7):
            p = torch.sigmoid(logits[b, k])
            by_hand -= targets[b, k] * torch.log(p) + (1 - targets[b, k]) * torch.log(1 - p)
    assert torch.allclose(loss, by_hand / 5)
    labels = torch.tensor([0, 3, 6, 2, 2])
    assert torch.allclose(classification_loss(logits, labels), F.cross_entropy(logits, labels))  # single label: CE


# Instances per class of one image: classes 0, 2, 4 hold 3, 1, 6 instances; 1 is labelled with no
# instance and 3 has a count but no label, so neither may be explained.
COUNTS = torch.tensor([3.0, 0.0, 1.0, 2.0, 6.0])
LABELS = torch.tensor([True, True, True, False, True])


def _draw_frequencies(weights, draws=6000):
    labels = LABELS.expand(draws, -1)
    if weights is not None:
        weights = weights.expand(draws, -1)
    positive = choose_positive(labels, torch.Generator().manual_seed(0), weights)
    return torch.bincount(positive, minlength=len(LABELS)).double() / draws


def test_positive_drawn_by_instance_count():
    frequencies = _draw_frequencies(COUNTS)
    # 6000 draws: the standard deviation of each frequency is at most 0.0065; bounds at 4.5 of them.
    expected = torch.tensor([0.3, 0.0, 0.1, 0.0, 0.6], dtype=torch.float64)
    assert torch.allclose(frequencies, expected, atol=0.03), frequencies
    assert frequencies[1] == 0 and frequencies[3] == 0


def test_positive_drawn_uniformly_over_labels():
    frequencies = _draw_frequencies(None)
    expected = torch.tensor([0.25, 0.25, 0.25, 0.0, 0.25], dtype=torch.float64)
    assert torch.allclose(frequencies, expected, atol=0.03), frequencies
    assert frequencies[3] == 0


def test_instance_counts_must_fit_the_labels():
    with pytest.raises(ValueError, match="do not match the labels"):
        choose_positive(LABELS[None], weights=COUNTS)
    labels = torch.tensor([[True, False], [False, True]])
    with pytest.raises(ValueError, match="batch images \\[1\\] have labels but no instance"):
        choose_positive(labels, weights=torch.tensor([[2.0, 0.0], [1.0, 0.0]]))


def test_random_layout_draws_by_weights_on_multilabel_data_only():
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    counts = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 2.0], [5.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    for seed in range(5):
        layout = random_layout(targets, 3, torch.Generator().manual_seed(seed), counts)
        assert layout.classes.tolist() == [1, 2, 0, 0]
    single = torch.tensor([2, 0, 1, 1])
    layout = random_layout(single, 3, torch.Generator().manual_seed(0), counts)
    assert torch.equal(layout.classes, single)


def _classifier(positive: str, multilabel: bool, composite_source: str = "batch") -> GCClassifier:
    return GCClassifier(
        model={"name": "tiny"}, loss={"name": "gc", "lambda": 1.0, "cam_mode": "elementwise", "detach_target": False,
                                      "positive": positive, "composite_source": composite_source,
                                      "composites": "per_sample"},
        optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "none"}, num_classes=3, multilabel=multilabel,
        layout_seed=0, net=tiny_net(3),
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a step outside a Trainer logs nothing
@pytest.mark.parametrize("positive", ["instances", "labels"])
def test_training_step_passes_instance_counts_as_loss_positive_says(monkeypatch, positive):
    seen = []
    monkeypatch.setattr(gcmodels.objectives.gc, "random_layout",
                        lambda targets, num_classes, generator, weights: seen.append(weights) or
                        random_layout(targets, num_classes, generator, weights))
    batch = {"image": torch.rand(4, 3, 8, 8), "target": torch.eye(3)[[0, 1, 2, 0]],
             "instances": torch.eye(3)[[0, 1, 2, 0]] * 2}
    _classifier(positive, multilabel=True).training_step(batch, 0)
    assert seen[-1] is (batch["instances"] if positive == "instances" else None)
    single = {"image": batch["image"], "target": torch.tensor([0, 1, 2, 0])}  # no counts: not needed
    _classifier(positive, multilabel=False).training_step(single, 0)
    assert seen[-1] is None
    without_counts = {"image": batch["image"], "target": batch["target"]}
    if positive == "instances":
        with pytest.raises(ValueError, match="loss.positive=instances .* no 'instances'"):
            _classifier(positive, multilabel=True).training_step(without_counts, 0)
    else:
        _classifier(positive, multilabel=True).training_step(without_counts, 0)


GC_OPTIONS = {"name": "gc", "lambda": 1.0, "cam_mode": "elementwise", "detach_target": False, "positive": "labels",
              "composite_source": "batch", "composites": "per_sample"}


@pytest.mark.parametrize("key, other", [("positive", "instances"), ("composite_source", "dataset")])
def test_loss_options_positive_and_composite_source_are_required(key, other):
    OBJECTIVES.validate(GC_OPTIONS)
    assert getattr(OBJECTIVES.validate({**GC_OPTIONS, key: other}), key) == other
    with pytest.raises(ConfigError) as error:
        OBJECTIVES.validate({name: value for name, value in GC_OPTIONS.items() if name != key})
    assert error.value.keys == [f"loss.{key}"]


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
    assert gradcheck_in_weights(
        net, lambda functional: gc_objective(functional, images, targets, layout, lam=10.0).loss)


def test_vit_gc_loss_gradcheck_float64():
    """The same for a ViT: double backprop through attention (on the math kernel, the one with a
    double backward) and through the position embeddings resized for the 2x composite."""
    torch.manual_seed(0)
    net = small_vit(4, patch_size=4, image_size=8, hidden_dim=8, mlp_dim=8).double()
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3])
    assert gradcheck_in_weights(
        net, lambda functional: gc_objective(functional, images, targets, _fixed_layout(targets), lam=10.0).loss)


def _attention_kernels(run) -> set[str]:
    """The scaled dot-product attention kernels ``run()`` calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return {event.name for event in profile.events() if "scaled_dot_product" in event.name}


def test_vit_attention_takes_the_math_kernel_only_in_a_second_order_graph():
    """The fused kernels (flash, memory-efficient) have no double backward: the GC loss's forward
    passes take the math kernel, and everything else keeps the fused ones (faster, leaner):
    a classification step and the evaluation's Grad-CAM."""
    torch.manual_seed(0)
    net = small_vit(4)
    images, targets = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    math = "aten::_scaled_dot_product_attention_math"

    def fused(kernels):
        return {name for name in kernels if any(kind in name for kind in ("flash", "efficient", "cudnn"))}

    classification = _attention_kernels(lambda: classification_loss(net(images), targets).backward())
    explanation = _attention_kernels(lambda: gradcam(net, images, targets))
    gc = _attention_kernels(lambda: gc_objective(net, images, targets, _fixed_layout(targets), lam=1.0).loss.backward())
    assert fused(classification) and math not in classification
    assert fused(explanation) and math not in explanation
    assert math in gc and not fused(gc)


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


@pytest.mark.parametrize("cam_mode", ["elementwise", "standard"])
def test_dataset_mode_loss_equals_batch_mode_for_the_same_distractors(cam_mode):
    """loss.composite_source=dataset changes where the distractors come from, nothing else: with the
    batch layout's distractor images given as each sample's own, the loss, its terms and its
    gradient are those of the batch mode."""
    torch.manual_seed(0)
    net = tiny_net(num_classes=4).double()
    images, targets = torch.rand(6, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    layout = _fixed_layout(targets)
    assert layout.valid.all()
    batch = gc_objective(net, images, targets, layout, lam=2.5, cam_mode=cam_mode)
    own = own_distractors_layout(layout.classes, layout.cells)
    dataset = gc_objective(net, images, targets, own, lam=2.5, cam_mode=cam_mode,
                           distractor_images=images[layout.distractors].clone())
    assert dataset.num_composites == batch.num_composites == 6
    for name in ("loss", "classification_loss", "consistency_loss", "logits"):
        assert torch.equal(getattr(dataset, name), getattr(batch, name)), name
    weight = net.head[-1].weight
    assert torch.equal(torch.autograd.grad(dataset.loss, weight)[0], torch.autograd.grad(batch.loss, weight)[0])
