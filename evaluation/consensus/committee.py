"""A committee of checkpoints explaining the same images: finding and checking the members,
computing each member's explanations (one member at a time, through the store), and scoring them
against the consensus in slices of images, so memory does not grow with the committee.

Two kinds of explanation: ``pixel`` maps (Grad-CAM, SmoothGrad, ...; stored at one common
resolution, each map divided by its largest magnitude) and ``superpixel`` weights (LIME: the signed weight of
each superpixel of one segmentation per image, shared by every member).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules import ClassificationDataModule
from datamodules.images import labelled_classes
from evaluation.consensus import core
from evaluation.consensus.stats import average_precision
from evaluation.consensus.store import ExplanationStore
from evaluation.metrics import ContentHeatmap, PointingGame, functional
from evaluation.preflight import check_trained_classes
from evaluation.references import REFERENCES, centre_maps, map_seeds, trial_noise_maps
from evaluation.sampling import spread_indices
from evaluation.settings import EvaluationSettings
from gcmodels.accuracy import accuracy_metric
from gcmodels.checkpoints import checkpoint_label, describe_checkpoint, load_checkpoint
from gcmodels.module import GCClassifier
from gcmodels.options import Options
from gcmodels.options import Sequence as OptionSequence

TARGETS = ("label", "prediction")
# Explainers of this name prefix are Grad-CAMs: the explainer the GC loss trains, which the
# consensus papers do not use.
GRADCAM = "gradcam"
# Values per member in one slice of images when members are compared (64 maps of 64 x 64): memory
# holds m members x this many at once, whatever the image size.
SLICE_VALUES = 64 * 64 * 64


class CommitteeOptions(Options):
    """How a committee's explanations are made and compared (``conf/committee/default.yaml``),
    shared by ``python -m evaluation.consensus`` (at the top level of its config) and the training
    callback (``callbacks.consensus``): ``num_images`` explained by every member (None: all),
    the explained class (``target``), the common ``resolution`` of pixel maps (None: the data's
    image size), the RBF width ``sigma`` of pixel maps, the LIME ``aggregation`` rule, and the
    explanation store's folder (``store_dir``)."""

    num_images: Annotated[int, Field(ge=1)] | None
    target: Literal[TARGETS]
    resolution: Annotated[int, Field(ge=2)] | None
    sigma: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    aggregation: Literal[core.RULES]
    store_dir: str


def _one_or_more(value):
    return ((value,) if value else ()) if isinstance(value, str) else value


# The committee's checkpoints as a config option: one path, or a list of paths; at least one.
Checkpoints = Annotated[OptionSequence[Annotated[str, Field(min_length=1)]], Field(min_length=1),
                        BeforeValidator(_one_or_more)]


def find_checkpoints(ckpts: str | Sequence[str] | None, ckpts_dir: str | None, pattern: str = "*.ckpt") -> list[Path]:
    """The committee's checkpoint files: ``ckpts`` (one path or a list), or, where ``ckpts_dir`` is
    given (the config's schema lets only one of them be), every file matching ``pattern`` below
    ``ckpts_dir`` (sorted)."""
    if ckpts_dir:
        folder = Path(ckpts_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"ckpts_dir: directory not found: {folder}")
        paths = sorted(folder.rglob(pattern))
        if not paths:
            raise ValueError(f"ckpts_dir: no file matching {pattern!r} under {folder}")
        return paths
    return [Path(ckpts)] if isinstance(ckpts, (str, Path)) else [Path(p) for p in ckpts]


def weights_digest(model: dict, state_dict: dict) -> str:
    """SHA-256 of a network's description and weights: a member is what it computes, so two files
    with the same weights (a run's best and last checkpoint of one epoch, a copy) are one member."""
    digest = hashlib.sha256(json.dumps(model, sort_keys=True).encode())
    for name in sorted(state_dict):
        value = state_dict[name]
        if torch.is_tensor(value) and name.startswith("net."):
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class Member:
    """One committee member: its checkpoint, content digest and hyper-parameters."""

    path: Path
    digest: str
    hparams: dict

    def describe(self) -> dict:
        return describe_checkpoint(self.path, self.hparams)

    @property
    def label(self) -> str:
        return f"{checkpoint_label(self.describe())} ({self.path.parent.parent.name}/{self.path.name})"


