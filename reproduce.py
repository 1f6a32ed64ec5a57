"""The paper's findings in one command: ``python reproduce.py [seeds=[0,1,2]] [epochs=6] ...``

Trains each variant of ``variants`` (baseline, GC, GMP, GMP+GC, CGC, Energy) for each seed with ``train.py``,
evaluates every last checkpoint with ``python -m evaluation`` (top-1, PG, SPG, CH, NQH, FGSM, the
reference maps), runs ``python -m evaluation.consensus`` over all of them, and writes
``report.md`` / ``report.json`` with a Table-1-style and a Table-6-style table (mean ± std over
seeds) beside the FGSM retention and attack success rate, the consensus ranking with pooled and
within-group correlations, the paper's directional claims judged by paired 95% t intervals over
seeds (with a sign test beside them), and figures (``heatmaps.png``, ``fgsm.png``, the consensus
``scatter.png``).

Every step runs as its own process, writing under ``output_dir/runs/<variant>/seed<k>/``; a step
whose outputs exist for the same arguments is reused, so running the command again after a crash
redoes only what did not finish. docs/reproduce.md says what is run and how claims are judged.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import hydra
from omegaconf import DictConfig, OmegaConf
from pydantic import AfterValidator, Field, create_model
from scipy import stats as scipy_stats

from datamodules import build_datamodule
from datamodules.shapes import MIN_IMAGE_SIZE
from evaluation.consensus import committee
from evaluation.explainers import EXPLAINERS, build_explainer
from evaluation.figures import save_figure, save_overlay_grid, subplots
from evaluation.metrics import registry
from evaluation.panels import explanation_panels
from evaluation.preflight import resolve_device
from evaluation.report import (
    FAITHFULNESS_FAMILIES,
    REFERENCE_LABELS,
    faithfulness_heading,
    faithfulness_keys,
    faithfulness_settings,
    reference_results,
)
from evaluation.sampling import validation_sample
from evaluation.settings import EvaluationSettings
from evaluation.tables import markdown_table, number, percent
from gcmodels.config import check_config, compose_group
from gcmodels.files import file_digest
from gcmodels.module import GCClassifier
from gcmodels.options import ConfigError, Options, Sequence

ROOT = Path(__file__).resolve().parent
# What each finished step leaves behind: its arguments (compared on reuse) and its wall time.
STEP_FILE = "reproduce_step.json"
LABELS = {"baseline": "baseline", "gc": "GC", "gmp": "GMP", "gmp_gc": "GMP+GC", "cgc": "CGC",
          "energy": "Energy"}


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    directory: Path

    @property
    def checkpoint(self) -> Path:
        return self.directory / "checkpoints" / "last.ckpt"

    @property
    def evaluation_dir(self) -> Path:
        return self.directory / "evaluation"

    @property
    def faithfulness_dir(self) -> Path:
        return self.directory / "faithfulness"


def override_value(value) -> str:
    """A config value written as a Hydra override value (JSON is a subset of its grammar)."""
    return json.dumps(value, separators=(",", ":"))


# Knobs of conf/reproduce.yaml that set the data key of the same name; null leaves the data config's.
DATA_KNOBS = ("data_dir", "image_size", "train_per_class", "batch_size")


def data_overrides(cfg: DictConfig) -> list[str]:
    knobs = [f"data.{key}={cfg[key]}" for key in DATA_KNOBS if cfg[key] is not None]
    return [*knobs, *[str(item) for item in cfg.data_overrides]]


def option_overrides(group: str, options: dict, own: tuple[str, ...] = ()) -> list[str]:
    """``group.key=value`` for every option but ``own`` (which the child sets itself), so that a
    child process uses exactly this run's."""
    return [f"{group}.{key}={override_value(value)}" for key, value in options.items()
            if key != "_target_" and key not in own]


def evaluation_overrides(evaluation: dict) -> list[str]:
    """The ``evaluation`` options for the evaluation and consensus steps: all of them, but a null
    ``batch_size``, which leaves the step its own default, the data's batch."""
    own = ("batch_size",) if evaluation["batch_size"] is None else ()
    return option_overrides("evaluation", evaluation, own=own)


def trains_with_gc(variant_overrides) -> bool:
    """Whether a variant's train.py overrides select the GC loss (conf/loss/gc.yaml)."""
    return "loss=gc" in [str(item) for item in variant_overrides]


def train_arguments(cfg: DictConfig, run: Run) -> list[str]:
    variant = [str(item) for item in cfg.variants[run.variant]]
    # GC options (e.g. loss.composites) do not exist in the CE loss config: only GC variants get them.
    gc = [str(item) for item in cfg.gc_overrides] if trains_with_gc(variant) else []
    # The report evaluates every checkpoint once at the end; per-epoch callbacks would only cost time.
    epochs = [] if cfg.epochs is None else [f"trainer.max_epochs={cfg.epochs}"]
    return [str(ROOT / "train.py"), *variant, *data_overrides(cfg), *epochs, f"seed={run.seed}",
            "~callbacks.explanation_metrics", "~callbacks.fgsm_robustness",
            *[str(item) for item in cfg.train_overrides], *gc, f"hydra.run.dir={run.directory}"]


