"""Cross-model consensus (evaluation.consensus.core): the formulas on hand-made explanations and
against the papers' formulas written naively, the two LIME rules reversing a ranking, missing
explanations, noise members ranked last, order independence, leave-one-out, sub-committees and
convergence."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from evaluation.consensus import core
from evaluation.consensus.core import (
    committee_size_convergence,
    consensus_scores,
    cosine_similarity,
    member_similarities,
    normalize_maps,
    pixel_consensus,
    random_subcommittees,
    ranks,
    rbf_similarity,
    superpixel_consensus,
)
from tests.conftest import ROOT

F64 = torch.float64
# The documented defaults (conf/committee/default.yaml), which the scripts pass.
COMMITTEE = OmegaConf.load(ROOT / "conf" / "committee" / "default.yaml")
SIGMA, RULE = COMMITTEE.sigma, COMMITTEE.aggregation


def rbf(rms: float, sigma: float = SIGMA) -> float:
    return math.exp(-0.5 * (rms / sigma) ** 2)


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# ---------------------------------------------------------------- hand-made superpixel weights
# 3 members, 2 images, 4 superpixels; image 1 has 3 real superpixels (the 4th is padding holding
# garbage, which must be ignored).
WEIGHTS = torch.tensor([
    [[3., 4., 0., 0.], [1., -1., 0., 99.]],          # A: image 0 norm 5, image 1 norm sqrt(2)
    [[0., 0., 0., 2.], [2., 0., 0., math.nan]],      # B: norm 2, norm 2
    [[6., 8., 0., 0.], [0., 0., -3., -7.]],          # C: norm 10, norm 3
], dtype=F64)
VALID = torch.tensor([[True, True, True, True], [True, True, True, False]])
R2 = 1 / math.sqrt(2)
# The members' own weights on the real superpixels, which both rules compare with the consensus.
RAW = {"A": [[3, 4, 0, 0], [1, -1, 0, 0]], "B": [[0, 0, 0, 2], [2, 0, 0, 0]], "C": [[6, 8, 0, 0], [0, 0, -3, 0]]}
# Linear terms t_i = L_i / ||L_i|| (padding 0).
LINEAR = {"A": [[0.6, 0.8, 0, 0], [R2, -R2, 0, 0]], "B": [[0, 0, 0, 1], [1, 0, 0, 0]],
          "C": [[0.6, 0.8, 0, 0], [0, 0, -1, 0]]}
# Squared terms t_i = L_i^2 / ||L_i||.
SQUARED = {"A": [[9 / 5, 16 / 5, 0, 0], [1 / math.sqrt(2), 1 / math.sqrt(2), 0, 0]],
           "B": [[0, 0, 0, 4 / 2], [4 / 2, 0, 0, 0]], "C": [[36 / 10, 64 / 10, 0, 0], [0, 0, 9 / 3, 0]]}


def mean_of(vectors: list[list[float]]) -> list[float]:
    return [sum(values) / len(vectors) for values in zip(*vectors)]


@pytest.mark.parametrize("rule, terms", [("linear", LINEAR), ("squared", SQUARED)])
def test_superpixel_consensus_and_cosine_by_hand(rule, terms):
    for image in (0, 1):
        expected = mean_of([terms[k][image] for k in "ABC"])
        got = superpixel_consensus(WEIGHTS, VALID, rule)[image]
        assert got.tolist() == pytest.approx(expected, abs=1e-12)
    sims = member_similarities(WEIGHTS, "superpixel", valid=VALID, rule=rule)
    assert sims.shape == (3, 2) and sims.dtype == F64
    for i, k in enumerate("ABC"):
        for image in (0, 1):
            c = mean_of([terms[j][image] for j in "ABC"])
            assert float(sims[i, image]) == pytest.approx(cos(RAW[k][image][:3 + (image == 0)],
                                                              c[:3 + (image == 0)]), abs=1e-12)


def test_linear_rule_numbers():
    # Image 0: c = (A + B + C) / 3 = [0.4, 1.6/3, 0, 1/3], |c| = sqrt(5)/3:
    # cos(A, c) = (2/3) / (sqrt(5)/3) = 2/sqrt(5); cos(B, c) = 1/sqrt(5).
    sims = member_similarities(WEIGHTS, "superpixel", valid=VALID, rule="linear")
    assert float(sims[0, 0]) == pytest.approx(2 / math.sqrt(5), abs=1e-12)
    assert float(sims[1, 0]) == pytest.approx(1 / math.sqrt(5), abs=1e-12)
    assert (RULE, SIGMA) == ("squared", 0.2)  # the documented defaults
    with pytest.raises(ValueError, match="rule: superpixel explanations need a consensus rule"):
        member_similarities(WEIGHTS, "superpixel", valid=VALID)
    # The linear rule ignores each member's scale; the squared rule does not.
    scaled = WEIGHTS.clone()
    scaled[0] *= 10
    assert torch.allclose(superpixel_consensus(scaled, VALID, "linear"), superpixel_consensus(WEIGHTS, VALID, "linear"))
    assert not torch.allclose(superpixel_consensus(scaled, VALID, "squared"),
                              superpixel_consensus(WEIGHTS, VALID, "squared"))


def paper_similarities(weights: np.ndarray, valid: np.ndarray, rule: str, leave_one_out: bool) -> np.ndarray:
    """The papers' formulas, loop by loop: ``c_k = (1/m) sum_i L_ik^2 / ||L_i||`` (squared, "Cross-Model
    Consensus ...", Appendix A) or ``(1/m) sum_i L_ik / ||L_i||`` (linear, "Democratizing ...",
    Appendix E) over the image's real superpixels, and ``s_j = cos(L_j, c)``."""
    m, images, width = weights.shape
    out = np.empty((m, images))
    for n in range(images):
        real = [k for k in range(width) if valid[n, k]]
        norms = [math.sqrt(sum(weights[i, n, k] ** 2 for k in real)) for i in range(m)]
        for j in range(m):
            others = [i for i in range(m) if not (leave_one_out and i == j)]
            c = [sum((weights[i, n, k] ** 2 if rule == "squared" else weights[i, n, k]) / norms[i] for i in others)
                 / len(others) for k in real]
            out[j, n] = cos([weights[j, n, k] for k in real], c)
    return out


