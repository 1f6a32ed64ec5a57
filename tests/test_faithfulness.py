"""Faithfulness metrics (insertion, deletion, ROAD) against naive per-image, per-step loops, a
direct sparse solve, and the failures of other libraries they must not repeat."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.explainers import GradCAM, build_explainer
from evaluation.metrics import functional
from evaluation.metrics.imputation import linear_imputation, noisy_linear_imputation
from gcmodels.config import compose_group
from gcmodels.networks import ExplainableNet, build_network
from tests.conftest import tiny_net

SIZE = (9, 11)


def small_net(num_classes: int = 4) -> ExplainableNet:
    torch.manual_seed(0)
    return tiny_net(num_classes).double().eval()


def small_case(seed: int = 0, batch: int = 5, zeros: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, *SIZE, generator=generator, dtype=torch.float64)
    heatmaps = torch.rand(batch, *SIZE, generator=generator, dtype=torch.float64)
    heatmaps = heatmaps.masked_fill(torch.rand(batch, *SIZE, generator=generator) < zeros, 0.0)
    classes = torch.randint(0, 4, (batch,), generator=generator)
    seeds = torch.arange(batch) + 100 * seed
    return images, heatmaps, classes, seeds


def naive_order(heatmap: torch.Tensor, seed: torch.Tensor) -> list[int]:
    """The pixels by decreasing value; equal values by the trial's random keys."""
    keys = functional.trial_uniforms("order", seed.view(1, -1), (heatmap.numel(),), torch.float64)[0].tolist()
    values = heatmap.flatten().tolist()
    return sorted(range(len(values)), key=lambda pixel: (-values[pixel], keys[pixel]))


def naive_score(net, image: torch.Tensor, klass: int, score: str = "probability") -> float:
    with torch.no_grad():
        logits = net(image.unsqueeze(0))[0]
    if score == "logit":
        return float(logits[klass])
    if score == "accuracy":
        return float(int(logits.argmax()) == klass)
    return float(torch.softmax(logits, 0)[klass])


def naive_curve(net, image, heatmap, klass, seed, insertion: bool, steps: int, substrate: str, score="probability"):
    pixels = heatmap.numel()
    blank = functional.substrate(image.unsqueeze(0), substrate)[0]
    start, end = (blank, image) if insertion else (image, blank)
    order = naive_order(heatmap, seed)
    fractions, curve = [], []
    for step in range(steps + 1):
        moved = int(np.floor(step * pixels / steps + 0.5))
        current = start.clone().flatten(1)
        current[:, order[:moved]] = end.flatten(1)[:, order[:moved]]
        curve.append(naive_score(net, current.view_as(image), klass, score))
        fractions.append(moved / pixels)
    area = sum((fractions[i + 1] - fractions[i]) * (curve[i] + curve[i + 1]) / 2 for i in range(len(curve) - 1))
    return fractions, curve, area


@pytest.mark.parametrize("insertion", [True, False])
@pytest.mark.parametrize("score", ["probability", "logit"])
def test_perturbation_curves_equal_a_naive_loop(insertion, score):
    net = small_net()
    images, heatmaps, classes, seeds = small_case(zeros=0.4)
    substrate = "blur" if insertion else "zeros"
    fractions, curves = functional.perturbation_curves(net, images, heatmaps, classes, seeds, insertion=insertion,
                                                       steps=7, substrate_name=substrate, score=score,
                                                       batch_size=3)
    auc = (functional.insertion_auc if insertion else functional.deletion_auc)(
        net, images, heatmaps, classes, seeds, steps=7, substrate_name=substrate, score=score, batch_size=4)
    for b in range(len(images)):
        expected_fractions, expected_curve, expected_area = naive_curve(
            net, images[b], heatmaps[b], int(classes[b]), seeds[b], insertion, 7, substrate, score)
        np.testing.assert_allclose(fractions.numpy(), expected_fractions, rtol=0, atol=1e-15)
        np.testing.assert_allclose(curves[b].numpy(), expected_curve, rtol=1e-12, atol=1e-12)
        assert auc[b].item() == pytest.approx(expected_area, rel=1e-12, abs=1e-12)