def load_members(paths: Sequence[Path], datamodule: ClassificationDataModule, minimum: int = 2) -> list[Member]:
    """Distinct members (files with the same weights count once, with a note) after checking that
    each was trained on the data's class set (count, and names where the checkpoint records
    them); at least ``minimum`` of them."""
    members: dict[str, Member] = {}
    for path in paths:
        checkpoint = load_checkpoint(path)
        hparams = checkpoint["hyper_parameters"]
        check_trained_classes(path, hparams, datamodule)
        digest = weights_digest(hparams["model"], checkpoint["state_dict"])
        if digest in members:
            print(f"{path}: the same weights as {members[digest].path}; counted once")
            continue
        members[digest] = Member(Path(path), digest, hparams)
    if len(members) < minimum:
        raise ValueError(f"a committee needs at least {minimum} distinct checkpoints, got {len(members)}: "
                         f"{[str(p) for p in paths]}")
    return list(members.values())


def consensus_options(kind: str, sigma: float, aggregation: str) -> dict:
    """The aggregation option of an explanation kind: ``sigma`` for pixel maps, the rule for LIME
    (both as :class:`CommitteeOptions` validated them)."""
    return {"sigma": float(sigma)} if kind == "pixel" else {"rule": aggregation}


def effective_resolution(resolution: int | None, datamodule: ClassificationDataModule) -> int:
    """The side of the common maps: ``resolution``, or (null) the data's image size, at which every
    member sees the images."""
    return datamodule.image_size if resolution is None else resolution


def to_resolution(maps: torch.Tensor, resolution: int) -> torch.Tensor:
    """Square maps ``[B, h, w]`` at ``resolution`` x ``resolution``. Larger maps are reduced by area
    averaging: each common pixel is the mean of the pixels it covers, so every pixel of a
    pixel-level map (SmoothGrad, gradients) counts, where a bilinear resize without antialiasing
    reads 4 pixels per output pixel and drops the rest (two thirds of a 224 px map at 64 px). Every
    pixel weighs the same when the map's side is a multiple of ``resolution``; otherwise the
    windows overlap by a pixel (224 px at 64: from 1 to 4 times the least weight). Smaller maps
    (Grad-CAM's feature grid) are enlarged bilinearly."""
    if min(maps.shape[-2:]) >= resolution:
        return F.interpolate(maps.unsqueeze(1), size=(resolution, resolution), mode="area").squeeze(1)
    return functional.upsample(maps, (resolution, resolution))


# How reports label a committee that explains with Grad-CAM (any of its variants).
GRADCAM_NOTE = "Grad-CAM committee: the explainer the GC loss trains; the papers use LIME and SmoothGrad"


def is_gradcam(explainer_name: str) -> bool:
    return explainer_name.startswith(GRADCAM)


def explanation_kind(explainer) -> str:
    """``superpixel`` for explainers that give one weight per superpixel (LIME), else ``pixel``."""
    return "superpixel" if hasattr(explainer, "superpixel_weights") else "pixel"


def committee_images(datamodule: ClassificationDataModule, num_images: int | None) -> Dataset:
    """The images every member explains: the localisation trials when the data has masks (so the
    explanations can be scored against them), else the validation set; spread over the set."""
    dataset = datamodule.localization_dataset()
    if dataset is None:
        dataset = datamodule.val_dataset()
    count = len(dataset) if num_images is None else num_images
    return Subset(dataset, spread_indices(len(dataset), count))


def _batches(images: Dataset, datamodule: ClassificationDataModule, batch_size: int,
             device: torch.device) -> Iterator[dict]:
    for batch in DataLoader(images, batch_size=batch_size, collate_fn=datamodule.collate_fn):
        if batch.get("skipped"):
            # Members must see the same images in the same order: a corrupt one would shift them.
            raise ValueError(f"{batch['skipped']} committee image(s) could not be decoded; the committee needs "
                             "every image (drop data.skip_corrupt or repair the files)")
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def shared_arrays(images: Dataset, datamodule: ClassificationDataModule, explainer, batch_size: int) -> dict:
    """What every member shares: labels, masks (when the data has them) and, for superpixel
    explainers, the segmentation."""
    labels, masks, segments = [], [], []
    for batch in _batches(images, datamodule, batch_size, torch.device("cpu")):
        labels.append(labelled_classes(batch["target"]))
        if "mask" in batch:
            masks.append(batch["mask"])
        if explanation_kind(explainer) == "superpixel":
            segments.append(explainer.segment(batch["image"]).to(torch.int32))
    arrays = {"labels": torch.cat(labels).numpy()}
    if masks:
        arrays["masks"] = torch.cat(masks).numpy()
    if segments:
        arrays["segments"] = torch.cat(segments).numpy()
    return arrays


