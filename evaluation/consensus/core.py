"""Cross-model consensus of explanations: the consensus, member similarities, scores and ranks.

A committee of ``m`` models explains the same ``N`` images with one explainer. For each image the
consensus ``c`` of the ``m`` explanations ``L_i`` is built, every member is compared with it, and a
member's *consensus score* is its mean similarity over the images (Li et al., "Cross-Model
Consensus of Explanations and Beyond for Image Classification Models: An Empirical Study", and
"Democratizing Evaluation of Deep Model Interpretability through Consensus"). Definitions, defaults
and their reasons: ``docs/consensus.md``.

Two kinds of explanation:

- ``"pixel"`` (SmoothGrad, Grad-CAM, ...): maps ``[m, N, H, W]`` at one common resolution. Each map
  is min-max normalised, ``n_i = (L_i - min L_i) / (max L_i - min L_i)``, and
  ``c = (1/m) sum_i n_i``. Similarity: the RBF kernel ``exp(-0.5 (rms(n_i - c) / sigma)^2)`` with
  ``rms(d) = ||d||_2 / sqrt(H W)``.
- ``"superpixel"`` (LIME): weights ``[m, N, S]`` over one segmentation per image shared by every
  member, padded to ``S`` superpixels; ``valid [N, S]`` marks the real ones. Each member contributes
  ``t_i = L_i^2 / ||L_i||`` (rule ``"squared"``, "Cross-Model Consensus of Explanations and
  Beyond", main text and Appendix A) or ``t_i = L_i / ||L_i||`` (rule ``"linear"``, "Democratizing
  Evaluation ...", Appendix E), ``||.||`` the L2 norm over the image's real superpixels, and
  ``c = (1/m) sum_i t_i``. Similarity, under both rules as the papers write it: the cosine between
  the member's own weights ``L_i`` and ``c``.

Every member helps build the consensus it is scored against; with ``leave_one_out=True`` member
``i`` is scored against the consensus of the others, ``c_(-i) = (m c - t_i) / (m - 1)``.

Missing explanations: a member's explanation of an image with a non-finite value (NaN, inf), or
that is constant (a pixel map with one value everywhere, all-zero superpixel weights: no
direction), or of an image without real superpixels, is *missing*. It takes no part in that
image's consensus (the mean is over the members present) and its similarity there is NaN, so the
image is skipped in that member's score; ``present`` tells which explanations count.

Everything is float64 torch; numpy arrays (e.g. memory-mapped float16 from the store) are accepted
and converted. Images are independent: a caller short of memory can score slices of images and
concatenate the ``[m, N]`` similarities along ``N``.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import stats as scipy_stats

KINDS = ("pixel", "superpixel")
RULES = ("linear", "squared")
# sigma and the LIME rule have no default here: they live in conf/committee/default.yaml (with
# their reasons in docs/consensus.md), and every caller passes them.


def _tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):  # also read-only memory maps: copy into float64
        return torch.from_numpy(np.array(x, dtype=np.float64))
    return torch.as_tensor(x)


def _as_float64(x, name: str) -> torch.Tensor:
    """``x`` (tensor, numpy array, number, or a sequence of tensors/arrays to stack) as float64."""
    try:
        if isinstance(x, (list, tuple)):
            if not x:
                raise ValueError(f"{name}: empty sequence")
            t = torch.stack([_tensor(item).to(torch.float64) for item in x])
        else:
            t = _tensor(x)
    except (TypeError, RuntimeError) as error:
        raise ValueError(f"{name}: not a numeric array ({error})") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected real numbers, got {t.dtype}")
    return t.detach().to(torch.float64)


def _check_sigma(sigma) -> float:
    if sigma is None:
        raise ValueError("sigma: pixel explanations need the RBF width (conf/committee/default.yaml)")
    if isinstance(sigma, bool):
        raise ValueError(f"sigma={sigma!r}: must be a positive number")
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"sigma={sigma!r}: must be a positive number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"sigma={sigma!r}: must be a positive finite number")
    return value


def _check_rule(rule) -> str:
    if rule is None:
        raise ValueError(f"rule: superpixel explanations need a consensus rule, one of {RULES} "
                         "(conf/committee/default.yaml)")
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: unknown LIME consensus rule; choose one of {RULES}")
    return rule


def _check_members(m: int, name: str) -> None:
    if m < 2:
        raise ValueError(f"{name}: a committee needs at least 2 members, got {m}")


# ----------------------------------------------------------------------------- pixel maps

def normalize_maps(maps) -> torch.Tensor:
    """Min-max normalise every map over its last two dims: ``(x - min) / (max - min)``.

    ``maps [..., H, W]`` -> float64 ``[..., H, W]`` in [0, 1]. A constant map becomes all zeros (the
    consensus treats it as missing); a map holding a NaN or inf becomes all NaN.
    """
    x = _as_float64(maps, "maps")
    if x.dim() < 2:
        raise ValueError(f"maps: need at least 2 dims [..., H, W], got shape {tuple(x.shape)}")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"maps: empty maps of shape {tuple(x.shape)}")
    finite = torch.isfinite(x).flatten(-2).all(-1)[..., None, None]
    safe = torch.where(finite, x, torch.zeros((), dtype=x.dtype))
    low = safe.amin(dim=(-2, -1), keepdim=True)
    span = safe.amax(dim=(-2, -1), keepdim=True) - low
    out = torch.where(span > 0, (safe - low) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.zeros((), dtype=x.dtype))
    return torch.where(finite, out, torch.full((), math.nan, dtype=x.dtype))


def _pixel_terms(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised maps ``[m, N, H, W]`` and presence ``[m, N]``."""
    terms = normalize_maps(maps)
    # A normalised map peaks at 1 unless it was constant (all zeros: it points nowhere, and would
    # pull the consensus towards a flat map) or held a non-finite value (all NaN).
    present = terms.flatten(-2).amax(-1) > 0
    return terms, present