def evaluation_arguments(cfg: DictConfig, run: Run, evaluation: dict, explainer: dict) -> list[str]:
    return ["-m", "evaluation", f"ckpt_path={run.checkpoint}", *data_overrides(cfg), f"seed={cfg.seed}",
            f"device={cfg.device}", f"explainer={explainer['name']}", *option_overrides("explainer", explainer),
            *evaluation_overrides(evaluation), "heatmap_images=0", f"hydra.run.dir={run.evaluation_dir}"]


def faithfulness_arguments(cfg: DictConfig, run: Run, evaluation: dict, explainer: dict) -> list[str]:
    """The faithfulness step: the evaluation's command with the faithfulness metrics on at most
    ``faithfulness_images`` validation images (they cost forwards), in a folder of its own."""
    arguments = evaluation_arguments(cfg, run, evaluation, explainer)[:-1]
    images = "null" if cfg.faithfulness_images is None else cfg.faithfulness_images
    return [*arguments, "metrics=[" + ",".join(cfg.faithfulness_metrics) + "]", f"max_images={images}",
            f"hydra.run.dir={run.faithfulness_dir}"]


def consensus_arguments(cfg: DictConfig, runs: list[Run], evaluation: dict) -> list[str]:
    out = Path(cfg.output_dir)
    return ["-m", "evaluation.consensus", "ckpts=[" + ",".join(str(r.checkpoint) for r in runs) + "]",
            *data_overrides(cfg), f"explainer={cfg.consensus_explainer}", f"device={cfg.device}", f"seed={cfg.seed}",
            *evaluation_overrides(evaluation), f"store_dir={out / 'consensus_store'}",
            f"hydra.run.dir={out / 'consensus'}"]


def run_step(arguments: list[str], directory: Path, description: str, inputs: dict | None = None) -> float:
    """Run ``python <arguments>`` once for ``directory``, or reuse its finished result; seconds taken.

    ``inputs``: what else the step's result depends on (e.g. digests of the checkpoints it reads).
    A directory with a step file for other arguments or inputs is refused (its results would be
    mixed with this run's); one without a step file is a step that did not finish, and starts
    again."""
    step_file = directory / STEP_FILE
    record = {"arguments": arguments, "inputs": inputs or {}}
    if step_file.is_file():
        done = json.loads(step_file.read_text())
        if {key: done.get(key, {}) for key in record} == record:
            print(f"reusing {description} ({directory})", flush=True)
            return float(done["seconds"])
        raise ValueError(f"{directory} holds a finished run with other settings or inputs ({step_file}): choose "
                         f"another output_dir, or delete that folder to redo it")
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    print(f"running {description}: python {' '.join(arguments)}", flush=True)
    start = time.perf_counter()
    with (directory / "reproduce_step.log").open("w") as log:
        # In this process's working directory, as if the user had typed the command there (the
        # data configs' default data_dir is relative to it); the project importable from anywhere.
        environment = {**os.environ,
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run([sys.executable, *arguments], stdout=log, stderr=subprocess.STDOUT, env=environment)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{description} failed (exit code {result.returncode}); its output is in "
                           f"{directory / 'reproduce_step.log'}")
    step_file.write_text(json.dumps({**record, "seconds": seconds}, indent=2))
    return seconds


# ------------------------------------------------------------------------------------ statistics

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN when a value is missing."""
    if any(value is None or math.isnan(value) for value in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# Differences within this of the margin count as on it (a drop of exactly 3 of 100 points is 3 points),
# and as zeros in the sign test.
ROUNDING = 1e-9
# The confidence of every claim's interval.
CONFIDENCE = 0.95


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The t interval of the mean of ``values`` (mean ± t_{(1+confidence)/2, n-1} sd / sqrt(n)); None
    for fewer than 2 values or a missing one, where no interval exists."""
    if len(values) < 2 or any(value is None or math.isnan(value) for value in values):
        return None
    mean, std = mean_std(values)
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half, mean + half


def sign_test_p(excesses: list[float]) -> float | None:
    """Exact two-sided sign test of how many ``excesses`` are above 0 against how many below,
    zeros (within ROUNDING) dropped; None when none is left or one is missing."""
    if any(value is None or math.isnan(value) for value in excesses):
        return None
    above = sum(value > ROUNDING for value in excesses)
    below = sum(value < -ROUNDING for value in excesses)
    return float(scipy_stats.binomtest(above, above + below, 0.5).pvalue) if above + below else None


