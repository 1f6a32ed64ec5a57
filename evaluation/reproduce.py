"""The paper's findings in one command: ``python -m evaluation.reproduce [seeds=[0,1,2]] [epochs=6] ...``

Trains each variant of ``variants`` (baseline, GC, GMP, GMP+GC) for each seed with ``train.py``,
evaluates every last checkpoint with ``python -m evaluation`` (top-1, PG, SPG, CH, NQH, FGSM, the
reference maps), runs ``python -m evaluation.consensus`` over all of them, and writes
``report.md`` / ``report.json`` with a Table-1-style and a Table-6-style table (mean ± std over
seeds), the consensus ranking, the paper's directional claims checked by paired comparisons over
seeds, and figures (``heatmaps.png``, ``fgsm.png``, the consensus ``scatter.png``).

Every step runs as its own process, writing under ``output_dir/runs/<variant>/seed<k>/``; a step
whose outputs exist for the same arguments is reused, so running the command again after a crash
redoes only what did not finish. docs/reproduce.md says what is run and how claims are judged.
"""
from __future__ import annotations

import hashlib
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

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from datamodules import build_datamodule  # noqa: E402
from datamodules.base import check_bool, check_integer, is_number  # noqa: E402
from evaluation.engine import resolve_device, validation_sample  # noqa: E402
from evaluation.explainers import build_explainer, explainer_options  # noqa: E402
from evaluation.figures import save_overlay_grid  # noqa: E402
from evaluation.panels import explanation_panels  # noqa: E402
from gcmodels.module import GCClassifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# What each finished step leaves behind: its arguments (compared on reuse) and its wall time.
STEP_FILE = "reproduce_step.json"
LABELS = {"baseline": "baseline", "gc": "GC", "gmp": "GMP", "gmp_gc": "GMP+GC"}
TABLE1 = (("acc", "Top-1"), ("pg", "PG"), ("spg", "SPG"), ("ch", "CH"), ("nqh", "NQH (lower is better)"))


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
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run([sys.executable, *arguments], stdout=log, stderr=subprocess.STDOUT, env=environment)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{description} failed (exit code {result.returncode}); its output is in "
                           f"{directory / 'reproduce_step.log'}")
    step_file.write_text(json.dumps({**record, "seconds": seconds}, indent=2))
    return seconds


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ statistics

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN when a value is missing."""
    if any(value is None or math.isnan(value) for value in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# Differences within this of the margin count as on it: a drop of exactly 3 of 100 points is 3 points.
ROUNDING = 1e-9


def paired_claim(claim: str, differences: list[float], direction: int, margin: float = 0.0) -> dict:
    """A claim that ``difference * direction > -margin`` per seed (``>= -margin`` when a margin is
    given: a drop of exactly the margin is allowed). It holds when the mean and every seed agree; is
    mixed when the mean agrees but some seed does not; else it does not hold."""
    mean, std = mean_std(differences)

    def agrees(value: float) -> bool:
        return value * direction >= -margin - ROUNDING if margin else value * direction > 0

    seeds = [agrees(d) for d in differences]
    verdict = "holds" if agrees(mean) and all(seeds) else "mixed" if agrees(mean) else "does not hold"
    return {"claim": claim, "differences": differences, "mean": mean, "std": std,
            "seeds_agreeing": sum(seeds), "seeds": len(differences), "verdict": verdict}


def attacked(results: dict) -> list[float]:
    """Top-1 under FGSM at each eps > 0 (eps 0 is the clean accuracy)."""
    return [value for key, value in results["fgsm"].items() if float(key.split("=")[1]) > 0]


def fgsm_mean(results: dict) -> float:
    """Top-1 under FGSM averaged over the eps > 0."""
    return statistics.fmean(attacked(results))


def claims(results: dict[str, list[dict]], little_top1: float) -> list[dict]:
    """The paper's directional claims, as paired differences over seeds (``results[variant][k]``:
    the evaluation results of seed k)."""
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
    if attacked(results["baseline"][0]):
        found += [
            paired_claim("GMP keeps more top-1 under FGSM (mean over eps > 0)", diff("gmp", "baseline", fgsm_mean), +1),
            paired_claim("GMP+GC keeps more top-1 under FGSM than GC (mean over eps > 0)",
                         diff("gmp_gc", "gc", fgsm_mean), +1),
        ]
    return found


# ------------------------------------------------------------------------------------ report

def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _number(value, spec: str = ".2f") -> str:
    """A correlation or p-value; '-' where it is undefined (None: a constant column, too few rows)."""
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _pm(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{_pct(mean)} ± {_pct(std)}"


def table1(results: dict[str, list[dict]]) -> list[str]:
    lines = ["| variant | " + " | ".join(heading for _, heading in TABLE1) + " |", "|---" * (len(TABLE1) + 1) + "|"]
    for variant, rows in results.items():
        lines.append(f"| {LABELS.get(variant, variant)} | "
                     + " | ".join(_pm([row[key] for row in rows]) for key, _ in TABLE1) + " |")
    first = next(iter(results.values()))[0]  # every checkpoint is scored on the same trials
    for reference, label in (("center", "reference: centred peak"), ("noise", "reference: uniform noise")):
        cells = ["-" if key in ("acc", "nqh") else _pct(first[f"{key}_{reference}"]) for key, _ in TABLE1]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def table6(results: dict[str, list[dict]]) -> list[str]:
    eps_keys = list(next(iter(results.values()))[0]["fgsm"])
    lines = ["| variant | clean | " + " | ".join(eps_keys) + " |", "|---" * (len(eps_keys) + 2) + "|"]
    for variant, rows in results.items():
        lines.append(f"| {LABELS.get(variant, variant)} | {_pm([row['acc'] for row in rows])} | "
                     + " | ".join(_pm([row["fgsm"][key] for row in rows]) for key in eps_keys) + " |")
    return lines


def claim_lines(found: list[dict]) -> list[str]:
    lines = ["| claim | verdict | mean difference ± std (points) | seeds agreeing | per seed |", "|---|---|---|---|---|"]
    for claim in found:
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in claim["differences"])
        lines.append(f"| {claim['claim']} | **{claim['verdict']}** | {100 * claim['mean']:+.1f} ± "
                     f"{100 * claim['std']:.1f} | {claim['seeds_agreeing']}/{claim['seeds']} | {per_seed} |")
    return lines


def consensus_lines(consensus: dict, runs: list[Run]) -> list[str]:
    names = {str(run.checkpoint): f"{LABELS.get(run.variant, run.variant)} seed {run.seed}" for run in runs}
    rows = sorted(consensus["members"], key=lambda row: row["rank"])
    lines = ["| rank | member | consensus score | top-1 |", "|---|---|---|---|"]
    lines += [f"| {row['rank']} | {names.get(row['checkpoint'], row['checkpoint'])} | {row['consensus_score']:.4f} | "
              f"{_pct(row['accuracy'])} |" for row in rows]
    if "consensus_map" in consensus:
        best = max(row["map"] for row in rows)
        lines += ["", f"mAP of the explanations against the object masks: consensus {_pct(consensus['consensus_map'])}, "
                      f"best member {_pct(best)}; centred peak {_pct(consensus['reference_map']['center'])}, "
                      f"uniform noise {_pct(consensus['reference_map']['noise'])}."]
    lines += ["", "| x | y | n | Pearson (p) | Spearman (p) |", "|---|---|---|---|---|"]
    lines += [f"| {c['x']} | {c['y']} | {c['n']} | {_number(c['pearson'])} ({_number(c['pearson_p'], '.2g')}) | "
              f"{_number(c['spearman'])} ({_number(c['spearman_p'], '.2g')}) |" for c in consensus["correlations"]]
    return lines


def save_fgsm_plot(results: dict[str, list[dict]], space: str, path: Path) -> Path:
    eps_keys = list(next(iter(results.values()))[0]["fgsm"])
    eps = [float(key.split("=")[1]) for key in eps_keys]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for variant, rows in results.items():
        stats = [mean_std([row["fgsm"][key] for row in rows]) for key in eps_keys]
        ax.errorbar(eps, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats], marker="o", capsize=3,
                    label=LABELS.get(variant, variant))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(f"FGSM eps (1/255, {space} space)")
    ax.set_ylabel("top-1 (%), mean ± std over seeds")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
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
            "epochs": base.trainer.max_epochs, "lambda": by_variant["gc"].loss["lambda"]}


# ------------------------------------------------------------------------------------ main

# evaluation.batch_size null leaves each step the data's batch, which train.py checks (data.batch_size)
# in the first step, before any data is generated: any valid batch stands in for it here.
PLACEHOLDER_BATCH = 1


def check_step_options(cfg: DictConfig) -> None:
    """The options of the evaluation, consensus and report steps, checked as those steps will check
    them: a typo must not surface after hours of training."""
    if not (is_number(cfg.little_top1) and 0 <= cfg.little_top1 < 1):
        raise ValueError(f"little_top1 must be a number in [0, 1) (a fraction of top-1: 0.03 is 3 points), "
                         f"got {cfg.little_top1!r}")
    check_integer("heatmap_images", cfg.heatmap_images, 0)
    placeholder = {"batch_size": PLACEHOLDER_BATCH} if cfg.evaluation.batch_size is None else {}
    settings = hydra.utils.instantiate(cfg.evaluation, **placeholder)
    build_explainer(**OmegaConf.to_container(cfg.explainer, resolve=True))
    if check_bool("consensus", cfg.consensus):
        # The consensus step selects it as a config group: a name, not a mapping of options.
        if not isinstance(cfg.consensus_explainer, str):
            raise ValueError(f"consensus_explainer must be the name of an explainer of conf/explainer/, "
                             f"got {cfg.consensus_explainer!r}")
        build_explainer(**explainer_options(cfg.consensus_explainer))
        if settings.protocol != "standard":
            raise ValueError(f"evaluation.protocol={settings.protocol!r}: the committee consensus (consensus=true) "
                             f"works on the standard geometry only; give evaluation.protocol=standard or "
                             f"consensus=false")
    # As the evaluation steps will resolve it.
    resolve_device(cfg.device)


def plan(cfg: DictConfig) -> list[Run]:
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {list(cfg.seeds)}")
    missing = {"baseline", "gc", "gmp", "gmp_gc"} - set(cfg.variants)
    if missing:
        raise ValueError(f"variants must include baseline, gc, gmp and gmp_gc (the claims compare them); "
                         f"missing: {sorted(missing)}")
    if cfg.gc_overrides and not any(trains_with_gc(overrides) for overrides in cfg.variants.values()):
        raise ValueError(f"gc_overrides {list(cfg.gc_overrides)} given, but no variant trains with loss=gc")
    check_step_options(cfg)
    out = Path(cfg.output_dir)
    # Seed by seed: a partial run already compares every variant.
    return [Run(variant, int(seed), out / "runs" / variant / f"seed{seed}") for seed in cfg.seeds
            for variant in cfg.variants]


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
    results: dict[str, list[dict]] = {}
    for item in runs:
        report = json.loads((item.evaluation_dir / "report.json").read_text())
        results.setdefault(item.variant, []).append(report["checkpoints"][0]["results"])

    consensus = None
    if cfg.consensus:
        consensus_dir = out / "consensus"
        # The same paths may hold other weights after a run was redone: the consensus follows the files.
        inputs = {str(r.checkpoint): file_digest(r.checkpoint) for r in runs}
        seconds["consensus"] = run_step(consensus_arguments(cfg, runs, evaluation), consensus_dir,
                                        "committee consensus", inputs)
        saved = json.loads((consensus_dir / "consensus.json").read_text())
        consensus = {"members": saved["members"], "correlations": saved["correlations"],
                     **{key: saved["summary"][key] for key in ("consensus_map", "reference_map") if key in saved["summary"]}}

    found = claims(results, cfg.little_top1)
    figures = {"fgsm": save_fgsm_plot(results, evaluation["fgsm_space"], out / "fgsm.png")}
    if cfg.heatmap_images > 0:
        figures["heatmaps"] = save_variant_heatmaps(cfg, runs, explainer, out / "heatmaps.png")
    if consensus is not None:
        figures["consensus_scatter"] = out / "consensus" / "scatter.png"
    seconds["total_this_call"] = time.perf_counter() - start
    settings = {key: OmegaConf.to_container(cfg, resolve=True)[key] for key in
                ("seeds", "image_size", "train_per_class", "epochs", "batch_size", "data_overrides", "train_overrides",
                 "gc_overrides", "variants",
                 "consensus_explainer", "little_top1")}
    summary = {"settings": {**settings, "evaluation": evaluation, "explainer": explainer}, "results": results,
               "claims": found, "consensus": consensus, "seconds": seconds,
               "figures": {key: str(path) for key, path in figures.items()}}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(markdown(cfg, results, found, consensus, runs, evaluation, explainer, seconds))
    print((out / "report.md").read_text())
    return summary


def markdown(cfg, results, found, consensus, runs, evaluation, explainer, seconds) -> str:
    seeds, run = len(cfg.seeds), run_description(runs)
    lines = ["# The paper's findings on the synthetic data", "",
             f"{run['model']} (output stride {run['output_stride']}), {len(results)} variants x {seeds} seeds; "
             f"{run['epochs']} epochs, {run['train_per_class']} training images per class at {run['image_size']} px, "
             f"batch {run['batch_size']}, GC lambda {run['lambda']:g}; extra overrides: "
             f"{list(cfg.train_overrides) or 'none'}; GC variants only: {list(cfg.gc_overrides) or 'none'}. "
             "Each last checkpoint is evaluated with "
             f"{explainer['name']} on the whole validation set. Values in %, mean ± std over seeds.", "",
             "## Table 1: accuracy and explanation quality", ""]
    lines += table1(results)
    lines += ["", "Reference rows: what a centred Gaussian peak and uniform noise score on the same trials.", "",
              f"## Table 6: top-1 under FGSM (eps in 1/255, {evaluation['fgsm_space']} space)", ""]
    lines += table6(results)
    lines += ["", "## The paper's claims, paired over seeds", "",
              "Difference = first variant minus second, per seed. *holds*: the mean difference and every seed "
              "point the claimed way; *mixed*: the mean does, some seed does not; *does not hold*: the mean "
              "does not.", ""]
    lines += claim_lines(found)
    if consensus is not None:
        lines += ["", f"## Committee consensus ({cfg.consensus_explainer}, all checkpoints)", ""]
        lines += consensus_lines(consensus, runs)
    lines += ["", "## Figures", ""]
    if cfg.heatmap_images > 0:
        lines.append("- `heatmaps.png`: explanations of each variant on the same images")
    lines.append("- `fgsm.png`: top-1 against FGSM eps")
    if consensus is not None:
        lines.append("- `consensus/scatter.png`: consensus score against top-1")
    lines += ["", f"Time: training {seconds['train'] / 60:.1f} min, evaluation {seconds['evaluate'] / 60:.1f} min"
              + (f", consensus {seconds['consensus'] / 60:.1f} min" if "consensus" in seconds else "")
              + " (reused steps count the time they took when they ran).", ""]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="reproduce")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
