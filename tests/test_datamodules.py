"""Tests of datamodules/: readers of the on-disk formats, the synthetic generator, the datamodules."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pydantic import ValidationError
from torch.utils.data import DataLoader
from torchvision import transforms

import datamodules.coco as coco_data
import datamodules.images
from datamodules import (
    DATASETS,
    COCODataModule,
    ImageNetDataModule,
    SyntheticDataModule,
    build_datamodule,
)
from datamodules.coco import CocoMaskDataset, CocoMultiLabelDataset, coco_masks, load_coco
from datamodules.imagefolder import ClassFolderDataset
from datamodules.imagenet import BoxMaskDataset, read_ilsvrc_boxes
from datamodules.images import CorruptImageError, TrialGeometry, collate_samples
from datamodules.shapes import MAX_CLASSES, MIN_IMAGE_SIZE, MIN_OBJECT_PIXELS, SyntheticParams, generate_synthetic
from gcmodels.options import ConfigError

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"
SMALL = dict(num_classes=3, image_size=48, train_per_class=4, val_per_class=2, object_scale=(0.3, 0.5), decoys=(1, 2),
             context_bias=0.0, seed=0)
LOADING = dict(batch_size=4, num_workers=0, skip_corrupt=False)


def generate(root: Path, **overrides) -> Path:
    """The synthetic data set with SMALL's parameters, some replaced."""
    return generate_synthetic(root, SyntheticParams(**{**SMALL, **overrides}))


def synthetic_module(data_dir: Path, **overrides) -> SyntheticDataModule:
    return SyntheticDataModule(data_dir, **{**SMALL, **LOADING, **overrides})


def imagenet_module(data_dir: Path, **overrides) -> ImageNetDataModule:
    return ImageNetDataModule(data_dir, **{**LOADING, "image_size": 32, "box_dir": None, **overrides})


def coco_module(data_dir: Path, **overrides) -> COCODataModule:
    splits = dict(train_split="train2017", val_split="val2017", val_transform="center_crop")
    return COCODataModule(data_dir, **{**LOADING, "image_size": 32, **splits, **overrides})


