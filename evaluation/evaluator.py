"""One evaluation pass of a network: accuracy, localisation (PG, SPG, CH), NQH and FGSM.

Shared by the checkpoint-evaluation script and the training callbacks, so both report the same
numbers. Each metric is a torchmetrics ``Metric``: under DDP every process evaluates its own
share of the images and ``compute()`` sums the counts over processes. Random draws (SPG's
points, the noise reference maps) are seeded per trial, by its index in the data set, so any
number of processes and any batch size give the numbers of one process. Results are fractions in
[0, 1]; only the human-facing reports print percent. Which images (:mod:`evaluation.sampling`)
and what is checked before (:mod:`evaluation.preflight`) live beside it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import Metric
from tqdm.auto import tqdm

from datamodules import ClassificationDataModule
from datamodules.images import size_buckets
from evaluation.composites import CompositeDataset, dataset_layout
from evaluation.explainers.base import Explainer as ExplainerMethod
from evaluation.metrics.functional import upsample
from evaluation.metrics.registry import COUNT_GROUPS, METRICS, family_members, results_of
from evaluation.references import REFERENCES, centre_maps, map_seeds, trial_noise_maps
from evaluation.sampling import Indexed, WithOthers, shard, shard_indices
from evaluation.settings import EvaluationSettings
from gcmodels.accuracy import accuracy_inputs

Explainer = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _batches(loader: DataLoader, device: torch.device, description: str, progress: bool):
    for batch in tqdm(loader, desc=description, disable=not progress, leave=False):
        if batch["image"].numel():
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class ExplanationEvaluator:
    """Accumulates the asked metrics for one network and one explainer.

    ``explainer(net, images, classes) -> heatmaps [B, h, w]``, or None when no metric explains
    (accuracy and FGSM only). NQH explains 2x2 composites whose distractors come from the whole
    validation set (``evaluation.composites``): the same composites whatever the batch size or the
    order of the files; images without one are counted. Every metric is built here, from
    ``settings``; one ``update_*`` method per metric family; :meth:`run` starts from a clean state,
    so one evaluator serves every epoch of a training run.
    """

    def __init__(self, explainer: Explainer | None, metrics: Sequence[str], num_classes: int, multilabel: bool,
                 settings: EvaluationSettings):
        # Registered names (the entry points' schemas check them).
        self.metrics = list(metrics)
        explained = [name for name in self.metrics if METRICS[name].explained]
        if explained and explainer is None:
            raise ValueError(f"metric(s) {explained} score explanations: give an explainer")
        # Gradient-free passes (LIME's) at the settings' precision; gradients stay in float32. A
        # plain function (a user's map, the tests' oracles) is used as it is.
        self.explainer = (explainer.at_precision(settings.precision) if isinstance(explainer, ExplainerMethod)
                          else explainer)
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.settings = settings
        self.state: dict[str, Metric] = {name: self._build(name) for name in self.metrics}
        # The same localisation and faithfulness metrics of the reference maps, on the same trials.
        referenced = family_members(self.metrics, "localization") + family_members(self.metrics, "faithfulness")
        self.references: dict[str, dict[str, Metric]] = {
            reference: {name: self._build(name) for name in referenced} for reference in REFERENCES
        } if referenced else {}

    def _build(self, name: str) -> Metric:
        return METRICS[name].build(self.settings, self.num_classes, self.multilabel)

    def _family(self, family: str) -> dict[str, Metric]:
        return {name: metric for name, metric in self.state.items() if METRICS[name].family == family}

    def _reference_family(self, family: str) -> dict[str, dict[str, Metric]]:
        """The reference maps' metrics of ``family``, per reference map."""
        return {reference: {name: metric for name, metric in metrics.items() if METRICS[name].family == family}
                for reference, metrics in self.references.items()}

    def reset(self) -> None:
        """Forget every update."""
        for metric in self._all_metrics():
            metric.reset()

    def _all_metrics(self) -> list[Metric]:
        return list(self.state.values()) + [m for metrics in self.references.values() for m in metrics.values()]

    def to(self, device: torch.device) -> ExplanationEvaluator:
        self.state = {name: metric.to(device) for name, metric in self.state.items()}
        self.references = {reference: {name: metric.to(device) for name, metric in metrics.items()}
                           for reference, metrics in self.references.items()}
        return self

    def update_accuracy(self, net, batch: dict) -> None:
        with torch.no_grad():
            logits = net(batch["image"])
        inputs = accuracy_inputs(logits, batch["target"])
        for metric in self._family("accuracy").values():
            metric.update(*inputs)

    def update_robustness(self, net, batch: dict) -> None:
        for metric in self._family("robustness").values():
            metric.update(net, batch["image"], batch["target"])

    def update_composites(self, net, batch: dict) -> None:
        """A batch of composites (``evaluation.composites.CompositeDataset``): explained for the
        class of the image in ``cell``."""
        heatmaps = self.explainer(net, batch["image"], batch["target"])
        for metric in self._family("composites").values():
            metric.update(heatmaps, batch["cell"])

    def _faithfulness_trials(self, batch: dict) -> dict:
        """The batch as trials: (image, labelled class) pairs, one per class present on multi-label
        data; ``seeds`` (image index, class) order each trial's tied pixels. The other images'
        maps explain their own class (multi-label: their first)."""
        targets, index = batch["target"], batch["index"]
        if self.multilabel:
            image, classes = targets.nonzero(as_tuple=True)
        else:
            image, classes = torch.arange(len(targets), device=targets.device), targets
        trials = {"images": batch["image"][image], "classes": classes, "index": index[image],
                  "seeds": torch.stack([index[image], classes], 1)}
        if "others" in batch:
            other_targets = batch["other_targets"]
            trials.update(others=batch["others"][image], other_index=batch["other_index"][image],
                          other_classes=(other_targets.argmax(-1) if self.multilabel else other_targets)[image])
        return trials

    def _maps(self, net, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The explainer's maps at the images' size."""
        return upsample(self.explainer(net, images, classes), images.shape[-2:])

    def update_faithfulness(self, net, batch: dict) -> None:
        """Insertion, deletion and ROAD of the explainer's maps, of the other images' maps on the
        same images (``"others"``, from :class:`evaluation.sampling.WithOthers`), and of the
        reference maps: the centred peak (the same map for every image, so its others score as it
        does) and the first uniform-noise map of each trial (the others': theirs)."""
        trials = self._faithfulness_trials(batch)
        images, classes, seeds = trials["images"], trials["classes"], trials["seeds"]
        if not len(images):
            return
        count, (height, width) = len(images), images.shape[-2:]
        maps, others = self._maps(net, images, classes), None
        if "others" in trials:
            others = self._maps(net, trials["others"].flatten(0, 1), trials["other_classes"].flatten())
            others = others.view(count, -1, height, width)
        for metric in self._family("faithfulness").values():
            metric.update(net, images, maps, classes, seeds, others)
        if not self.references:
            return
        centre = centre_maps(count, height, width, images.device)
        noise = trial_noise_maps(self.settings.seed, map_seeds(trials["index"], 1), height, width, images.device)
        reference_others = {"center": None, "noise": None}
        if others is not None:
            reference_others["center"] = centre.unsqueeze(1).expand_as(others)
            other_index = trials["other_index"].flatten()
            reference_others["noise"] = trial_noise_maps(self.settings.seed, map_seeds(other_index, 1), height, width,
                                                         images.device).view_as(others)
        references = self._reference_family("faithfulness")
        for reference, reference_maps in (("center", centre), ("noise", noise)):
            for metric in references[reference].values():
                metric.update(net, images, reference_maps, classes, seeds, reference_others[reference])

    def update_randomisation(self, net, batch: dict) -> None:
        """The randomisation test of the explainer on the batch's trials."""
        trials = self._faithfulness_trials(batch)
        if len(trials["images"]):
            for metric in self._family("randomisation").values():
                metric.update(net, self.explainer, trials["images"], trials["classes"])

    def update_localization(self, net, batch: dict) -> None:
        """The explainer's maps, and the reference maps, scored on the batch's trials (masks may be
        larger than the images: the authors' protocol scores at the original size). ``"index"``:
        the trials' indices in the data set, which seed their random draws."""
        masks, classes = batch["mask"], batch["target"]
        pointing = batch["pointing"] if "pointing" in batch else torch.ones_like(classes, dtype=torch.bool)
        # "difficult": the trials of a data set's difficult subset (VOC 2007's), where it has one.
        trials = {"classes": classes, "difficult": batch.get("difficult")}
        explained = {**trials, "seeds": map_seeds(batch["index"], 0)}  # the explainer's maps and the centred peak
        self._update_localization_metrics(self._family("localization"), self.explainer(net, batch["image"], classes),
                                          masks, explained, pointing)
        count, (height, width) = len(masks), masks.shape[-2:]
        references = self._reference_family("localization")
        if references and references["center"]:
            self._update_localization_metrics(references["center"],
                                              centre_maps(count, height, width, masks.device),
                                              masks, explained, pointing)
            for number in range(1, self.settings.noise_seeds + 1):  # one pooled mean over the maps
                seeds = map_seeds(batch["index"], number)
                noise = trial_noise_maps(self.settings.seed, seeds, height, width, masks.device)
                self._update_localization_metrics(references["noise"], noise, masks, {**trials, "seeds": seeds},
                                                  pointing)

    @staticmethod
    def _update_localization_metrics(metrics: dict[str, Metric], heatmaps: torch.Tensor, masks: torch.Tensor,
                                     trials: dict[str, torch.Tensor | None], pointing: torch.Tensor) -> None:
        """``pointing`` False: a trial scored only by the metrics that score every trial (CH; the
        authors' difficult-only images). Each metric takes the trial inputs it names of ``trials``
        (``trial_inputs``: PG counts per class and difficult subset, SPG seeds its draws per trial;
        None where the data has no such input)."""
        every = (heatmaps, masks, trials)
        # The pointing trials, selected once for every metric that needs them (masks may be large).
        pointed = every if pointing.all() else (heatmaps[pointing], masks[pointing],
                                                {key: None if value is None else value[pointing]
                                                 for key, value in trials.items()})
        for metric in metrics.values():
            maps, trial_masks, inputs = pointed if metric.pointing_only else every
            if len(maps):
                metric.update(maps, trial_masks, **{key: inputs[key] for key in metric.trial_inputs})

    def compute(self) -> dict:
        """Fractions in [0, 1]; ``skipped`` counts images left out (all-zero heatmap, empty mask);
        ``zero_maps_uniform`` (under ``evaluation.zero_maps=uniform`` only) the all-zero maps scored
        as uniform ones, per metric; ``<key>_center`` and ``<key>_noise``: the reference maps' scores
        on the same trials. FGSM: ``fgsm`` top-1 under attack and ``fgsm_success`` the attack's
        success rate among the images correct before it, both per eps, and ``fgsm_clean`` the clean
        top-1 of the same images."""
        results: dict = {"skipped": {}}
        for name, metric in self.state.items():
            for key, value in results_of(name, metric.compute()).items():
                if isinstance(value, dict):
                    results.setdefault(key, {}).update(value)
                else:
                    results[key] = value
        for reference, metrics in self.references.items():
            for name, metric in metrics.items():
                # Their counts are the explainer's (the same trials); their curves are kept.
                results.update({f"{key}_{reference}": value for key, value in results_of(name, metric.compute()).items()
                                if key not in COUNT_GROUPS.values()})
        return results

    def run(self, net, datamodule: ClassificationDataModule, max_images: int | None = None, rank: int = 0,
            world_size: int = 1, progress: bool = True, num_workers: int = 0) -> dict:
        """Evaluate ``net`` on ``datamodule``'s validation data (and its localisation trials), from a
        clean state."""
        device = next(net.parameters()).device
        self.reset()
        self.to(device)
        updates = {"accuracy": self.update_accuracy, "robustness": self.update_robustness}
        per_image = [update for family, update in updates.items() if self._family(family)]
        localization = bool(self._family("localization"))

        def loader(dataset: Dataset, batch_size: int = self.settings.batch_size) -> DataLoader:
            return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                              collate_fn=datamodule.collate_fn)

        was_training = net.training
        net.eval()
        try:
            val_set = datamodule.val_dataset()
            if per_image:
                for batch in _batches(loader(shard(val_set, rank, world_size, max_images)), device,
                                      "classification, FGSM", progress):
                    for update in per_image:
                        update(net, batch)
            composite_metrics = self._family("composites")
            if composite_metrics:
                indices = shard_indices(len(val_set), rank, world_size, max_images)
                layout = dataset_layout(val_set.label_sets(), val_set.keys(), indices, self.settings.seed)
                for metric in composite_metrics.values():
                    metric.count_without_composite(int((~layout.valid).sum()))
                # A composite has 4 images' pixels: a quarter batch of them holds no more than the
                # batch the user sized.
                composites = loader(CompositeDataset(val_set, layout), max(1, self.settings.batch_size // 4))
                for batch in _batches(composites, device, "composites", progress):
                    self.update_composites(net, batch)
            image_updates = {"faithfulness": self.update_faithfulness, "randomisation": self.update_randomisation}
            explained_images = [update for family, update in image_updates.items() if self._family(family)]
            if explained_images:
                count = self.settings.other_images if self._family("faithfulness") else 0
                dataset = Subset(WithOthers(val_set, count, self.settings.seed),
                                 shard_indices(len(val_set), rank, world_size, max_images))
                # Each image brings its K others: a batch of (K + 1) times fewer holds as many images.
                for batch in _batches(loader(dataset, max(1, self.settings.batch_size // (count + 1))), device,
                                      "faithfulness", progress):
                    for update in explained_images:
                        update(net, batch)
            if localization:
                trials = datamodule.localization_dataset(self.settings.trial_geometry)
                if trials is None:
                    raise ValueError(f"data {datamodule.name!r} has no localisation trials (masks or boxes)")
                indices = shard_indices(len(trials), rank, world_size, max_images)
                if self.settings.protocol == "authors":
                    # Images keep their aspect: a batch holds trials of one original size.
                    sizes = trials.sizes()
                    batches = [[indices[i] for i in bucket]
                               for bucket in size_buckets([sizes[i] for i in indices], self.settings.batch_size)]
                    trial_loader = DataLoader(Indexed(trials), batch_sampler=batches, num_workers=num_workers,
                                              collate_fn=datamodule.collate_fn)
                else:
                    trial_loader = loader(Subset(Indexed(trials), indices))
                for batch in _batches(trial_loader, device, "localisation", progress):
                    self.update_localization(net, batch)
            results = self.compute()
            if localization:
                # Counted over the whole validation set (ImageNet's box files); not sharded.
                for key in ("skipped_difficult", "skipped_no_box"):
                    if hasattr(trials, key):
                        results["skipped"][key] = int(getattr(trials, key))
            return results
        except torch.OutOfMemoryError as err:
            # The batch defaults to the data's training batch, which explanations at the authors'
            # 448 px may not fit: say which key sizes it.
            raise torch.OutOfMemoryError(
                f"out of memory evaluating {self.settings.batch_size} images per batch (protocol "
                f"{self.settings.protocol}): lower evaluation.batch_size. {err}") from err
        finally:
            net.train(was_training)
