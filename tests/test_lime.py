import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.explainers import EXPLAINERS, Lime, build_explainer
from gcmodels.networks import ExplainableNet
from tests.conftest import tiny_net

SIZE = 32
OPTIONS = dict(num_samples=40, kernel_width=0.25, num_segments=8, compactness=10.0, seed=0, fill="mean",
               score="probability", ridge=1.0)


def lime(**changes) -> Lime:
    return Lime(**{**OPTIONS, **changes})


def smooth_images(batch=3, dtype=torch.float64, seed=1):
    """Smooth colour fields: SLIC finds several superpixels in them (pure noise gives one)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=generator, dtype=dtype)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def smooth_net():
    torch.manual_seed(0)
    return tiny_net(num_classes=4).double().eval()


def assert_same_weights(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_weights_of_a_linear_model_are_each_superpixels_exact_contribution():
    """logit_t(x) = sum_p w_tp x_p + b_t, and with fill 0 a perturbation keeps x_p where its
    superpixel is on: logit_t = sum_s z_s c_s + b_t, c_s = sum_{p in s} w_tp x_p, exactly linear in
    z, so the (nearly unpenalised) weighted least squares recovers c whatever its weights."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(1), nn.Linear(3 * SIZE * SIZE, 5))
    net = ExplainableNet(nn.Identity(), head).double().eval()
    images, targets = smooth_images(), torch.tensor([0, 3, 4])
    explainer = lime(num_samples=200, fill=0.0, score="logit", ridge=1e-6)
    segments, weights = explainer.superpixel_weights(net, images, targets)
    pixel_weights = head[1].weight.detach()[targets].view(-1, 3, SIZE, SIZE)
    contributions = (pixel_weights * images).sum(dim=1)  # [B, H, W]
    for image_segments, image_contributions, weight in zip(segments, contributions, weights):
        count = int(image_segments.max()) + 1
        assert count >= 4 and weight.shape == (count,) and weight.dtype == torch.float64
        expected = torch.zeros(count, dtype=torch.float64).index_add_(
            0, image_segments.flatten(), image_contributions.flatten())
        torch.testing.assert_close(weight, expected, rtol=1e-6, atol=1e-8)


def test_weights_do_not_depend_on_samples_per_pass():
    net, images, targets = smooth_net(), smooth_images(), torch.tensor([0, 1, 2])
    reference = lime(samples_per_pass=1).superpixel_weights(net, images, targets)
    for per_pass in (7, None):
        segments, weights = lime(samples_per_pass=per_pass).superpixel_weights(net, images, targets)
        assert torch.equal(segments, reference[0])
        assert_same_weights(weights, reference[1])


def test_an_image_gets_the_same_perturbations_anywhere_in_any_batch():
    net, images, targets = smooth_net(), smooth_images(), torch.tensor([0, 1, 2])
    explainer = lime(samples_per_pass=11)
    _, weights = explainer.superpixel_weights(net, images, targets)
    order = torch.tensor([2, 0])
    _, reordered = explainer.superpixel_weights(net, images[order], targets[order])
    assert_same_weights(reordered, [weights[2], weights[0]])
    _, alone = explainer.superpixel_weights(net, images[1:2], targets[1:2])
    assert_same_weights(alone, [weights[1]])

    segments = explainer.segment(images)
    masks = explainer.perturbations(images, segments)
    assert all(mask.shape == (40, int(s.max()) + 1) and mask[0].all() for mask, s in zip(masks, segments))
    assert not torch.equal(masks[0], masks[1][:, : masks[0].shape[1]])  # images draw apart
    other_seed = lime(seed=1).perturbations(images, segments)
    assert all(not torch.equal(a, b) for a, b in zip(masks, other_seed))
    assert all(torch.equal(a, b) for a, b in zip(masks, lime().perturbations(images, segments)))


def test_segmentation_is_deterministic_and_labels_every_pixel_contiguously():
    images = smooth_images(batch=4)
    explainer = lime()
    segments = explainer.segment(images)
    assert segments.shape == (4, SIZE, SIZE) and segments.dtype == torch.long
    assert torch.equal(segments, explainer.segment(images))
    assert torch.equal(segments[1:3], explainer.segment(images[1:3]))
    for image_segments in segments:
        ids = image_segments.unique()
        assert len(ids) > 1 and torch.equal(ids, torch.arange(len(ids)))


def test_map_paints_the_positive_part_of_each_superpixels_weight():
    net, images, targets = smooth_net(), smooth_images(), torch.tensor([3, 1, 0])
    explainer = lime()
    maps = explainer(net, images, targets)
    segments, weights = explainer.superpixel_weights(net, images, targets)
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == images.dtype and (maps >= 0).all()
    for image_map, image_segments, weight in zip(maps, segments, weights):
        assert (weight < 0).any() and (weight > 0).any()  # the clipping is exercised
        torch.testing.assert_close(image_map, weight.clamp(min=0)[image_segments], rtol=1e-9, atol=1e-12)


def test_works_under_no_grad_and_leaves_no_parameter_gradients():
    net, images, targets = smooth_net(), smooth_images(batch=2).float(), torch.tensor([0, 1])
    net.float()
    explainer = lime()
    with torch.no_grad():
        maps = explainer(net, images, targets)
    assert not maps.requires_grad and maps.amax() > 0
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    torch.testing.assert_close(maps, explainer(net, images, targets))


@pytest.mark.parametrize("option, value", [
    ("num_samples", 1), ("kernel_width", 0.0), ("kernel_width", -0.25), ("num_segments", 0),
    ("compactness", 0.0), ("ridge", -1.0), ("samples_per_pass", 0), ("score", "margin"),
    ("fill", "median"), ("fill", True),
])
def test_bad_options_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        lime(**{option: value})


def test_refuses_training_mode_batch_norm():
    # Batch statistics would make each perturbation's score depend on the others in its pass.
    net = ExplainableNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 2))).double()
    with pytest.raises(ValueError, match="eval"):
        lime()(net, smooth_images(batch=1), torch.tensor([0]))


@pytest.mark.parametrize("per_pass", [1, 4, 7, None])
def test_build_explainer_and_forward_passes(per_pass):
    assert EXPLAINERS["lime"] is Lime
    explainer = build_explainer("lime", **{**OPTIONS, "num_samples": 10}, samples_per_pass=per_pass)
    assert isinstance(explainer, Lime) and explainer.num_samples == 10
    net, images, targets = smooth_net(), smooth_images(), torch.tensor([0, 1, 2])
    sizes = []
    handle = net.register_forward_hook(lambda _module, inputs, _output: sizes.append(len(inputs[0])))
    try:
        explainer(net, images, targets)
    finally:
        handle.remove()
    total = 3 * 10
    step = per_pass or total  # 32 px images: the default pass holds thousands
    assert len(sizes) == math.ceil(total / step) and sum(sizes) == total
    assert sizes[:-1] == [step] * (len(sizes) - 1)
