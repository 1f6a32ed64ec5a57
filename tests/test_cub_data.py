"""``data=cub``: CUB-200-2011 in its distributed text-file format (tests/formats.py), masks from
its segmentations or boxes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules import CUBDataModule
from datamodules.images import TrialGeometry
from tests.conftest import REAL_DATA, assert_ok, evaluate_script, read_summary, train
from tests.formats import CUB_CLASSES, write_cub


def cub(root, **overrides) -> CUBDataModule:
    return CUBDataModule(root, **{"image_size": 32, "batch_size": 4, "num_workers": 0, "skip_corrupt": False,
                                  "mask": "segmentation", "segmentation_dir": None, **overrides})


def expected_mask(record: dict, kind: str) -> torch.Tensor:
    """The bird by hand: the segmentation's rows at 255 and 204 (most annotators), or the box."""
    width, height = record["size"]
    x, y, w, h = record["box"]
    mask = torch.zeros(height, width, dtype=torch.bool)
    rows = 10 if kind == "segmentation" and record["segmented"] else h
    mask[y:y + rows, x:x + w] = True
    return mask


@pytest.mark.parametrize("kind", ["segmentation", "box"])
def test_splits_labels_and_masks_are_the_text_files(tmp_path, kind):
    records = write_cub(tmp_path)
    data = cub(tmp_path, mask=kind)
    data.setup("fit")
    assert data.class_names == list(CUB_CLASSES) and data.num_classes == 3 and not data.multilabel
    val_keys = data.val_dataset().keys()
    assert val_keys == [path for path, record in records.items() if not record["train"]]
    assert data.train_set.keys() == [path for path, record in records.items() if record["train"]]
    assert [label for _, label in data.val_dataset().samples] == [records[key]["label"] for key in val_keys]
    trials = data.localization_dataset(TrialGeometry("authors"))
    assert len(trials) == 6
    assert trials.masks.missing == (1 if kind == "segmentation" else 0)  # the last test image's
    for index, key in enumerate(val_keys):
        trial = trials[index]
        assert torch.equal(trial["mask"], expected_mask(records[key], kind)), key
        assert int(trial["target"]) == records[key]["label"]
    assert trials.sizes() == [tuple(reversed(records[key]["size"])) for key in val_keys]
    assert data.localization_dataset()[0]["mask"].shape == (32, 32)
    # The guidance objectives' masks of the training images, grown by a share of the box.
    masks = data.training_masks(0.0)
    first = next(key for key, record in records.items() if record["train"])
    assert torch.equal(masks(0, records[first]["label"]), expected_mask(records[first], kind))
    assert data.training_masks(0.2)(0, 0).sum() > masks(0, 0).sum()


def test_a_file_whose_ids_disagree_with_images_txt_is_named(tmp_path):
    write_cub(tmp_path)
    labels = tmp_path / "image_class_labels.txt"
    labels.write_text(labels.read_text() + "99 1\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt has image id 99, which images.txt does not list"):
        _ = cub(tmp_path).class_names
    write_cub(tmp_path)
    boxes = tmp_path / "bounding_boxes.txt"
    boxes.write_text("\n".join(boxes.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(ValueError, match=r"bounding_boxes.txt has no line for image id 1 of images.txt"):
        _ = cub(tmp_path).class_names
    write_cub(tmp_path)
    boxes.write_text(boxes.read_text().replace("1 3.0", "1 three", 1))
    with pytest.raises(ValueError, match=r"image id 1 of .*: a label or box that is no number"):
        _ = cub(tmp_path).class_names
    write_cub(tmp_path)
    (tmp_path / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    with pytest.raises(ValueError, match=r"gives image id 9 class 3, which classes.txt does not list"):
        _ = cub(tmp_path).class_names
    (tmp_path / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_test_split.txt not found.\n.*CUB-200-2011 as distributed"):
        _ = cub(tmp_path).class_names
    write_cub(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data.segmentation_dir: directory not found: .*nowhere"):
        cub(tmp_path, segmentation_dir=str(tmp_path / "nowhere")).localization_dataset()


@pytest.mark.slow
def test_train_and_evaluate_cub_as_distributed(tmp_path):
    """GC and energy guidance train a step on CUB; the GC checkpoint is scored under both
    protocols."""
    write_cub(tmp_path / "CUB_200_2011")
    common = ["data=cub", f"data.data_dir={tmp_path / 'CUB_200_2011'}", "model=resnet18", "trainer.max_epochs=1",
              "heatmap_images=2", "callbacks.explanation_metrics.max_images=4", *REAL_DATA]
    run = train(tmp_path / "run", None, *common, "loss=gc")
    assert_ok(run)
    checkpoint = read_summary(tmp_path / "run")["last_checkpoint"]
    for protocol in ("standard", "authors"):
        out = tmp_path / f"eval_{protocol}"
        assert_ok(evaluate_script(out, "cub", tmp_path / "CUB_200_2011", checkpoint, "metrics=[acc,pg,spg,ch,nqh]",
                                  f"evaluation.protocol={protocol}", "evaluation.short_side=64"))
        results = json.loads(Path(out / "report.json").read_text())["checkpoints"][0]["results"]
        assert 0 <= results["pg"] <= 1 and 0 <= results["ch"] <= 1
    assert_ok(train(tmp_path / "energy", None, *common, "loss=energy"))
