"""Lime's kernel and weighted ridge fit against references computed without it: scikit-learn's
``Ridge`` with ``sample_weight`` and its cosine ``pairwise_distances``, on the perturbations and
scores of one small image through a small random conv net (a probability score, so not linear in
the on/off vector ``z`` and the sample weights change the fit)."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.metrics import pairwise_distances
from torch import nn

from evaluation.explainers import Lime
from gcmodels.networks import ExplainableNet

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
TARGET = 1
# Both fits are solved in float64: they agree to about 1e-15 absolute, 1e-10 relative on the
# smallest coefficient.
RTOL, ATOL = 1e-5, 1e-12


def explainer(**changes) -> Lime:
    """The configured defaults (kernel width, ridge, fill, probability score), fewer samples and
    superpixels so that the test stays fast."""
    options = yaml.safe_load((ROOT / "conf/explainer/lime.yaml").read_text())
    options.pop("name")
    return Lime(**{**options, "num_samples": 200, "num_segments": 8, **changes})


def textured_image() -> torch.Tensor:
    """A smooth colour field, so SLIC finds several superpixels, plus fine noise: with the default
    fill (each superpixel's own mean colour) a smooth field alone would barely change when a
    superpixel is switched off."""
    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand(1, 3, 4, 4, generator=generator, dtype=torch.float64)
    image = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    noise = 0.15 * torch.rand(1, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    return (image + noise).clamp(0, 1)


def conv_net() -> ExplainableNet:
    torch.manual_seed(0)
    net = ExplainableNet(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 4)),
    ).double().eval()
    # At the default initialisation the class probabilities stay near 1/4 and move by ~1e-4 over
    # all perturbations; larger weights make the softmax bend, so the score is clearly non-linear.
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(6.0)
    return net


@pytest.fixture(scope="module")
def case():
    """The explainer's own steps on one image: superpixels, on/off draws Z and scores y."""
    lime, net, images, targets = explainer(), conv_net(), textured_image(), torch.tensor([TARGET])
    segments = lime.segment(images)
    masks = lime.perturbations(images, segments)
    scores = lime._scores(net, images, targets, segments, masks)
    return dict(lime=lime, net=net, images=images, targets=targets, segments=segments,
                mask=masks[0], score=scores[0])


def cosine_kernel(mask: torch.Tensor, kernel_width: float) -> np.ndarray:
    """exp(-d^2 / w^2), d from scikit-learn's cosine distance to the all-ones vector (1 for the
    all-off row, whose cosine similarity scikit-learn takes as 0)."""
    design = mask.double().numpy()
    distances = pairwise_distances(design, np.ones((1, design.shape[1])), metric="cosine").ravel()
    return np.exp(-distances ** 2 / kernel_width ** 2)


def fit_with_recorded_kernel(lime: Lime, mask, score, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """``lime._fit`` and the sample weights it used. No step returns them (they are a local of
    ``_fit``), so the one ``torch.exp`` call inside it is recorded."""
    recorded, exp = [], torch.exp

    def recording_exp(*args, **kwargs):
        result = exp(*args, **kwargs)
        recorded.append(result.detach().clone())
        return result

    with monkeypatch.context() as patch:
        patch.setattr(torch, "exp", recording_exp)
        beta = lime._fit(mask, score)
    assert len(recorded) == 1 and recorded[0].shape == (len(mask),), (
        "Lime._fit no longer computes its sample weights in one torch.exp call: update this spy")
    return beta.numpy(), recorded[0].numpy()


def sklearn_ridge(mask, score, alpha, sample_weight) -> np.ndarray:
    design = mask.double().numpy()
    return Ridge(alpha=alpha, fit_intercept=True).fit(design, score.numpy(), sample_weight=sample_weight).coef_


def test_the_case_is_not_trivial(case):
    """Guards the other tests: a linear score or uniform weights would let a wrong kernel pass."""
    design, score = case["mask"].double().numpy(), case["score"].numpy()
    assert design.shape[1] >= 5 and case["mask"][0].all()
    residuals = score - LinearRegression().fit(design, score).predict(design)
    assert np.abs(residuals).max() > 0.01 * np.ptp(score) > 0
    weights = cosine_kernel(case["mask"], case["lime"].kernel_width)
    assert weights.max() == 1.0 and weights.min() < 0.1


def test_kernel_is_exp_of_the_squared_cosine_distance_to_all_ones(case, monkeypatch):
    lime = case["lime"]
    _, used = fit_with_recorded_kernel(lime, case["mask"], case["score"], monkeypatch)
    np.testing.assert_allclose(used, cosine_kernel(case["mask"], lime.kernel_width), rtol=1e-12, atol=0)

    # Every number of "on" superpixels, the all-off row included, which the random draws may miss.
    size = case["mask"].shape[1]
    every_count = torch.arange(size + 1).view(-1, 1) > torch.arange(size).view(1, -1)
    score = torch.linspace(0, 1, size + 1, dtype=torch.float64)
    _, used = fit_with_recorded_kernel(lime, every_count, score, monkeypatch)
    np.testing.assert_allclose(used, cosine_kernel(every_count, lime.kernel_width), rtol=1e-12, atol=0)
    assert used[0] == pytest.approx(np.exp(-1 / lime.kernel_width ** 2), rel=1e-12)  # all off: d = 1


@pytest.mark.parametrize("ridge", [None, 0.05])  # None: the configured penalty
def test_fit_is_sklearns_weighted_ridge(case, monkeypatch, ridge):
    lime = case["lime"] if ridge is None else replace(case["lime"], ridge=ridge)
    mask, score = case["mask"], case["score"]
    beta, used = fit_with_recorded_kernel(lime, mask, score, monkeypatch)
    with_used = sklearn_ridge(mask, score, lime.ridge, used)
    with_reference = sklearn_ridge(mask, score, lime.ridge, cosine_kernel(mask, lime.kernel_width))
    np.testing.assert_allclose(beta, with_used, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(beta, with_reference, rtol=RTOL, atol=ATOL)

    # Not vacuous: the weights carry signal, and dropping the sample weights moves them a hundred
    # times the tolerance (700 to 2300 times here: the score is only mildly curved in z).
    assert np.abs(beta).max() > 1e-3
    unweighted = sklearn_ridge(mask, score, lime.ridge, None)
    assert np.abs(beta - unweighted).max() > 100 * RTOL * np.abs(beta).max()


def independent_scores(net, image, target, segments, mask) -> np.ndarray:
    """The probability of ``target`` for each perturbation, built without Lime: off superpixels
    painted with their own mean colour (the configured fill), in numpy."""
    pixels = image.numpy()  # [3, H, W]
    ids = segments.numpy()
    means = np.stack([pixels[:, ids == segment].mean(axis=1) for segment in range(ids.max() + 1)])
    filled = means[ids].transpose(2, 0, 1)  # [3, H, W]
    keep = mask.numpy()[:, ids][:, None]  # [N, 1, H, W]
    perturbed = torch.from_numpy(np.where(keep, pixels, filled))
    with torch.no_grad():
        return net(perturbed).softmax(dim=1)[:, target].numpy()


def test_superpixel_weights_equal_an_independent_pipeline(case):
    """End to end: only the superpixels and on/off draws are taken from Lime (choices, not
    computations); the scores, kernel and fit are recomputed with numpy and scikit-learn."""
    lime, net, images, targets = case["lime"], case["net"], case["images"], case["targets"]
    assert lime.fill == "segment"  # independent_scores paints that fill
    segments, weights = lime.superpixel_weights(net, images, targets)
    assert torch.equal(segments, case["segments"])
    mask = lime.perturbations(images, segments)[0]
    score = independent_scores(net, images[0], TARGET, segments[0], mask)
    np.testing.assert_allclose(score, case["score"].numpy(), rtol=1e-10, atol=0)
    expected = sklearn_ridge(mask, torch.from_numpy(score), lime.ridge, cosine_kernel(mask, lime.kernel_width))
    assert weights[0].dtype == torch.float64 and weights[0].shape == expected.shape
    np.testing.assert_allclose(weights[0].numpy(), expected, rtol=RTOL, atol=ATOL)
