"""Committee consensus over checkpoints:
``python -m evaluation.consensus ckpts=[a.ckpt,b.ckpt,...] | ckpts_dir=DIR [data=...]
[explainer=smoothgrad|lime|gradcam] [num_images=N]``.

Every member explains the same images (one member at a time, kept in the store), the explanations
are aggregated into a consensus per image, and each member is scored by its mean similarity to the
consensus (docs/consensus.md). Writes consensus.md, consensus.csv, consensus.json, scatter.png,
explanations.png and, where the data has masks, convergence.png to the output dir.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated, Literal

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import Field, ValidationInfo, field_validator

from datamodules import DATASETS, build_datamodule
from evaluation.consensus import committee, core, stats
from evaluation.consensus.committee import Checkpoints, CommitteeOptions
from evaluation.consensus.report import scatter
from evaluation.consensus.store import ExplanationStore
from evaluation.distributed import start_processes
from evaluation.explainers import EXPLAINERS, build_explainer
from evaluation.figures import Panel, save_figure, save_overlay_grid, subplots
from evaluation.preflight import check_checkpoint_explainer
from evaluation.settings import EvaluationSettings
from evaluation.tables import markdown_table, number, percent
from gcmodels.config import check_config
from gcmodels.options import ConfigError, Options, Sequence

# ------------------------------------------------------------------------------------ the config


class ConsensusEvaluation(EvaluationSettings):
    """The ``evaluation`` group as the consensus takes it: members' maps are stacked and compared
    pixel by pixel, which needs one image size for all, so the standard geometry only."""

    protocol: Literal["standard"]


class Subcommittees(Options):
    """``draws`` random sub-committees of ``size`` members (None: off); a correlation over 2
    members is always +-1, hence 3 at least. At most the committee's size (``check_members``)."""

    size: Annotated[int, Field(ge=3)] | None
    draws: Annotated[int, Field(ge=1)]


class Convergence(Options):
    """Consensus mAP of ``trials`` random committees of each of ``sizes`` (None: 2 to the
    committee's size; at most the committee's size, ``check_members``)."""

    enabled: bool
    sizes: Annotated[Sequence[Annotated[int, Field(ge=2)]], Field(min_length=1)] | None
    trials: Annotated[int, Field(ge=1)]


DataOptions = DATASETS.union()
ExplainerOptions = EXPLAINERS.union()


class ConsensusConfig(CommitteeOptions):
    """The schema of ``conf/consensus.yaml``: the committee group's options at the top level,
    the committee (``ckpts`` or ``ckpts_dir``), and what the report computes and shows."""

    data: DataOptions
    evaluation: ConsensusEvaluation
    explainer: ExplainerOptions
    ckpts: Checkpoints | None
    ckpts_dir: Annotated[str, Field(min_length=1)] | None
    ckpts_glob: Annotated[str, Field(min_length=1)]
    leave_one_out: bool
    subcommittees: Subcommittees
    convergence: Convergence
    picture_images: Annotated[int, Field(ge=1)]
    device: str
    devices: Annotated[int, Field(ge=1)]
    num_nodes: Annotated[int, Field(ge=1)]
    seed: Annotated[int, Field(ge=0)]
    output_dir: str

    @field_validator("ckpts_dir")
    @classmethod
    def one_committee(cls, ckpts_dir: str | None, info: ValidationInfo) -> str | None:
        if "ckpts" in info.data and (info.data["ckpts"] is None) == (ckpts_dir is None):
            raise ValueError("give the committee as ckpts=[a.ckpt,b.ckpt,...] or as ckpts_dir=DIR, not both or "
                             "neither")
        return ckpts_dir


