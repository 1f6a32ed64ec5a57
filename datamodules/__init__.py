"""LightningDataModules for the embedded synthetic data, ImageNet and COCO, and their readers."""

from .coco import COCODataModule
from .imagenet import ImageNetDataModule
from .readers import (
    IMAGE_EXTENSIONS,
    ClassFolderDataset,
    CocoMultiLabelDataset,
    CorruptImageError,
    IlsvrcBoxes,
    coco_masks,
    collate_skipping_corrupt,
    list_class_folders,
    load_coco,
    load_rgb,
    read_ilsvrc_boxes,
)
from .synthetic import SyntheticDataModule, SyntheticParams, generate_synthetic

__all__ = [
    "COCODataModule",
    "ClassFolderDataset",
    "CocoMultiLabelDataset",
    "CorruptImageError",
    "IMAGE_EXTENSIONS",
    "IlsvrcBoxes",
    "ImageNetDataModule",
    "SyntheticDataModule",
    "SyntheticParams",
    "coco_masks",
    "collate_skipping_corrupt",
    "generate_synthetic",
    "list_class_folders",
    "load_coco",
    "load_rgb",
    "read_ilsvrc_boxes",
]
