"""The two evaluation geometries on ImageNet and COCO in their distributed formats.

The authors' protocol is checked against an independent re-implementation of what their scripts
compute (TorchRay-derived ``evaluate_imagenet_gradcam_{pointinggame,stochastic_pointinggame,
energy_inside_bbox}.py``): one image at a time, shorter side resized, element-wise Grad-CAM of
the labelled class, the map resized bilinearly to the XML's image size (``cv2.resize`` with
INTER_LINEAR, whose half-pixel rule is ``interpolate(align_corners=False)``), the 15 px disc in
original pixels, a mask from the 1-based box corners, difficult-only images out of PG and SPG
but in CH, PG as the mean of per-class accuracies.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from datamodules import COCODataModule, ImageNetDataModule
from datamodules.images import TrialGeometry
from evaluation.evaluator import ExplanationEvaluator
from evaluation.explainers import build_explainer
from evaluation.settings import default_settings
from tests.conftest import REAL_DATA, assert_ok, evaluate_script, read_summary, tiny_net, train
from tests.formats import WNIDS, write_coco, write_imagenet

SHORT_SIDE = 64
TOLERANCE = 15


def imagenet(root, **overrides) -> ImageNetDataModule:
    return ImageNetDataModule(root, **{"image_size": 32, "batch_size": 4, "num_workers": 0, "skip_corrupt": False,
                                       "box_dir": None, **overrides})


def authors_reference(net, images: list[dict], all_zero: bool = False) -> dict:
    """PG (mean of per-class accuracies), the expected SPG (the map's mass within the tolerance of
    the mask, which 100 draws estimate) and CH, one image at a time as the authors' scripts.
    ``all_zero``: as if every Grad-CAM were all zero."""
    hits, misses = np.zeros(len(WNIDS)), np.zeros(len(WNIDS))
    content, stochastic = [], []
    resize = transforms.Compose([transforms.Resize(SHORT_SIDE), transforms.ToTensor()])
    for info in images:
        label, (width, height) = info["label"], info["size"]
        x = resize(Image.open(info["path"]).convert("RGB")).unsqueeze(0)
        features = net.forward_features(x).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(net.head(features)[0, label], features)
        cam = torch.relu((grad * features).sum(1)) * (0 if all_zero else 1)
        cam = cam / (cam.sum() + 1e-8) + 1e-8
        if all_zero:  # cv2.resize keeps a constant map exactly constant; interpolate may move it by an ulp
            heat = cam[0, :1, :1].expand(height, width)
        else:
            heat = F.interpolate(cam.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        heat = (heat / heat.sum()).detach().double().numpy()
        objects = [obj for obj in info["objects"] if obj[0] == WNIDS[label]]
        mask = np.zeros((height, width), dtype=bool)
        for _, (xmin, ymin, xmax, ymax), _ in objects:
            mask[ymin - 1:ymax, xmin - 1:xmax] = True  # their int(...) - 1 and [min:max + 1]
        content.append((heat * mask).sum())
        if all(difficult for *_, difficult in objects):
            continue
        rows, cols = np.mgrid[0:height, 0:width]
        mask_rows, mask_cols = np.nonzero(mask)
        # Squared distance of every pixel to the nearest mask pixel, by brute force.
        distance = ((rows[..., None] - mask_rows) ** 2 + (cols[..., None] - mask_cols) ** 2).min(-1)
        accept = distance < TOLERANCE ** 2
        peak = np.unravel_index(heat.argmax(), heat.shape)
        if accept[peak]:
            hits[label] += 1
        else:
            misses[label] += 1
        stochastic.append(heat[accept].sum())
    return {"pg": (hits / np.maximum(hits + misses, 1)).mean(), "spg": np.mean(stochastic), "ch": np.mean(content),
            "pointed": len(stochastic)}


def evaluate(net, datamodule, protocol: str, metrics=("pg", "spg", "ch"), explainer=None, **overrides) -> dict:
    settings = default_settings(seed=0, batch_size=4, protocol=protocol, short_side=SHORT_SIDE, **overrides)
    evaluator = ExplanationEvaluator(explainer or build_explainer("gradcam"), metrics, datamodule.num_classes,
                                     datamodule.multilabel, settings)
    return evaluator.run(net, datamodule, progress=False)


@pytest.mark.parametrize("flat", [True, False])
def test_authors_protocol_equals_their_scripts_on_imagenet_as_distributed(tmp_path, flat):
    images = write_imagenet(tmp_path, flat=flat)
    datamodule = imagenet(tmp_path)
    val_set = datamodule.val_dataset()
    assert ({path.name: label for path, label in val_set.samples}
            == {info["path"].name: info["label"] for info in images})
    torch.manual_seed(0)
    net = tiny_net(num_classes=len(WNIDS)).eval()
    expected = authors_reference(net, images)
    results = evaluate(net, datamodule, "authors")

    assert results["pg"] == pytest.approx(expected["pg"], abs=1e-12)
    assert results["ch"] == pytest.approx(expected["ch"], abs=1e-5)
    # 5 runs of 100 points on 8 images: the mean of 4,000 Bernoulli draws.
    assert results["spg"] == pytest.approx(expected["spg"], abs=4 * math.sqrt(0.25 / 4000))
    assert results["skipped"]["skipped_difficult"] == 1 and expected["pointed"] == len(images) - 1
    assert results["skipped"]["pg"] == 0 and results["skipped"]["ch"] == 0


def test_uniform_zero_maps_equal_their_scripts_on_all_zero_grad_cams(tmp_path):
    """Their +1e-8 makes an all-zero Grad-CAM a constant map: PG points at the top-left pixel, SPG
    draws uniformly, CH is the mask's share. evaluation.zero_maps=uniform scores it so; skip leaves
    it out and counts it."""
    images = write_imagenet(tmp_path)
    datamodule = imagenet(tmp_path)
    torch.manual_seed(0)
    net = tiny_net(num_classes=len(WNIDS)).eval()
    expected = authors_reference(net, images, all_zero=True)
    gradcam = build_explainer("gradcam")

    def all_zero(net, images, classes):
        return gradcam(net, images, classes) * 0

    results = evaluate(net, datamodule, "authors", explainer=all_zero, zero_maps="uniform")
    assert results["pg"] == pytest.approx(expected["pg"], abs=1e-12)
    assert results["ch"] == pytest.approx(expected["ch"], abs=1e-6)
    pointed = expected["pointed"]
    assert results["spg"] == pytest.approx(expected["spg"], abs=4 * math.sqrt(0.25 / (pointed * 5 * 100)))
    assert results["zero_maps_uniform"] == {"pg": pointed, "spg": pointed, "ch": len(images)}
    assert results["skipped"]["pg"] == results["skipped"]["ch"] == 0
    skipped = evaluate(net, datamodule, "authors", explainer=all_zero)
    assert math.isnan(skipped["pg"]) and math.isnan(skipped["ch"]) and "zero_maps_uniform" not in skipped
    assert skipped["skipped"]["pg"] == skipped["skipped"]["spg"] == pointed and skipped["skipped"]["ch"] == len(images)


def test_authors_trials_keep_the_aspect_and_the_original_mask(tmp_path):
    images = write_imagenet(tmp_path)
    trials = imagenet(tmp_path).localization_dataset(TrialGeometry("authors", short_side=SHORT_SIDE))
    assert trials.sizes() == [(info["size"][1], info["size"][0]) for info in images]
    wide = trials[0]  # 48 x 36: the shorter side becomes 64, the longer int(64 * 48 / 36) = 85
    assert wide["image"].shape == (3, 64, 85) and wide["mask"].shape == (36, 48)
    standard = imagenet(tmp_path).localization_dataset()
    assert standard[0]["image"].shape == (3, 32, 32) and standard[0]["mask"].shape == (32, 32)
    assert len(standard) == len(images) - 1  # the difficult-only image is out of every metric there


def test_standard_and_authors_protocols_run_on_coco_as_distributed(tmp_path):
    write_coco(tmp_path, year=2014)
    datamodule = COCODataModule(tmp_path, train_split="train2014", val_split="val2014", val_transform="square",
                                image_size=32, batch_size=4, num_workers=0, skip_corrupt=False)
    torch.manual_seed(0)
    net = tiny_net(num_classes=3).eval()
    trials = datamodule.localization_dataset(TrialGeometry("authors", short_side=SHORT_SIDE))
    # Every (image, class) pair of the 5 annotated images is a trial, masks at the json's size.
    assert len(trials) == sum(len([k for k in range(3) if (i + k) % 3 != 0]) for i in range(1, 6))
    assert all(trials[i]["mask"].shape == size for i, size in enumerate(trials.sizes()))
    for protocol in ("standard", "authors"):
        results = evaluate(net, datamodule, protocol, metrics=("acc", "pg", "spg", "ch", "nqh"))
        assert 0 <= results["pg"] <= 1 and 0 <= results["ch"] <= 1 and 0 <= results["f1"] <= 1
        assert 0 <= results["f1_per_class"] <= 1  # the COCO papers' F1-PerClass beside F1-Overall
        assert results["skipped"]["pg"] == 0


# --------------------------------------------------------------------------- end to end

# 64 px: ResNet18 keeps 2x2 cells at layer4 (batch norm needs more than one value per channel).
@pytest.mark.slow
def test_train_and_evaluate_imagenet_and_coco_as_distributed_under_both_protocols(tmp_path):
    """ImageNet with a flat val folder and its XMLs, no sorting step; then COCO 2014 started from
    the ImageNet checkpoint, as in the paper. Each checkpoint is evaluated under both protocols."""
    write_imagenet(tmp_path / "imagenet")
    write_coco(tmp_path / "coco", year=2014)
    common = ["model=resnet18", "trainer.max_epochs=1", "heatmap_images=2",
              "callbacks.explanation_metrics.max_images=4", *REAL_DATA]
    run = train(tmp_path / "in", None, "data=imagenet", f"data.data_dir={tmp_path / 'imagenet'}", *common)
    assert_ok(run)
    imagenet_checkpoint = read_summary(tmp_path / "in")["last_checkpoint"]
    run = train(tmp_path / "coco_run", None, "data=coco", f"data.data_dir={tmp_path / 'coco'}",
                f"model.init_from={imagenet_checkpoint}", *common)
    assert_ok(run)
    assert "model.init_from" in run.stdout + run.stderr  # what was loaded and what was not, logged
    coco_checkpoint = read_summary(tmp_path / "coco_run")["last_checkpoint"]
    for data, data_dir, checkpoint in (("imagenet", tmp_path / "imagenet", imagenet_checkpoint),
                                       ("coco", tmp_path / "coco", coco_checkpoint)):
        metrics = "[acc,pg,spg,ch,nqh,fgsm]" if data == "imagenet" else "[acc,pg,spg,ch,nqh]"
        for protocol in ("standard", "authors"):
            out = tmp_path / f"eval_{data}_{protocol}"
            run = evaluate_script(out, data, data_dir, checkpoint, f"metrics={metrics}",
                                  f"evaluation.protocol={protocol}", "evaluation.short_side=64")
            assert_ok(run)
            report = json.loads((out / "report.json").read_text())
            assert report["settings"]["protocol"] == protocol
            results = report["checkpoints"][0]["results"]
            assert 0 <= results["pg"] <= 1 and 0 <= results["ch"] <= 1
            if data == "imagenet":
                # The difficult-only image: out of PG and SPG under both protocols, in CH under the authors'.
                assert results["skipped"]["skipped_difficult"] == 1


# --------------------------------------------------------------------------- bad input


def test_imagenet_bad_input_names_the_file(tmp_path):
    write_imagenet(tmp_path)
    image = tmp_path / "val" / "ILSVRC2012_val_00000002.JPEG"
    xml = image.with_suffix(".xml")
    text = xml.read_text()
    xml.unlink()
    with pytest.raises(FileNotFoundError, match=f"validation image {re.escape(str(image))} has no box file: "
                                                f"expected {re.escape(str(xml))}"):
        imagenet(tmp_path).val_dataset()
    xml.write_text(text.replace(WNIDS[1], "n04000000", 1))
    with pytest.raises(ValueError, match=f"box file {re.escape(str(xml))} labels .* as 'n04000000', which is not "
                                         "among the 3 training classes"):
        imagenet(tmp_path).val_dataset()
    xml.write_text(text)
    (tmp_path / "val" / WNIDS[0]).mkdir()
    with pytest.raises(ValueError, match="holds both image files and folders .*\n.*as distributed"):
        imagenet(tmp_path).val_dataset()


def test_imagenet_root_laid_out_wrongly_shows_the_expected_layout(tmp_path):
    write_imagenet(tmp_path / "root")
    (tmp_path / "root" / "val").rename(tmp_path / "root" / "validation")
    with pytest.raises(FileNotFoundError, match=r"val not found\.\n.*as distributed:\n.*train/<wnid>/\*\.JPEG"):
        imagenet(tmp_path / "root").val_dataset()


def coco(root, **overrides) -> COCODataModule:
    return COCODataModule(root, **{"train_split": "train2014", "val_split": "val2014", "val_transform": "square",
                                   "image_size": 32, "batch_size": 4, "num_workers": 0, "skip_corrupt": False,
                                   **overrides})


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_coco_bad_input_names_the_entry(tmp_path):
    write_coco(tmp_path)
    ann_file = tmp_path / "annotations" / "instances_val2014.json"
    missing = tmp_path / "val2014" / "COCO_val2014_000000000003.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) of .*instances_val2014.json are not in .*val2014, "
                                                r"e\.g\. \['COCO_val2014_000000000003.jpg'\]"):
        coco(tmp_path).val_dataset()
    write_coco(tmp_path)
    edit_json(ann_file, lambda data: data["images"][0].update(file_name="../train2014/COCO_train2014_000000000001.jpg"))
    with pytest.raises(ValueError, match=r"image 1 in .* has file_name '\.\./train2014/.*', which does not name a "
                                         "file inside"):
        coco(tmp_path).val_dataset()
    with pytest.raises(FileNotFoundError, match=r"COCO split 'val2017' needs .*\n.*MS-COCO as distributed"):
        coco(tmp_path, val_split="val2017").val_dataset()


def test_coco_annotations_without_segmentation_use_their_boxes_with_a_warning(tmp_path, caplog):
    write_coco(tmp_path)
    ann_file = tmp_path / "annotations" / "instances_val2014.json"
    edit_json(ann_file, lambda data: [ann.pop("segmentation") for ann in data["annotations"]])
    with caplog.at_level("WARNING", logger="datamodules.coco"):
        trials = coco(tmp_path).localization_dataset(TrialGeometry("authors"))
    assert "have no segmentation: their boxes serve as masks" in caplog.text
    annotations = json.loads(ann_file.read_text())["annotations"]
    image_id, class_index = trials.trials[0]
    x, y, w, h = next(ann["bbox"] for ann in annotations
                      if ann["image_id"] == image_id and ann["category_id"] == trials.category_ids[class_index])
    expected = torch.zeros(trials.sizes()[0], dtype=torch.bool)
    expected[y:y + h, x:x + w] = True
    assert torch.equal(trials[0]["mask"], expected)


def test_coco_samples_carry_instance_counts_for_the_explained_class_draw(tmp_path):
    write_coco(tmp_path)
    ann_file = tmp_path / "annotations" / "instances_val2014.json"
    # A second person in image 1: two instances of class 0 there.
    edit_json(ann_file, lambda data: data["annotations"].append({**data["annotations"][0], "id": 999}))
    val_set = coco(tmp_path).val_dataset()
    sample = val_set[0]
    assert sample["instances"][0] == 2 and torch.equal(sample["target"], (sample["instances"] > 0).float())
    assert len(val_set) == 5  # the image without annotations is not a classification sample


def test_label_pairs_are_the_label_sets_without_the_table(tmp_path):
    """The composite_source=dataset wrapper reads (image, class) pairs: ImageNet's [1.28M, 1000]
    table would take 1.28 GB."""
    write_imagenet(tmp_path / "imagenet")
    write_coco(tmp_path / "coco")
    for dataset in (imagenet(tmp_path / "imagenet").val_dataset(), coco(tmp_path / "coco").val_dataset()):
        images, classes = dataset.label_pairs()
        table = torch.zeros(len(dataset), len(dataset.classes), dtype=torch.bool)
        table[images, classes] = True
        assert torch.equal(table, dataset.label_sets()) and bool((images[1:] >= images[:-1]).all())