def check_members(cfg: DictConfig, members: list[committee.Member], explainer) -> None:
    """The options that depend on the committee, checked before any member is explained: the sizes
    against its number of distinct members, the explainer against each member's network."""
    count = len(members)
    problems = []
    if cfg.subcommittees.size is not None and cfg.subcommittees.size > count:
        problems.append(("subcommittees.size", f"{cfg.subcommittees.size} is more than the committee's {count} "
                                               "distinct members"))
    if cfg.convergence.enabled and cfg.convergence.sizes is not None and max(cfg.convergence.sizes) > count:
        problems.append(("convergence.sizes", f"{list(cfg.convergence.sizes)} holds a size above the committee's "
                                              f"{count} distinct members"))
    if problems:
        raise ConfigError(problems)
    for member in members:
        check_checkpoint_explainer(explainer, member.path, member.hparams)


# Members are grouped by these hyper-parameters, where they vary, for the within-group correlations.
GROUP_KEYS = ("pooling", "loss", "model")


def member_rows(members, entries, computed, scores, ranks, missing) -> list[dict]:
    return [{**member.describe(), "label": member.label, "digest": member.digest,
             "accuracy": float(entry["meta"]["accuracy"]), "consensus_score": float(score), "rank": rank,
             "missing_explanations": count, "forward_passes": int(entry["meta"]["forward_passes"]),
             "computed_now": new}
            for member, entry, new, score, rank, count in zip(members, entries, computed, scores.tolist(), ranks,
                                                              missing)]


def add_rule_scores(rows: list[dict], entries, shared, options: dict) -> None:
    """Each LIME member's score and rank under both papers' rules (``consensus_score_<rule>``,
    ``rank_<rule>``): they can rank members in opposite orders when their confidence differs."""
    for rule in core.RULES:
        scores = core.consensus_scores(committee.similarities(entries, shared, "superpixel", {**options, "rule": rule}))
        for row, score, rank in zip(rows, scores.tolist(), core.ranks(scores)):
            row.update({f"consensus_score_{rule}": score, f"rank_{rule}": rank})