@pytest.mark.parametrize("rule", ["squared", "linear"])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_superpixel_similarities_are_the_papers_formulas(rule, leave_one_out):
    weights, valid = lime_committee(4, noisy=1, n_images=5, seed=2)
    weights[0] *= -1  # signed weights of both signs: the squared rule's consensus has none
    got = member_similarities(weights, "superpixel", valid=valid, rule=rule, leave_one_out=leave_one_out)
    expected = paper_similarities(weights.numpy(), valid.numpy(), rule, leave_one_out)
    assert np.allclose(got.numpy(), expected, atol=1e-12)


def test_the_rules_can_reverse_a_ranking():
    """One confident member (LIME weights of scale 10, on superpixel 0) and four diffident ones
    (scale 0.1, on superpixels 1 and 2). The linear rule's consensus is the mean direction, that of
    the four; the squared rule's terms keep each member's scale, so the confident member's term
    dominates it."""
    confident, diffident = [10.0, 0.0, 0.0], [0.0, 0.1, 0.1]
    weights = torch.tensor([[confident]] + [[diffident]] * 4, dtype=F64)
    # Linear: c = (e_0 + 4 (e_1 + e_2) / sqrt(2)) / 5.
    c = [0.2, 0.8 / math.sqrt(2), 0.8 / math.sqrt(2)]
    linear = consensus_scores(member_similarities(weights, "superpixel", rule="linear"))
    assert linear.tolist() == pytest.approx([cos(confident, c)] + [cos(diffident, c)] * 4, abs=1e-12)
    assert ranks(linear) == [5, 1, 1, 1, 1]
    # Squared: c = ([100, 0, 0] / 10 + 4 [0, 0.01, 0.01] / (0.1 sqrt(2))) / 5.
    c = [2.0, 0.04 / (0.5 * math.sqrt(2)), 0.04 / (0.5 * math.sqrt(2))]
    squared = consensus_scores(member_similarities(weights, "superpixel", rule="squared"))
    assert squared.tolist() == pytest.approx([cos(confident, c)] + [cos(diffident, c)] * 4, abs=1e-12)
    assert ranks(squared) == [1, 2, 2, 2, 2]
    assert float(squared[0]) > 0.99 and float(squared[1]) < 0.05


