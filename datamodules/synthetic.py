"""The embedded synthetic data set (:mod:`datamodules.shapes`) as a datamodule."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from torchvision.transforms import v2

from .base import DATASETS, ClassificationDataModule, DataOptions
from .coco import CocoMaskDataset, load_coco
from .guidance import CocoTrainingMasks, coco_image_ids
from .imagefolder import ClassFolderDataset
from .images import TrialGeometry, to_float_image
from .shapes import SyntheticParams, generate_synthetic, is_complete, synthetic_dir

CONFIG_FILE = Path(__file__).resolve().parents[1] / "conf" / "data" / "synthetic.yaml"


def default_config() -> dict:
    """``conf/data/synthetic.yaml`` as a dict (unresolved: ``data_dir`` names Hydra's working
    directory), for code outside Hydra such as the benchmarks."""
    return OmegaConf.to_container(OmegaConf.load(CONFIG_FILE))


def generator_options() -> dict:
    """``object_scale`` and ``decoys`` of the default config, for code that builds small synthetic
    sets of its own size and count."""
    config = default_config()
    return {key: config[key] for key in ("object_scale", "decoys")}


class SyntheticOptions(SyntheticParams, DataOptions):
    """The synthetic ``data`` group: the generator's parameters and the loading options."""


@DATASETS.register("synthetic", SyntheticOptions)
class SyntheticDataModule(ClassificationDataModule):
    """Single-label, ``num_classes`` shapes; the generation parameters are :class:`SyntheticParams`.

    ``num_classes`` and ``class_names`` come from the config, so the model can be built before
    ``prepare_data`` (which generates the files, on one process per node) and ``setup``.
    """

    name = "synthetic"
    multilabel = False
    guidance_masks = "masks"

    def __init__(self, data_dir: str | Path, *, batch_size: int, num_workers: int, skip_corrupt: bool,
                 **params) -> None:
        """``params``: the fields of :class:`SyntheticParams`, which the generated files depend on."""
        self.params = SyntheticParams(**params)
        super().__init__(data_dir, image_size=self.params.image_size, batch_size=batch_size,
                         num_workers=num_workers, skip_corrupt=skip_corrupt)
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return self.params.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.params.class_names

    @property
    def dataset_dir(self) -> Path:
        return synthetic_dir(self.data_dir, self.params)

    @property
    def val_annotation_file(self) -> Path:
        return self.dataset_dir / "annotations" / "instances_val.json"

    def prepare_data(self) -> None:
        generate_synthetic(self.data_dir, self.params)

    def _build_localization_dataset(self, geometry: TrialGeometry) -> CocoMaskDataset:
        """Validation images with their object's exact mask (category id = class index + 1); under
        the standard protocol at their own size, which is already ``image_size``."""
        return CocoMaskDataset(self._split_dir("val"), self.val_annotation_file, range(1, self.num_classes + 1),
                               geometry, self.skip_corrupt)

    def _split_dir(self, split: str) -> Path:
        if not is_complete(self.dataset_dir, self.params):
            raise FileNotFoundError(
                f"synthetic data set not found or incomplete at {self.dataset_dir}: call prepare_data() first"
            )
        return self.dataset_dir / split

    def eval_geometry(self) -> list[v2.Transform]:
        # The files are image_size square already.
        return []

    def _build_val_dataset(self) -> ClassFolderDataset:
        return ClassFolderDataset(self._split_dir("val"), to_float_image(*self.eval_geometry()), self.skip_corrupt,
                                  class_names=self.class_names)

    def train_geometry(self) -> list[v2.Transform]:
        # Horizontal flips keep every shape in its class (an L mirrored is still the L class).
        return [v2.RandomHorizontalFlip()]

    def training_masks(self, dilation: float) -> CocoTrainingMasks:
        """The exact masks of the generated shapes (``annotations/instances_train.json``)."""
        train_set = self.train_set
        ann_file = self.dataset_dir / "annotations" / "instances_train.json"
        coco = load_coco(ann_file)
        return CocoTrainingMasks(coco, coco_image_ids(coco, train_set.keys(), ann_file),
                                 range(1, self.num_classes + 1), "masks", dilation)

    def _build_train_dataset(self) -> ClassFolderDataset:
        return ClassFolderDataset(self._split_dir("train"), to_float_image(*self.train_geometry()), self.skip_corrupt,
                                  class_names=self.class_names)