def test_curves_start_and_end_at_the_substrates_and_the_images_own_scores():
    net = small_net()
    images, heatmaps, classes, seeds = small_case(seed=1)
    own = functional.class_scores(net(images), classes, "probability", False)
    blurred = functional.class_scores(net(functional.substrate(images, "blur")), classes, "probability", False)
    black = functional.class_scores(net(torch.zeros_like(images)), classes, "probability", False)
    _, insertion = functional.perturbation_curves(net, images, heatmaps, classes, seeds, insertion=True, steps=5,
                                                  substrate_name="blur")
    _, deletion = functional.perturbation_curves(net, images, heatmaps, classes, seeds, insertion=False, steps=5,
                                                 substrate_name="zeros")
    torch.testing.assert_close(insertion[:, 0], blurred.detach())
    torch.testing.assert_close(insertion[:, -1], own.detach())
    torch.testing.assert_close(deletion[:, 0], own.detach())
    torch.testing.assert_close(deletion[:, -1], black.detach())


def test_the_blur_substrate_is_the_gaussian_of_kernel_11_and_sigma_5():
    """An independent 2-D convolution with the normalised Gaussian, reflect padding."""
    images = torch.rand(2, 3, 20, 23, dtype=torch.float64)
    offsets = torch.arange(11, dtype=torch.float64) - 5
    kernel1d = torch.exp(-offsets**2 / (2 * 5.0**2))
    kernel1d /= kernel1d.sum()
    kernel = (kernel1d[:, None] * kernel1d[None, :]).expand(3, 1, 11, 11)
    padded = torch.nn.functional.pad(images, (5, 5, 5, 5), mode="reflect")
    expected = torch.nn.functional.conv2d(padded, kernel, groups=3)
    torch.testing.assert_close(functional.substrate(images, "blur"), expected)