def write_image(path: Path, size=(40, 30), color=(200, 30, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def esc(path: Path) -> str:
    """A path as a regular expression for pytest.raises(match=...)."""
    return re.escape(str(path))


def read_json(path: Path):
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- synthetic generator


def test_generation_is_deterministic_and_seed_dependent(tmp_path):
    first = generate(tmp_path / "a", context_bias=0.5, seed=1)
    second = generate(tmp_path / "b", context_bias=0.5, seed=1)
    other = generate(tmp_path / "c", context_bias=0.5, seed=2)

    hashes = file_hashes(first)
    assert len([name for name in hashes if name.endswith(".png")]) == 3 * (4 + 2)
    assert {"meta.json", "annotations/instances_train.json", "annotations/instances_val.json"} <= set(hashes)
    assert hashes == file_hashes(second)
    assert first.name == second.name != other.name  # the directory name hashes the parameters
    other_hashes = file_hashes(other)
    pngs = [name for name in hashes if name.endswith(".png")]
    assert all(hashes[name] != other_hashes[name] for name in pngs)


def test_generation_is_idempotent_and_redoes_an_incomplete_directory(tmp_path):
    directory = generate(tmp_path)
    image = directory / "train" / "class_00_circle" / "00000.png"
    stamp = image.stat().st_mtime_ns
    assert generate(tmp_path) == directory
    assert image.stat().st_mtime_ns == stamp  # not rewritten

    expected = file_hashes(directory)
    (directory / "meta.json").unlink()  # as if generation had been interrupted
    image.unlink()
    assert generate(tmp_path) == directory
    assert file_hashes(directory) == expected
    assert [p.name for p in tmp_path.iterdir()] == [directory.name]  # no staging directory left


@pytest.mark.parametrize("split", ["train", "val"])
def test_annotation_masks_are_exact(tmp_path, split):
    directory = generate(tmp_path, context_bias=1.0)
    coco = load_coco(directory / "annotations" / f"instances_{split}.json")
    assert [cat["id"] for cat in coco.dataset["categories"]] == [1, 2, 3]
    for ann in coco.dataset["annotations"]:
        info = coco.imgs[ann["image_id"]]
        pixels = np.asarray(Image.open(directory / split / info["file_name"]))
        mask = coco.annToMask(ann).astype(bool)
        rows, cols = np.nonzero(mask)
        assert mask.shape == pixels.shape[:2] == (48, 48)
        assert rows.size == ann["area"] > 0
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert ann["bbox"] == [cols.min(), rows.min(), width, height]
        assert (pixels[mask] == ann["color"]).all()
        # Exact both ways: no pixel of the object's colour lies outside the mask either.
        assert ((pixels == ann["color"]).all(-1) == mask).all()
        # The class is in the folder name and the category: they agree.
        assert info["file_name"].split("/")[0] == coco.cats[ann["category_id"]]["name"]


def test_every_shape_renders_distinct_masks_at_the_minimum_size(tmp_path):
    smallest = MIN_OBJECT_PIXELS / MIN_IMAGE_SIZE
    directory = generate(tmp_path, num_classes=MAX_CLASSES, image_size=MIN_IMAGE_SIZE, train_per_class=1,
                         val_per_class=1, object_scale=(smallest, smallest))
    coco = load_coco(directory / "annotations" / "instances_val.json")
    masks = [coco.annToMask(ann) for ann in coco.dataset["annotations"]]
    assert len(masks) == MAX_CLASSES and all(mask.any() for mask in masks)
    # Normalise away position and scale: crop to the box and resize; the shapes must differ.
    signatures = set()
    for mask in masks:
        rows, cols = np.nonzero(mask)
        crop = Image.fromarray(mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] * 255)
        signatures.add(np.asarray(crop.resize((12, 12), Image.Resampling.NEAREST)).tobytes())
    assert len(signatures) == MAX_CLASSES


def test_context_cue_is_in_every_biased_train_image_and_never_in_val(tmp_path):
    biased = generate(tmp_path, context_bias=1.0)
    unbiased = generate(tmp_path, context_bias=0.0)

    train = read_json(biased / "annotations" / "instances_train.json")
    boxes = {ann["image_id"]: ann["bbox"] for ann in train["annotations"]}
    cue_colors = set()
    for info in train["images"]:
        cue = info["context_cue"]
        x, y, w, h = cue["box"]
        pixels = np.asarray(Image.open(biased / "train" / info["file_name"]))
        assert (pixels[y : y + h, x : x + w] == cue["color"]).all()
        bx, by, bw, bh = boxes[info["id"]]
        assert x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y  # outside the object
        cue_colors.add((info["file_name"].split("/")[0], tuple(cue["color"])))
        # The cue is drawn last from the same random stream: without it the image is the same.
        plain = np.asarray(Image.open(unbiased / "train" / info["file_name"])).copy()
        plain[y : y + h, x : x + w] = cue["color"]
        assert (plain == pixels).all()
    assert len(cue_colors) == 3  # one colour per class

    for directory, split in ((biased, "val"), (unbiased, "train"), (unbiased, "val")):
        images = read_json(directory / "annotations" / f"instances_{split}.json")["images"]
        assert all(info["context_cue"] is None for info in images)


def synthetic_config(tmp_path: Path, **overrides) -> dict:
    """The synthetic ``data`` group with SMALL's parameters, some replaced."""
    return {"name": "synthetic", "data_dir": str(tmp_path), **SMALL, **LOADING, **overrides}


def test_synthetic_params_validate_on_construction():
    # generate_synthetic is also called without a config (tests, scripts): the parameters refuse
    # what the schema refuses, and equal values name the same data set (the directory hashes them).
    with pytest.raises(ValidationError):
        SyntheticParams(**{**SMALL, "num_classes": MAX_CLASSES + 1})
    assert (SyntheticParams(**{**SMALL, "context_bias": 1}).digest
            == SyntheticParams(**{**SMALL, "context_bias": 1.0}).digest)
    assert SyntheticParams(**{**SMALL, "object_scale": [0.3, 0.5]}) == SyntheticParams(**SMALL)


def test_a_nan_context_bias_is_refused(tmp_path):
    with pytest.raises(ConfigError) as error:
        DATASETS.validate(synthetic_config(tmp_path, context_bias=float("nan")))
    assert error.value.keys == ["data.context_bias"]


@pytest.mark.parametrize("key, value", [
    ("object_scale", (0.5, 0.3)),  # [smallest, largest]
    ("object_scale", (0.2, 0.5)),  # 9.6 px objects at image_size=48: below MIN_OBJECT_PIXELS
    ("decoys", (2, 1)),  # [fewest, most]
])
def test_object_scale_and_decoys_are_ordered_and_objects_drawable(tmp_path, key, value):
    with pytest.raises(ConfigError) as error:
        DATASETS.validate(synthetic_config(tmp_path, **{key: value}))
    assert error.value.keys == [f"data.{key}"]
    # A larger image makes the same scale drawable.
    if value == (0.2, 0.5):
        DATASETS.validate(synthetic_config(tmp_path, object_scale=value, image_size=80))


def test_objects_sit_anywhere(tmp_path):
    directory = generate(tmp_path, image_size=64, train_per_class=40, val_per_class=1, object_scale=(0.22, 0.5),
                         decoys=(3, 3))
    train = read_json(directory / "annotations" / "instances_train.json")
    boxes = np.array([ann["bbox"] for ann in train["annotations"]])
    sides = np.maximum(boxes[:, 2], boxes[:, 3])
    assert sides.min() >= 0.22 * 64 - 1 and sides.max() <= 0.5 * 64 + 1  # PIL draws the end pixel too
    # Positions cover the image, borders included (not only near the centre).
    assert (boxes[:, 0] == 0).any() or (boxes[:, 1] == 0).any()
    centres = boxes[:, :2] + boxes[:, 2:] / 2
    assert centres.min() < 16 and centres.max() > 48


def test_decoys_are_textured_and_stay_clear_of_the_object():
    """On a blank image, whatever the decoys paint lies outside the object's box grown by 2 px; a
    single decoy has exactly two colours, far apart in every channel (never a near-solid square)."""
    from datamodules.shapes import _draw_decoys

    for seed in range(20):
        rng = np.random.default_rng(seed)
        left, top, side = int(rng.integers(0, 32)), int(rng.integers(0, 32)), 30
        for count in (1, 3):
            pixels = np.zeros((64, 64, 3), np.uint8)
            _draw_decoys(rng, pixels, (left, top, side), count)
            changed = np.argwhere((pixels != 0).any(-1))
            assert not ((changed[:, 1] >= left - 2) & (changed[:, 1] < left + side + 2)
                        & (changed[:, 0] >= top - 2) & (changed[:, 0] < top + side + 2)).any()
            if count == 1 and len(changed):
                rows, cols = changed.min(0), changed.max(0) + 1
                colours = np.unique(pixels[rows[0]:cols[0], rows[1]:cols[1]].reshape(-1, 3), axis=0).astype(int)
                assert len(colours) == 2
                gap = np.abs(colours[0] - colours[1])
                assert (np.minimum(gap, 256 - gap) >= 64).all()


def test_a_centred_peak_points_at_the_object_in_at_most_half_of_the_default_validation_images(tmp_path):
    """Issue 9: the default synthetic validation set does not reward a centre prior (TorchRay's
    centre baseline with the pointing game's tolerance), while uniform noise scores far lower."""
    from evaluation.metrics.classes import PointingGame
    from evaluation.references import centre_maps, trial_noise_maps

    config = OmegaConf.to_container(OmegaConf.load(CONF_DATA / "synthetic.yaml"))
    # Validation images do not depend on the training set's size: one training image per class.
    module = synthetic_module(tmp_path, **{key: config[key] for key in (
        "num_classes", "image_size", "val_per_class", "object_scale", "decoys", "context_bias", "seed")},
        train_per_class=1)
    module.prepare_data()
    trials = module.localization_dataset()
    masks = torch.stack([trials[i]["mask"] for i in range(len(trials))])
    assert len(masks) == config["num_classes"] * config["val_per_class"]
    size = config["image_size"]
    centre, noise = PointingGame(tolerance=15, tolerance_at=224), PointingGame(tolerance=15, tolerance_at=224)
    centre.update(centre_maps(len(masks), size, size, "cpu"), masks)
    noise.update(trial_noise_maps(0, torch.arange(len(masks)), size, size, "cpu"), masks)
    assert 0.3 < centre.compute()["pg"] <= 0.5
    assert noise.compute()["pg"] < 0.25


def test_synthetic_datamodule_end_to_end(tmp_path):
    module = synthetic_module(tmp_path, context_bias=0.5, batch_size=5)
    assert module.num_classes == 3 and not module.multilabel  # known before any file exists
    assert module.name == "synthetic"
    assert module.class_names == ["class_00_circle", "class_01_square", "class_02_triangle"]
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        module.setup("fit")

    module.prepare_data()
    module.setup("fit")
    assert module.val_annotation_file.is_file()
    assert module.val_annotation_file.parent.parent == module.dataset_dir
    assert len(module.train_set) == 12 and len(module.val_set) == 6
    for loader, size in ((module.train_dataloader(), 5), (module.val_dataloader(), 5)):
        batch = next(iter(loader))
        assert batch["image"].shape == (size, 3, 48, 48) and batch["image"].dtype == torch.float32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["target"].dtype == torch.int64 and batch["target"].shape == (size,)
        assert ((batch["target"] >= 0) & (batch["target"] < 3)).all()
        assert batch["skipped"] == 0
    # Val labels follow the folders, in config order.
    assert [label for _, label in module.val_set.samples] == [0, 0, 1, 1, 2, 2]


# --------------------------------------------------------------------------- ImageFolder reader


def test_class_folder_dataset_reads_labels_and_decodes_through_load_rgb(tmp_path, monkeypatch):
    write_image(tmp_path / "cat" / "1.png", color=(255, 0, 0))
    write_image(tmp_path / "cat" / "2.JPEG", color=(0, 0, 255))
    write_image(tmp_path / "ant" / "nested" / "3.jpg")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()  # hidden folders are not classes

    calls = []
    original = datamodules.images.load_rgb
    monkeypatch.setattr(datamodules.images, "load_rgb", lambda path: calls.append(path) or original(path))
    dataset = ClassFolderDataset(tmp_path, transforms.ToTensor(), skip_corrupt=False)
    assert dataset.classes == ["ant", "cat"] and dataset.num_classes == 2
    samples = [(path.name, label) for path, label in dataset.samples]
    assert samples == [("3.jpg", 0), ("1.png", 1), ("2.JPEG", 1)]
    sample = dataset[1]
    assert sample["target"].dtype == torch.int64 and sample["target"].item() == 1
    assert sample["image"].shape == (3, 30, 40) and sample["image"].dtype == torch.float32
    assert torch.allclose(sample["image"][:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert calls == [tmp_path / "cat" / "1.png"]


def test_class_folder_dataset_uses_given_class_names(tmp_path):
    write_image(tmp_path / "b" / "1.png")
    dataset = ClassFolderDataset(tmp_path, transforms.ToTensor(), skip_corrupt=False, class_names=["a", "b", "c"])
    assert dataset.num_classes == 3 and dataset.samples[0][1] == 1
    with pytest.raises(ValueError, match=r"\['b'\].*" + esc(tmp_path)):
        ClassFolderDataset(tmp_path, transforms.ToTensor(), skip_corrupt=False, class_names=["a"])


def test_class_folder_dataset_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=esc(missing)):
        ClassFolderDataset(missing, transforms.ToTensor(), skip_corrupt=False)
    with pytest.raises(ValueError, match=f"no class folders.*{esc(tmp_path)}"):
        ClassFolderDataset(tmp_path, transforms.ToTensor(), skip_corrupt=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"no image files.*{esc(tmp_path)}"):
        ClassFolderDataset(tmp_path, transforms.ToTensor(), skip_corrupt=False)


def corrupt_tree(root: Path) -> tuple[Path, Path]:
    """Two good images, a garbage .png and a truncated .png (valid header, cut pixel data)."""
    write_image(root / "a" / "0.png")
    write_image(root / "a" / "1.png")
    garbage = root / "a" / "2.png"
    garbage.write_bytes(b"this is not an image")
    truncated = root / "b" / "3.png"
    noisy = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    truncated.parent.mkdir()
    Image.fromarray(noisy).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    return garbage, truncated


def test_corrupt_images_raise_an_error_naming_the_file(tmp_path):
    garbage, truncated = corrupt_tree(tmp_path)
    dataset = ClassFolderDataset(tmp_path, transforms.ToTensor(), skip_corrupt=False)
    for index, path in ((2, garbage), (3, truncated)):
        with pytest.raises(CorruptImageError, match=f"corrupt image file {esc(path)}"):
            dataset[index]


def test_a_missing_file_is_not_skipped_as_corrupt(tmp_path):
    path = write_image(tmp_path / "a" / "0.png")
    dataset = ClassFolderDataset(tmp_path, transforms.ToTensor(), skip_corrupt=True)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=esc(path)):
        dataset[0]


def test_skip_corrupt_drops_bad_files_from_the_batch(tmp_path):
    corrupt_tree(tmp_path)
    dataset = ClassFolderDataset(tmp_path, transforms.ToTensor(), skip_corrupt=True)
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=collate_samples))
    assert batches[0]["image"].shape == (2, 3, 30, 40) and batches[0]["skipped"] == 0
    assert batches[0]["target"].tolist() == [0, 0]
    # Both files of the second batch are corrupt: an empty batch that says so.
    assert batches[1]["image"].numel() == 0 and batches[1]["target"].numel() == 0
    assert batches[1]["skipped"] == 2

    mixed = list(DataLoader(dataset, batch_size=4, collate_fn=collate_samples))
    assert mixed[0]["image"].shape == (2, 3, 30, 40) and mixed[0]["skipped"] == 2


