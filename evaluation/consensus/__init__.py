"""Cross-model consensus of explanations (Li et al.): a committee of models explains the same
images, the consensus of their explanations is built per image, and each model is scored by how
close its explanations are to it. Definitions and defaults: ``docs/consensus.md``.

- ``evaluation.consensus.core``: consensus of pixel maps and of LIME superpixel weights, member
  similarities, consensus scores and ranks, random sub-committees, committee-size convergence
  (pure float64 torch).
- ``evaluation.consensus.stats``: correlations between table columns (scipy), average precision
  of a map against an object mask (torchmetrics).
- ``evaluation.consensus.report``: ``python -m evaluation.consensus.report table=FILE``, the
  correlations and scatter plots of a committee table (imported on first use of its names, so
  importing this package does not load matplotlib or Hydra).
"""
from evaluation.consensus.core import (
    KINDS,
    RULES,
    committee_size_convergence,
    consensus_scores,
    cosine_similarity,
    member_similarities,
    normalize_maps,
    pixel_consensus,
    present,
    random_subcommittees,
    ranks,
    rbf_similarity,
    superpixel_consensus,
)
from evaluation.consensus.stats import (
    all_correlations,
    average_precision,
    correlation,
    group_correlations,
    is_missing,
    mean_average_precision,
)

_REPORT = ("read_table", "write_table_report", "scatter", "correlation_title")

__all__ = ["KINDS", "RULES", "normalize_maps", "pixel_consensus", "rbf_similarity",
           "superpixel_consensus", "cosine_similarity", "member_similarities", "present", "consensus_scores", "ranks",
           "random_subcommittees", "committee_size_convergence", "correlation", "all_correlations",
           "group_correlations", "average_precision", "mean_average_precision", "is_missing", *_REPORT]


def __getattr__(name: str):
    # Lazy: `python -m evaluation.consensus.report` must not find the module already imported.
    if name in _REPORT:
        from evaluation.consensus import report
        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