class RegionNet(nn.Module):
    """Two classes: class 0's logit is the texture (mean horizontal pixel difference) of the
    top-left quadrant, class 1's a constant: the quadrant's texture decides class 0, and a blur
    removes it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        region = images[:, :, : height // 2, : width // 2]
        texture = (region[..., 1:] - region[..., :-1]).abs().mean((1, 2, 3)) * 30
        return torch.stack([texture, torch.full_like(texture, 5.0)], 1)


def test_a_map_ranking_the_decisive_region_first_beats_a_random_map():
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, 16, 16, generator=generator, dtype=torch.float64)
    decisive = torch.zeros(6, 16, 16, dtype=torch.float64)
    decisive[:, :8, :8] = 1.0
    noise = torch.rand(6, 16, 16, generator=generator, dtype=torch.float64)
    classes, seeds = torch.zeros(6, dtype=torch.long), torch.arange(6)
    net = RegionNet()
    assert bool((net(images).argmax(1) == 0).all())
    options = {"steps": 16, "batch_size": 8, "substrate_name": "blur"}
    for auc, better in ((functional.insertion_auc, torch.gt), (functional.deletion_auc, torch.lt)):
        own = auc(net, images, decisive, classes, seeds, **options)
        random = auc(net, images, noise, classes, seeds, **options)
        assert bool(better(own, random).all()), (auc.__name__, own, random)


def test_ties_are_broken_so_that_exactly_the_stated_share_moves():
    """pytorch-grad-cam's ROAD thresholds at a percentile and so removes every pixel of a map whose
    exact zeros reach past it; here a map with 60% exact zeros removes exactly the stated count."""
    _, heatmaps, _, seeds = small_case(zeros=0.6, batch=4)
    assert float((heatmaps == 0).double().mean()) > 0.5
    ranks = functional.pixel_ranks(heatmaps, seeds)
    pixels = heatmaps[0].numel()
    assert torch.equal(ranks.sort(1).values, torch.arange(pixels).expand(4, -1))
    for percent in (10, 50, 70, 90):
        count = torch.full((4,), round(percent / 100 * pixels))
        for order in functional.ROAD_ORDERS:
            removed = functional.road_removed(ranks, count, order)
            assert torch.equal(removed.sum(1), count)
    # Higher values first; the zeros (ties) in an order that depends on the trial's seed alone.
    flat = heatmaps.flatten(1)
    ordered = flat.gather(1, ranks.argsort(1))
    assert bool((ordered[:, 1:] <= ordered[:, :-1]).all())
    torch.testing.assert_close(functional.pixel_ranks(heatmaps[2:3], seeds[2:3]), ranks[2:3], rtol=0, atol=0)
    assert not torch.equal(functional.pixel_ranks(heatmaps[2:3], seeds[2:3] + 1), ranks[2:3])


def scipy_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's system, built pixel by pixel and solved by scipy's direct sparse solver."""
    height, width = removed.shape
    unknown = {pixel: i for i, pixel in enumerate(zip(*np.nonzero(removed)))}
    matrix = scipy.sparse.lil_matrix((len(unknown), len(unknown)))
    right = np.zeros((len(unknown), image.shape[0]))
    for (y, x), row in unknown.items():
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dy, dx) == (0, 0) or not (0 <= y + dy < height and 0 <= x + dx < width):
                    continue
                weight = 1 / 6 if dy == 0 or dx == 0 else 1 / 12
                matrix[row, row] += weight
                if (y + dy, x + dx) in unknown:
                    matrix[row, unknown[(y + dy, x + dx)]] -= weight
                else:
                    right[row] += weight * image[:, y + dy, x + dx]
    solution = scipy.sparse.linalg.spsolve(matrix.tocsc(), right).reshape(len(unknown), -1)
    filled = image.copy()
    for (y, x), row in unknown.items():
        filled[:, y, x] = solution[row]
    return filled


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_linear_imputation_equals_a_direct_sparse_solve_on_rgb_images_with_one_channel_maps(solver):
    """Quantus' batched ROAD raises an IndexError on RGB images with a one-channel map; here the
    map ranks pixels, and all three channels of each removed pixel are imputed."""
    images, heatmaps, _, seeds = small_case(seed=2, batch=4, zeros=0.5)
    ranks = functional.pixel_ranks(heatmaps, seeds)
    counts = torch.tensor([10, 50, 80, 98])
    removed = functional.road_removed(ranks, counts, "morf").view(4, *SIZE)
    imputed = linear_imputation(images, removed, solver)
    for b in range(4):
        expected = scipy_imputation(images[b].numpy(), removed[b].numpy())
        np.testing.assert_allclose(imputed[b].numpy(), expected, rtol=0, atol=1e-8)
    # Kept pixels are untouched; a removed one is the weighted mean of its neighbours.
    assert torch.equal(imputed.masked_select(~removed.unsqueeze(1)), images.masked_select(~removed.unsqueeze(1)))


def test_noisy_imputation_adds_the_noise_on_removed_pixels_only():
    images, heatmaps, _, seeds = small_case(seed=4, batch=2)
    removed = functional.road_removed(functional.pixel_ranks(heatmaps, seeds), torch.tensor([30, 30]), "lerf")
    removed = removed.view(2, *SIZE)
    noise = torch.randn_like(images) * 0.01
    difference = noisy_linear_imputation(images, removed, noise) - linear_imputation(images, removed)
    torch.testing.assert_close(difference, noise * removed.unsqueeze(1))