# --------------------------------------------------------------------------- COCO reader

CATEGORY_IDS = [1, 5, 90]


def rle_of_box(height, width, x, y, w, h) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_coco_split(root: Path, split: str, categories=CATEGORY_IDS) -> Path:
    """Images 1-3 annotated, image 4 without annotations; 30x40 images."""
    for image_id in range(1, 5):
        write_image(root / split / f"{image_id:012d}.jpg")
    annotations = [
        # image 1: category 1 twice (union mask) and category 90
        (1, 1, {"segmentation": rle_of_box(30, 40, 0, 0, 5, 5)}),
        (1, 1, {"segmentation": rle_of_box(30, 40, 20, 10, 4, 3)}),
        (1, 90, {"segmentation": [[10.0, 10.0, 20.0, 10.0, 20.0, 20.0, 10.0, 20.0]]}),
        # image 2: only category 5; image 3: a crowd of category 90, in uncompressed RLE as COCO
        # stores crowds (no zeros, then 1200 ones: the whole image)
        (2, 5, {"segmentation": rle_of_box(30, 40, 1, 1, 2, 2)}),
        (3, 90, {"segmentation": {"size": [30, 40], "counts": [0, 30 * 40]}, "iscrowd": 1}),
    ]
    data = {
        "images": [
            {"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30} for i in range(1, 5)
        ],
        "annotations": [
            {"id": n, "image_id": image_id, "category_id": cat, "iscrowd": 0, **extra}
            for n, (image_id, cat, extra) in enumerate(annotations, start=1)
        ],
        "categories": [{"id": cat, "name": f"cat{cat}"} for cat in categories],
    }
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(data))
    return ann_file


