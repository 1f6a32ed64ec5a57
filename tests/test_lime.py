import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lime.lime_base import LimeBase
from lime.lime_image import LimeImageExplainer
from lime.wrappers.scikit_image import SegmentationAlgorithm
from sklearn.linear_model import Ridge
from sklearn.metrics import pairwise_distances
from torch import nn

from evaluation.explainers import EXPLAINERS, Lime, build_explainer
from gcmodels.networks import ExplainableNet
from gcmodels.options import ConfigError
from tests.conftest import tiny_net

SIZE = 32
OPTIONS = dict(num_samples=40, kernel_width=0.25, segmentation="slic", num_segments=8, compactness=10.0,
               kernel_size=4.0, max_dist=200.0, ratio=0.2, seed=0, fill="segment", score="probability",
               ridge=1.0)
# lime_image's kernel width, in its exp(-d^2 / (2 w^2)) form.
LIME_WIDTH = 0.25


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


def test_the_old_fill_mean_is_refused_not_reread():
    # "mean" was the whole image's mean colour before the default became each superpixel's own
    # (now fill=image); fill=segment is lime_image's.
    with pytest.raises(ConfigError) as error:
        EXPLAINERS.validate({"name": "lime", **OPTIONS, "fill": "mean"})
    assert error.value.keys == ["explainer.fill"]
    for fill in ("segment", "image", 0.5):
        assert EXPLAINERS.validate({"name": "lime", **OPTIONS, "fill": fill}).fill == fill


# -------------------------------------------------------------------------- the lime package


def quadrants(size=8, batch=1):
    """Four square superpixels, ids 0..3 row by row, ``[batch, 2 * size, 2 * size]``."""
    ids = torch.arange(4).view(2, 2).repeat_interleave(size, 0).repeat_interleave(size, 1)
    return ids.expand(batch, -1, -1).clone()