def run(cfg: DictConfig) -> dict:
    # Every option is checked before any checkpoint is read or image explained.
    config: ConsensusConfig = check_config(cfg, ConsensusConfig)
    explainer_options = OmegaConf.to_container(cfg.explainer, resolve=True)
    explainer = build_explainer(**explainer_options)
    kind = committee.explanation_kind(explainer)
    options = committee.consensus_options(kind, cfg.sigma, cfg.aggregation)
    paths = committee.find_checkpoints(cfg.ckpts, cfg.ckpts_dir, cfg.ckpts_glob)
    settings: EvaluationSettings = config.evaluation
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    members = committee.load_members(paths, datamodule)
    check_members(cfg, members, explainer)
    fabric = start_processes(cfg.device, cfg.devices, cfg.num_nodes)

    with fabric.rank_zero_first():  # the synthetic data is generated once
        datamodule.prepare_data()
    datamodule.setup("validate")
    images = committee.committee_images(datamodule, cfg.num_images)
    resolution = committee.effective_resolution(cfg.resolution, datamodule)
    store = ExplanationStore(cfg.store_dir, committee.run_settings(
        OmegaConf.to_container(cfg.data, resolve=True), explainer_options, cfg.target, resolution,
        settings.batch_size, len(images), settings.arithmetic))
    with fabric.rank_zero_first():  # computed once (LIME's superpixels, the masks), read by the others
        shared = committee.stored_shared_arrays(store, images, datamodule, explainer, settings.batch_size)

    # The members not in the store, dealt out over the processes in turn: each computes its share
    # into the store (a stored member is computed by nobody); every process lists them before any
    # of them writes, so all deal the same list. Rank 0 then scores the whole committee alone.
    missing = [index for index, member in enumerate(members) if store.load_member(member.digest) is None]
    fabric.barrier()
    for turn, index in enumerate(missing):
        if turn % fabric.world_size == fabric.global_rank:
            print(f"rank {fabric.global_rank}: explaining [{index + 1}/{len(members)}] {members[index].label}")
            committee.member_entry(members[index], store, explainer, images, datamodule, shared, cfg.target,
                                   resolution, settings, fabric.device)
    fabric.barrier()
    if fabric.global_rank != 0:
        return {}
    entries = [committee.stored_member(store, member) for member in members]
    computed = [index in missing for index in range(len(members))]
    for index, (member, entry) in enumerate(zip(members, entries)):
        print(f"[{index + 1}/{len(members)}] {member.label}: {'computed' if computed[index] else 'from the store'}, "
              f"{entry['meta']['forward_passes']} forward passes")

    similarities = committee.similarities(entries, shared, kind, options)
    scores = core.consensus_scores(similarities)
    missing = committee.missing_counts(entries, shared, kind)
    rows = member_rows(members, entries, computed, scores, core.ranks(scores), missing)
    summary: dict = {"kind": kind, "images": len(images), "resolution": resolution,
                     "missing_explanations": sum(missing), "similarities": similarities.tolist()}
    other_rule = None
    if kind == "superpixel":
        add_rule_scores(rows, entries, shared, options)
        other_rule = {"rule": next(rule for rule in core.RULES if rule != options["rule"])}
    score_columns = ["consensus_score"]
    if cfg.leave_one_out:
        loo = core.consensus_scores(committee.similarities(entries, shared, kind, options, leave_one_out=True))
        for row, score, rank in zip(rows, loo.tolist(), core.ranks(loo)):
            row.update(consensus_score_loo=score, rank_loo=rank)
        score_columns.append("consensus_score_loo")
    others = ["accuracy"]
    generator = torch.Generator().manual_seed(cfg.seed)
    if "masks" in shared:
        localisation = committee.localisation_scores(entries, shared, kind, settings)
        for i, row in enumerate(rows):
            row.update(pg=localisation["pg"][i], ch=localisation["ch"][i], map=localisation["map"][i])
        summary["consensus_map"] = committee.consensus_map(entries, shared, kind, options)
        if other_rule is not None:
            other_rule["consensus_map"] = committee.consensus_map(entries, shared, kind, {"rule": other_rule["rule"]})
        summary["reference_map"] = committee.reference_map(shared, settings)
        others += ["pg", "ch", "map"]
        if cfg.convergence.enabled:
            sizes = list(cfg.convergence.sizes or range(2, len(members) + 1))
            summary["convergence"] = core.committee_size_convergence(
                lambda chosen: committee.consensus_map(entries, shared, kind, options, members=chosen),
                len(members), sizes, cfg.convergence.trials, generator)
    if cfg.subcommittees.size is not None:
        explanations = committee.stacked(entries, slice(None))
        valid = (committee.superpixel_valid(np.asarray(shared["segments"]), explanations.shape[-1])
                 if kind == "superpixel" else None)
        summary["subcommittees"] = core.random_subcommittees(
            explanations, torch.tensor([row["accuracy"] for row in rows]), cfg.subcommittees.size,
            cfg.subcommittees.draws, generator, kind=kind, valid=valid, **options)
    correlations = [stats.correlation(rows, x, y) for x in score_columns for y in others]
    groups = stats.group_correlations(rows, GROUP_KEYS, "consensus_score", "accuracy")
    if other_rule is not None:
        other_rule["correlations"] = [stats.correlation(rows, f"consensus_score_{other_rule['rule']}", y)
                                      for y in others]
    return write_outputs(cfg, rows, summary, {"correlations": correlations, "group_correlations": groups,
                                              "other_rule": other_rule},
                         explainer_options, pictures=(entries, shared, kind, options, members, images))


# ------------------------------------------------------------------------------------ outputs

CSV_COLUMNS = ("checkpoint", "model", "pooling", "loss", "lambda", "accuracy", "consensus_score", "rank",
               "consensus_score_loo", "rank_loo", *(f"{name}_{rule}" for rule in core.RULES
                                                   for name in ("consensus_score", "rank")),
               "pg", "ch", "map", "missing_explanations", "forward_passes")