def test_coco_multilabel_targets_and_masks(tmp_path):
    ann_file = write_coco_split(tmp_path, "val2017")
    dataset = CocoMultiLabelDataset(tmp_path / "val2017", ann_file, transforms.ToTensor(), skip_corrupt=False)
    assert dataset.classes == ["cat1", "cat5", "cat90"] and dataset.num_classes == 3
    assert dataset.image_ids == [1, 2, 3]  # image 4 has no annotation: dropped
    targets = [dataset[i]["target"].tolist() for i in range(3)]
    assert targets == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    sample = dataset[0]
    assert sample["target"].dtype == torch.float32 and sample["image"].shape == (3, 30, 40)

    masks = coco_masks(dataset.coco, 1, dataset.category_ids)
    assert sorted(masks) == [0, 2]
    expected = np.zeros((30, 40), dtype=bool)
    expected[0:5, 0:5] = expected[10:13, 20:24] = True
    assert masks[0].dtype == bool and (masks[0] == expected).all()
    assert masks[2][12:19, 12:19].all() and not masks[2][:9].any()  # the polygon's inside
    assert coco_masks(dataset.coco, 3, {2: 90})[2].all()  # crowd included; explicit mapping


def test_coco_errors_name_the_file(tmp_path):
    ann_file = write_coco_split(tmp_path, "val2017")
    with pytest.raises(FileNotFoundError, match=esc(tmp_path / "nowhere")):
        CocoMultiLabelDataset(tmp_path / "nowhere", ann_file, transforms.ToTensor(), skip_corrupt=False)
    with pytest.raises(FileNotFoundError, match=esc(tmp_path / "none.json")):
        load_coco(tmp_path / "none.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=f"malformed COCO annotation file {esc(broken)}"):
        load_coco(broken)
    broken.write_text('{"images": []}')
    with pytest.raises(ValueError, match=f"{esc(broken)} lacks the key"):
        load_coco(broken)


# --------------------------------------------------------------------------- ILSVRC boxes

ILSVRC_XML = """<annotation>
  <folder>n01440764</folder><filename>n01440764_18</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  <object><name>n01440764</name><difficult>0</difficult>
    <bndbox><xmin>10</xmin><ymin>20</ymin><xmax>300</xmax><ymax>200</ymax></bndbox></object>
  <object><name>n01440764</name><difficult>1</difficult>
    <bndbox><xmin>5.0</xmin><ymin>6</ymin><xmax>7</xmax><ymax>8</ymax></bndbox></object>
</annotation>"""


def test_read_ilsvrc_boxes(tmp_path):
    path = tmp_path / "n01440764_18.xml"
    path.write_text(ILSVRC_XML)
    boxes, width, height = read_ilsvrc_boxes(path)
    assert (width, height) == (500, 375)
    assert boxes == [
        {"name": "n01440764", "box": (10, 20, 300, 200), "difficult": False},
        {"name": "n01440764", "box": (5, 6, 7, 8), "difficult": True},
    ]

    path.write_text(ILSVRC_XML[:200])
    with pytest.raises(ValueError, match=f"malformed box annotation file {esc(path)}"):
        read_ilsvrc_boxes(path)
    path.write_text(ILSVRC_XML.replace("<xmax>300</xmax>", ""))
    with pytest.raises(ValueError, match=f"{esc(path)}: missing <bndbox/xmax>"):
        read_ilsvrc_boxes(path)


# --------------------------------------------------------------------------- ImageNet and COCO


def imagenet_tree(root: Path, val_classes=("n01", "n02")) -> Path:
    for split, classes in (("train", ("n01", "n02")), ("val", val_classes)):
        for wnid in classes:
            for i in range(2):
                write_image(root / split / wnid / f"{wnid}_{i}.JPEG")
    return root


def test_imagenet_datamodule_batches(tmp_path):
    module = imagenet_module(imagenet_tree(tmp_path), batch_size=3)
    assert module.num_classes == 2 and module.class_names == ["n01", "n02"] and not module.multilabel
    assert module.name == "imagenet"
    module.setup("fit")
    for loader in (module.train_dataloader(), module.val_dataloader(), module.test_dataloader()):
        batch = next(iter(loader))
        assert batch["image"].shape == (3, 3, 32, 32) and batch["target"].dtype == torch.int64
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_imagenet_datamodule_errors(tmp_path):
    module = imagenet_module(imagenet_tree(tmp_path, val_classes=("n01", "n03")))
    with pytest.raises(ValueError, match=r"class folder\(s\) \['n03'\] of .*val are not among the training classes"):
        module.setup("fit")
    # A validation set that lacks some classes is fine (a part of ImageNet val): indices still agree.
    module = imagenet_module(imagenet_tree(tmp_path / "part", val_classes=("n02",)))
    assert module.val_dataset().classes == ["n01", "n02"] and module.val_dataset().samples[0][1] == 1
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"data\\.data_dir: directory not found: {esc(missing)}"):
        _ = imagenet_module(missing).num_classes  # the property reads the directory