def stored_shared_arrays(store: ExplanationStore, images: Dataset, datamodule: ClassificationDataModule, explainer,
                         batch_size: int) -> dict:
    """The run's shared arrays from the store, computed and stored first when they are not there."""
    shared = store.load_shared()
    if shared is None:
        store.save_shared(shared_arrays(images, datamodule, explainer, batch_size), {})
        shared = store.load_shared()
    return shared


def _count_forward_passes(net: torch.nn.Module) -> tuple[list[int], Callable[[], None]]:
    """A counter of passes through the network: its ``features`` run once per pass, whether the
    caller runs ``net(x)`` or, as Grad-CAM does, ``features`` and ``head`` apart."""
    calls = [0]
    handle = net.features.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle.remove


def explain_member(net: torch.nn.Module, explainer, images: Dataset, datamodule: ClassificationDataModule,
                   shared: dict, target: str, resolution: int, batch_size: int) -> tuple[dict, dict]:
    """One member's arrays (``explanations``, ``predictions``) and meta (forward passes);
    ``target``: one of ``TARGETS`` (checked by the caller's schema)."""
    device = next(net.parameters()).device
    kind = explanation_kind(explainer)
    segments = torch.from_numpy(np.array(shared["segments"])) if kind == "superpixel" else None
    width = int(segments.max()) + 1 if segments is not None else 0
    explanations, predictions = [], []
    start = 0
    calls, stop_counting = _count_forward_passes(net)
    try:
        for batch in _batches(images, datamodule, batch_size, device):
            images_batch = batch["image"]
            with torch.no_grad():
                predicted = net(images_batch).argmax(1)
            classes = labelled_classes(batch["target"]) if target == "label" else predicted
            if kind == "superpixel":
                batch_segments = segments[start:start + len(images_batch)].to(device).long()
                _, weights = explainer.superpixel_weights(net, images_batch, classes, batch_segments)
                # Padding beyond an image's superpixels is 0; superpixel_valid tells real slots apart.
                padded = torch.zeros(len(weights), width, dtype=torch.float32)
                for row, values in enumerate(weights):
                    padded[row, :len(values)] = values.float().cpu()
                explanations.append(padded)
            else:
                maps = to_resolution(explainer(net, images_batch, classes).float(), resolution)
                peak = maps.abs().flatten(1).amax(1).clamp_min(torch.finfo(maps.dtype).tiny).view(-1, 1, 1)
                # Divided by their largest magnitude, maps fit float16 whatever the explainer's scale
                # and sign; scale-free uses (min-max normalisation, PG, CH, AP) are unchanged.
                explanations.append((maps / peak).to(torch.float16).cpu())
            predictions.append(predicted.cpu())
            start += len(images_batch)
    finally:
        stop_counting()
    arrays = {"explanations": torch.cat(explanations).numpy(), "predictions": torch.cat(predictions).numpy()}
    return arrays, {"forward_passes": calls[0], "kind": kind}


def validation_accuracy(net: torch.nn.Module, datamodule: ClassificationDataModule) -> float:
    """Top-1 accuracy (micro F1 on multi-label data) over the whole validation set. The metric does
    not sync across processes: the committee is scored on one process (e.g. rank 0 of a training
    run), where a collective would wait for the others forever."""
    metric = accuracy_metric(datamodule.num_classes, datamodule.multilabel, sync_on_compute=False)
    device = next(net.parameters()).device
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            if batch["image"].numel():
                targets = batch["target"].to(device)
                metric.update(net(batch["image"].to(device)).cpu(), (targets.long() if datamodule.multilabel
                                                                     else targets).cpu())
    return float(metric.compute())


def run_settings(data: dict, explainer_options: dict, target: str, resolution: int, batch_size: int,
                 num_images: int, arithmetic: dict | None = None) -> dict:
    """Everything a member's stored explanations depend on besides its checkpoint: which images
    (the ``data`` config without its loading options), the explainer and its options, the
    explained class, the common resolution (the effective one, never null) and how maps are
    brought to it, and the batch size (SmoothGrad's noise depends on an image's position in its
    batch), and the arithmetic where it is not the default (``EvaluationSettings.arithmetic``:
    the precision, the memory format), so that the stores of default runs keep their key."""
    which_images = {key: value for key, value in data.items() if key not in ("num_workers", "batch_size",
                                                                              "skip_corrupt")}
    # "reduction" keeps entries of the earlier bilinear reduction, at the same resolution, apart.
    settings = {"data": which_images, "num_images": num_images, "explainer": explainer_options, "target": target,
                "resolution": resolution, "reduction": "area", "batch_size": batch_size}
    return {**settings, **(arithmetic or {})}