def paired_claim(claim: str, differences: list[float], direction: int, margin: float | None = None) -> dict:
    """A claim that the paired ``differences`` (one per seed) point the way of ``direction`` (+1: the
    first variant higher): ``difference * direction > 0``, or ``>= -margin`` when a margin is given (a
    drop of exactly the margin is allowed; ``margin=0``: no drop at all).

    It holds when the 95% t interval of the mean difference lies wholly on the claimed side, does
    not hold when it lies wholly on the other side, and is inconclusive when it spans the boundary,
    or when there is no interval (one seed, a missing difference). The sign test counts the seeds on
    either side of the same boundary."""
    bound = 0.0 if margin is None else -margin
    mean, std = mean_std(differences)
    interval = t_interval(differences)
    excesses = [None if d is None or math.isnan(d) else d * direction - bound for d in differences]

    def claimed(excess: float) -> bool:
        # Within ROUNDING of the boundary: on it, as the sign test counts it.
        return excess >= -ROUNDING if margin is not None else excess > ROUNDING

    if interval is None:
        verdict = "inconclusive"
    else:
        low, high = sorted(value * direction - bound for value in interval)
        verdict = "holds" if claimed(low) else "does not hold" if not claimed(high) else "inconclusive"
    return {"claim": claim, "differences": differences, "direction": direction, "margin": margin,
            "mean": mean, "std": std, "interval": interval, "confidence": CONFIDENCE,
            "sign_test_p": sign_test_p(excesses), "seeds_agreeing": sum(e is not None and claimed(e) for e in excesses),
            "seeds": len(differences), "verdict": verdict}


def seeds_needed(effect: float, sd: float, margin: float = 0.0, confidence: float = CONFIDENCE,
                 power: float | None = None, most: int = 1000) -> int | None:
    """Seeds a paired claim needs to hold when its true mean difference is ``effect`` (on the claimed
    side, > 0) and the seed-to-seed sd of the difference is ``sd``: the smallest n (>= 2) whose
    interval half-width t_{(1+confidence)/2, n-1} sd / sqrt(n) is below ``effect + margin``, i.e. at
    which an observed mean and sd of that size decide (about half of such runs would hold, half not).
    ``power``: instead the n at which the claim holds in that share of runs (noncentral t). None when
    more than ``most`` seeds would be needed."""
    if not effect + margin > 0 or sd < 0:
        raise ValueError(f"seeds_needed: effect + margin must be > 0 and sd >= 0, got effect={effect!r}, "
                         f"margin={margin!r}, sd={sd!r}")
    if power is not None and not 0 < power < 1:
        raise ValueError(f"seeds_needed: power must be in (0, 1), got {power!r}")
    if sd == 0:  # no spread: two seeds give a zero-width interval at the effect
        return 2
    for n in range(2, most + 1):
        quantile = scipy_stats.t.ppf((1 + confidence) / 2, n - 1)
        if power is None:
            if quantile * sd / math.sqrt(n) < effect + margin:
                return n
        elif scipy_stats.nct.sf(quantile, n - 1, (effect + margin) / sd * math.sqrt(n)) >= power:
            return n
    return None


def attacked_keys(results: dict) -> list[str]:
    """The FGSM keys with eps > 0 (eps 0 is the clean accuracy)."""
    return [key for key in results["fgsm"] if float(key.split("=")[1]) > 0]


def retention(results: dict) -> dict[str, float]:
    """Share of the clean top-1 kept under FGSM at each eps > 0 (top-1 under attack / clean top-1):
    robustness apart from accuracy, which an absolute top-1 at small eps mostly measures. NaN for a
    clean top-1 of 0, where no share exists."""
    clean = results["acc"]
    return {key: results["fgsm"][key] / clean if clean > 0 else math.nan for key in attacked_keys(results)}


def mean_retention(results: dict) -> float:
    """The FGSM claims' measure: retention averaged over the eps > 0 (NaN when it is undefined)."""
    return statistics.fmean(retention(results).values())


RETENTION = "retention: top-1 under attack / clean top-1, mean over eps > 0"