def test_coco_datamodule_batches(tmp_path):
    write_coco_split(tmp_path, "train2017")
    write_coco_split(tmp_path, "val2017")
    module = coco_module(tmp_path, batch_size=3)
    assert module.multilabel and module.num_classes == 3  # read from the val annotations
    assert module.name == "coco"
    module.setup("fit")
    for loader in (module.train_dataloader(), module.val_dataloader()):
        batch = next(iter(loader))
        assert batch["image"].shape == (3, 3, 32, 32)
        assert batch["target"].shape == (3, 3) and batch["target"].dtype == torch.float32


def test_coco_datamodule_rejects_mismatched_categories(tmp_path):
    write_coco_split(tmp_path, "train2017", categories=[1, 5, 90, 91])
    write_coco_split(tmp_path, "val2017")
    module = coco_module(tmp_path)
    with pytest.raises(ValueError, match=r"categories of .*instances_train2017\.json differ"):
        module.setup("fit")


# --------------------------------------------------------------------------- the datamodule interface


def test_datamodules_are_registered_under_their_config_name():
    assert DATASETS.names() == ["coco", "cub", "folder", "imagenet", "synthetic", "voc2007"]
    for name in DATASETS.names():
        cls = DATASETS[name].target
        assert cls.name == name and isinstance(cls.multilabel, bool)
    assert DATASETS["coco"].target.multilabel and not DATASETS["imagenet"].target.multilabel