def test_superpixel_leave_one_out_by_hand():
    loo = member_similarities(WEIGHTS, "superpixel", valid=VALID, rule="linear", leave_one_out=True)
    # Image 0, member A against (B + C)/2 = [0.3, 0.4, 0, 0.5]: cos = 0.5 / sqrt(0.5).
    assert float(loo[0, 0]) == pytest.approx(0.5 / math.sqrt(0.5), abs=1e-12)
    # Member B against (A + C)/2 = [0.6, 0.8, 0, 0]: orthogonal.
    assert float(loo[1, 0]) == pytest.approx(0.0, abs=1e-12)
    # Image 1, member C against (A + B)/2 = [(R2 + 1)/2, -R2/2, 0]: orthogonal as well.
    assert float(loo[2, 1]) == pytest.approx(0.0, abs=1e-12)
    # And in general: the consensus of the others, computed directly.
    for i in range(3):
        others = [j for j in range(3) if j != i]
        c = superpixel_consensus(WEIGHTS[others], VALID, "squared")
        expected = cosine_similarity(WEIGHTS[i].nan_to_num(), c, VALID)
        got = member_similarities(WEIGHTS, "superpixel", valid=VALID, rule="squared", leave_one_out=True)[i]
        assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("rule, terms", [("linear", LINEAR), ("squared", SQUARED)])
def test_padding_and_missing_superpixel_members(rule, terms):
    weights = WEIGHTS.clone()
    weights[:, 1, 3] = torch.tensor([1e9, -5.0, math.inf])  # any padding value is ignored
    assert torch.allclose(member_similarities(weights, "superpixel", valid=VALID, rule=rule),
                          member_similarities(WEIGHTS, "superpixel", valid=VALID, rule=rule))
    assert superpixel_consensus(weights, VALID, rule)[1, 3] == 0
    # An all-zero member and a NaN member are missing: left out of the mean, similarity NaN.
    weights[1, 0] = 0.0
    weights[2, 1, 0] = math.nan
    assert core.present(weights, "superpixel", VALID).tolist() == [[True, True], [False, True], [True, False]]
    c = superpixel_consensus(weights, VALID, rule)
    assert c[0].tolist() == pytest.approx(mean_of([terms["A"][0], terms["C"][0]]))
    assert c[1].tolist() == pytest.approx(mean_of([terms["A"][1], terms["B"][1]]))
    sims = member_similarities(weights, "superpixel", valid=VALID, rule=rule)
    assert math.isnan(sims[1, 0]) and math.isnan(sims[2, 1])
    assert float(sims[0, 0]) == pytest.approx(cos(RAW["A"][0], c[0].tolist()))
    scores = consensus_scores(sims)
    assert float(scores[1]) == pytest.approx(float(sims[1, 1]))  # the NaN image is skipped
    assert float(scores[2]) == pytest.approx(float(sims[2, 0]))


def test_cosine_similarity():
    a = torch.tensor([[1., 0., 5.], [0., 0., 0.]], dtype=F64)
    b = torch.tensor([1., 1., -9.], dtype=F64)
    valid = torch.tensor([True, True, False])
    out = cosine_similarity(a, b, valid)
    assert float(out[0]) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(out[1])  # a zero vector has no direction
    assert float(cosine_similarity(a[0], b)) == pytest.approx(cos([1, 0, 5], [1, 1, -9]))


# ---------------------------------------------------------------- hand-made pixel maps
RAMP = torch.arange(9, dtype=F64).reshape(3, 3)
E00, E22 = torch.zeros(3, 3, dtype=F64), torch.zeros(3, 3, dtype=F64)
E00[0, 0], E22[2, 2] = 1, 1


def pixel_committee() -> torch.Tensor:
    """3 members, 2 images, 3x3. Image 0: ramp, 2*ramp+5 (same normalised map), a constant map
    (missing). Image 1: a peak top-left (scaled), a map with a NaN (missing), a peak bottom-right."""
    broken = 3 * E00.clone()
    broken[1, 1] = math.nan
    return torch.stack([torch.stack([RAMP, 4 * E00 - 1]),
                        torch.stack([2 * RAMP + 5, broken]),
                        torch.stack([torch.full((3, 3), 7.0, dtype=F64), E22])])