def member_entry(member: Member, store: ExplanationStore, explainer, images: Dataset,
                 datamodule: ClassificationDataModule, shared: dict, target: str, resolution: int,
                 settings: EvaluationSettings, device: torch.device) -> tuple[dict, bool]:
    """The member's stored entry, computing and storing it first when it is not there; the flag
    says whether it was computed now."""
    entry = store.load_member(member.digest)
    if entry is not None:
        return entry, False
    net = GCClassifier.from_checkpoint(member.path).net.to(device, memory_format=settings.memory_format).eval()
    arrays, meta = explain_member(net, explainer.at_precision(settings.precision), images, datamodule, shared,
                                  target, resolution, settings.batch_size)
    meta["accuracy"] = validation_accuracy(net, datamodule)
    meta["checkpoint"] = str(member.path)
    store.save_member(member.digest, arrays, meta)
    return store.load_member(member.digest), True


def stored_member(store: ExplanationStore, member: Member) -> dict:
    """The member's entry, which this run has stored (by whichever process computed it)."""
    entry = store.load_member(member.digest)
    if entry is None:
        raise RuntimeError(f"{member.path}: its explanations are not in the store {store.run_dir} after every "
                           f"process finished (a process failed, or the store is not shared by all of them)")
    return entry


# ------------------------------------------------------------------------------------ scoring


def superpixel_valid(segments: np.ndarray, width: int) -> torch.Tensor:
    """bool [N, S]: which padded superpixel slots are real (ids run from 0 to the image's max)."""
    counts = torch.from_numpy(segments.reshape(len(segments), -1).max(1) + 1)
    return torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)


def valid_slots(shared: dict, rows: slice, kind: str, width: int) -> torch.Tensor | None:
    """``superpixel_valid`` of images ``rows`` for superpixel explanations; None for pixel maps."""
    return superpixel_valid(np.asarray(shared["segments"][rows]), width) if kind == "superpixel" else None


def stacked(entries: Sequence[dict], rows: slice) -> torch.Tensor:
    """The members' explanations of images ``rows``, as float64 [m, n, ...]."""
    return torch.stack([torch.from_numpy(np.array(entry["explanations"][rows], dtype=np.float64))
                        for entry in entries])


def similarities(entries: Sequence[dict], shared: dict, kind: str, options: dict,
                 leave_one_out: bool = False, members: Sequence[int] | None = None) -> torch.Tensor:
    """[m, N]: each member's similarity to the consensus, image slice by image slice."""
    chosen = [entries[i] for i in members] if members is not None else list(entries)
    parts = []
    for rows in _slices(len(chosen[0]["explanations"]), chosen[0]["explanations"]):
        explanations = stacked(chosen, rows)
        parts.append(core.member_similarities(explanations, kind, valid=valid_slots(shared, rows, kind,
                                                                                    explanations.shape[-1]),
                                              leave_one_out=leave_one_out, **options))
    return torch.cat(parts, dim=1)


def missing_counts(entries: Sequence[dict], shared: dict, kind: str) -> list[int]:
    """Per member, how many of its explanations are missing (``core.present``: non-finite,
    constant, or of an image without real superpixels), slice by slice."""
    counts = torch.zeros(len(entries), dtype=torch.long)
    for rows in _slices(len(entries[0]["explanations"]), entries[0]["explanations"]):
        explanations = stacked(entries, rows)
        counts += (~core.present(explanations, kind, valid_slots(shared, rows, kind, explanations.shape[-1]))).sum(1)
    return counts.tolist()