@pytest.mark.parametrize("name", ["synthetic", "imagenet", "coco", "folder", "cub", "voc2007"])
def test_every_data_config_builds_its_datamodule(tmp_path, name):
    config = OmegaConf.load(CONF_DATA / f"{name}.yaml")
    assert "monitor" not in config  # derived from multilabel, not a constructor argument
    config.data_dir = str(tmp_path)  # the synthetic one names Hydra's working directory
    values = OmegaConf.to_container(config, resolve=True)
    DATASETS.validate(values)
    module = build_datamodule(values)
    assert type(module) is DATASETS[name].target
    assert module.batch_size == config.batch_size and module.num_workers == config.num_workers
    if name == "synthetic":  # the yaml's values are the data set's, no default of the code's
        assert module.params == SyntheticParams(
            **{key: config[key] for key in ("num_classes", "image_size", "train_per_class", "val_per_class",
                                            "object_scale", "decoys", "context_bias", "seed")}
        )


def test_the_data_schema_names_the_refused_key(tmp_path):
    config = synthetic_config(tmp_path)
    DATASETS.validate(config)
    with pytest.raises(ConfigError) as error:
        DATASETS.validate({**config, "name": "mnist"})
    assert error.value.keys == ["data.name"]
    with pytest.raises(ConfigError) as error:
        DATASETS.validate({key: value for key, value in config.items() if key != "seed"})
    assert error.value.keys == ["data.seed"]  # no default fills in for a key the config lacks
    with pytest.raises(ConfigError) as error:
        DATASETS.validate({**config, "monitor": "val/acc"})  # derived from multilabel, no data option
    assert error.value.keys == ["data.monitor"]
    assert not any(tmp_path.iterdir())