def test_normalize_maps():
    maps = pixel_committee()
    n = normalize_maps(maps)
    assert torch.allclose(n[0, 0], RAMP / 8) and torch.allclose(n[1, 0], RAMP / 8)
    assert torch.equal(n[2, 0], torch.zeros(3, 3, dtype=F64))  # constant -> zeros
    assert torch.allclose(n[0, 1], E00)
    assert torch.isnan(n[1, 1]).all()  # a NaN pixel: the whole map is missing


def test_pixel_consensus_and_rbf_by_hand():
    maps = pixel_committee()
    assert core.present(maps, "pixel").tolist() == [[True, True], [True, False], [False, True]]
    c = pixel_consensus(maps)
    n = RAMP / 8
    # The constant map, all zeros once normalised, is missing: it would drag the consensus
    # towards a flat map (2n/3) and score a similarity of its own.
    assert torch.allclose(c[0], n)
    assert torch.allclose(c[1], (E00 + E22) / 2)  # the NaN map is missing too
    sims = member_similarities(maps, "pixel", sigma=SIGMA)
    assert float(sims[0, 0]) == 1.0 and float(sims[1, 0]) == 1.0
    assert math.isnan(sims[2, 0]) and math.isnan(sims[1, 1])
    # Image 1: members 1 and 3 differ from c by +-(E00 - E22)/2: rms = sqrt(2 * 0.25 / 9).
    assert float(sims[0, 1]) == pytest.approx(rbf(math.sqrt(0.5 / 9)), abs=1e-12)
    assert float(sims[2, 1]) == pytest.approx(rbf(math.sqrt(0.5 / 9)), abs=1e-12)
    scores = consensus_scores(sims)
    assert float(scores[1]) == 1.0  # only image 0 counts
    assert float(scores[2]) == pytest.approx(rbf(math.sqrt(0.5 / 9)))  # only image 1
    assert float(scores[0]) == pytest.approx((1 + rbf(math.sqrt(0.5 / 9))) / 2)
    # Another sigma, straight from the definition; with leave-one-out, member 1 of image 0 meets
    # member 2's map alone.
    sims = member_similarities(maps, "pixel", sigma=0.5)
    assert float(sims[0, 1]) == pytest.approx(math.exp(-0.5 * (math.sqrt(0.5 / 9) / 0.5) ** 2), abs=1e-12)
    assert float(member_similarities(maps, "pixel", sigma=SIGMA, leave_one_out=True)[0, 0]) == 1.0


def test_rbf_similarity_is_resolution_free():
    a = torch.zeros(2, 2, dtype=F64)
    b = torch.full((2, 2), 0.3, dtype=F64)
    assert float(rbf_similarity(a, b, 0.3)) == pytest.approx(math.exp(-0.5))
    big_a, big_b = a.repeat_interleave(8, 0).repeat_interleave(8, 1), b.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert float(rbf_similarity(big_a, big_b, 0.3)) == pytest.approx(math.exp(-0.5))
    assert float(rbf_similarity(a, a, 0.3)) == 1.0
    assert rbf_similarity(torch.zeros(4, 2, 2), b, 0.3).shape == (4,)  # broadcast


def test_pixel_leave_one_out_by_hand():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(4, 3, 5, 6, generator=g, dtype=F64) * 3 - 1
    m = maps.shape[0]
    full = pixel_consensus(maps)
    n = normalize_maps(maps)
    loo = member_similarities(maps, "pixel", leave_one_out=True, sigma=0.3)
    for i in range(m):
        c_loo = pixel_consensus(maps[[j for j in range(m) if j != i]])
        assert torch.allclose(full, ((m - 1) * c_loo + n[i]) / m, atol=1e-12)
        assert torch.allclose(loo[i], rbf_similarity(n[i], c_loo, 0.3), atol=1e-12)
    # Hand check for member 0 on image 0: consensus of the three others, pixel by pixel.
    c0 = sum((maps[j, 0] - maps[j, 0].min()) / (maps[j, 0].max() - maps[j, 0].min()) for j in (1, 2, 3)) / 3
    d = n[0, 0] - c0
    assert float(loo[0, 0]) == pytest.approx(math.exp(-0.5 * (math.sqrt(float((d * d).mean())) / 0.3) ** 2))
    assert not torch.allclose(loo, member_similarities(maps, "pixel", sigma=0.3))