def test_imputation_float32_matches_float64_and_refuses_removing_everything():
    images, heatmaps, _, seeds = small_case(seed=5, batch=3)
    removed = functional.road_removed(functional.pixel_ranks(heatmaps, seeds), torch.tensor([70, 80, 90]), "morf")
    removed = removed.view(3, *SIZE)
    exact = linear_imputation(images, removed, "direct")
    for solver in ("direct", "cg"):
        torch.testing.assert_close(linear_imputation(images.float(), removed, solver).double(), exact, atol=1e-5,
                                   rtol=0)
    with pytest.raises(ValueError, match="100%"):
        linear_imputation(images, torch.ones(3, *SIZE, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="did not converge in 1 iterations"):
        linear_imputation(images, removed, "cg", max_iterations=1)
    with pytest.raises(ValueError, match="unknown solver 'lu'"):
        linear_imputation(images, removed, "lu")


@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("score", ["probability", "accuracy"])
def test_road_equals_a_naive_loop(order, score):
    net = small_net()
    images, heatmaps, classes, seeds = small_case(seed=6, zeros=0.6)
    percentages = (10, 40, 90)
    scores = functional.road(net, images, heatmaps, classes, seeds, percentages=percentages, order=order,
                             score=score, batch_size=4)
    pixels = heatmaps[0].numel()
    for b in range(len(images)):
        ranking = naive_order(heatmaps[b], seeds[b])
        for index, percent in enumerate(percentages):
            count = round(percent / 100 * pixels)
            chosen = ranking[:count] if order == "morf" else ranking[pixels - count:]
            removed = np.zeros(pixels, dtype=bool)
            removed[chosen] = True
            removed = removed.reshape(SIZE)
            filled = scipy_imputation(images[b].numpy(), removed)
            row = torch.tensor([[int(seeds[b]), index, functional.ROAD_ORDERS.index(order)]])
            noise = functional.trial_normals("road", row, images.shape[1:], torch.float64)[0].numpy() * 0.01
            filled = filled + noise * removed
            expected = naive_score(net, torch.from_numpy(filled), int(classes[b]), score)
            assert scores[b, index].item() == pytest.approx(expected, rel=1e-7, abs=1e-7)


def test_bad_inputs_are_refused_naming_the_shapes():
    net = small_net()
    images, heatmaps, classes, seeds = small_case()
    with pytest.raises(ValueError, match="at the images' size"):
        functional.insertion_auc(net, images, heatmaps[:, :4], classes, seeds)
    with pytest.raises(ValueError, match="finite"):
        functional.deletion_auc(net, images, heatmaps.masked_fill(heatmaps > 0.9, float("nan")), classes, seeds)
    with pytest.raises(ValueError, match="classes must be integers"):
        functional.road(net, images, heatmaps, classes[:2], seeds, percentages=(10,), order="morf")
    with pytest.raises(ValueError, match="unknown ROAD order"):
        functional.road(net, images, heatmaps, classes, seeds, percentages=(10,), order="random")
    with pytest.raises(ValueError, match="unknown substrate"):
        functional.insertion_auc(net, images, heatmaps, classes, seeds, substrate_name="mean")


def test_spearman_equals_scipy_with_ties_and_is_undefined_for_a_constant_map():
    import scipy.stats

    generator = torch.Generator().manual_seed(7)
    first = torch.rand(4, 300, generator=generator, dtype=torch.float64)
    second = torch.rand(4, 300, generator=generator, dtype=torch.float64)
    first[:, :120] = 0.0  # ReLU'd maps: many exact zeros
    second[:, 60:200] = 0.0
    first[3] = 0.25
    correlation = functional.spearman(first, second)
    for row in range(3):
        expected = scipy.stats.spearmanr(first[row].numpy(), second[row].numpy()).statistic
        assert correlation[row].item() == pytest.approx(expected, abs=1e-12)
    assert correlation[3].isnan()


def test_map_similarity_of_a_map_to_itself_and_ssim_as_scikit_image_defines_it():
    from skimage.metrics import structural_similarity

    generator = torch.Generator().manual_seed(8)
    maps = torch.rand(3, 24, 26, generator=generator, dtype=torch.float64)
    same = functional.map_similarity(maps, maps)
    for name in functional.SIMILARITIES:
        torch.testing.assert_close(same[name], torch.ones(3, dtype=torch.float64))
    other = maps + 0.3 * torch.rand(3, 24, 26, generator=generator, dtype=torch.float64)
    ssim = functional.map_similarity(maps, other)["ssim"]
    for b in range(3):
        expected = structural_similarity((maps[b] / maps[b].max()).numpy(), (other[b] / other[b].max()).numpy(),
                                         data_range=1.0, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False)
        # torchmetrics scores the border from reflected pixels, scikit-image leaves it out.
        assert ssim[b].item() == pytest.approx(expected, abs=0.01)
    zero = functional.map_similarity(maps, maps * 0)
    assert zero["ssim"].isnan().all() and zero["spearman"].isnan().all()


def test_parameter_blocks_run_from_the_input_to_the_logits():
    from gcmodels.networks import build_network

    names = [name for name, _ in functional.parameter_blocks(build_network("resnet18", 5))]
    assert names == ["features.0", "features.1", "features.4.0", "features.4.1", "features.5.0", "features.5.1",
                     "features.6.0", "features.6.1", "features.7.0", "features.7.1", "head.2"]
    names = [name for name, _ in functional.parameter_blocks(build_network("alexnet", 5))]
    assert names == ["features.0", "features.3", "features.6", "features.8", "features.10", "head.3.1", "head.3.4",
                     "head.3.6"]


def gradcam(net, images, classes):
    from evaluation.explainers import GradCAM

    return GradCAM()(net, images, classes)


def first_layer_activity(net, images, classes):
    """A map that ignores every block above the first convolution: what a map that does not depend
    on the weights near the logits looks like."""
    return net.features[0](net.normalize(images)).abs().mean(1)


def naive_randomisation(net, explainer, images, classes, seed, cascading):
    """Per image and step: a fresh copy randomised block by block, one image explained at a time,
    scipy's Spearman."""
    import copy

    import scipy.stats

    names = [name for name, _ in functional.parameter_blocks(net)]
    rows = []
    for b in range(len(images)):
        image, klass = images[b:b + 1], classes[b:b + 1]
        original = functional.upsample(explainer(net, image, klass).detach(), images.shape[-2:])[0]
        row = []
        for step in range(len(names)):
            copy_ = copy.deepcopy(net)
            chosen = range(len(names) - 1 - step, len(names)) if cascading else [len(names) - 1 - step]
            for number in chosen:
                functional.randomise_block(copy_.get_submodule(names[number]), seed, number)
            randomised = functional.upsample(explainer(copy_, image, klass).detach(), images.shape[-2:])[0]
            row.append(scipy.stats.spearmanr(original.flatten().numpy(), randomised.flatten().numpy()).statistic)
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("cascading", [True, False])
def test_randomisation_equals_a_naive_loop(cascading):
    net = small_net()
    images, _, classes, _ = small_case(seed=9, batch=3)
    names, similarity = functional.randomisation_similarity(net, gradcam, images, classes, seed=4,
                                                            cascading=cascading)
    assert names == [name for name, _ in reversed(functional.parameter_blocks(net))]
    expected = naive_randomisation(net, gradcam, images, classes, 4, cascading)
    np.testing.assert_allclose(similarity["spearman"].numpy(), expected, atol=1e-10)
    # The network itself is left as it was.
    torch.testing.assert_close(gradcam(net, images, classes), gradcam(small_net(), images, classes))


def test_randomisation_detects_a_map_that_ignores_the_weights_near_the_logits():
    net = small_net()
    images, _, classes, _ = small_case(seed=10, batch=4)
    names, similarity = functional.randomisation_similarity(net, first_layer_activity, images, classes, seed=0)
    above = names.index("features.0")
    # Unchanged, exactly, while only the blocks above its layer are random; changed after.
    torch.testing.assert_close(similarity["spearman_abs"][:, :above], torch.ones(4, above, dtype=torch.float64))
    assert bool((similarity["spearman_abs"][:, above] < 0.99).all())
    _, gradcam_similarity = functional.randomisation_similarity(net, gradcam, images, classes, seed=0)
    assert bool((gradcam_similarity["spearman_abs"][:, 0] < 0.99).all())


def test_pointing_game_does_not_count_an_empty_mask_as_a_hit():
    """Quantus' pointing game counts an image whose mask is empty as a hit; here it is left out."""
    from evaluation.metrics import PointingGame

    heatmaps = torch.rand(3, 8, 8)
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 2:4] = True
    hits, valid = functional.pointing_hits(heatmaps, masks)
    assert valid.tolist() == [True, False, False] and not bool(hits[1:].any())
    metric = PointingGame(tolerance=1, tolerance_at=None)
    metric.update(heatmaps, masks)
    assert metric.compute()["skipped"] == 2