def write_outputs(cfg: DictConfig, rows: list[dict], summary: dict, analyses: dict, explainer_options: dict,
                  pictures: tuple) -> dict:
    """``analyses``: ``correlations`` (pooled), ``group_correlations`` and, for LIME, ``other_rule``
    (the rule not chosen: its correlations and consensus mAP), written as top-level keys of
    consensus.json."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = [c for c in CSV_COLUMNS if any(c in row for row in rows)]
    with (out / "consensus.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    settings = {"explainer": explainer_options, "data": OmegaConf.to_container(cfg.data, resolve=True),
                "evaluation": OmegaConf.to_container(cfg.evaluation, resolve=True), "num_images": cfg.num_images,
                "target": cfg.target, "resolution": summary["resolution"], "sigma": cfg.sigma,
                "aggregation": cfg.aggregation, "leave_one_out": cfg.leave_one_out,
                "subcommittees": OmegaConf.to_container(cfg.subcommittees),
                "convergence": OmegaConf.to_container(cfg.convergence), "seed": cfg.seed}
    summary = dict(summary)
    similarities = summary.pop("similarities")  # [member][image], beside the rows rather than in them
    analyses = {key: value for key, value in analyses.items() if value is not None}
    (out / "consensus.json").write_text(json.dumps(
        {"settings": settings, "summary": summary, "members": rows, **analyses, "similarities": similarities},
        indent=2))
    explainer_name = explainer_options["name"]
    (out / "consensus.md").write_text(markdown(rows, summary, analyses, explainer_name, cfg))
    accuracy_correlation = analyses["correlations"][0]
    title = (f"{explainer_name}: Pearson {number(accuracy_correlation['pearson'])}, Spearman "
             f"{number(accuracy_correlation['spearman'])} (n={accuracy_correlation['n']})")
    if committee.is_gradcam(explainer_name):
        title = f"{committee.GRADCAM_NOTE}\n{title}"
    paths = {name: out / name for name in ("consensus.md", "consensus.csv", "consensus.json")}
    paths["scatter.png"] = scatter([(row["label"], row["consensus_score"], row["accuracy"]) for row in rows],
                                   "consensus score", "accuracy", title, out / "scatter.png")
    paths["explanations.png"] = save_explanations(*pictures, cfg.picture_images, out / "explanations.png")
    if "convergence" in summary:
        paths["convergence.png"] = save_convergence(summary["convergence"], out / "convergence.png")
    print((out / "consensus.md").read_text())
    for name, path in paths.items():
        print(f"{name:<17} {path}")
    return {"rows": rows, "summary": summary, **analyses, "outputs": {k: str(v) for k, v in paths.items()}}


def _correlation_table(correlations: list[dict], first: str, first_key: str) -> list[str]:
    return markdown_table([first, "n", "Pearson (p)", "Spearman (p)"], (
        [c[first_key], c["n"], f"{number(c['pearson'])} ({number(c['pearson_p'], '.2g')})",
         f"{number(c['spearman'])} ({number(c['spearman_p'], '.2g')})"] for c in correlations))


def markdown(rows: list[dict], summary: dict, analyses: dict, explainer: str, cfg: DictConfig) -> str:
    localisation = "pg" in rows[0]
    other = analyses.get("other_rule")
    gradcam = committee.is_gradcam(explainer)
    compared = (f"compared at {summary['resolution']} x {summary['resolution']} px" if summary["kind"] == "pixel"
                else f"aggregated by the {cfg.aggregation} rule")
    lines = [f"# {'Grad-CAM committee' if gradcam else 'Committee'} consensus ({explainer} on {cfg.data.name}, "
             f"{summary['images']} images, {summary['kind']} explanations {compared})", ""]
    if gradcam:
        lines += [f"{committee.GRADCAM_NOTE}.", ""]
    lines += ["Consensus score: mean similarity of the member's explanation to the consensus (1 = identical); "
              "rank 1 = highest. Accuracy" + (", PG, CH and mAP" if localisation else "") + " in percent. Missing: "
              "the member's explanations that are constant or non-finite, left out of the consensus and of its "
              "score.", ""]
    headers = ["rank", "member", "accuracy", f"consensus score ({cfg.aggregation})" if other else "consensus score"]
    if other:
        headers += [f"score ({other['rule']})", f"rank ({other['rule']})"]
    headers += ["PG", "CH", "mAP"] if localisation else []
    headers += ["missing", "forward passes"]
    table = []
    for row in sorted(rows, key=lambda r: r["rank"]):
        cells = [row["rank"], row["label"], percent(row["accuracy"]), number(row["consensus_score"])]
        if other:
            cells += [number(row[f"consensus_score_{other['rule']}"]), row[f"rank_{other['rule']}"]]
        if localisation:
            cells += [percent(row[key]) for key in ("pg", "ch", "map")]
        table.append(cells + [row["missing_explanations"], row["forward_passes"]])
    lines += markdown_table(headers, table)
    lines += ["", f"Missing explanations: {summary['missing_explanations']} of {len(rows) * summary['images']}.", ""]
    if "consensus_map" in summary:
        best = float(np.nanmax([row["map"] for row in rows]))
        reference = summary["reference_map"]
        by_rule = (f" ({cfg.aggregation} rule; {other['rule']} rule: {percent(other['consensus_map'])})"
                   if other else "")
        lines += [f"mAP of the consensus against the masks: {percent(summary['consensus_map'])}{by_rule} "
                  f"(best single member: {percent(best)}; reference maps on the same images: centred peak "
                  f"{percent(reference['center'])}, uniform noise {percent(reference['noise'])}).", ""]
    lines += ["Correlations over the whole committee (n = members used):", ""]
    lines += _correlation_table([{**c, "pair": f"{c['x']} / {c['y']}"} for c in analyses["correlations"]],
                                "x / y", "pair")
    if analyses["group_correlations"]:
        lines += ["", "Consensus score / accuracy within groups of members (members of one pooling, loss or "
                  "network; groups of 3 or more):", ""]
        lines += _correlation_table(analyses["group_correlations"], "group", "group")
    if other:
        lines += ["", f"Under the {other['rule']} rule, which can rank members differently when their confidence "
                  "differs (docs/consensus.md):", ""]
        lines += _correlation_table([{**c, "pair": f"{c['x']} / {c['y']}"} for c in other["correlations"]],
                                    "x / y", "pair")
    if "subcommittees" in summary:
        sub = summary["subcommittees"]
        lines += ["", f"Random sub-committees ({sub['valid_draws']} draws of {sub['size']} members): score-accuracy "
                  f"Pearson {number(sub['pearson_mean'])} ± {number(sub['pearson_std'])}, Spearman "
                  f"{number(sub['spearman_mean'])} ± {number(sub['spearman_std'])}."]
    return "\n".join(lines) + "\n"


def save_explanations(entries, shared, kind, options, members, images, count: int, path: Path) -> Path:
    """A few images: each member's explanation and the consensus side by side."""
    rows_shown = committee.spread_indices(len(images), count)
    grid = []
    for index in rows_shown:
        rows = slice(index, index + 1)
        explanations = committee.stacked(entries, rows)
        consensus = committee.consensus_of(explanations, shared, rows, kind, options)
        image = images[index]["image"]
        maps = committee.display_maps(torch.cat([explanations, consensus.unsqueeze(0)]), shared, rows, kind,
                                      tuple(image.shape[-2:]))
        labels = [member.label.replace(" (", "\n(") for member in members] + ["consensus"]
        panels = [Panel(image, heat[0], label, images[index].get("mask")) for heat, label in zip(maps, labels)]
        grid.append((f"image {index}", panels))
    return save_overlay_grid(grid, path, "members' explanations and their consensus")


def save_convergence(convergence: list[dict], path: Path) -> Path:
    fig, ax = subplots(figsize=(4.5, 3.2))
    sizes = [point["size"] for point in convergence]
    ax.plot(sizes, [point["mean"] for point in convergence], "o-", label="mean")
    ax.plot(sizes, [point["median"] for point in convergence], "s--", label="median")
    ax.set_xlabel("committee size")
    ax.set_ylabel("consensus mAP")
    ax.set_title("consensus mAP against the masks")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return path


@hydra.main(version_base="1.3", config_path="../../conf", config_name="consensus")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
