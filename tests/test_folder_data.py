"""``data=folder``: a user's own images in the ImageFolder layout, with and without COCO-format
mask jsons, read as written by tests/formats.py."""
from __future__ import annotations

import json

import pytest
import torch

from datamodules import FolderDataModule
from datamodules.coco import CocoMaskDataset
from datamodules.images import TrialGeometry
from evaluation.preflight import unsupported_metrics
from tests.conftest import REAL_DATA, assert_ok, evaluate_script, read_summary, train
from tests.formats import FOLDER_CLASSES, write_folder


def folder(root, annotations: bool = True, **overrides) -> FolderDataModule:
    options = {"image_size": 32, "batch_size": 4, "num_workers": 0, "skip_corrupt": False,
               "train_annotations": str(root / "annotations" / "train.json") if annotations else None,
               "val_annotations": str(root / "annotations" / "val.json") if annotations else None}
    return FolderDataModule(root, **{**options, **overrides})


def test_classes_labels_and_masks_are_the_folders_and_the_json(tmp_path):
    written = write_folder(tmp_path)
    data = folder(tmp_path)
    data.setup("fit")
    assert data.class_names == list(FOLDER_CLASSES) and data.num_classes == 3 and not data.multilabel
    assert len(data.train_set) == 12 and len(data.val_dataset()) == 9
    labels = [label for _, label in data.val_dataset().samples]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # The authors' protocol keeps each mask at its image's size: the box of the json, exactly.
    trials = data.localization_dataset(TrialGeometry("authors"))
    assert isinstance(trials, CocoMaskDataset) and len(trials) == 8  # one image has no object
    keys = data.val_dataset().keys()
    for index in range(len(trials)):
        trial = trials[index]
        image_id, class_index = trials.trials[index]
        name = trials.coco.imgs[image_id]["file_name"]
        x, y, w, h = written["boxes"][name]
        expected = torch.zeros(trial["mask"].shape, dtype=torch.bool)
        expected[y:y + h, x:x + w] = True
        assert torch.equal(trial["mask"], expected)
        assert class_index == FOLDER_CLASSES.index(name.split("/")[0]) and name in keys
    # The standard protocol resizes and crops image and mask together to image_size.
    assert data.localization_dataset()[0]["mask"].shape == (32, 32)


def test_without_a_mask_json_localisation_is_refused_naming_the_file(tmp_path):
    write_folder(tmp_path, annotations=False)
    data = folder(tmp_path, annotations=False)
    assert data.localization_dataset() is None
    reasons = unsupported_metrics(data, ["acc", "pg", "ch", "nqh", "fgsm"])
    assert set(reasons) == {"pg", "ch"} and "data.val_annotations is null" in reasons["pg"]
    missing = tmp_path / "masks.json"
    data = folder(tmp_path, annotations=False, val_annotations=str(missing))
    assert f"data.val_annotations: file not found: {missing}" in unsupported_metrics(data, ["spg"])["spg"]
    assert data.guidance_masks is None and folder(tmp_path).guidance_masks == "masks"


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_bad_input_names_the_file_and_the_entry(tmp_path):
    written = write_folder(tmp_path)
    (tmp_path / "val" / "wolf").mkdir()
    (tmp_path / "val" / "wolf" / "a.png").write_bytes((tmp_path / "val" / "cat" / "cat_0.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"data.data_dir: class folder\(s\) \['wolf'\] in .*val are not among"):
        folder(tmp_path).val_dataset()
    (tmp_path / "val" / "wolf" / "a.png").unlink()
    (tmp_path / "val" / "wolf").rmdir()
    edit_json(written["val_annotations"], lambda data: data["images"][2].update(file_name="cat/missing.jpg"))
    with pytest.raises(ValueError, match=r"data.val_annotations: image 9 of .*val.json is 'cat/missing.jpg', which is "
                                         r"not an image of"):
        folder(tmp_path).localization_dataset()
    write_folder(tmp_path)
    edit_json(written["val_annotations"], lambda data: data["categories"][0].update(name="wolf"))
    with pytest.raises(ValueError, match=r"data.val_annotations: category 13 of .*val.json is named 'wolf', which is "
                                         r"no class folder"):
        folder(tmp_path).localization_dataset()
    with pytest.raises(FileNotFoundError, match=r"data.data_dir: directory not found: .*nowhere"):
        _ = folder(tmp_path / "nowhere").class_names
    (tmp_path / "train").rename(tmp_path / "training")
    with pytest.raises(FileNotFoundError, match=r"data.data_dir: .*train not found.\n.*ImageFolder"):
        _ = folder(tmp_path).class_names


@pytest.mark.slow
def test_train_and_evaluate_a_folder_with_and_without_masks(tmp_path):
    """GC trains a step on the folders; the checkpoint is scored under both protocols with masks,
    and without them everything but localisation runs while PG is refused naming the file."""
    write_folder(tmp_path / "data")
    annotations = tmp_path / "data" / "annotations"
    common = ["data=folder", f"data.data_dir={tmp_path / 'data'}", "model=resnet18", "loss=gc", "trainer.max_epochs=1",
              "heatmap_images=2", "callbacks.explanation_metrics.max_images=4", *REAL_DATA,
              f"data.val_annotations={annotations / 'val.json'}"]
    run = train(tmp_path / "run", None, *common)
    assert_ok(run)
    checkpoint = read_summary(tmp_path / "run")["last_checkpoint"]
    masks = f"data.val_annotations={annotations / 'val.json'}"
    for protocol in ("standard", "authors"):
        out = tmp_path / f"eval_{protocol}"
        assert_ok(evaluate_script(out, "folder", tmp_path / "data", checkpoint, masks, "metrics=[acc,pg,spg,ch,nqh]",
                                  f"evaluation.protocol={protocol}", "evaluation.short_side=64"))
        results = json.loads((out / "report.json").read_text())["checkpoints"][0]["results"]
        assert 0 <= results["pg"] <= 1 and 0 <= results["ch"] <= 1
    out = tmp_path / "eval_unmasked"
    assert_ok(evaluate_script(out, "folder", tmp_path / "data", checkpoint, "metrics=[acc,nqh,fgsm,insertion]",
                              "max_images=4"))
    results = json.loads((out / "report.json").read_text())["checkpoints"][0]["results"]
    assert {"acc", "nqh", "insertion"} <= set(results)
    run = evaluate_script(tmp_path / "eval_refused", "folder", tmp_path / "data", checkpoint, "metrics=[acc,pg]")
    assert run.returncode != 0 and "data.val_annotations is null" in run.stderr
    # The guidance objectives take the training json's masks.
    run = train(tmp_path / "energy", None, *common, "loss=energy",
                f"data.train_annotations={annotations / 'train.json'}")
    assert_ok(run)