def test_other_images_are_distinct_others_drawn_per_image():
    """Quantus' Infidelity blacks out patches cumulatively in raster order, so its "samples" are
    identical; the other-image baseline's K maps come from K distinct other images, drawn per
    image from the seed alone."""
    from evaluation.sampling import other_indices

    draws = [other_indices(10, index, 5, seed=3) for index in range(10)]
    for index, others in enumerate(draws):
        assert len(set(others)) == 5 and index not in others and all(0 <= other < 10 for other in others)
        assert other_indices(10, index, 5, seed=3) == others
    assert len({tuple(others) for others in draws}) > 1
    assert other_indices(10, 0, 5, seed=4) != draws[0] or other_indices(10, 1, 5, seed=4) != draws[1]
    with pytest.raises(ValueError, match="evaluation.other_images=5 needs 6 validation images; the data has 5"):
        other_indices(5, 0, 5, seed=0)


def engine_case(**settings):
    from tests.test_evaluation import SquaresModule, evaluator, oracle

    torch.manual_seed(0)
    net = tiny_net(num_classes=4).eval()
    options = {"other_images": 2, "perturbation_steps": 4, "road_percentages": [30, 70], **settings}
    return net, SquaresModule(count=6, size=16), oracle, lambda metrics, batch: evaluator(oracle, metrics, batch,
                                                                                           **options)