def _check_pixel_maps(maps: torch.Tensor) -> None:
    if maps.dim() != 4:
        raise ValueError(f"maps: expected [m, N, H, W], got shape {tuple(maps.shape)}")
    _check_members(maps.shape[0], "maps")


def pixel_consensus(maps) -> torch.Tensor:
    """Consensus of pixel maps ``[m, N, H, W]`` -> ``[N, H, W]``: ``c = (1/m) sum_i n_i`` with
    ``n_i = normalize_maps(L_i)``. Members whose map of an image is missing (non-finite or
    constant) are left out of that image's mean; an image with no member present gets NaN."""
    x = _as_float64(maps, "maps")
    _check_pixel_maps(x)
    terms, present = _pixel_terms(x)
    total, count = _sum_present(terms, present)
    return _mean(total, count)


def rbf_similarity(a, b, sigma) -> torch.Tensor:
    """RBF similarity of maps over the last two dims: ``exp(-0.5 (rms(a - b) / sigma)^2)`` with
    ``rms(d) = ||d||_2 / sqrt(H W)``, so that the pixel count alone does not change it (the maps'
    min-max normalisation still does: compare at one resolution).

    ``a [..., H, W]`` and ``b [..., H, W]`` (broadcast over the leading dims) -> ``[...]`` in (0, 1];
    NaN where either map holds a NaN.
    """
    sigma = _check_sigma(sigma)
    a, b = _as_float64(a, "a"), _as_float64(b, "b")
    if a.dim() < 2 or b.dim() < 2 or a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"rbf_similarity: maps of shapes {tuple(a.shape)} and {tuple(b.shape)} "
                         "differ in their last two dims [H, W]")
    rms = (a - b).pow(2).mean(dim=(-2, -1)).sqrt()
    return torch.exp(-0.5 * (rms / sigma) ** 2)


# ----------------------------------------------------------------------------- superpixels

def _check_valid(valid, shape: tuple[int, int]) -> torch.Tensor:
    if valid is None:
        return torch.ones(shape, dtype=torch.bool)
    v = torch.as_tensor(valid)
    if v.dtype != torch.bool:
        if not bool(((v == 0) | (v == 1)).all()):
            raise ValueError("valid: must be boolean (or 0/1)")
        v = v.bool()
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"valid: shape {tuple(v.shape)} does not match the weights' [N, S] = {tuple(shape)}")
    return v


