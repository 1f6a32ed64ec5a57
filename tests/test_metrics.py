"""Explanation metrics against naive per-image references written here (distances to every mask
pixel, one point at a time), hand-built maps, and a linear model whose input gradient is known."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.attacks import fgsm
from evaluation.metrics import (
    ContentHeatmap,
    FGSMRobustness,
    NegativeQuadrantsHeatmap,
    PointingGame,
    StochasticPointingGame,
    functional,
)
from tests.conftest import fgsm_case

NAN = float("nan")


# ---------------------------------------------------------------- naive references (per image)

def naive_hit(mask: np.ndarray, y: int, x: int, tolerance: float) -> bool:
    """The point (y, x) is a hit iff its distance to some mask pixel is < tolerance."""
    ys, xs = np.nonzero(mask)
    return bool(np.sqrt((ys - y) ** 2 + (xs - x) ** 2).min() < tolerance)


def naive_distance_grid(mask: np.ndarray) -> np.ndarray:
    """Distance from every pixel to the nearest mask pixel (inf for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return np.full(mask.shape, np.inf)
    grid_y, grid_x = np.mgrid[:mask.shape[0], :mask.shape[1]]
    return np.sqrt((grid_y[..., None] - ys) ** 2 + (grid_x[..., None] - xs) ** 2).min(-1)


def scorable(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    return heatmap.any() and mask.any()


def naive_pointing_game(heatmap: np.ndarray, mask: np.ndarray, tolerance: float) -> float:
    if not scorable(heatmap, mask):
        return NAN
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)  # first maximum, row-major
    return float(naive_hit(mask, y, x, tolerance))


def naive_stochastic_pointing_game(mask: np.ndarray, points: np.ndarray, tolerance: float) -> float:
    width = mask.shape[1]
    return float(np.mean([naive_hit(mask, p // width, p % width, tolerance) for p in points]))


def naive_content_heatmap(heatmap: np.ndarray, mask: np.ndarray) -> float:
    if not scorable(heatmap, mask):
        return NAN
    return float(heatmap[mask].sum() / heatmap.sum())


def per_image(reference, *tensors, **kwargs) -> torch.Tensor:
    arrays = [t.double().numpy() if t.is_floating_point() else t.numpy() for t in tensors]
    return torch.tensor([reference(*items, **kwargs) for items in zip(*arrays)], dtype=torch.float64)


def assert_scores(actual: torch.Tensor, expected: torch.Tensor, atol: float = 0.0) -> None:
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=0, equal_nan=True)


# ---------------------------------------------------------------- random cases

def random_cases(seed: int, batch: int = 24, height: int = 37, width: int = 53, coarse=(5, 7)):
    """Smooth peaky heatmaps (``coarse`` size, upsampled unless ``coarse`` is None) and masks:
    random boxes (many touching a border) and blobs, plus an empty mask, a full mask and two
    all-zero heatmaps (one of them on an empty mask)."""
    generator = torch.Generator().manual_seed(seed)
    heatmaps = torch.rand(batch, 1, *coarse, generator=generator) ** 4
    if (height, width) != tuple(coarse):
        heatmaps = F.interpolate(heatmaps, size=(height, width), mode="bilinear", align_corners=False)
    heatmaps = heatmaps.squeeze(1)
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    for b in range(batch):
        if b % 3 == 0:  # blob: thresholded smooth noise
            noise = F.interpolate(torch.rand(1, 1, 4, 4, generator=generator), size=(height, width), mode="bilinear")
            masks[b] = noise[0, 0] > 0.7
        else:  # box, corners drawn beyond the image so that it often touches a border
            y0, y1 = sorted(torch.randint(-height // 4, height + height // 4, (2,), generator=generator).tolist())
            x0, x1 = sorted(torch.randint(-width // 4, width + width // 4, (2,), generator=generator).tolist())
            masks[b, max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    masks[1] = False
    masks[2] = True
    heatmaps[3] = 0
    heatmaps[1] = 0
    return heatmaps, masks


# ---------------------------------------------------------------- dilation and PG

@pytest.fixture(scope="module")
def masks_and_distances():
    _, masks = random_cases(0)
    return masks, np.stack([naive_distance_grid(m) for m in masks.numpy()])


@pytest.mark.parametrize("tolerance", [15, 14.9, 6, 2.5, 1, 0.5])
def test_dilate_masks_equals_distance_grid(masks_and_distances, tolerance):
    masks, distances = masks_and_distances
    assert torch.equal(functional.dilate_masks(masks, tolerance), torch.from_numpy(distances < tolerance))


@pytest.mark.parametrize("tolerance", [15, 6, 1.5])
@pytest.mark.parametrize("size", [(37, 53), (24, 24), (53, 9)])
def test_pointing_game_equals_naive(tolerance, size):
    heatmaps, masks = random_cases(1, height=size[0], width=size[1])
    expected = per_image(naive_pointing_game, heatmaps, masks, tolerance=tolerance)
    valid = ~expected.isnan()
    hits = functional.pointing_game(heatmaps, masks, tolerance)
    assert hits.dtype == torch.bool and hits.shape == (len(heatmaps),)
    assert torch.equal(hits[valid], expected[valid] == 1)
    assert not hits[~valid].any()  # unscorable images are False, never a hit
    both = functional.pointing_hits(heatmaps, masks, tolerance)
    assert torch.equal(both[0], hits) and torch.equal(both[1], valid)


def test_pointing_game_sees_hits_and_misses():
    heatmaps, masks = random_cases(2, batch=48)
    hits, valid = functional.pointing_hits(heatmaps, masks, 4)
    assert hits.any() and (valid & ~hits).any()


@pytest.mark.parametrize(
    "offset, tolerance, hit",
    [
        ((0, 14), 15, True),
        ((0, 15), 15, False),  # exactly 15: a miss
        ((9, 12), 15, False),  # 9^2 + 12^2 = 15^2: a miss on a diagonal
        ((10, 11), 15, True),  # sqrt(221) = 14.87
        ((10, 11), 14.9, True),
        ((10, 11), 14.8, False),
        ((-14, 0), 15, True),
        ((-12, -9), 15, False),
    ],
)
def test_pointing_game_tolerance_edges(offset, tolerance, hit):
    mask = torch.zeros(1, 60, 60, dtype=torch.bool)
    mask[0, 25, 25] = True
    heatmap = torch.zeros(1, 60, 60)
    heatmap[0, 25 + offset[0], 25 + offset[1]] = 1.0
    assert functional.pointing_game(heatmap, mask, tolerance).item() is hit
    assert functional.dilate_masks(mask, tolerance)[0, 25 + offset[0], 25 + offset[1]].item() == hit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])  # numpy's argmax, torch's
def test_pointing_game_ties_take_the_first_maximum(dtype):
    heatmap = torch.zeros(2, 10, 10, dtype=dtype)
    heatmap[:, 0, 9] = heatmap[:, 9, 0] = 1.0  # (0, 9) comes first in row-major order
    mask = torch.zeros(2, 10, 10, dtype=torch.bool)
    mask[0, 9, 0] = True  # at the second maximum: a miss
    mask[1, 0, 9] = True  # at the first: a hit
    assert functional.pointing_game(heatmap, mask, tolerance=2).tolist() == [False, True]


# ---------------------------------------------------------------- SPG and CH

@pytest.mark.parametrize("tolerance", [15, 4])
def test_stochastic_pointing_game_equals_naive_on_the_same_points(tolerance):
    heatmaps, masks = random_cases(3, coarse=(37, 53))  # rough maps: points spread everywhere
    points = functional._sample_points(heatmaps, 50, torch.Generator().manual_seed(7))
    scores = functional.stochastic_pointing_game(heatmaps, masks, 50, tolerance, torch.Generator().manual_seed(7))
    expected = torch.tensor([
        naive_stochastic_pointing_game(m, p, tolerance) if scorable(h, m) else NAN
        for h, m, p in zip(heatmaps.numpy(), masks.numpy(), points.numpy())
    ], dtype=torch.float64)
    assert_scores(scores, expected, atol=1e-6)  # k/50 in float32 against float64
    assert ((expected > 0) & (expected < 1)).any()


def test_sampled_points_follow_the_heatmap():
    heatmap = torch.zeros(1, 4, 5)
    heatmap[0, 1, 2], heatmap[0, 3, 4] = 3.0, 1.0
    points = functional._sample_points(heatmap, 4000, torch.Generator().manual_seed(0))
    assert set(points.unique().tolist()) == {1 * 5 + 2, 3 * 5 + 4}
    assert abs((points == 7).float().mean().item() - 0.75) < 0.03


def test_stochastic_pointing_game_mean_matches_its_expectation():
    """Through the class, with small maps upsampled: the mean over images and runs of the hit
    fraction estimates the mean heatmap mass inside the dilated mask."""
    heatmaps, masks = random_cases(4, batch=600, height=24, width=24, coarse=(6, 6))
    metric = StochasticPointingGame(tolerance=3, tolerance_at=None, num_samples=20, num_runs=5, seed=0)
    metric.update(heatmaps[:, ::4, ::4], masks, torch.arange(600))  # 6x6 maps, upsampled to 24x24 inside
    upsampled = F.interpolate(heatmaps[:, None, ::4, ::4], size=(24, 24), mode="bilinear")[:, 0].double()
    valid = functional.valid_pairs(upsampled, masks)
    inside = (upsampled * functional.dilate_masks(masks, 3)).sum((1, 2)) / upsampled.sum((1, 2))
    p = inside[valid]
    standard_error = (p * (1 - p)).sum().sqrt() / math.sqrt(20 * 5) / len(p)
    result = metric.compute()
    assert abs(result["spg"] - p.mean()) < 4 * standard_error
    assert 0.2 < p.mean() < 0.8 and result["skipped"] == (~valid).sum()


def test_content_heatmap_equals_naive():
    heatmaps, masks = random_cases(5)
    expected = per_image(naive_content_heatmap, heatmaps, masks)
    assert_scores(functional.content_heatmap(heatmaps, masks), expected, atol=1e-6)


def test_invalid_images_are_nan_for_every_score_and_false_in_the_pointing_game():
    heatmaps, masks = random_cases(6, batch=6)  # 1: zero map + empty mask, 2: full mask, 3: zero map
    masks[4] = False
    expected_valid = torch.tensor([True, False, True, False, False, True])
    assert torch.equal(functional.valid_pairs(heatmaps, masks), expected_valid)
    assert torch.equal(functional.valid_pairs(heatmaps), heatmaps.flatten(1).amax(1) > 0)
    hits, valid = functional.pointing_hits(heatmaps, masks)
    assert torch.equal(valid, expected_valid) and not hits[~valid].any()
    assert not functional.pointing_game(heatmaps, masks)[~valid].any()
    for scores in (
        functional.stochastic_pointing_game(heatmaps, masks, generator=torch.Generator().manual_seed(0)),
        functional.content_heatmap(heatmaps, masks),
    ):
        assert torch.equal(scores.isnan(), ~expected_valid)
    nqh = functional.negative_quadrants_heatmap(heatmaps, torch.zeros(6, dtype=torch.long))
    assert torch.equal(nqh.isnan(), heatmaps.flatten(1).amax(1) == 0)


def test_bad_inputs_are_refused():
    heatmaps, masks = random_cases(7, batch=4)
    with pytest.raises(ValueError, match="non-negative"):
        functional.pointing_game(heatmaps - 0.5, masks)
    with pytest.raises(ValueError, match="finite"):
        functional.content_heatmap(heatmaps.masked_fill(masks, NAN), masks)
    with pytest.raises(ValueError, match="bool"):
        functional.content_heatmap(heatmaps, masks.float())
    with pytest.raises(ValueError, match="upsample"):
        functional.pointing_game(heatmaps[:, :10], masks)
    with pytest.raises(ValueError, match="0..3"):
        functional.negative_quadrants_heatmap(heatmaps, torch.tensor([0, 1, 2, 4]))


@pytest.mark.parametrize("bad, count", [(NAN, "1 NaN, 0 inf and 0 negative"), (math.inf, "0 NaN, 1 inf and 0 negative"),
                                        (-math.inf, "0 NaN, 1 inf and 1 negative"),
                                        (-1e-9, "0 NaN, 0 inf and 1 negative")])
def test_heatmaps_that_are_no_distribution_are_refused_by_every_score(bad, count):
    heatmaps, masks = random_cases(7, batch=4)
    heatmaps[2, 5, 6] = bad
    message = rf"heatmaps \(4, 37, 53\) must be finite and non-negative .* got {count} values"
    for score in (
        lambda: functional.pointing_hits(heatmaps, masks),
        lambda: functional.stochastic_pointing_game(heatmaps, masks, seeds=torch.arange(4)),
        lambda: functional.content_heatmap(heatmaps, masks),
        lambda: functional.negative_quadrants_heatmap(heatmaps, torch.zeros(4, dtype=torch.long)),
        lambda: functional.upsample(heatmaps, (74, 106)),
        lambda: functional.valid_pairs(heatmaps),
    ):
        with pytest.raises(ValueError, match=message):
            score()


def test_tensors_on_another_device_or_of_another_shape_are_refused_with_their_shapes():
    """The meta device stands for a second device (a GPU) on any machine: the checks read only
    devices and shapes, before any computation."""
    heatmaps, masks = random_cases(7, batch=4)
    with pytest.raises(ValueError, match=r"masks \(4, 37, 53\) are on meta, the heatmaps \(4, 37, 53\) on cpu"):
        functional.content_heatmap(heatmaps, masks.to("meta"))
    with pytest.raises(ValueError, match=r"masks must be bool with the heatmaps' shape \(4, 37, 53\), got torch.bool "
                                         r"\(3, 37, 53\)"):
        functional.pointing_hits(heatmaps, masks[:3])
    with pytest.raises(ValueError, match=r"positive_cell \(4,\) are on meta, the heatmaps \(4, 37, 53\) on cpu"):
        functional.negative_quadrants_heatmap(heatmaps, torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"positive_cell must be integers \[B\] = \[4\] in 0..3, one per heatmap of "
                                         r"\(4, 37, 53\), got torch.float32 \(4,\)"):
        functional.negative_quadrants_heatmap(heatmaps, torch.zeros(4))
    with pytest.raises(ValueError, match=r"seeds must be integers \[B\] or \[B, k\] with B = 4 .*\(4, 37, 53\)\), "
                                         r"got torch.int64 \(5,\)"):
        functional.stochastic_pointing_game(heatmaps, masks, seeds=torch.arange(5))
    with pytest.raises(ValueError, match=r"got torch.float32 \(4, 2\)"):
        functional.stochastic_pointing_game(heatmaps, masks, seeds=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="give seeds or a generator, not both"):
        functional.stochastic_pointing_game(heatmaps, masks, generator=torch.Generator(), seeds=torch.arange(4))


def test_metric_classes_refuse_bad_classes_and_seeds_and_keep_their_state():
    small, masks, classes = localisation_batches()
    pg = PointingGame(tolerance=15, tolerance_at=None, num_classes=4)
    pg.update(small, masks, classes)
    before = pg.compute()
    for bad, message in (
        (classes[:-1], r"classes must be integers \[B\] = \[30\] in 0..3, one per heatmap of \(30, 8, 8\), "
                       r"got torch.int64 \(29,\)"),
        (classes.float(), r"got torch.float32 \(30,\)"),
        (classes + 1, r"classes must be in 0..3, got values from 1 to 4"),
        (classes.to("meta"), r"classes \(30,\) are on meta, the heatmaps \(30, 8, 8\) on cpu"),
    ):
        with pytest.raises(ValueError, match=message):
            pg.update(small, masks, bad)
    assert_results_equal(pg.compute(), before)
    spg = spg_metric()
    with pytest.raises(ValueError, match=r"seeds must be integers \[B\] or \[B, k\] with B = 30 .* got torch.int64 "
                                         r"\(30, 2, 1\)"):
        spg.update(small, masks, torch.zeros(30, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="seeds must be non-negative, got -1"):
        spg.update(small, masks, -torch.ones(30, dtype=torch.long))
    with pytest.raises(TypeError, match="seeds"):
        spg.update(small, masks)


# ---------------------------------------------------------------- NQH

@pytest.mark.parametrize("cell", [0, 1, 2, 3])
def test_negative_quadrants_heatmap_for_each_cell(cell):
    # Cell c of a 4x6 map holds mass c + 1 (spread over its 2x3 pixels); total 10.
    cell_mass = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    heatmap = cell_mass.repeat_interleave(2, 0).repeat_interleave(3, 1)[None] / 6
    nqh = functional.negative_quadrants_heatmap(heatmap, torch.tensor([cell]))
    assert nqh.item() == pytest.approx((10 - (cell + 1)) / 10)


@pytest.mark.parametrize("cell", [0, 1, 2, 3])
def test_negative_quadrants_heatmap_splits_the_middle_of_odd_sizes_evenly(cell):
    # The centre pixel of a 5x7 map belongs a quarter to each cell.
    heatmap = torch.zeros(1, 5, 7)
    heatmap[0, 2, 3] = 1.0
    assert functional.negative_quadrants_heatmap(heatmap, torch.tensor([cell])).item() == 0.75
    # A uniform 27x27 map (AlexNet's conv5 on a 448 px composite): each cell holds exactly a quarter,
    # where giving the middle row and column to the bottom/right cells would hold 13^2 / 27^2 top-left.
    uniform = torch.ones(1, 27, 27, dtype=torch.float64)
    assert functional.negative_quadrants_heatmap(uniform, torch.tensor([cell])).item() == pytest.approx(0.75, abs=1e-15)
    # A pixel on the middle row of the left half: half top-left, half bottom-left.
    row = torch.zeros(1, 5, 7)
    row[0, 2, 0] = 1.0
    expected = {0: 0.5, 1: 1.0, 2: 0.5, 3: 1.0}[cell]
    assert functional.negative_quadrants_heatmap(row, torch.tensor([cell])).item() == expected


# ---------------------------------------------------------------- metric classes

def localisation_batches():
    heatmaps, masks = random_cases(8, batch=30, coarse=(7, 7))
    small = heatmaps[:, ::5, ::7].contiguous()  # 8x8 maps, upsampled to 37x53 by the classes
    classes = torch.arange(30) % 4
    return small, masks, classes


def test_classes_upsample_small_heatmaps_and_match_the_naive_references():
    small, masks, _ = localisation_batches()
    upsampled = F.interpolate(small[:, None], size=masks.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    for metric, name, naive in (
        (PointingGame(tolerance=15, tolerance_at=None), "pg",
         per_image(naive_pointing_game, upsampled, masks, tolerance=15)),
        (ContentHeatmap(), "ch", per_image(naive_content_heatmap, upsampled, masks)),
    ):
        metric.update(small, masks)
        result = metric.compute()
        valid = ~naive.isnan()
        assert result[name].item() == pytest.approx(naive[valid].mean().item(), abs=1e-6)
        assert result["skipped"] == (~valid).sum() == 2


def assert_results_equal(one: dict, other: dict) -> None:
    assert one.keys() == other.keys()
    for key in one:
        torch.testing.assert_close(one[key], other[key], equal_nan=True)


def test_two_updates_equal_one_update_on_the_concatenation():
    small, masks, classes = localisation_batches()
    cells = torch.arange(30) % 4
    net, images, targets = fgsm_case(False)
    cases = [
        (lambda: PointingGame(tolerance=15, tolerance_at=None, num_classes=5), (small, masks, classes)),
        (lambda: PointingGame(tolerance=15, tolerance_at=224), (small, masks)),
        (ContentHeatmap, (small, masks)),
        (NegativeQuadrantsHeatmap, (small, cells)),
    ]
    for make, tensors in cases:
        whole, split, merged = make(), make(), make()
        whole.update(*tensors)
        split.update(*(t[:11] for t in tensors))
        split.update(*(t[11:] for t in tensors))
        merged.update(*(t[:11] for t in tensors))
        other = make()
        other.update(*(t[11:] for t in tensors))
        merged.merge_state(other)  # merges states with their dist_reduce_fx, as a DDP sync does
        assert_results_equal(split.compute(), whole.compute())
        assert_results_equal(merged.compute(), whole.compute())
    whole, split, merged, other = (FGSMRobustness(eps_list=(1, 8), space="pixel") for _ in range(4))
    whole.update(net, images, targets)
    split.update(net, images[:3], targets[:3])
    split.update(net, images[3:], targets[3:])
    merged.update(net, images[:3], targets[:3])
    other.update(net, images[3:], targets[3:])
    merged.merge_state(other)
    assert_results_equal(split.compute(), whole.compute())
    assert_results_equal(merged.compute(), whole.compute())


def test_fgsm_robustness_counts_top1_under_attack():
    net, images, targets = fgsm_case(False)
    metric = FGSMRobustness(eps_list=(0, 2, 64), space="pixel")
    metric.update(net, images, targets)
    result = metric.compute()
    assert list(result) == ["fgsm/eps=0", "fgsm/eps=2", "fgsm/eps=64", "fgsm_success/eps=0", "fgsm_success/eps=2",
                            "fgsm_success/eps=64", "fgsm_clean"]
    result = {key: result[key] for key in ("fgsm/eps=0", "fgsm/eps=2", "fgsm/eps=64")}
    # The linear model's CE input gradient in closed form, independent of evaluation.attacks.
    weight, bias = net.head[1].weight.detach(), net.head[1].bias.detach()
    gradient = ((images.flatten(1) @ weight.T + bias).softmax(1) - F.one_hot(targets, 6)) @ weight
    for eps, accuracy in zip((0, 2, 64), result.values()):
        adversarial = fgsm(net, images, targets, eps)
        assert accuracy.item() == pytest.approx((net(adversarial).argmax(1) == targets).double().mean().item())
        closed_form = (images + eps / 255 * gradient.view_as(images).sign()).clamp(0, 1)
        logits = closed_form.flatten(1) @ weight.T + bias
        assert accuracy.item() == pytest.approx((logits.argmax(1) == targets).double().mean().item())
    assert len({value.item() for value in result.values()}) > 1  # the attack changes some predictions
    assert result["fgsm/eps=64"] <= result["fgsm/eps=0"]
    with pytest.raises(ValueError, match="single-label"):
        metric.update(*fgsm_case(True))


class SignOfSine(torch.nn.Module):
    """Two classes from one pixel x: class 0 iff sin(10 pi x) > 0, i.e. x in (0, 0.1), (0.2, 0.3), ...
    Cross-entropy falls as the margin of the true class grows, so FGSM moves x by eps/255 against
    it: class 0 targets by -sign(cos(10 pi x)), class 1 targets by +sign(cos(10 pi x))."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        margin = torch.sin(10 * math.pi * images[:, 0, 0, 0])
        return torch.stack([margin, -margin], 1)


# Pixel, target; clean prediction and the pixel after FGSM at eps 1, 2, 8 and 32 (steps of 0.0039,
# 0.0078, 0.0314 and 0.1255), worked out by hand:
#   0.06  -> 0: right; cos < 0 so up: 0.0639, 0.0678, 0.0914 right; 0.1855 wrong
#   0.098 -> 0: right; up: 0.1019, 0.1058, 0.1294 wrong; 0.2235 right again
#   0.16  -> 0: wrong; cos > 0 so down: 0.1561, 0.1522, 0.1286 wrong; 0.0345 right
#   0.16  -> 1: right; up: 0.1639, 0.1678, 0.1914 right; 0.2855 wrong
SINE_PIXELS, SINE_TARGETS = (0.06, 0.098, 0.16, 0.16), (0, 0, 0, 1)
SINE_EPS = (1, 2, 8, 32)
# 3 images right before the attack; at eps 1-8 the second is broken, at 32 the first and the last
# (the second is right again, the third right by chance: neither counts as a success).
SINE_TOP1 = {"eps=1": 2 / 4, "eps=2": 2 / 4, "eps=8": 2 / 4, "eps=32": 2 / 4}
SINE_SUCCESS = {"eps=1": 1 / 3, "eps=2": 1 / 3, "eps=8": 1 / 3, "eps=32": 2 / 3}


def sine_case():
    images = torch.tensor(SINE_PIXELS, dtype=torch.float64).view(-1, 1, 1, 1)
    return SignOfSine(), images, torch.tensor(SINE_TARGETS)


def test_fgsm_success_rate_counts_only_images_right_before_the_attack():
    net, images, targets = sine_case()
    metric = FGSMRobustness(eps_list=SINE_EPS, space="pixel")
    metric.update(net, images, targets)
    result = {key: value.item() for key, value in metric.compute().items()}
    assert result == {**{f"fgsm/{key}": rate for key, rate in SINE_TOP1.items()},
                      **{f"fgsm_success/{key}": rate for key, rate in SINE_SUCCESS.items()}, "fgsm_clean": 3 / 4}
    # At eps 32 top-1 alone would suggest 1 - 0.5 / 0.75 = 1/3 broken; 2 of the 3 were.
    for eps in SINE_EPS:  # the attacked pixels as the table above has them
        with torch.no_grad():
            assert net(fgsm(net, images, targets, eps)).argmax(1).eq(targets).double().mean() == SINE_TOP1[f"eps={eps}"]


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # the states added by hand
def test_fgsm_states_of_two_processes_add_up_to_one():
    """A DDP sync sums every state: two metrics' summed states (merged, or added by hand) give the
    rates of one metric over all images."""
    net, images, targets = sine_case()
    whole, first, second = (FGSMRobustness(eps_list=SINE_EPS, space="pixel") for _ in range(3))
    whole.update(net, images, targets)
    first.update(net, images[::2], targets[::2])
    second.update(net, images[1::2], targets[1::2])
    summed = FGSMRobustness(eps_list=SINE_EPS, space="pixel")
    for state in ("correct", "total", "clean_correct", "broken"):
        setattr(summed, state, getattr(first, state) + getattr(second, state))
    first.merge_state(second)
    assert_results_equal(first.compute(), whole.compute())
    assert_results_equal(summed.compute(), whole.compute())


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_fgsm_success_rate_without_a_right_image_is_nan():
    net, images, targets = sine_case()
    metric = FGSMRobustness(eps_list=(1,), space="pixel")
    metric.update(net, images[2:3], targets[2:3])  # wrong before the attack
    result = metric.compute()
    assert result["fgsm_clean"] == 0 and result["fgsm_success/eps=1"].isnan()


# ---------------------------------------------------------------- all-zero maps as the authors score them

def authors_all_zero_map(low: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The map an all-zero Grad-CAM becomes in the authors' scripts: ``cam / (cam.sum() + 1e-8) +
    1e-8`` in float32, resized (cv2.resize keeps a constant map constant), divided by its sum."""
    cam = np.zeros(low, dtype=np.float32)
    cam = cam / (cam.sum() + np.float32(1e-8)) + np.float32(1e-8)
    resized = np.full(size, cam[0, 0], dtype=np.float32)
    return resized / resized.sum()


def zero_map_cases():
    """Four 7x7 maps for 40x50 masks: two all zero (one mask at the top-left corner, one far from
    it), one all zero on an empty mask, one ordinary."""
    heatmaps = torch.rand(4, 7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    heatmaps[:3] = 0
    masks = torch.zeros(4, 40, 50, dtype=torch.bool)
    masks[0, 10:20, 5:15] = True  # (10, 5): 11.2 px from the top-left pixel
    masks[1, 25:35, 30:45] = True
    masks[3, 5:30, 10:40] = True
    return heatmaps, masks


def test_uniform_scores_an_all_zero_map_as_the_authors_do():
    heatmaps, masks = zero_map_cases()
    tolerance = 15
    pg = PointingGame(tolerance=tolerance, tolerance_at=None, zero_maps="uniform")
    ch = ContentHeatmap(zero_maps="uniform")
    spg = StochasticPointingGame(tolerance=tolerance, tolerance_at=None, num_samples=4000, num_runs=2, seed=0,
                                 zero_maps="uniform")
    for index in range(2):  # one all-zero map with its mask at a time
        theirs = authors_all_zero_map((7, 7), (40, 50))
        mask = masks[index].numpy()
        accept = naive_distance_grid(mask) < tolerance
        peak = np.unravel_index(theirs.argmax(), theirs.shape)
        assert peak == (0, 0)
        for metric in (pg, ch, spg):
            metric.reset()
        pg.update(heatmaps[index:index + 1], masks[index:index + 1])
        ch.update(heatmaps[index:index + 1], masks[index:index + 1])
        spg.update(heatmaps[index:index + 1], masks[index:index + 1], torch.tensor([index]))
        assert pg.compute()["pg"].item() == float(accept[peak]) == (1.0 if index == 0 else 0.0)
        assert ch.compute()["ch"].item() == pytest.approx(float((theirs * mask).sum()), abs=1e-6)
        assert ch.compute()["ch"].item() == mask.mean()  # the mask's share of the image, exactly
        # Their np.random.choice(p=map) hits with probability the map's mass in reach of the mask.
        expected = float(theirs[accept].sum())
        assert spg.compute()["spg"].item() == pytest.approx(expected, abs=4 * math.sqrt(0.25 / 8000))
        for metric in (pg, ch, spg):
            assert metric.compute()["uniform"] == 1 and metric.compute()["skipped"] == 0


def test_skip_leaves_all_zero_maps_out_and_counts_them_and_uniform_counts_what_it_scored():
    heatmaps, masks = zero_map_cases()
    seeds = torch.arange(4)
    for zero_maps, scored, skipped in (("skip", 1, 3), ("uniform", 3, 1)):  # the empty mask: skipped by both
        metrics = (PointingGame(tolerance=15, tolerance_at=None, zero_maps=zero_maps),
                   ContentHeatmap(zero_maps=zero_maps),
                   StochasticPointingGame(tolerance=15, tolerance_at=None, num_samples=10, num_runs=2, seed=0,
                                          zero_maps=zero_maps))
        metrics[0].update(heatmaps, masks)
        metrics[1].update(heatmaps, masks)
        metrics[2].update(heatmaps, masks, seeds)
        for metric in metrics:
            result = metric.compute()
            assert metric.scored == scored and result["skipped"] == skipped
            assert ("uniform" in result) == (zero_maps == "uniform")
            if zero_maps == "uniform":
                assert result["uniform"] == 2
    # Under skip the scores are those of the ordinary map alone.
    alone = ContentHeatmap()
    alone.update(heatmaps[3:], masks[3:])
    skipping = ContentHeatmap(zero_maps="skip")
    skipping.update(heatmaps, masks)
    assert skipping.compute()["ch"] == alone.compute()["ch"]


def test_uniform_where_zero_replaces_only_all_zero_maps():
    heatmaps, _ = zero_map_cases()
    maps, zero = functional.uniform_where_zero(heatmaps)
    assert zero.tolist() == [True, True, True, False]
    assert torch.equal(maps[:3], torch.ones(3, 7, 7, dtype=torch.float64)) and torch.equal(maps[3], heatmaps[3])
    assert heatmaps[:3].eq(0).all()  # the input is left as it was


def test_uniform_zero_maps_merge_like_every_state():
    heatmaps, masks = zero_map_cases()
    whole, merged, other = (PointingGame(tolerance=15, tolerance_at=None, num_classes=2, zero_maps="uniform")
                            for _ in range(3))
    classes = torch.tensor([0, 1, 0, 1])
    whole.update(heatmaps, masks, classes)
    merged.update(heatmaps[:2], masks[:2], classes[:2])
    other.update(heatmaps[2:], masks[2:], classes[2:])
    merged.merge_state(other)
    assert_results_equal(merged.compute(), whole.compute())
    assert list(whole.compute()) == ["pg", "pg_micro", "skipped", "uniform"]


def test_pointing_game_per_class_mean():
    # Peaks on the mask (hit) or far from it (miss); class 2 has no trial and is left out.
    masks = torch.zeros(6, 40, 40, dtype=torch.bool)
    masks[:, :5, :5] = True
    heatmaps = torch.zeros(6, 40, 40)
    hits = [True, True, False, False, True, True]
    for b, hit in enumerate(hits):
        heatmaps[b, (2 if hit else 39), (2 if hit else 39)] = 1.0
    heatmaps[5] = 0  # skipped
    classes = torch.tensor([0, 0, 0, 1, 3, 3])
    metric = PointingGame(tolerance=15, tolerance_at=None, num_classes=4)
    metric.update(heatmaps, masks, classes)
    result = metric.compute()
    # Class 0: 2/3, class 1: 0/1, class 3: 1/1 (one skipped).
    assert result["pg"].item() == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert result["pg_micro"].item() == pytest.approx(3 / 5)
    assert result["skipped"] == 1
    with pytest.raises(ValueError, match="classes"):
        metric.update(heatmaps, masks)
    with pytest.raises(ValueError, match="classes"):
        PointingGame(tolerance=15, tolerance_at=None).update(heatmaps, masks, classes)


def test_pointing_game_scales_its_tolerance_to_the_masks_size():
    """15 px at 224 px is 15 * 56 / 224 = 3.75 px on 56 px masks: a peak 3 px from the mask is a
    hit and one 4 px away a miss, where unscaled 15 px would count both as hits."""
    masks = torch.zeros(2, 56, 56, dtype=torch.bool)
    masks[:, 20:30, 20:30] = True
    heatmaps = torch.zeros(2, 56, 56)
    heatmaps[0, 25, 32] = 1.0  # 3 px right of the mask's last column (29)
    heatmaps[1, 25, 33] = 1.0  # 4 px
    scaled = PointingGame(tolerance=15, tolerance_at=224)
    scaled.update(heatmaps, masks)
    assert scaled.compute()["pg"].item() == 0.5
    unscaled = PointingGame(tolerance=15, tolerance_at=None)
    unscaled.update(heatmaps, masks)
    assert unscaled.compute()["pg"].item() == 1.0


def spg_metric(seed: int = 0) -> StochasticPointingGame:
    return StochasticPointingGame(tolerance=6, tolerance_at=None, num_samples=20, num_runs=5, seed=seed)


def spg_result(seed: int, use_forward: bool = False) -> dict:
    small, masks, _ = localisation_batches()
    trials = torch.arange(30)
    metric = spg_metric(seed)
    step = metric.forward if use_forward else metric.update
    step(small[:15], masks[:15], seeds=trials[:15])
    step(small[15:], masks[15:], seeds=trials[15:])
    return metric.compute()


def test_stochastic_pointing_game_is_reproducible_and_varies_over_runs():
    first = spg_result(seed=0)
    assert_results_equal(spg_result(seed=0), first)
    assert_results_equal(spg_result(seed=0, use_forward=True), first)
    assert spg_result(seed=1)["spg"] != first["spg"]
    assert first["spg_std"] > 0 and first["skipped"] == 2
    assert 0 < first["spg"] < 1


def test_stochastic_pointing_game_depends_on_the_trials_alone():
    """Each trial's points come from its seed alone: other batches, another order or two merged
    metrics (as two DDP processes) give exactly the same result (the scores are multiples of
    1/20, whose float64 sums do not depend on the order)."""
    small, masks, _ = localisation_batches()
    trials = torch.arange(30) + 1000  # the trials' indices in some data set
    whole = spg_metric()
    whole.update(small, masks, trials)
    reordered, merged, other = spg_metric(), spg_metric(), spg_metric()
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    for part in order.split(7):
        reordered.update(small[part], masks[part], trials[part])
    merged.update(small[0::2], masks[0::2], trials[0::2])
    other.update(small[1::2], masks[1::2], trials[1::2])
    merged.merge_state(other)
    assert reordered.compute() == whole.compute() and merged.compute() == whole.compute()
    renumbered = spg_metric()
    renumbered.update(small, masks, trials + 1)
    assert renumbered.compute()["spg"] != whole.compute()["spg"]
    # Each image's points depend on its own seed row only.
    points = functional._sample_points(small, 50, seeds=trials)
    assert torch.equal(functional._sample_points(small[order], 50, seeds=trials[order]), points[order])
    assert torch.equal(functional._sample_points(small[3:4], 50, seeds=trials[3:4]), points[3:4])


def test_trial_uniforms_are_a_function_of_the_stream_and_the_row():
    seeds = torch.tensor([[0, 5, 1], [0, 5, 2], [0, 5, 1], [1, 5, 1]])
    uniforms = functional.trial_uniforms("spg", seeds, (4, 3), torch.float64)
    assert uniforms.shape == (4, 4, 3) and uniforms.dtype == torch.float64
    assert ((uniforms >= 0) & (uniforms < 1)).all()
    assert torch.equal(uniforms[0], uniforms[2])
    assert not torch.equal(uniforms[0], uniforms[1]) and not torch.equal(uniforms[0], uniforms[3])
    noise = functional.trial_uniforms("noise", seeds, (4, 3), torch.float32)
    assert noise.dtype == torch.float32
    assert not torch.equal(noise, functional.trial_uniforms("spg", seeds, (4, 3), torch.float32))
    assert torch.equal(functional.trial_seeds(7, torch.tensor([3, 4])), torch.tensor([[7, 3], [7, 4]]))
    assert torch.equal(functional.trial_seeds(7, torch.tensor([[3, 1]])), torch.tensor([[7, 3, 1]]))
    with pytest.raises(ValueError, match="unknown random stream 'lime'"):
        functional.trial_uniforms("lime", seeds, (2,), torch.float64)
    with pytest.raises(ValueError, match="seeds must be non-negative, got -5"):
        functional.trial_uniforms("spg", -seeds, (2,), torch.float64)


def test_an_empty_batch_changes_nothing():
    small, masks, classes = localisation_batches()
    for metric, tensors in (
        (PointingGame(tolerance=15, tolerance_at=None, num_classes=4), (small, masks, classes)),
        (StochasticPointingGame(tolerance=15, tolerance_at=None, num_samples=100, num_runs=5, seed=0),
         (small, masks, torch.arange(30))),
        (ContentHeatmap(), (small, masks)),
        (NegativeQuadrantsHeatmap(), (small, classes)),
    ):
        metric.update(*(t[:4] for t in tensors))
        before = metric.compute()
        metric.update(*(t[:0] for t in tensors))
        assert_results_equal(metric.compute(), before)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_empty_metric_reports_nan_not_a_number_that_looks_real():
    assert ContentHeatmap().compute()["ch"].isnan()
    assert PointingGame(tolerance=15, tolerance_at=None, num_classes=3).compute()["pg"].isnan()