def test_the_engine_scores_own_and_other_images_maps_as_the_functions_do():
    from evaluation.sampling import other_indices

    net, data, oracle, build = engine_case()
    results = build(["insertion", "road"], 6).run(net, data, progress=False)
    def insertion(image, maps, klass, seeds):
        return functional.insertion_auc(net, image, maps, klass, seeds, steps=4, substrate_name="blur")

    def road_morf(image, maps, klass, seeds):
        curve = functional.road(net, image, maps, klass, seeds, percentages=(30, 70), order="morf")
        return functional.curve_area(torch.tensor([0.3, 0.7], dtype=torch.float64), curve.double())

    own, others, morf, morf_others = [], [], [], []
    for index in range(6):
        sample = data.val_dataset()[index]
        trial = (sample["image"].unsqueeze(0), sample["target"].view(1), torch.tensor([[index, int(sample["target"])]]))
        own_map = oracle(net, trial[0], trial[1])
        own.append(insertion(trial[0], own_map, *trial[1:]))
        morf.append(road_morf(trial[0], own_map, *trial[1:]))
        other_maps = [oracle(net, data.val_dataset()[other]["image"].unsqueeze(0), None)
                      for other in other_indices(6, index, 2, seed=0)]
        others.append(torch.stack([insertion(trial[0], maps, *trial[1:]) for maps in other_maps]).mean())
        morf_others.append(torch.stack([road_morf(trial[0], maps, *trial[1:]) for maps in other_maps]).mean())
    assert results["insertion"] == pytest.approx(float(torch.stack(own).mean()), rel=1e-6)
    assert results["insertion_others"] == pytest.approx(float(torch.stack(others).mean()), rel=1e-6)
    assert results["insertion_minus_others"] == pytest.approx(results["insertion"] - results["insertion_others"])
    assert results["road_morf"] == pytest.approx(float(torch.stack(morf).mean()), rel=1e-5)
    assert results["road_morf_others"] == pytest.approx(float(torch.stack(morf_others).mean()), rel=1e-5)
    # The centred peak is one map for every image: nothing of its score is the image's own.
    assert results["insertion_minus_others_center"] == 0.0 and results["road_lerf_minus_others_center"] == 0.0
    assert set(results["insertion_curve"]) == {"0.0000", "0.2500", "0.5000", "0.7500", "1.0000"}
    assert set(results["road_morf_curve_noise"]) == {"p=30", "p=70"}


def test_the_engine_does_not_depend_on_the_batch_size():
    net, data, _, build = engine_case()
    metrics = ["insertion", "deletion", "road", "mprt"]
    one, other = (build(metrics, batch).run(net, data, progress=False) for batch in (3, 12))
    assert one.keys() == other.keys()
    for key, value in one.items():
        if isinstance(value, dict):
            assert value == pytest.approx(other[key], rel=1e-5, abs=1e-6), key
        else:
            assert value == pytest.approx(other[key], rel=1e-5, abs=1e-6), key