def claims(results: dict[str, list[dict]], little_top1: float) -> list[dict]:
    """The paper's directional claims, as paired differences over seeds (``results[variant][k]``:
    the evaluation results of seed k); each names its measure."""
    def diff(a: str, b: str, metric) -> list[float]:
        get = metric if callable(metric) else (lambda r: r[metric])
        return [get(x) - get(y) for x, y in zip(results[a], results[b])]

    found = [
        paired_claim("GC lowers NQH against the baseline", diff("gc", "baseline", "nqh"), -1),
        paired_claim("GMP raises SPG against the baseline", diff("gmp", "baseline", "spg"), +1),
        paired_claim("GMP raises CH against the baseline", diff("gmp", "baseline", "ch"), +1),
        paired_claim("GMP+GC has the best SPG (against the best of baseline, GC and GMP of the same seed)",
                     [row["spg"] - max(results[v][k]["spg"] for v in ("baseline", "gc", "gmp"))
                      for k, row in enumerate(results["gmp_gc"])], +1),
        paired_claim(f"GC costs little top-1 (drop at most {100 * little_top1:g} points)",
                     diff("gc", "baseline", "acc"), +1, margin=little_top1),
    ]
    # The objectives beside GC (issue 20), when the run trains them: CGC's paper reports higher
    # content-heatmap and lower negative-quadrant scores (its Tables 1-2), guidance with masks a higher
    # (energy) pointing game; both claim a small accuracy cost.
    if "cgc" in results:
        found += [
            paired_claim("CGC raises CH against the baseline", diff("cgc", "baseline", "ch"), +1),
            paired_claim("CGC lowers NQH against the baseline", diff("cgc", "baseline", "nqh"), -1),
            paired_claim(f"CGC costs little top-1 (drop at most {100 * little_top1:g} points)",
                         diff("cgc", "baseline", "acc"), +1, margin=little_top1),
        ]
    if "energy" in results:
        found += [
            paired_claim("Energy guidance raises PG against the baseline", diff("energy", "baseline", "pg"), +1),
            paired_claim("Energy guidance raises CH against the baseline", diff("energy", "baseline", "ch"), +1),
        ]
    # Faithfulness (issue 21): a concentrated map can localise well and still not be what the
    # decision rests on; GC should not make its maps less faithful than the baseline's.
    if "insertion" in results["baseline"][0]:
        found.append(paired_claim("GC's maps are at least as faithful as the baseline's: insertion AUC not lower",
                                  diff("gc", "baseline", "insertion"), +1, margin=0.0))
    if "deletion" in results["baseline"][0]:
        found.append(paired_claim("GC's maps are at least as faithful as the baseline's: deletion AUC not higher",
                                  diff("gc", "baseline", "deletion"), -1, margin=0.0))
    if attacked_keys(results["baseline"][0]):
        found += [
            paired_claim(f"GMP keeps a larger share of its clean top-1 under FGSM than the baseline ({RETENTION})",
                         diff("gmp", "baseline", mean_retention), +1),
            paired_claim(f"GMP+GC keeps a larger share of its clean top-1 under FGSM than the baseline ({RETENTION}; "
                         "the paper's Table 6 headline)", diff("gmp_gc", "baseline", mean_retention), +1),
            paired_claim(f"GMP+GC keeps a larger share of its clean top-1 under FGSM than GC ({RETENTION}; not in "
                         "the paper: its Table 6 has no GC row)", diff("gmp_gc", "gc", mean_retention), +1),
        ]
    return found


def robustness(results: dict[str, list[dict]]) -> dict:
    """Per variant and seed: retention at each eps > 0 and its mean, and the attack success rate
    (among images classified correctly before the attack, the share misclassified under it; None
    where an evaluation report predates it)."""
    return {variant: {"retention": [retention(row) for row in rows],
                      "mean_retention": [mean_retention(row) for row in rows],
                      "success": [row.get("fgsm_success") for row in rows]} for variant, rows in results.items()}


# ------------------------------------------------------------------------------------ report