def test_fill_paints_each_superpixel_with_its_own_mean_the_image_mean_or_a_grey_level():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=generator, dtype=torch.float64)
    # The second image has two superpixels, so ids are shifted per image in the batched sums.
    segments = torch.stack([quadrants()[0], quadrants()[0] // 2])
    fill = lime().fill_images(images, segments)
    assert fill.shape == images.shape and fill.dtype == images.dtype
    for image, image_fill, image_segments in zip(images, fill, segments):
        for segment in image_segments.unique():
            inside = image_segments == segment
            mean = image[:, inside].mean(dim=1)
            torch.testing.assert_close(image_fill[:, inside], mean.unsqueeze(1).expand(-1, int(inside.sum())),
                                       rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(lime(fill="image").fill_images(images, segments).expand_as(images),
                               images.mean(dim=(2, 3), keepdim=True).expand_as(images), rtol=0, atol=0)
    assert torch.equal(lime(fill=0.25).fill_images(images, segments).expand_as(images),
                       torch.full_like(images, 0.25))


def lime_image_run(net, image, target, segments, mask, num_samples):
    """``lime_image.explain_instance`` with its defaults (``hide_color=None``, ``Ridge(alpha=1)``,
    every superpixel kept), on ``segments`` and with ``mask`` as its random on/off draws: the
    images its classifier received and the weights of ``target``."""
    received = []

    def classifier(batch):
        received.append(torch.from_numpy(batch).permute(0, 3, 1, 2))
        with torch.no_grad():
            return net(received[-1]).softmax(dim=1).numpy()

    explainer = LimeImageExplainer(kernel_width=LIME_WIDTH)
    # data_labels draws its on/off matrix with random_state.randint(0, 2, num_samples * S).
    explainer.random_state = SimpleNamespace(randint=lambda low, high, size: mask.long().flatten().numpy())
    explanation = explainer.explain_instance(
        image.permute(1, 2, 0).numpy(), classifier, labels=(int(target),), top_labels=None,
        num_samples=num_samples, segmentation_fn=lambda _image: segments.numpy(), random_seed=0)
    weights = torch.zeros(int(segments.max()) + 1, dtype=torch.float64)
    for segment, weight in explanation.local_exp[int(target)]:
        weights[segment] = weight
    return torch.cat(received), weights


@pytest.mark.parametrize("handmade", [True, False])
def test_perturbed_images_and_weights_equal_lime_images(handmade):
    """The same superpixels and on/off draws through lime_image and through Lime: the same
    perturbed images (off superpixels in their own mean colour) and the same weights."""
    net, images = smooth_net(), smooth_images(batch=2)
    targets = torch.tensor([1, 3])
    explainer = lime(kernel_width=LIME_WIDTH * math.sqrt(2))
    segments = quadrants(size=SIZE // 2, batch=2) if handmade else explainer.segment(images)
    received = []
    handle = net.register_forward_hook(lambda _module, inputs, _output: received.append(inputs[0]))
    try:
        _, weights = explainer.superpixel_weights(net, images, targets, segments)
    finally:
        handle.remove()
    perturbed = torch.cat(received).view(2, OPTIONS["num_samples"], 3, SIZE, SIZE)
    masks = explainer.perturbations(images, segments)
    for index in range(2):
        assert not masks[index][1:].all(dim=1).all()  # some superpixel is off: the fill is used
        lime_images, lime_weights = lime_image_run(net, images[index], targets[index], segments[index],
                                                   masks[index], OPTIONS["num_samples"])
        torch.testing.assert_close(perturbed[index], lime_images, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(weights[index], lime_weights, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("ridge, regressor, selection, features", [
    (1.0, None, "auto", 100000),  # lime_image's defaults: Ridge(alpha=1), and 'auto' keeps every column
    (0.3, Ridge(alpha=0.3), "none", 12),
    (0.0, Ridge(alpha=0.0), "none", 12),
])
def test_fit_is_lime_bases_weighted_ridge(ridge, regressor, selection, features):
    generator = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 2, (300, 12), generator=generator).bool()
    mask[0] = True
    score = torch.rand(300, generator=generator, dtype=torch.float64)
    data = mask.long().numpy()
    distances = pairwise_distances(data, data[:1], metric="cosine").ravel()  # as lime_image
    base = LimeBase(lambda d: np.sqrt(np.exp(-(d ** 2) / LIME_WIDTH ** 2)))  # lime_image's kernel
    labels = torch.stack([1 - score, score], dim=1).numpy()
    _, local, _, _ = base.explain_instance_with_data(data, labels, distances, 1, features,
                                                     feature_selection=selection, model_regressor=regressor)
    expected = torch.zeros(12, dtype=torch.float64)
    for feature, weight in local:
        expected[feature] = weight
    fitted = lime(kernel_width=LIME_WIDTH * math.sqrt(2), ridge=ridge)._fit(mask, score)
    torch.testing.assert_close(fitted, expected, rtol=1e-8, atol=1e-12)


def test_quickshift_is_lime_images_segmentation():
    """The same superpixels as lime_image's default SegmentationAlgorithm, ids up to relabelling."""
    generator = torch.Generator().manual_seed(3)
    coarse = torch.rand(2, 3, 6, 6, generator=generator, dtype=torch.float64)
    images = F.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    algorithm = SegmentationAlgorithm("quickshift", kernel_size=4, max_dist=200, ratio=0.2, random_seed=0)
    segments = lime(segmentation="quickshift").segment(images)
    for image, ours in zip(images, segments):
        theirs = algorithm(image.permute(1, 2, 0).numpy())
        count = len(np.unique(theirs))
        assert count > 3 and torch.equal(ours.unique(), torch.arange(count))
        # One to one: each pair (ours, theirs) occurs for exactly one id of either.
        assert len(np.unique(np.stack([ours.numpy().ravel(), theirs.ravel()]), axis=1).T) == count


def test_refuses_training_mode_batch_norm():
    # Batch statistics would make each perturbation's score depend on the others in its pass.
    net = ExplainableNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 2))).double()
    with pytest.raises(ValueError, match="eval"):
        lime()(net, smooth_images(batch=1), torch.tensor([0]))


@pytest.mark.parametrize("per_pass", [1, 4, 7, None])
def test_build_explainer_and_forward_passes(per_pass):
    assert EXPLAINERS["lime"].target is Lime
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