def _superpixel_terms(weights: torch.Tensor, valid: torch.Tensor,
                      rule: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each member's weights and term ``t_i`` ``[m, N, S]`` (0 on padding and where missing) and
    presence ``[m, N]``."""
    zero = torch.zeros((), dtype=weights.dtype)
    w = torch.where(valid, weights, zero)  # padding ignored, whatever it holds
    finite = torch.where(valid, torch.isfinite(weights), torch.ones((), dtype=torch.bool)).all(-1)
    w = torch.where(finite[..., None], w, zero)
    norm = w.pow(2).sum(-1).sqrt()
    present = finite & (norm > 0) & valid.any(-1)
    safe_norm = torch.where(norm > 0, norm, torch.ones((), dtype=norm.dtype))[..., None]
    terms = (w if rule == "linear" else w.pow(2)) / safe_norm
    return w, terms, present


def _check_superpixel_weights(weights: torch.Tensor) -> None:
    if weights.dim() != 3:
        raise ValueError(f"weights: expected [m, N, S], got shape {tuple(weights.shape)}")
    _check_members(weights.shape[0], "weights")


def superpixel_consensus(weights, valid, rule) -> torch.Tensor:
    """Consensus of LIME superpixel weights ``[m, N, S]`` -> ``[N, S]``.

    ``c_k = (1/m) sum_i L_ik^2 / ||L_i||`` (``rule="squared"``) or ``c_k = (1/m) sum_i L_ik / ||L_i||``
    (``rule="linear"``), ``||L_i||`` the L2 norm of member i's weights over the image's real
    superpixels (``valid [N, S]``, True = real; None = all real). Padding is ignored and set to 0
    in the result. Missing members (non-finite or all-zero weights) are left out of the mean.
    """
    rule = _check_rule(rule)
    w = _as_float64(weights, "weights")
    _check_superpixel_weights(w)
    v = _check_valid(valid, tuple(w.shape[1:]))
    _, terms, present = _superpixel_terms(w, v, rule)
    total, count = _sum_present(terms, present)
    return torch.where(v, _mean(total, count), torch.zeros((), dtype=w.dtype))


def cosine_similarity(a, b, valid=None) -> torch.Tensor:
    """Cosine ``<a, b> / (||a|| ||b||)`` over the last dim, counting only entries where ``valid``
    is True (broadcast; None = all). ``[..., S]`` -> ``[...]``; NaN where either vector is zero or
    holds a non-finite value."""
    a, b = _as_float64(a, "a"), _as_float64(b, "b")
    if a.dim() < 1 or b.dim() < 1 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"cosine_similarity: vectors of shapes {tuple(a.shape)} and {tuple(b.shape)} "
                         "differ in their last dim")
    if valid is not None:
        v = torch.as_tensor(valid).bool()
        if v.dim() < 1 or v.shape[-1] != a.shape[-1]:
            raise ValueError(f"valid: shape {tuple(v.shape)} does not match the vectors' last dim {a.shape[-1]}")
        zero = torch.zeros((), dtype=a.dtype)
        a, b = torch.where(v, a, zero), torch.where(v, b, zero)
    norms = a.pow(2).sum(-1).sqrt() * b.pow(2).sum(-1).sqrt()
    dot = (a * b).sum(-1)
    return torch.where(norms > 0, dot / torch.where(norms > 0, norms, torch.ones_like(norms)),
                       torch.full((), math.nan, dtype=a.dtype))


# ----------------------------------------------------------------------------- members

def _sum_present(terms: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over members of the present terms, and how many there are per image."""
    mask = present.reshape(present.shape + (1,) * (terms.dim() - present.dim()))
    total = torch.where(mask, terms, torch.zeros((), dtype=terms.dtype)).sum(0)
    return total, present.sum(0)


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    count = count.reshape(count.shape + (1,) * (total.dim() - count.dim())).to(total.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full((), math.nan, dtype=total.dtype))


def member_similarities(explanations, kind: str, *, sigma=None, rule=None, valid=None,
                        leave_one_out: bool = False) -> torch.Tensor:
    """Similarity of every member's explanation to the consensus, per image: ``[m, N]`` float64.

    ``kind="pixel"``: ``explanations [m, N, H, W]``; RBF with width ``sigma`` (required) between
    ``n_i`` and ``c``. ``kind="superpixel"``: ``explanations [m, N, S]`` with ``valid [N, S]``;
    cosine between the member's weights ``L_i`` and ``c`` built under ``rule`` (required).
    ``leave_one_out=True`` scores member i against the consensus of the other members,
    ``c_(-i) = (sum_j t_j - t_i) / (count - 1)``. NaN where the member's explanation is missing or
    the consensus is undefined.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: unknown explanation kind; choose one of {KINDS}")
    x = _as_float64(explanations, "explanations")
    if kind == "pixel":
        if rule is not None:
            _check_rule(rule)
        sigma = _check_sigma(sigma)
        _check_pixel_maps(x)
        if valid is not None:
            raise ValueError("valid: only superpixel explanations take a valid mask")
        terms, present = _pixel_terms(x)
        compared = terms
    else:
        if sigma is not None:
            _check_sigma(sigma)
        rule = _check_rule(rule)
        _check_superpixel_weights(x)
        v = _check_valid(valid, tuple(x.shape[1:]))
        # The papers compare the member's own signed weights with the consensus, under both rules
        # (under the linear rule the same cosine as with t_i = L_i / ||L_i||).
        compared, terms, present = _superpixel_terms(x, v, rule)

    total, count = _sum_present(terms, present)
    if leave_one_out:
        mask = present.reshape(present.shape + (1,) * (terms.dim() - present.dim()))
        own = torch.where(mask, terms, torch.zeros((), dtype=terms.dtype))
        consensus = _mean(total[None] - own, count[None] - present.long())  # [m, N, ...]
    else:
        consensus = _mean(total, count)[None]
    if kind == "pixel":
        sims = rbf_similarity(compared, consensus, sigma)
    else:
        sims = cosine_similarity(compared, consensus, v)
    return torch.where(present, sims, torch.full((), math.nan, dtype=sims.dtype))


def present(explanations, kind: str, valid=None) -> torch.Tensor:
    """bool ``[m, N]``: which explanations take part in the consensus (the others are missing:
    non-finite, constant, or of an image without real superpixels)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: unknown explanation kind; choose one of {KINDS}")
    x = _as_float64(explanations, "explanations")
    if kind == "pixel":
        _check_pixel_maps(x)
        return _pixel_terms(x)[1]
    _check_superpixel_weights(x)
    # The rule changes the terms, not which members are present.
    return _superpixel_terms(x, _check_valid(valid, tuple(x.shape[1:])), "linear")[2]


def consensus_scores(similarities) -> torch.Tensor:
    """A member's consensus score: its mean similarity over images, NaN entries skipped.
    ``[m, N]`` -> ``[m]``; NaN for a member with no finite similarity."""
    s = _as_float64(similarities, "similarities")
    if s.dim() != 2:
        raise ValueError(f"similarities: expected [m, N], got shape {tuple(s.shape)}")
    return s.nanmean(dim=1)


def ranks(scores) -> list[int]:
    """Rank of each member by score, 1 = highest. Ties share the best rank of their group
    (1, 2, 2, 4); NaN scores come last and share one rank."""
    s = _as_float64(scores, "scores")
    if s.dim() != 1:
        raise ValueError(f"scores: expected [m], got shape {tuple(s.shape)}")
    values = s.tolist()
    finite = [v for v in values if not math.isnan(v)]
    return [1 + sum(other > v for other in finite) if not math.isnan(v) else len(finite) + 1 for v in values]


# ----------------------------------------------------------------------------- committees

def _correlations(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Pearson r and Spearman rho (scipy); NaN for fewer than 3 points or a constant vector."""
    if x.numel() < 3 or x.std() == 0 or y.std() == 0:
        return math.nan, math.nan
    x, y = x.numpy(), y.numpy()
    return float(scipy_stats.pearsonr(x, y).statistic), float(scipy_stats.spearmanr(x, y).statistic)


def random_subcommittees(explanations, accuracy, size: int, draws: int, generator: torch.Generator | None = None,
                         **options) -> dict:
    """Correlation of consensus score with accuracy within random sub-committees.

    ``draws`` times, ``size`` members are drawn uniformly without replacement (draws are
    independent, so a sub-committee may repeat); their consensus scores are computed within the
    sub-committee (``member_similarities(explanations[idx], **options)``: ``kind``, ``sigma``,
    ``rule``, ``valid``, ``leave_one_out``) and correlated with their ``accuracy [m]`` (Pearson and
    Spearman). Members with a NaN score are left out of that draw's correlation; a draw whose
    correlation is undefined (constant scores or accuracies) is NaN and skipped in mean and std.

    Returns ``{"size", "draws", "valid_draws", "pearson_mean", "pearson_std", "spearman_mean",
    "spearman_std", "pearson", "spearman"}`` (the last two: the value of every draw); std is the
    sample standard deviation (ddof=1; NaN with fewer than 2 valid draws).
    """
    x = _as_float64(explanations, "explanations")
    m = x.shape[0] if x.dim() > 0 else 0
    _check_members(m, "explanations")
    acc = _as_float64(accuracy, "accuracy")
    if acc.shape != (m,):
        raise ValueError(f"accuracy: shape {tuple(acc.shape)} does not match the {m} members")
    if isinstance(size, bool) or not isinstance(size, int) or not 3 <= size <= m:
        raise ValueError(f"size={size!r}: a sub-committee needs 3 to {m} members "
                         f"(a correlation of 2 points is always +-1)")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws={draws!r}: must be a positive integer")
    if "kind" not in options:
        raise ValueError("kind: give kind='pixel' or kind='superpixel'")
    unknown = set(options) - {"kind", "sigma", "rule", "valid", "leave_one_out"}
    if unknown:
        raise ValueError(f"unknown consensus options {sorted(unknown)}")

    pearson, spearman = [], []
    for _ in range(draws):
        idx = torch.randperm(m, generator=generator)[:size].sort().values
        scores = consensus_scores(member_similarities(x[idx], **options))
        keep = ~torch.isnan(scores) & ~torch.isnan(acc[idx])
        s, a = scores[keep], acc[idx][keep]
        r, rho = _correlations(s, a)
        pearson.append(r)
        spearman.append(rho)

    def summary(values: list[float]) -> tuple[float, float]:
        finite = [v for v in values if not math.isnan(v)]
        mean = statistics.fmean(finite) if finite else math.nan
        std = statistics.stdev(finite) if len(finite) >= 2 else math.nan
        return mean, std

    pearson_mean, pearson_std = summary(pearson)
    spearman_mean, spearman_std = summary(spearman)
    return {"size": size, "draws": draws,
            "valid_draws": sum(not (math.isnan(p) or math.isnan(r)) for p, r in zip(pearson, spearman)),
            "pearson_mean": pearson_mean, "pearson_std": pearson_std,
            "spearman_mean": spearman_mean, "spearman_std": spearman_std,
            "pearson": pearson, "spearman": spearman}


def committee_size_convergence(consensus_quality_fn: Callable[[list[int]], float], m: int, sizes: Sequence[int],
                               trials: int, generator: torch.Generator | None = None) -> list[dict]:
    """How a consensus' quality settles as the committee grows.

    For each size k in ``sizes``, ``trials`` committees of k members are drawn uniformly without
    replacement from ``range(m)``, and ``consensus_quality_fn(sorted member indices)`` gives one
    number for each (e.g. the mAP of that committee's consensus against object masks; see
    ``evaluation.consensus.stats.mean_average_precision``). Returns one
    ``{"size", "mean", "median", "values"}`` per size, in the order given; mean and median skip NaN
    values (NaN when none is finite).
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m={m!r}: the number of members must be a positive integer")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials={trials!r}: must be a positive integer")
    sizes = list(sizes)
    if not sizes:
        raise ValueError("sizes: give at least one committee size")
    for k in sizes:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m:
            raise ValueError(f"sizes: committee size {k!r} is not between 1 and m={m}")
    out = []
    for k in sizes:
        values = []
        for _ in range(trials):
            idx = sorted(torch.randperm(m, generator=generator)[:k].tolist())
            values.append(float(consensus_quality_fn(idx)))
        finite = [v for v in values if not math.isnan(v)]
        out.append({"size": k,
                    "mean": statistics.fmean(finite) if finite else math.nan,
                    "median": statistics.median(finite) if finite else math.nan,
                    "values": values})
    return out