def test_localization_dataset_of_each_datamodule(tmp_path, monkeypatch):
    synthetic = synthetic_module(tmp_path / "synthetic")
    synthetic.prepare_data()
    trials = synthetic.localization_dataset()
    assert isinstance(trials, CocoMaskDataset) and len(trials) == 3 * 2  # one object per val image
    assert trials[0]["image"].shape == (3, 48, 48) and trials[0]["mask"].shape == (48, 48)

    write_coco_split(tmp_path / "coco", "train2017")
    write_coco_split(tmp_path / "coco", "val2017")
    loads = []
    monkeypatch.setattr(coco_data, "load_coco", lambda path: loads.append(path) or load_coco(path))
    trials = coco_module(tmp_path / "coco").localization_dataset()
    assert isinstance(trials, CocoMaskDataset) and len(trials) == 4  # (image, class) pairs
    assert loads == [tmp_path / "coco" / "annotations" / "instances_val2017.json"]  # one index for both sets
    assert trials[0]["image"].shape == (3, 32, 32) and trials[0]["mask"].shape == (32, 32)

    imagenet_tree(tmp_path / "imagenet")
    assert imagenet_module(tmp_path / "imagenet").localization_dataset() is None  # no box_dir
    box_dir = tmp_path / "boxes"
    for wnid in ("n01", "n02"):
        for i in range(2):
            write_boxes(box_dir / f"{wnid}_{i}.xml", [(wnid, False)])
    trials = imagenet_module(tmp_path / "imagenet", box_dir=box_dir).localization_dataset()
    assert isinstance(trials, BoxMaskDataset) and len(trials) == 4
    assert trials[0]["image"].shape == (3, 32, 32) and trials[0]["mask"].shape == (32, 32)


def test_collate_fn_stacks_masks_and_drops_corrupt_trials(tmp_path):
    module = synthetic_module(tmp_path, skip_corrupt=True)
    module.prepare_data()
    corrupt = module.dataset_dir / "val" / module.class_names[1] / "00000.png"
    corrupt.write_bytes(b"not a png")
    trials = module.localization_dataset()
    batch = next(iter(DataLoader(trials, batch_size=len(trials), collate_fn=module.collate_fn)))
    assert batch["skipped"] == 1
    assert batch["image"].shape == (5, 3, 48, 48) and batch["mask"].shape == (5, 48, 48)
    assert batch["mask"].dtype == torch.bool and batch["mask"].flatten(1).any(1).all()
    assert batch["target"].tolist() == [0, 0, 1, 2, 2]
    # Each mask is its own image's: the object's pixels have one colour (the annotation's).
    for image, mask in zip(batch["image"], batch["mask"]):
        assert (image[:, mask] == image[:, mask][:, :1]).all()