# ---------------------------------------------------------------- committees with a noise member
def blob_committee(m: int, noisy: int, n_images: int = 12, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``m`` members explaining ``n_images`` images: agreeing members draw a blob near the image's
    object (jittered, with 10% noise), member ``noisy`` returns uniform noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=F64), torch.arange(size, dtype=F64), indexing="ij")
    maps = torch.empty(m, n_images, size, size, dtype=F64)
    for n in range(n_images):
        cy, cx = (torch.rand(2, generator=g, dtype=F64) * (size - 8) + 4).tolist()
        for i in range(m):
            if i == noisy:
                maps[i, n] = torch.rand(size, size, generator=g, dtype=F64)
            else:
                dy, dx = (torch.randn(2, generator=g, dtype=F64)).tolist()
                s = 2 + 2 * float(torch.rand(1, generator=g))
                maps[i, n] = (torch.exp(-((yy - cy - dy) ** 2 + (xx - cx - dx) ** 2) / (2 * s * s))
                              + 0.1 * torch.rand(size, size, generator=g, dtype=F64))
    return maps


def lime_committee(m: int, noisy: int, n_images: int = 12, s_max: int = 20, seed: int = 0):
    """LIME-like weights: agreeing members = the image's common weights (non-negative, as the
    evidence for the explained class mostly is) + small noise, at their own scale; member
    ``noisy`` has random signed weights. Images have 12 to 20 real superpixels."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.full((m, n_images, s_max), math.nan, dtype=F64)
    valid = torch.zeros(n_images, s_max, dtype=torch.bool)
    for n in range(n_images):
        s = int(torch.randint(12, s_max + 1, (1,), generator=g))
        valid[n, :s] = True
        common = torch.randn(s, generator=g, dtype=F64).abs()
        for i in range(m):
            scale = float(torch.rand(1, generator=g)) * 5 + 0.1
            w = (torch.randn(s, generator=g, dtype=F64) if i == noisy
                 else common + 0.3 * torch.randn(s, generator=g, dtype=F64))
            weights[i, n, :s] = scale * w
    return weights, valid


@pytest.mark.parametrize("leave_one_out", [False, True])
@pytest.mark.parametrize("noisy", [0, 3])
def test_noise_member_ranks_last_pixel(noisy, leave_one_out):
    maps = blob_committee(5, noisy)
    scores = consensus_scores(member_similarities(maps, "pixel", leave_one_out=leave_one_out, sigma=SIGMA))
    assert ranks(scores)[noisy] == 5
    assert sorted(ranks(scores)) == [1, 2, 3, 4, 5]


def test_default_sigma_separates_without_saturating():
    """The default sigma: a noise member scores clearly low but not 0, agreeing members clearly
    high but not 1 (the numbers of docs/consensus.md, on a small committee)."""
    maps = blob_committee(5, noisy=0, n_images=20, size=28, seed=3)
    scores = consensus_scores(member_similarities(maps, "pixel", sigma=SIGMA))
    assert 0.05 < float(scores[0]) < 0.4
    assert (scores[1:] > 0.6).all() and (scores[1:] < 0.95).all()


@pytest.mark.parametrize("rule", ["linear", "squared"])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_noise_member_ranks_last_superpixel(rule, leave_one_out):
    for noisy in (0, 2):
        weights, valid = lime_committee(4, noisy, seed=noisy)
        sims = member_similarities(weights, "superpixel", valid=valid, rule=rule, leave_one_out=leave_one_out)
        assert ranks(consensus_scores(sims))[noisy] == 4


@pytest.mark.parametrize("kind", ["pixel", "superpixel"])
def test_scores_do_not_depend_on_member_order(kind):
    if kind == "pixel":
        x, options = blob_committee(5, noisy=2), {"sigma": SIGMA}
    else:
        x, valid = lime_committee(5, noisy=1)
        options = {"valid": valid, "rule": "squared"}
    perm = torch.tensor([3, 0, 4, 1, 2])
    for loo in (False, True):
        scores = consensus_scores(member_similarities(x, kind, leave_one_out=loo, **options))
        permuted = consensus_scores(member_similarities(x[perm], kind, leave_one_out=loo, **options))
        assert torch.allclose(permuted, scores[perm], atol=1e-12)
        assert ranks(permuted) == [ranks(scores)[p] for p in perm.tolist()]


def test_inputs_numpy_float16_and_lists():
    maps = blob_committee(3, noisy=1, n_images=2).to(torch.float16)
    expected = member_similarities(maps, "pixel", sigma=SIGMA)
    array = maps.numpy()
    array.setflags(write=False)  # like the store's read-only memory maps
    assert torch.equal(member_similarities(array, "pixel", sigma=SIGMA), expected)
    assert torch.equal(member_similarities(list(maps), "pixel", sigma=SIGMA), expected)


def test_ranks():
    assert ranks(torch.tensor([0.2, 0.9, 0.5])) == [3, 1, 2]
    assert ranks([0.5, 0.9, 0.5, 0.1]) == [2, 1, 2, 4]
    assert ranks([math.nan, 0.3, 0.7]) == [3, 2, 1]
    assert consensus_scores(torch.tensor([[math.nan, math.nan], [0.2, 0.4]])).isnan().tolist() == [True, False]


# ---------------------------------------------------------------- sub-committees and convergence
def graded_committee(m: int = 6, seed: int = 0):
    """Member i returns uniform noise instead of a blob on its first 2i images, and its
    'accuracy' falls with i."""
    g = torch.Generator().manual_seed(seed)
    maps = blob_committee(m, noisy=-1, n_images=12, seed=seed)
    for i in range(m):
        maps[i, :2 * i] = torch.rand(maps[i, :2 * i].shape, generator=g, dtype=F64)
    accuracy = torch.linspace(0.9, 0.6, m, dtype=F64)
    return maps, accuracy


def test_correlation_helper_is_scipys_and_refuses_degenerate_input():
    x = torch.tensor([1.0, 2.0, 2.0, 5.0, 3.0, 3.0], dtype=F64)
    y = torch.tensor([0.3, 0.1, 0.4, 0.9, 0.4, 0.2], dtype=F64)
    r, rho = core._correlations(x, y)
    assert r == scipy_stats.pearsonr(x.numpy(), y.numpy()).statistic
    assert rho == scipy_stats.spearmanr(x.numpy(), y.numpy()).statistic
    assert all(math.isnan(v) for v in core._correlations(torch.ones(4, dtype=F64), y[:4]))
    assert all(math.isnan(v) for v in core._correlations(x[:2], y[:2]))


def test_random_subcommittees():
    maps, accuracy = graded_committee()
    out = random_subcommittees(maps, accuracy, 4, 6, torch.Generator().manual_seed(0), kind="pixel", sigma=SIGMA)
    assert set(out) == {"size", "draws", "valid_draws", "pearson_mean", "pearson_std", "spearman_mean",
                        "spearman_std", "pearson", "spearman"}
    assert out["size"] == 4 and out["draws"] == 6 and len(out["pearson"]) == 6 and out["valid_draws"] == 6
    assert out["pearson_mean"] == pytest.approx(float(np.mean(out["pearson"])))
    assert out["pearson_std"] == pytest.approx(float(np.std(out["pearson"], ddof=1)))
    assert out["spearman_mean"] > 0.5 and out["pearson_mean"] > 0.5  # cleaner members are more accurate
    again = random_subcommittees(maps, accuracy, 4, 6, torch.Generator().manual_seed(0), kind="pixel", sigma=SIGMA)
    assert again == out
    # The whole committee once: the correlation of its scores with accuracy, as scipy computes it.
    whole = random_subcommittees(maps, accuracy, 6, 1, torch.Generator().manual_seed(0), kind="pixel", sigma=0.3)
    scores = consensus_scores(member_similarities(maps, "pixel", sigma=0.3)).numpy()
    assert whole["pearson"][0] == pytest.approx(scipy_stats.pearsonr(scores, accuracy.numpy()).statistic, abs=1e-10)
    assert whole["spearman"][0] == pytest.approx(scipy_stats.spearmanr(scores, accuracy.numpy()).statistic, abs=1e-10)
    assert math.isnan(whole["pearson_std"])  # one draw
    weights, valid = lime_committee(5, noisy=4)
    lime = random_subcommittees(weights, torch.tensor([0.9, 0.85, 0.8, 0.75, 0.5]), 3, 4,
                                torch.Generator().manual_seed(1), kind="superpixel", valid=valid, rule="squared")
    assert lime["draws"] == 4 and len(lime["spearman"]) == 4


def test_committee_size_convergence():
    seen = []

    def quality(indices: list[int]) -> float:
        seen.append(indices)
        return math.nan if indices == [0] else float(sum(indices))

    out = committee_size_convergence(quality, 5, [1, 3, 5], 4, torch.Generator().manual_seed(0))
    assert [row["size"] for row in out] == [1, 3, 5]
    assert all(set(row) == {"size", "mean", "median", "values"} and len(row["values"]) == 4 for row in out)
    assert all(indices == sorted(set(indices)) and all(0 <= i < 5 for i in indices) for indices in seen)
    assert [len(indices) for indices in seen] == [1] * 4 + [3] * 4 + [5] * 4
    assert out[2]["values"] == [10.0] * 4 and out[2]["mean"] == 10.0 and out[2]["median"] == 10.0
    finite = [v for v in out[1]["values"] if not math.isnan(v)]
    assert out[1]["mean"] == pytest.approx(sum(finite) / len(finite))
    assert out[1]["median"] == pytest.approx(float(np.median(finite)))
    again = committee_size_convergence(lambda idx: float(sum(idx)), 5, [1, 3, 5], 4, torch.Generator().manual_seed(0))
    assert [row["values"] for row in again][1:] == [row["values"] for row in out][1:]


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("call, message", [
    (lambda: pixel_consensus(torch.rand(1, 2, 3, 3)), "at least 2 members"),
    (lambda: member_similarities(torch.rand(1, 2, 3, 3), "pixel", sigma=SIGMA), "at least 2 members"),
    (lambda: superpixel_consensus(torch.rand(1, 2, 4), None, RULE), "at least 2 members"),
    (lambda: member_similarities(torch.rand(2, 2, 3, 3), "heatmap"), "kind='heatmap'"),
    (lambda: member_similarities(torch.rand(2, 2, 3, 3), "pixel"), "sigma: pixel explanations need"),
    (lambda: member_similarities(torch.rand(2, 2, 4), "superpixel", rule="cubic"), "rule='cubic'"),
    (lambda: superpixel_consensus(torch.rand(2, 2, 4), None, rule="mean"), "rule='mean'"),
    (lambda: member_similarities(torch.rand(2, 2, 3, 3), "pixel", sigma=0), "sigma=0"),
    (lambda: member_similarities(torch.rand(2, 2, 3, 3), "pixel", sigma=-0.2), "sigma=-0.2"),
    (lambda: rbf_similarity(torch.rand(3, 3), torch.rand(3, 3), sigma=math.nan), "sigma=nan"),
    (lambda: rbf_similarity(torch.rand(3, 3), torch.rand(3, 4), SIGMA), "(3, 4)"),
    (lambda: cosine_similarity(torch.rand(4), torch.rand(5)), "(5,)"),
    (lambda: member_similarities(torch.rand(2, 2, 4), "superpixel",
                                 valid=torch.ones(2, 5, dtype=torch.bool), rule=RULE), "(2, 5)"),
    (lambda: member_similarities(torch.rand(2, 2, 4), "pixel", sigma=SIGMA), "[m, N, H, W]"),
    (lambda: member_similarities(torch.rand(2, 2, 3, 3), "superpixel", rule=RULE), "[m, N, S]"),
    (lambda: member_similarities([torch.rand(2, 3, 3), torch.rand(2, 4, 4)], "pixel", sigma=SIGMA), "explanations"),
    (lambda: random_subcommittees(torch.rand(4, 2, 3, 3), torch.rand(3), 3, 2, kind="pixel", sigma=SIGMA), "accuracy"),
    (lambda: random_subcommittees(torch.rand(4, 2, 3, 3), torch.rand(4), 2, 2, kind="pixel", sigma=SIGMA), "size=2"),
    (lambda: random_subcommittees(torch.rand(4, 2, 3, 3), torch.rand(4), 5, 2, kind="pixel", sigma=SIGMA), "size=5"),
    (lambda: random_subcommittees(torch.rand(4, 2, 3, 3), torch.rand(4), 3, 0, kind="pixel", sigma=SIGMA), "draws=0"),
    (lambda: random_subcommittees(torch.rand(4, 2, 3, 3), torch.rand(4), 3, 2), "kind"),
    (lambda: committee_size_convergence(lambda i: 0.0, 4, [0, 2], 2), "size 0"),
    (lambda: committee_size_convergence(lambda i: 0.0, 4, [5], 2), "size 5"),
    (lambda: committee_size_convergence(lambda i: 0.0, 4, [2], 0), "trials=0"),
])
def test_errors(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)