def paint(weights: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """[n, H, W] maps: each pixel takes its superpixel's weight."""
    return weights.gather(1, segments.flatten(1).long()).view(segments.shape)


def pixel_maps(explanations: torch.Tensor, shared: dict, rows: slice, kind: str,
               size: tuple[int, int]) -> torch.Tensor:
    """Explanations of images ``rows`` ([..., n, R, R] or [..., n, S]) as float64 maps
    [..., n, H, W] of ``size`` (the images')."""
    if kind == "superpixel":
        segments = torch.from_numpy(np.array(shared["segments"][rows]))
        flat = explanations.reshape(-1, *explanations.shape[-2:])
        return torch.stack([paint(w, segments) for w in flat]).view(*explanations.shape[:-1], *size)
    flat = explanations.reshape(-1, *explanations.shape[-2:]).float()
    return functional.upsample(flat, size).view(*explanations.shape[:-2], *size).double()


def display_maps(explanations: torch.Tensor, shared: dict, rows: slice, kind: str,
                 size: tuple[int, int]) -> torch.Tensor:
    """Non-negative maps to draw: LIME's positive weights, pixel maps as they are."""
    return pixel_maps(explanations, shared, rows, kind, size).clamp_min(0)


def consensus_of(explanations: torch.Tensor, shared: dict, rows: slice, kind: str, options: dict) -> torch.Tensor:
    """The consensus [n, ...] of the members' explanations [m, n, ...] of images ``rows``."""
    if kind == "superpixel":
        return core.superpixel_consensus(explanations, valid_slots(shared, rows, kind, explanations.shape[-1]),
                                         options["rule"])
    return core.pixel_consensus(explanations)


def _slices(total: int, *arrays) -> Iterator[slice]:
    """Slices of ``total`` images, each about ``SLICE_VALUES`` values of the largest per-image
    array a loop holds (``arrays``: ``[N, ...]``; a 224 px map is 12 times a 64 px one)."""
    per_image = max(int(np.prod(np.shape(array)[1:])) for array in arrays)
    step = max(1, SLICE_VALUES // per_image)
    return (slice(start, start + step) for start in range(0, total, step))


def _average_precisions(maps: torch.Tensor, masks: torch.Tensor) -> list[float]:
    return [average_precision(heat, mask) for heat, mask in zip(maps, masks)]


def localisation_scores(entries: Sequence[dict], shared: dict, kind: str,
                        settings: EvaluationSettings) -> dict[str, list[float]]:
    """Each member's PG, CH and mAP against the masks (from its stored explanations), one member
    and one slice of images at a time."""
    results: dict[str, list[float]] = {"pg": [], "ch": [], "map": []}
    for entry in entries:
        # Scored by one process (rank 0 of a sharded committee): nothing to gather from the others.
        pg = PointingGame(tolerance=settings.tolerance, tolerance_at=settings.tolerance_at, sync_on_compute=False)
        ch = ContentHeatmap(sync_on_compute=False)
        precisions: list[float] = []
        for rows in _slices(len(entry["explanations"]), entry["explanations"], shared["masks"]):
            masks = torch.from_numpy(np.array(shared["masks"][rows]))
            maps = pixel_maps(stacked([entry], rows), shared, rows, kind, tuple(masks.shape[-2:]))[0]
            positive = maps.clamp_min(0).float()  # PG and CH need non-negative maps
            pg.update(positive, masks)
            ch.update(positive, masks)
            precisions += _average_precisions(maps, masks)
        results["pg"].append(float(pg.compute()["pg"]))
        results["ch"].append(float(ch.compute()["ch"]))
        results["map"].append(float(np.nanmean(precisions)))
    return results


def consensus_map(entries: Sequence[dict], shared: dict, kind: str, options: dict,
                  members: Sequence[int] | None = None) -> float:
    """mAP against the masks of the consensus of ``members`` (default: all)."""
    chosen = [entries[i] for i in members] if members is not None else list(entries)
    values: list[float] = []
    for rows in _slices(len(chosen[0]["explanations"]), chosen[0]["explanations"], shared["masks"]):
        masks = torch.from_numpy(np.array(shared["masks"][rows]))
        consensus = consensus_of(stacked(chosen, rows), shared, rows, kind, options)
        values += _average_precisions(pixel_maps(consensus, shared, rows, kind, tuple(masks.shape[-2:])), masks)
    return float(np.nanmean(values))


def reference_map(shared: dict, settings: EvaluationSettings) -> dict[str, float]:
    """mAP against the masks of the reference maps on the same images: a centred peak, and uniform
    noise (``settings.noise_seeds`` maps per image, each seeded by ``settings.seed``, the image's
    position in the store and the map's number alone, as ``python -m evaluation`` seeds its trials)."""
    values: dict[str, list[float]] = {reference: [] for reference in REFERENCES}
    for rows in _slices(len(shared["labels"]), shared["masks"]):
        masks = torch.from_numpy(np.array(shared["masks"][rows]))
        count, (height, width) = len(masks), masks.shape[-2:]
        values["center"] += _average_precisions(centre_maps(count, height, width, masks.device), masks)
        images = torch.arange(rows.start, rows.start + count)
        for number in range(1, settings.noise_seeds + 1):
            noise = trial_noise_maps(settings.seed, map_seeds(images, number), height, width, masks.device)
            values["noise"] += _average_precisions(noise, masks)
    return {reference: float(np.nanmean(numbers)) for reference, numbers in values.items()}