# --------------------------------------------------------------------------- localisation trials


def write_boxes(path: Path, objects: list[tuple[str, bool]], box=(2, 3, 20, 15)) -> None:
    """An ILSVRC box file for a 40x30 image, one object per (wnid, difficult)."""
    xmin, ymin, xmax, ymax = box
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<annotation><size><width>40</width><height>30</height></size>"
        + "".join(
            f"<object><name>{wnid}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
            for wnid, difficult in objects
        )
        + "</annotation>"
    )


def box_trials(root: Path, skip_corrupt: bool, protocol: str = "standard") -> BoxMaskDataset:
    """Val images n01_0 (a usable box), n01_1 (only difficult boxes of n01), n02_0 (only another
    class's box), n02_1 (no object at all)."""
    imagenet_tree(root)
    box_dir = root / "boxes"
    write_boxes(box_dir / "n01_0.xml", [("n01", False), ("n01", True)])
    write_boxes(box_dir / "n01_1.xml", [("n01", True), ("n02", False)])
    write_boxes(box_dir / "n02_0.xml", [("n01", False)])
    write_boxes(box_dir / "n02_1.xml", [])
    module = imagenet_module(root, box_dir=box_dir, skip_corrupt=skip_corrupt)
    return module.localization_dataset(TrialGeometry(protocol))


def test_box_trials_count_difficult_and_boxless_images_apart(tmp_path):
    trials = box_trials(tmp_path, skip_corrupt=False)
    assert len(trials) == 1 and trials.trials[0][0].name == "n01_0.JPEG"
    assert trials.skipped_difficult == 1  # n01_1: its boxes of n01 are all difficult
    assert trials.skipped_no_box == 2  # n02_0 and n02_1: no box of n02 at all
    # The authors' protocol keeps n01_1 for CH only, masked by all its boxes of n01 (difficult too).
    trials = box_trials(tmp_path / "authors", skip_corrupt=False, protocol="authors")
    assert [(path.name, pointing) for path, *_, pointing in trials.trials] == [("n01_0.JPEG", True),
                                                                               ("n01_1.JPEG", False)]
    assert trials.skipped_difficult == 1 and trials.skipped_no_box == 2
    trial = trials[1]
    assert not trial["pointing"] and trial["mask"].shape == (30, 40) and trial["mask"].sum() == 19 * 13


def test_box_trials_honour_skip_corrupt(tmp_path, caplog):
    path = tmp_path / "val" / "n01" / "n01_0.JPEG"
    trials = box_trials(tmp_path, skip_corrupt=False)
    path.write_bytes(b"not a jpeg")
    with pytest.raises(CorruptImageError, match=f"corrupt image file {esc(path)}"):
        trials[0]
    trials = box_trials(tmp_path / "skip", skip_corrupt=True)
    path = tmp_path / "skip" / "val" / "n01" / "n01_0.JPEG"
    path.write_bytes(b"not a jpeg")
    with caplog.at_level("WARNING", logger="datamodules.images"):
        assert trials[0] is None
    assert str(path) in caplog.text


def test_coco_mask_trials_honour_skip_corrupt(tmp_path, caplog):
    ann_file = write_coco_split(tmp_path, "val2017")
    path = tmp_path / "val2017" / f"{1:012d}.jpg"  # image 1: trials 0 and 1
    path.write_bytes(b"not a jpeg")
    trials = CocoMaskDataset(tmp_path / "val2017", ann_file, CATEGORY_IDS, TrialGeometry(), skip_corrupt=False)
    with pytest.raises(CorruptImageError, match=f"corrupt image file {esc(path)}"):
        trials[0]
    assert trials[2]["mask"].shape == (30, 40)  # the other images are unaffected
    trials = CocoMaskDataset(tmp_path / "val2017", ann_file, CATEGORY_IDS, TrialGeometry(), skip_corrupt=True)
    with caplog.at_level("WARNING", logger="datamodules.images"):
        assert trials[0] is None and trials[1] is None
    assert str(path) in caplog.text
    batch = collate_samples([trials[i] for i in range(len(trials))])
    assert batch["skipped"] == 2 and batch["target"].tolist() == [1, 2]