def test_the_engine_fails_a_map_that_ignores_the_weights_near_the_logits():
    from tests.test_evaluation import SquaresModule, evaluator

    torch.manual_seed(0)
    net = tiny_net(num_classes=4).eval()
    results = evaluator(first_layer_activity, ["mprt"], 6).run(net, SquaresModule(count=6, size=16), progress=False)
    blocks = list(results["mprt_spearman_abs"])
    assert blocks == ["head.4", "head.0", "features.0"]
    assert results["mprt_spearman_abs"]["head.4"] == pytest.approx(1.0)
    assert results["mprt_unchanged"] == 2


def test_report_prints_the_faithfulness_table_with_its_settings_and_the_randomisation_verdict(tmp_path):
    import csv

    from evaluation.figures import save_faithfulness_curves
    from evaluation.report import reference_results, write_reports
    from evaluation.settings import default_settings

    def scores(insertion, others, unchanged):
        return {"insertion": insertion, "insertion_others": others, "insertion_minus_others": insertion - others,
                "insertion_curve": {"0.0000": 0.1, "0.5000": 0.6, "1.0000": 0.9},
                "mprt": 0.3, "mprt_unchanged": float(unchanged),
                "mprt_spearman_abs": {"head.2": 0.9 if unchanged else 0.2, "features.7.1": 0.1}}

    first = {**scores(0.75, 0.60, 0), "skipped": {"mprt": 3}, "insertion_center": 0.67, "insertion_others_center": 0.67,
             "insertion_minus_others_center": 0.0, "insertion_curve_center": {"0.0000": 0.1, "1.0000": 0.9}}
    rows = [{"checkpoint": "a.ckpt", "model": "resnet18", "pooling": "avg", "loss": "gc", "lambda": 25.0,
             "results": first},
            {"checkpoint": "b.ckpt", "model": "resnet18", "pooling": "avg", "loss": "ce", "lambda": 0.0,
             "results": {**scores(0.70, 0.65, 1), "skipped": {}}}]
    settings = {"explainer": "gradcam", "data": "synthetic", **default_settings(seed=0, batch_size=4).to_dict()}
    paths = write_reports(rows, tmp_path, settings)
    markdown = paths["md"].read_text()
    assert ("| model | Insertion | Insertion (others) | Insertion - others | MPRT rank corr. | MPRT unchanged steps |"
            in markdown)
    assert "| resnet18 GC (lambda=25) | 75.00 | 60.00 | 15.00 | 0.300 | 0 |" in markdown
    assert "| reference: centred peak | 67.00 | 67.00 | 0.00 | - | - |" in markdown
    assert "28 equal steps" in markdown and "substrate blur" in markdown and "5 other validation images" in markdown
    assert "resnet18 GC (lambda=25): passes" in markdown
    assert "resnet18 baseline: FAILS" in markdown and "block(s) head.2" in markdown
    assert "(all-zero heatmap or empty mask): none; randomised maps left out of the rank correlations (constant): 3" \
        in markdown
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert float(table[0]["insertion_minus_others"]) == pytest.approx(0.15)
    assert float(table[0]["insertion_minus_others_center"]) == 0.0 and table[1]["insertion_center"] == ""
    figure = save_faithfulness_curves([("GC", first, False), ("centre", reference_results(first, "center"), True)],
                                      tmp_path / "faithfulness.png", "probability")
    assert figure.stat().st_size > 0
    assert save_faithfulness_curves([("GC", {"acc": 0.5}, False)], tmp_path / "none.png", "probability") is None


FAST = ["evaluation.perturbation_steps=4", "evaluation.road_percentages=[30,70]", "evaluation.other_images=2"]