def _pm(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{percent(mean, 1)} ± {percent(std, 1)}"


def table1_columns(first: dict) -> list[tuple[str, str]]:
    """The registered metrics' Table 1 columns that the evaluations hold (``first``: one's results),
    a heading saying where lower is better."""
    return [(key, heading if registry.score_of(key).higher_is_better else f"{heading} (lower is better)")
            for key, heading in registry.table1_columns() if key in first]


def table1(results: dict[str, list[dict]]) -> list[str]:
    first = next(iter(results.values()))[0]  # every checkpoint is scored on the same trials
    columns = table1_columns(first)
    table = [[LABELS.get(variant, variant), *(_pm([row[key] for row in rows]) for key, _ in columns)]
             for variant, rows in results.items()]
    for reference, label in (("center", "reference: centred peak"), ("noise", "reference: uniform noise")):
        table.append([label, *(percent(first.get(f"{key}_{reference}"), 1) for key, _ in columns)])
    return markdown_table(["variant", *(heading for _, heading in columns)], table)


def faithfulness_table(results: dict[str, list[dict]]) -> list[str]:
    """The faithfulness scores of every variant (mean ± std over seeds; MPRT's rank correlation
    as a number, the rest in %), and the reference maps' (of the first checkpoint: they do not
    depend on the model)."""
    first = next(iter(results.values()))[0]
    keys = faithfulness_keys([{"results": first}])
    unitless = {"mprt", "mprt_unchanged"}

    def cell(values: list[float], key: str) -> str:
        if key not in unitless:
            return _pm(values)
        mean, std = mean_std(values)
        return f"{number(mean, '.2f')} ± {number(std, '.2f')}"

    table = [[LABELS.get(variant, variant), *(cell([row.get(key) for row in rows], key) for key in keys)]
             for variant, rows in results.items()]
    for reference, label in REFERENCE_LABELS.items():
        scored = reference_results(first, reference)
        if any(key in scored for key in keys):
            table.append([f"reference: {label}", *(percent(scored.get(key), 1) if key not in unitless else "-"
                                                   for key in keys)])
    return markdown_table(["variant", *(faithfulness_heading(key) for key in keys)], table)


def table6(results: dict[str, list[dict]]) -> list[str]:
    eps_keys = list(next(iter(results.values()))[0]["fgsm"])
    return markdown_table(["variant", "clean", *eps_keys], (
        [LABELS.get(variant, variant), _pm([row["acc"] for row in rows]),
         *(_pm([row["fgsm"][key] for row in rows]) for key in eps_keys)] for variant, rows in results.items()))


def _eps_mean(values: dict, keys: list[str]) -> float:
    """The mean over ``keys`` of ``values`` (NaN where one is missing or undefined)."""
    return statistics.fmean(math.nan if values.get(key) is None else values[key] for key in keys)


def eps_table(per_variant: dict[str, list[dict | None]], keys: list[str]) -> list[str]:
    """A per-eps measure (mean ± std over seeds) and its mean over ``keys``; ``missing`` for a
    variant with a seed that lacks it."""
    table = []
    for variant, seeds in per_variant.items():
        if any(values is None for values in seeds):
            cells = ["missing"] * (len(keys) + 1)
        else:
            cells = [_pm([values.get(key, math.nan) for values in seeds]) for key in keys]
            cells.append(_pm([_eps_mean(values, keys) for values in seeds]))
        table.append([LABELS.get(variant, variant), *cells])
    return markdown_table(["variant", *keys, "mean over eps > 0"], table)


def robustness_lines(results: dict[str, list[dict]], robust: dict, seeds: list[int]) -> list[str]:
    keys = attacked_keys(next(iter(results.values()))[0])
    lines = ["Retention (top-1 under attack / clean top-1 of the same seed; the FGSM claims' measure):", ""]
    lines += eps_table({variant: robust[variant]["retention"] for variant in results}, keys)
    undefined = [f"{LABELS.get(variant, variant)} seed {seed}" for variant, rows in results.items()
                 for seed, row in zip(seeds, rows) if not row["acc"] > 0]
    if undefined:
        lines += ["", f"Retention is undefined (clean top-1 0, shown as -) for {', '.join(undefined)}: a claim "
                      "on it is inconclusive."]
    lines += ["", "Attack success rate (among the images classified correctly before the attack, the share "
                  "misclassified under it):", ""]
    lines += eps_table({variant: robust[variant]["success"] for variant in results}, keys)
    if any(values is None for variant in results for values in robust[variant]["success"]):
        lines += ["", "missing: the evaluation report has no `fgsm_success` (it was made before `python -m "
                      "evaluation` reported it); delete that run's `evaluation/` folder to redo it."]
    return lines


def _interval(claim: dict) -> str:
    if claim["interval"] is None:
        return "-"
    low, high = claim["interval"]
    return f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def claim_lines(found: list[dict]) -> list[str]:
    header = ["claim", "verdict", "mean difference (points)", "95% interval (points)", "sign test p",
              "seeds on the claimed side", "per seed"]
    return markdown_table(header, (
        [claim["claim"], f"**{claim['verdict']}**", number(100 * claim["mean"], "+.1f"), _interval(claim),
         number(claim["sign_test_p"], ".2g"), f"{claim['seeds_agreeing']}/{claim['seeds']}",
         ", ".join(number(100 * difference, "+.1f") for difference in claim["differences"])] for claim in found))


def claims_reading(seeds: int) -> str:
    """How to read the claims table, with the sign test's floor for this number of seeds."""
    floor = min(1.0, 2 * 0.5 ** seeds)
    return ("Difference = first variant minus second, per seed, in points (the FGSM claims: points of "
            "retention). 95% interval: the paired t interval of the mean difference, mean ± t(0.975, "
            "seeds - 1) · sd / √seeds. *holds*: the interval lies wholly on the claimed side of 0 (of the "
            "margin, for a claim with one); *does not hold*: wholly on the other side; *inconclusive*: it "
            "spans it, or there is no interval (one seed, an undefined difference). Sign test: the exact "
            "two-sided binomial p of how many seeds lie on the claimed side against the other, seeds exactly "
            f"on the boundary dropped. With {seeds} seeds its smallest possible p is {floor:.2g}"
            + (", so it can never reject at 5%: the t interval is what decides." if floor > 0.05 else ".")
            + " docs/reproduce.md says how many seeds a claim of a given size needs.")


def committee_title(explainer: str) -> str:
    return f"{explainer}; a {committee.GRADCAM_NOTE}" if committee.is_gradcam(explainer) else explainer


def correlation_table(correlations: list[dict], group: bool = False) -> list[str]:
    header = [*(["group"] if group else []), "x", "y", "n", "Pearson (p)", "Spearman (p)", "note"]
    return markdown_table(header, (
        [*([c["group"]] if group else []), c["x"], c["y"], c["n"],
         f"{number(c['pearson'], '.2f')} ({number(c['pearson_p'], '.2g')})",
         f"{number(c['spearman'], '.2f')} ({number(c['spearman_p'], '.2g')})", c.get("note") or ""]
        for c in correlations))


def consensus_lines(consensus: dict, runs: list[Run]) -> list[str]:
    names = {str(run.checkpoint): f"{LABELS.get(run.variant, run.variant)} seed {run.seed}" for run in runs}
    rows = sorted(consensus["members"], key=lambda row: row["rank"])
    lines = markdown_table(["rank", "member", "consensus score", "top-1"], (
        [row["rank"], names.get(row["checkpoint"], row["checkpoint"]), number(row["consensus_score"]),
         percent(row["accuracy"], 1)] for row in rows))
    if "consensus_map" in consensus:
        best = max(row["map"] for row in rows)
        reference = consensus["reference_map"]
        lines += ["", f"mAP of the explanations against the object masks: consensus "
                      f"{percent(consensus['consensus_map'], 1)}, best member {percent(best, 1)}; centred peak "
                      f"{percent(reference['center'], 1)}, uniform noise {percent(reference['noise'], 1)}."]
    lines += ["", "Correlations over every checkpoint, pooled:", ""]
    lines += correlation_table(consensus["correlations"])
    # Pooled over both poolings, a correlation can come from the gap between the groups alone (GMP's
    # lower top-1 here); within a group it cannot.
    lines += ["", "Within groups (the same correlations over the checkpoints of one group only; a pooled "
                  "correlation that the groups do not show comes from the difference between the groups):", ""]
    if consensus["group_correlations"] is None:
        lines.append("not in consensus.json (made by a consensus step that predates them); delete "
                     "`output_dir/consensus/` to redo it.")
    elif not consensus["group_correlations"]:
        lines.append("none: no pooling, loss or network shared by 3 members or more")
    else:
        lines += correlation_table(consensus["group_correlations"], group=True)
    return lines


def save_fgsm_plot(results: dict[str, list[dict]], robust: dict | None, space: str, path: Path) -> Path:
    """Top-1 against eps, and beside it the retention (``robust``: None without an eps > 0)."""
    eps_keys = list(next(iter(results.values()))[0]["fgsm"])
    panels = [("top-1 (%)", eps_keys, {variant: [row["fgsm"] for row in rows] for variant, rows in results.items()})]
    if robust is not None:
        panels.append(("retention (%): top-1 / clean top-1", attacked_keys(next(iter(results.values()))[0]),
                       {variant: robust[variant]["retention"] for variant in results}))
    fig, axes = subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (label, keys, per_variant) in zip(axes[0], panels):
        for variant, seeds in per_variant.items():
            stats = [mean_std([values[key] for values in seeds]) for key in keys]
            ax.errorbar([float(key.split("=")[1]) for key in keys], [100 * m for m, _ in stats],
                        yerr=[100 * s for _, s in stats], marker="o", capsize=3, label=LABELS.get(variant, variant))
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(f"FGSM eps (1/255, {space} space)")
        ax.set_ylabel(label)
        ax.set_title("mean ± std over seeds", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return path


def save_variant_heatmaps(cfg: DictConfig, runs: list[Run], explainer: dict, path: Path) -> Path:
    """One row per variant (its first seed), the same validation images in every row."""
    data = OmegaConf.to_container(training_config(runs[0]).data, resolve=True)
    datamodule = build_datamodule(data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    batch = validation_sample(datamodule, cfg.heatmap_images)
    device = resolve_device(cfg.device)
    grid, seen = [], set()
    for run in runs:
        if run.variant in seen:
            continue
        seen.add(run.variant)
        net = GCClassifier.from_checkpoint(run.checkpoint).net.to(device).eval()
        panels = explanation_panels(net, build_explainer(**explainer), batch, datamodule.class_names)
        grid.append((f"{LABELS.get(run.variant, run.variant)}\nseed {run.seed}", panels))
    return save_overlay_grid(grid, path, f"{explainer['name']} of the labelled class, one row per variant")


def training_config(run: Run) -> DictConfig:
    """The config a training run used, as Hydra saved it (its ``${hydra:runtime.cwd}`` resolves to
    this process's working directory, which was the run's)."""
    return OmegaConf.load(run.directory / ".hydra" / "config.yaml")


def run_description(runs: list[Run]) -> dict:
    """What the report header says about the runs, read from their saved configs."""
    by_variant = {run.variant: training_config(run) for run in reversed(runs)}  # each variant's first seed
    base = by_variant["baseline"]
    return {"model": base.model.name, "output_stride": base.model.output_stride, "image_size": base.data.image_size,
            "train_per_class": base.data.train_per_class, "batch_size": base.data.batch_size,
            "epochs": base.trainer.max_epochs,
            # Each objective's weight once (GC's and GMP+GC's are the same loss).
            "lambdas": {LABELS.get(config.loss.name, config.loss.name): config.loss["lambda"]
                        for config in reversed(by_variant.values()) if "lambda" in config.loss}}


# ------------------------------------------------------------------------------------ main

# The variants the claims compare.
CLAIMED_VARIANTS = ("baseline", "gc", "gmp", "gmp_gc")


def distinct(seeds: tuple[int, ...]) -> tuple[int, ...]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the seeds must be distinct (each is a run of every variant), got {list(seeds)}")
    return seeds


def claimed_variants(variants: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    missing = [name for name in CLAIMED_VARIANTS if name not in variants]
    if missing:
        raise ValueError(f"must include {', '.join(CLAIMED_VARIANTS)} (the claims compare them); missing: {missing}")
    return variants


def explainer_name(name: str) -> str:
    """A registered explainer, whose options the consensus step will take from its config group
    (``explainer=<name>``)."""
    if name not in EXPLAINERS:
        raise ValueError(f"allowed: {EXPLAINERS.names()}")
    EXPLAINERS.validate(compose_group("explainer", name), prefix=f"conf/explainer/{name}.yaml")
    return name


Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]


def faithfulness_metric_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """Registered metrics of the faithfulness and randomisation families."""
    allowed = [name for name, spec in registry.METRICS.items() if spec.family in FAITHFULNESS_FAMILIES]
    wrong = [name for name in names if name not in allowed]
    if wrong:
        raise ValueError(f"{wrong} are not faithfulness metrics; allowed: {allowed}")
    return names


class StepEvaluation(EvaluationSettings):
    """The ``evaluation`` group of the reproduction: that of the evaluation and consensus steps,
    but ``batch_size`` may be None, which leaves each step the data's batch (``data.batch_size``)."""

    batch_size: Positive | None


class ReproduceOptions(Options):
    """The reproduction's own options (conf/reproduce.yaml), checked before the first step: a typo
    must not surface after hours of training. None in a scale knob keeps the data's or trainer's
    value."""

    seeds: Annotated[Sequence[Count], Field(min_length=1), AfterValidator(distinct)]
    data_dir: str | None
    image_size: Annotated[int, Field(ge=MIN_IMAGE_SIZE)] | None
    train_per_class: Positive | None
    epochs: Positive | None
    batch_size: Positive | None
    data_overrides: Sequence[str]
    train_overrides: Sequence[str]
    gc_overrides: Sequence[str]
    variants: Annotated[dict[str, Sequence[str]], AfterValidator(claimed_variants)]
    consensus: bool
    consensus_explainer: Annotated[str, AfterValidator(explainer_name)]
    # A fraction of top-1 (0.03: 3 points).
    little_top1: Annotated[float, Field(ge=0, lt=1)]
    faithfulness_metrics: Annotated[Sequence[str], AfterValidator(faithfulness_metric_names)]
    faithfulness_images: Positive | None
    heatmap_images: Count
    output_dir: str
    device: str
    seed: Count


def reproduce_schema() -> type[Options]:
    """The schema of ``conf/reproduce.yaml``, of the explainers registered now."""
    return create_model("ReproduceConfig", __base__=ReproduceOptions, evaluation=(StepEvaluation, ...),
                        explainer=(EXPLAINERS.union(), ...))


def check_steps(options: ReproduceOptions) -> None:
    """The rules across the steps' options, as the later steps will apply them (the device as the
    evaluation steps resolve it)."""
    problems = []
    if options.consensus and options.evaluation.protocol != "standard":
        problems.append(("evaluation.protocol", f"{options.evaluation.protocol!r}: the committee consensus "
                         "(consensus=true) works on the standard geometry only; give evaluation.protocol=standard "
                         "or consensus=false"))
    if options.gc_overrides and not any(trains_with_gc(overrides) for overrides in options.variants.values()):
        problems.append(("gc_overrides", f"{list(options.gc_overrides)} given, but no variant trains with loss=gc"))
    if problems:
        raise ConfigError(problems)
    resolve_device(options.device)


def plan(cfg: DictConfig) -> list[Run]:
    """The runs, seed by seed (a partial run already compares every variant), once every option of
    every step is checked."""
    options = check_config(cfg, reproduce_schema())
    check_steps(options)
    out = Path(options.output_dir)
    return [Run(variant, seed, out / "runs" / variant / f"seed{seed}") for seed in options.seeds
            for variant in options.variants]


def run(cfg: DictConfig) -> dict:
    runs = plan(cfg)
    out = Path(cfg.output_dir)
    evaluation = OmegaConf.to_container(cfg.evaluation, resolve=True)
    explainer = OmegaConf.to_container(cfg.explainer, resolve=True)
    start = time.perf_counter()
    seconds = {"train": 0.0, "evaluate": 0.0}
    for index, item in enumerate(runs, 1):
        description = f"[{index}/{len(runs)}] {item.variant} seed {item.seed}"
        seconds["train"] += run_step(train_arguments(cfg, item), item.directory, f"training {description}")
        seconds["evaluate"] += run_step(evaluation_arguments(cfg, item, evaluation, explainer), item.evaluation_dir,
                                        f"evaluation {description}")
        if cfg.faithfulness_metrics:
            seconds["faithfulness"] = seconds.get("faithfulness", 0.0) + run_step(
                faithfulness_arguments(cfg, item, evaluation, explainer), item.faithfulness_dir,
                f"faithfulness {description}")
    results: dict[str, list[dict]] = {}
    for item in runs:
        report = json.loads((item.evaluation_dir / "report.json").read_text())
        row = report["checkpoints"][0]["results"]
        if cfg.faithfulness_metrics:
            faithful = json.loads((item.faithfulness_dir / "report.json").read_text())["checkpoints"][0]["results"]
            row = {**row, **faithful, "skipped": {**row.get("skipped", {}), **faithful.get("skipped", {})}}
        results.setdefault(item.variant, []).append(row)

    consensus = None
    if cfg.consensus:
        consensus_dir = out / "consensus"
        # The same paths may hold other weights after a run was redone: the consensus follows the files.
        inputs = {str(r.checkpoint): file_digest(r.checkpoint) for r in runs}
        seconds["consensus"] = run_step(consensus_arguments(cfg, runs, evaluation), consensus_dir,
                                        "committee consensus", inputs)
        saved = json.loads((consensus_dir / "consensus.json").read_text())
        # None: a consensus.json from before the within-group correlations, which the report says.
        consensus = {"members": saved["members"], "correlations": saved["correlations"],
                     "group_correlations": saved.get("group_correlations"),
                     **{key: saved["summary"][key] for key in ("consensus_map", "reference_map")
                        if key in saved["summary"]}}

    found = claims(results, cfg.little_top1)
    robust = robustness(results) if attacked_keys(results["baseline"][0]) else None
    figures = {"fgsm": save_fgsm_plot(results, robust, evaluation["fgsm_space"], out / "fgsm.png")}
    if cfg.heatmap_images > 0:
        figures["heatmaps"] = save_variant_heatmaps(cfg, runs, explainer, out / "heatmaps.png")
    if consensus is not None:
        figures["consensus_scatter"] = out / "consensus" / "scatter.png"
    seconds["total_this_call"] = time.perf_counter() - start
    settings = {key: OmegaConf.to_container(cfg, resolve=True)[key] for key in
                ("seeds", "image_size", "train_per_class", "epochs", "batch_size", "data_overrides", "train_overrides",
                 "gc_overrides", "variants", "consensus_explainer", "little_top1", "faithfulness_metrics",
                 "faithfulness_images")}
    summary = {"settings": {**settings, "evaluation": evaluation, "explainer": explainer}, "results": results,
               "claims": found, "fgsm_robustness": robust, "consensus": consensus, "seconds": seconds,
               "figures": {key: str(path) for key, path in figures.items()}}
    (out / "report.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    (out / "report.md").write_text(markdown(cfg, results, found, robust, consensus, runs, evaluation, explainer,
                                            seconds))
    print((out / "report.md").read_text())
    return summary


def json_safe(value):
    """``value`` with every NaN or infinity (an undefined retention, interval or p) as null: JSON has
    no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def markdown(cfg, results, found, robust, consensus, runs, evaluation, explainer, seconds) -> str:
    seeds, run = len(cfg.seeds), run_description(runs)
    lines = ["# The paper's findings on the synthetic data", "",
             f"{run['model']} (output stride {run['output_stride']}), {len(results)} variants x {seeds} seeds; "
             f"{run['epochs']} epochs, {run['train_per_class']} training images per class at {run['image_size']} px, "
             f"batch {run['batch_size']}, lambda {', '.join(f'{k} {v:g}' for k, v in run['lambdas'].items())}; "
             "extra overrides: "
             f"{list(cfg.train_overrides) or 'none'}; GC variants only: {list(cfg.gc_overrides) or 'none'}. "
             "Each last checkpoint is evaluated with "
             f"{explainer['name']} on the whole validation set. Values in %, mean ± std over seeds.", "",
             "## Table 1: accuracy and explanation quality", ""]
    lines += table1(results)
    lines += ["", "Reference rows: what a centred Gaussian peak and uniform noise score on the same trials.", "",
              f"## Table 6: top-1 under FGSM (eps in 1/255, {evaluation['fgsm_space']} space)", ""]
    lines += table6(results)
    if cfg.faithfulness_metrics:
        images = "all" if cfg.faithfulness_images is None else f"{cfg.faithfulness_images}"
        lines += ["", f"## Faithfulness ({images} validation images per checkpoint)", "",
                  faithfulness_settings(evaluation, faithfulness_keys([{"results": results['baseline'][0]}])), ""]
        lines += faithfulness_table(results)
        lines += ["", "'- others': the score minus that of other images' maps on the same images. Deletion: lower is "
                      "better; MPRT: the maps' mean rank correlation with the original after each step of "
                      "randomising the network, lower is better."]
    if robust is not None:
        lines += ["", "At small eps the absolute top-1 mostly measures the clean top-1; the share of it kept under "
                      "attack measures robustness apart from accuracy:", ""]
        lines += robustness_lines(results, robust, list(cfg.seeds))
    lines += ["", "## The papers' claims, paired over seeds", "", claims_reading(seeds), ""]
    lines += claim_lines(found)
    if consensus is not None:
        lines += ["", f"## Committee consensus ({committee_title(cfg.consensus_explainer)}; all checkpoints)", ""]
        lines += consensus_lines(consensus, runs)
    lines += ["", "## Figures", ""]
    if cfg.heatmap_images > 0:
        lines.append("- `heatmaps.png`: explanations of each variant on the same images")
    lines.append("- `fgsm.png`: top-1" + (" and retention" if robust is not None else "") + " against FGSM eps")
    if consensus is not None:
        lines.append("- `consensus/scatter.png`: consensus score against top-1")
    lines += ["", f"Time: training {seconds['train'] / 60:.1f} min, evaluation {seconds['evaluate'] / 60:.1f} min"
              + (f", faithfulness {seconds['faithfulness'] / 60:.1f} min" if "faithfulness" in seconds else "")
              + (f", consensus {seconds['consensus'] / 60:.1f} min" if "consensus" in seconds else "")
              + " (reused steps count the time they took when they ran).", ""]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="reproduce")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
