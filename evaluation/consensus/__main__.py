"""Committee consensus over checkpoints:
``python -m evaluation.consensus ckpts=[a.ckpt,b.ckpt,...] | ckpts_dir=DIR [data=...] [explainer=smoothgrad|lime|gradcam] [num_images=N]``.

Every member explains the same images (one member at a time, kept in the store), the explanations
are aggregated into a consensus per image, and each member is scored by its mean similarity to the
consensus (docs/consensus.md). Writes consensus.md, consensus.csv, consensus.json, scatter.png,
explanations.png and, where the data has masks, convergence.png to the output dir.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from datamodules import build_datamodule
from datamodules.base import check_bool, check_integer
from evaluation.consensus import committee, core, stats
from evaluation.consensus.report import scatter
from evaluation.consensus.store import ExplanationStore
from evaluation.engine import check_checkpoint_explainer, resolve_device
from evaluation.explainers import build_explainer
from evaluation.figures import Panel, save_overlay_grid
from evaluation.settings import EvaluationSettings


def check_options(cfg: DictConfig) -> None:
    """The options that need no checkpoint, checked before any is read."""
    committee.check_image_options(cfg.target, cfg.num_images, cfg.resolution)
    check_bool("leave_one_out", cfg.leave_one_out)
    check_bool("convergence.enabled", cfg.convergence.enabled)
    if cfg.subcommittees.size is not None:
        # A correlation over 2 members is always +-1.
        check_integer("subcommittees.size", cfg.subcommittees.size, 3)
    check_integer("subcommittees.draws", cfg.subcommittees.draws, 1)
    sizes = cfg.convergence.sizes
    if sizes is not None:
        if not isinstance(sizes, ListConfig) or not sizes:
            raise ValueError(f"convergence.sizes must be a list of committee sizes (null: 2 to the committee's "
                             f"size), got {sizes!r}")
        for size in sizes:
            check_integer("convergence.sizes", size, 2)
    check_integer("convergence.trials", cfg.convergence.trials, 1)
    check_integer("picture_images", cfg.picture_images, 1)


def check_members(cfg: DictConfig, members: list[committee.Member], explainer) -> None:
    """The options that depend on the committee, checked before any member is explained: the sizes
    against its number of distinct members, the explainer against each member's network."""
    count = len(members)
    if cfg.subcommittees.size is not None and cfg.subcommittees.size > count:
        raise ValueError(f"subcommittees.size={cfg.subcommittees.size}: the committee has {count} distinct members")
    if cfg.convergence.enabled and cfg.convergence.sizes is not None and max(cfg.convergence.sizes) > count:
        raise ValueError(f"convergence.sizes={list(cfg.convergence.sizes)}: the committee has {count} distinct "
                         "members")
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
    check_options(cfg)
    explainer_options = OmegaConf.to_container(cfg.explainer, resolve=True)
    explainer = build_explainer(**explainer_options)
    kind = committee.explanation_kind(explainer)
    options = committee.consensus_options(kind, cfg.sigma, cfg.aggregation)
    paths = committee.find_checkpoints(cfg.ckpts, cfg.ckpts_dir, cfg.ckpts_glob)
    settings: EvaluationSettings = hydra.utils.instantiate(cfg.evaluation)
    if settings.protocol != "standard":
        # Members' maps are stacked and compared pixel by pixel: one image size for all.
        raise ValueError(f"evaluation.protocol={settings.protocol!r}: the consensus scores work on the standard "
                         "geometry only (evaluation.protocol=standard)")
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    members = committee.load_members(paths, datamodule)
    check_members(cfg, members, explainer)
    device = resolve_device(cfg.device)

    datamodule.prepare_data()
    datamodule.setup("validate")
    images = committee.committee_images(datamodule, cfg.num_images)
    resolution = committee.effective_resolution(cfg.resolution, datamodule)
    store = ExplanationStore(cfg.store_dir, committee.run_settings(
        OmegaConf.to_container(cfg.data, resolve=True), explainer_options, cfg.target, resolution,
        settings.batch_size, len(images)))
    shared = committee.stored_shared_arrays(store, images, datamodule, explainer, settings.batch_size)

    entries, computed = [], []
    for index, member in enumerate(members, 1):
        entry, new = committee.member_entry(member, store, explainer, images, datamodule, shared, cfg.target,
                                            resolution, settings, device)
        entries.append(entry)
        computed.append(new)
        print(f"[{index}/{len(members)}] {member.label}: {'computed' if new else 'from the store'}, "
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


def _fmt(value, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


def _p_value(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2g}"


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
    title = (f"{explainer_name}: Pearson {_fmt(accuracy_correlation['pearson'])}, Spearman "
             f"{_fmt(accuracy_correlation['spearman'])} (n={accuracy_correlation['n']})")
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
    lines = [f"| {first} | n | Pearson (p) | Spearman (p) |", "|---|---|---|---|"]
    return lines + [f"| {c[first_key]} | {c['n']} | {_fmt(c['pearson'])} ({_p_value(c['pearson_p'])}) | "
                    f"{_fmt(c['spearman'])} ({_p_value(c['spearman_p'])}) |" for c in correlations]


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
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in sorted(rows, key=lambda r: r["rank"]):
        cells = [str(row["rank"]), row["label"], _fmt(row["accuracy"], True), _fmt(row["consensus_score"])]
        if other:
            cells += [_fmt(row[f"consensus_score_{other['rule']}"]), str(row[f"rank_{other['rule']}"])]
        if localisation:
            cells += [_fmt(row[key], True) for key in ("pg", "ch", "map")]
        cells += [str(row["missing_explanations"]), str(row["forward_passes"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Missing explanations: {summary['missing_explanations']} of {len(rows) * summary['images']}.", ""]
    if "consensus_map" in summary:
        best = float(np.nanmax([row["map"] for row in rows]))
        reference = summary["reference_map"]
        by_rule = (f" ({cfg.aggregation} rule; {other['rule']} rule: {_fmt(other['consensus_map'], True)})"
                   if other else "")
        lines += [f"mAP of the consensus against the masks: {_fmt(summary['consensus_map'], True)}{by_rule} "
                  f"(best single member: {_fmt(best, True)}; reference maps on the same images: centred peak "
                  f"{_fmt(reference['center'], True)}, uniform noise {_fmt(reference['noise'], True)}).", ""]
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
                  f"Pearson {_fmt(sub['pearson_mean'])} ± {_fmt(sub['pearson_std'])}, Spearman "
                  f"{_fmt(sub['spearman_mean'])} ± {_fmt(sub['spearman_std'])}."]
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
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    sizes = [point["size"] for point in convergence]
    ax.plot(sizes, [point["mean"] for point in convergence], "o-", label="mean")
    ax.plot(sizes, [point["median"] for point in convergence], "s--", label="median")
    ax.set_xlabel("committee size")
    ax.set_ylabel("consensus mAP")
    ax.set_title("consensus mAP against the masks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@hydra.main(version_base="1.3", config_path="../../conf", config_name="consensus")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