@pytest.mark.slow  # trains a tiny network with the faithfulness metrics as training callbacks
def test_training_callbacks_log_faithfulness_and_the_script_reports_it(tmp_path):
    import csv
    import json

    from tests.conftest import assert_ok, read_summary, run_module, train

    out, data_dir = tmp_path / "train", tmp_path / "data"
    assert_ok(train(out, data_dir, "loss=gc", "callbacks.explanation_metrics.metrics=[pg,insertion,mprt]",
                    "callbacks.explanation_metrics.max_images=4", "~callbacks.fgsm_robustness", *FAST))
    with open(next(out.glob("csv/version_*/metrics.csv"))) as handle:
        columns = set(next(csv.reader(handle)))
    assert {"explain/pg", "explain/insertion", "explain/insertion_minus_others", "explain/mprt",
            "explain/mprt_unchanged"} <= columns

    checkpoint = read_summary(out)["last_checkpoint"]
    report_dir = tmp_path / "evaluation"
    run = run_module("evaluation", report_dir, data_dir, f"ckpt_path={checkpoint}", "max_images=4",
                     "metrics=[acc,pg,insertion,deletion,road,mprt]", *FAST)
    assert_ok(run)
    markdown = (report_dir / "report.md").read_text()
    assert "| model | Insertion | Insertion (others) | Insertion - others | Deletion |" in markdown
    assert "4 equal steps" in markdown and "[30.0, 70.0] % removed" in markdown and "2 other validation" in markdown
    assert "Randomisation check" in markdown and "reference: centred peak" in markdown
    results = json.loads((report_dir / "report.json").read_text())["checkpoints"][0]["results"]
    for key in ("insertion", "deletion", "road_morf", "road_lerf"):
        assert 0 <= results[key] <= 1 and key + "_minus_others" in results and key + "_center" in results
    assert results["insertion_minus_others_center"] == 0.0
    with (report_dir / "report.csv").open() as handle:
        row = next(csv.DictReader(handle))
    assert float(row["road_morf_minus_others"]) == pytest.approx(results["road_morf_minus_others"])
    assert (report_dir / "faithfulness.png").stat().st_size > 0


def test_bf16_forward_passes_stay_within_a_bound_of_float32():
    """``evaluation.precision=bf16-mixed`` runs the perturbed images' forwards (and LIME's) under
    bfloat16 autocast: on a ResNet18 at 64 px the class probabilities of insertion and deletion
    move by less than 0.02 and the AUCs by less than 0.01; LIME's superpixel weights by less than
    5% of the largest, with a rank correlation above 0.9 with float32's. Gradients are not
    involved: Grad-CAM stays in float32."""
    torch.manual_seed(0)
    net = build_network("resnet18", 5).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64, generator=generator)
    heatmaps = GradCAM()(net, images, torch.tensor([0, 1, 2]))
    heatmaps = F.interpolate(heatmaps.unsqueeze(1), size=(64, 64), mode="bilinear").squeeze(1)
    classes, seeds = torch.tensor([0, 1, 2]), torch.arange(3)
    for insertion in (True, False):
        curves = {precision: functional.perturbation_curves(
            net, images, heatmaps, classes, seeds, insertion=insertion, steps=8, substrate_name="blur",
            batch_size=16, precision=precision) for precision in ("32", "bf16-mixed")}
        (fractions, exact), (_, reduced) = curves["32"], curves["bf16-mixed"]
        assert exact.dtype == reduced.dtype == torch.float32 and not torch.equal(exact, reduced)
        assert (exact - reduced).abs().max() < 0.02
        areas = [functional.curve_area(fractions, curve) for curve in (exact, reduced)]
        assert (areas[0] - areas[1]).abs().max() < 0.01
    # LIME on a smooth image (superpixels that follow it) with logit scores (weights well above 0).
    lime = build_explainer(**{**compose_group("explainer", "lime"), "num_samples": 64, "num_segments": 12,
                              "score": "logit"})
    smooth = F.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size=(64, 64), mode="bilinear")
    weights = {precision: lime.at_precision(precision)(net, smooth, classes[:1]) for precision in ("32", "bf16-mixed")}
    assert lime.pass_precision == "32"  # at_precision left the configured explainer as it was
    exact, reduced = weights["32"].flatten(1), weights["bf16-mixed"].flatten(1)
    assert exact.unique().numel() > 3 and (exact - reduced).abs().max() < 0.05 * exact.abs().max()
    assert functional.spearman(exact, reduced) > 0.9
