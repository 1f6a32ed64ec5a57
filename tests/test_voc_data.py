"""``data=voc2007``: PASCAL VOC 2007 in its distributed format (tests/formats.py), TorchRay's
pointing-game trials and its "difficult" subset (on COCO too, from TorchRay's table)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import COCODataModule, VOC2007DataModule
from datamodules.images import TrialGeometry
from datamodules.voc import VOC_CLASSES
from evaluation.evaluator import ExplanationEvaluator
from evaluation.metrics.classes import PointingGame
from evaluation.settings import default_settings
from tests.conftest import REAL_DATA, ROOT, assert_ok, evaluate_script, read_summary, tiny_net, train
from tests.formats import VOC_TEST, write_coco, write_voc

CAT, DOG, PERSON = (VOC_CLASSES.index(name) for name in ("cat", "dog", "person"))
# TorchRay's trials of the test images, by hand: (image, class, in Zhang et al.'s difficult subset).
TRIALS = [
    ("000001", DOG, True),  # its box is 120 px of 1920, and a person is there
    ("000001", PERSON, False),  # a large box
    ("000002", CAT, False),
    ("000004", CAT, True),  # the union of its two boxes (one PASCAL-difficult): 331 of 1728 px
    # (000004's dog: every box PASCAL-difficult, no trial)
    ("000007", PERSON, False),  # small, but alone in its image
]


def voc(root, **overrides) -> VOC2007DataModule:
    return VOC2007DataModule(root, **{"image_size": 32, "batch_size": 4, "num_workers": 0, "skip_corrupt": False,
                                      "train_split": "trainval", "val_split": "test", "mask": "box",
                                      "difficult_flags": None, **overrides})


def box_mask(size: tuple[int, int], boxes) -> torch.Tensor:
    """The union of 1-based inclusive boxes, by hand."""
    mask = torch.zeros(size[1], size[0], dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0 - 1:y1, x0 - 1:x1] = True
    return mask


def test_labels_trials_and_box_masks_follow_the_annotations(tmp_path):
    records = write_voc(tmp_path, VOC_CLASSES)
    data = voc(tmp_path)
    data.setup("fit")
    assert data.class_names == list(VOC_CLASSES) and data.num_classes == 20 and data.multilabel
    assert data.val_dataset().keys() == [image_id for image_id, *_ in VOC_TEST]
    assert len(data.train_set) == 4
    # Labels: every class with an object, PASCAL-difficult ones included (000004's dog).
    sample = data.val_dataset()[2]
    assert sample["target"].nonzero().flatten().tolist() == [CAT, DOG]
    assert sample["instances"][CAT] == 2 and sample["image"].shape == (3, 32, 32)

    trials = data.localization_dataset(TrialGeometry("authors"))
    assert [(data.val_dataset().ids[index], class_index, difficult)
            for index, class_index, difficult in trials.trials] == TRIALS
    assert trials.skipped_difficult == 1
    assert trials.mask_source == ("the union of the class's boxes (Annotations); "
                                  "PG (difficult): Zhang et al.'s rule computed from the annotations")
    for number, (image_id, class_index, difficult) in enumerate(TRIALS):
        trial, record = trials[number], records[image_id]
        boxes = [box for name, box, *_ in record["objects"] if name == VOC_CLASSES[class_index]]
        assert torch.equal(trial["mask"], box_mask(record["size"], boxes)), (image_id, class_index)
        assert int(trial["target"]) == class_index and bool(trial["difficult"]) == difficult
    assert trials.sizes() == [tuple(reversed(records[image_id]["size"])) for image_id, *_ in TRIALS]
    assert data.localization_dataset()[0]["mask"].shape == (32, 32)
    # The guidance objectives' masks of a training image, grown by a share of each box.
    masks = data.training_masks(0.0)
    assert torch.equal(masks(0, CAT), box_mask((48, 40), [(4, 4, 30, 30)]))
    assert data.training_masks(0.2)(0, CAT).sum() > masks(0, CAT).sum()


def test_segmentation_masks_leave_out_the_borders_and_fall_back_to_boxes(tmp_path):
    records = write_voc(tmp_path, VOC_CLASSES)
    trials = voc(tmp_path, mask="segmentation").localization_dataset(TrialGeometry("authors"))
    assert trials.boxes_for_masks == 2  # 000002 and 000007 have no PNG
    assert "boxes for the 2 of 5 trials whose image has no segmentation" in trials.mask_source
    dog, person = trials[0]["mask"], trials[1]["mask"]
    # The dog, in front, is its whole box; the person is its box less the dog and the 1-pixel
    # border (label 255) drawn around the dog.
    assert torch.equal(dog, box_mask((48, 40), [(5, 5, 16, 14)]))
    ring = box_mask((48, 40), [(4, 4, 17, 15)])
    assert torch.equal(person, box_mask((48, 40), [(3, 2, 46, 38)]) & ~ring)
    labels = records["000001"]["segmentation"]
    assert (labels == 255).any() and not (dog | person)[torch.from_numpy(labels == 255)].any()
    # Without a PNG, the boxes.
    assert torch.equal(trials[2]["mask"], box_mask((40, 40), [(2, 2, 39, 39)]))


def test_torchrays_difficult_flags_file_decides_the_subset(tmp_path):
    write_voc(tmp_path, VOC_CLASSES)
    flags = tmp_path / "pointing_game_ebp_voc07_difficult.txt"
    rows = {image_id: ["0"] * 20 for image_id, *_ in VOC_TEST}
    rows["000001"][PERSON] = "1"  # the file, not the rule, says which pairs are difficult
    flags.write_text("".join("\t".join([image_id, *values]) + "\n" for image_id, values in rows.items()))
    trials = voc(tmp_path, difficult_flags=str(flags)).localization_dataset()
    assert [difficult for *_, difficult in trials.trials] == [False, True, False, False, False]
    assert "PG (difficult): the flags of pointing_game_ebp_voc07_difficult.txt" in trials.mask_source
    # An image without a line stays in the subset, as in TorchRay (and the report says so).
    flags.write_text("".join("\t".join([image_id, *values]) + "\n" for image_id, values in rows.items()
                             if image_id != "000004"))
    trials = voc(tmp_path, difficult_flags=str(flags)).localization_dataset()
    assert [difficult for *_, difficult in trials.trials] == [False, True, False, True, False]
    assert "and the 1 image(s) it has no line for" in trials.mask_source
    flags.write_text("000001\t0\t1\n")
    with pytest.raises(ValueError, match=r"data.difficult_flags: .*difficult.txt, line 1: an image id and 20 flags"):
        voc(tmp_path, difficult_flags=str(flags)).localization_dataset()
    flags.write_text("009999" + "\t0" * 20 + "\n")
    with pytest.raises(ValueError, match=r"difficult.txt has a line for none of the split's images \(e.g. 000001\)"):
        voc(tmp_path, difficult_flags=str(flags)).localization_dataset()


def test_coco_takes_torchrays_difficult_table_by_file_name(tmp_path):
    write_coco(tmp_path)
    flags = tmp_path / "pointing_game_ebp_coco_difficult.txt"
    rows = {1: "1\t0\t0", 2: "0\t1\t1", 4: "0\t0\t0", 5: "0\t0\t0"}  # no line for image 3
    flags.write_text("".join(f"COCO_val2014_{image_id:012d}\t{row}\n" for image_id, row in rows.items()))
    data = COCODataModule(tmp_path, image_size=32, batch_size=4, num_workers=0, skip_corrupt=False,
                          train_split="train2014", val_split="val2014", val_transform="square",
                          difficult_flags=str(flags))
    trials = data.localization_dataset()
    assert "and the 1 image(s) it has no line for" in trials.mask_source
    for index, (image_id, class_index) in enumerate(trials.trials):
        expected = image_id == 3 or rows[image_id].split("\t")[class_index] == "1"
        assert bool(trials[index]["difficult"]) == expected, (image_id, class_index)
    assert "difficult" not in COCODataModule(tmp_path, image_size=32, batch_size=4, num_workers=0, skip_corrupt=False,
                                             train_split="train2014", val_split="val2014",
                                             val_transform="square").localization_dataset()[0]


def test_bad_input_is_named(tmp_path):
    write_voc(tmp_path, VOC_CLASSES)
    with pytest.raises(FileNotFoundError, match=r"data.val_split: .*ImageSets/Main/val2007.txt not found; splits "
                                                r"there: \['test', 'trainval'\]"):
        voc(tmp_path, val_split="val2007").setup("validate")
    xml = tmp_path / "Annotations" / "000002.xml"
    xml.write_text(xml.read_text().replace("<name>cat</name>", "<name>kitten</name>"))
    with pytest.raises(ValueError, match=r"000002.xml: object class 'kitten' is not one of VOC's 20 classes"):
        voc(tmp_path).setup("validate")
    xml.unlink()
    with pytest.raises(FileNotFoundError, match=r"image 000002 has no annotation file: expected .*000002.xml"):
        voc(tmp_path).setup("validate")
    write_voc(tmp_path, VOC_CLASSES)
    (tmp_path / "JPEGImages" / "000007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) of the split are not in .*JPEGImages.*000007.jpg"):
        voc(tmp_path).setup("validate")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"data.data_dir: .*elsewhere/ImageSets/Main not found.\n"
                                                r".*PASCAL VOC 2007 as distributed"):
        voc(empty).setup("validate")


def test_pg_difficult_is_the_mean_over_classes_of_the_difficult_trials():
    generator = torch.Generator().manual_seed(0)
    count, classes_count = 60, 5
    maps = torch.rand(count, 12, 12, generator=generator)
    masks = torch.rand(count, 12, 12, generator=generator) > 0.9
    classes = torch.randint(0, classes_count, (count,), generator=generator)
    difficult = torch.rand(count, generator=generator) > 0.5
    metric = PointingGame(tolerance=2, tolerance_at=None, num_classes=classes_count)
    metric.update(maps[:30], masks[:30], classes[:30], difficult[:30])
    metric.update(maps[30:], masks[30:], classes[30:], difficult[30:])
    results = metric.compute()
    # By hand: the peak's 3x3 neighbourhood (distance below 2, TorchRay's strict rule) meets the mask.
    hits = []
    for heatmap, mask in zip(maps, masks):
        row, col = divmod(int(heatmap.flatten().argmax()), 12)
        near = [(row + dy, col + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        hits.append(any(0 <= y < 12 and 0 <= x < 12 and bool(mask[y, x]) for y, x in near))
    hits = torch.tensor(hits)

    def class_mean(selected):
        return np.mean([hits[selected & (classes == c)].double().mean().item() for c in range(classes_count)
                        if (selected & (classes == c)).any()])

    assert results["pg"].item() == pytest.approx(class_mean(torch.ones(count, dtype=torch.bool)))
    assert results["pg_difficult"].item() == pytest.approx(class_mean(difficult))
    assert results["pg_micro"].item() == pytest.approx(hits.double().mean().item())


def by_hand_pointing(trials, point_of, tolerance: float) -> tuple[float, float]:
    """PG over all trials and over the difficult subset, each the mean over classes of the hit
    rate, a hit when a mask pixel is nearer than ``tolerance`` to ``point_of(height, width)``."""
    hits = {}
    for index, (_, class_index, difficult) in enumerate(trials.trials):
        mask = trials[index]["mask"]
        row, col = point_of(*mask.shape)
        rows, cols = mask.nonzero(as_tuple=True)
        hit = bool((((rows - row) ** 2 + (cols - col) ** 2).float().sqrt() < tolerance).any())
        hits.setdefault(class_index, []).append((hit, difficult))
    every = np.mean([np.mean([hit for hit, _ in pairs]) for pairs in hits.values()])
    difficult = np.mean([np.mean([hit for hit, hard in pairs if hard]) for pairs in hits.values()
                         if any(hard for _, hard in pairs)])
    return float(every), float(difficult)


def test_the_evaluator_reports_both_pointing_numbers_on_voc(tmp_path):
    """PG on all trials and on the difficult subset, of a map peaked near the top left corner and
    of the centred reference map, by hand from the trials' masks, equal the engine's."""
    write_voc(tmp_path, VOC_CLASSES)
    data = voc(tmp_path)
    data.setup("validate")
    settings = default_settings(seed=0, batch_size=2, tolerance=2, tolerance_at=None)

    def peak(net, images, classes):
        maps = torch.zeros(len(images), *images.shape[-2:])
        maps[:, 6, 6] = 1
        return maps

    results = ExplanationEvaluator(peak, ["pg"], 20, True, settings).run(tiny_net(num_classes=20), data,
                                                                        progress=False)
    trials = data.localization_dataset(settings.trial_geometry)
    every, difficult = by_hand_pointing(trials, lambda height, width: (6, 6), 2)
    assert (results["pg"], results["pg_difficult"]) == pytest.approx((every, difficult))
    assert 0 < difficult < every < 1  # hits and misses in both
    every, difficult = by_hand_pointing(trials, lambda height, width: ((height - 1) // 2, (width - 1) // 2), 2)
    assert (results["pg_center"], results["pg_difficult_center"]) == pytest.approx((every, difficult))
    assert difficult == 0  # the small objects are off the centre


@pytest.mark.slow
def test_train_and_evaluate_voc_as_distributed(tmp_path):
    """GC and energy guidance train a step on VOC 2007; the GC checkpoint is scored under both
    protocols, with PG on all trials and on the difficult subset, beside the reference maps; the
    two form a committee for the consensus script."""
    root = tmp_path / "VOC2007"
    write_voc(root, VOC_CLASSES)
    common = ["data=voc2007", f"data.data_dir={root}", "model=resnet18", "trainer.max_epochs=1", "heatmap_images=2",
              "callbacks.explanation_metrics.max_images=4", *REAL_DATA]
    run = train(tmp_path / "run", None, *common, "loss=gc")
    assert_ok(run)
    checkpoint = read_summary(tmp_path / "run")["last_checkpoint"]
    for protocol in ("standard", "authors"):
        out = tmp_path / f"eval_{protocol}"
        assert_ok(evaluate_script(out, "voc2007", root, checkpoint, "metrics=[acc,pg,spg,ch,nqh]",
                                  f"evaluation.protocol={protocol}", "evaluation.short_side=64",
                                  "data.mask=segmentation"))
        results = json.loads(Path(out / "report.json").read_text())["checkpoints"][0]["results"]
        assert 0 <= results["pg"] <= 1 and 0 <= results["pg_difficult"] <= 1 and "pg_difficult_center" in results
        report = (out / "report.md").read_text()
        assert "| PG (difficult) |" in report and "reference: centred peak" in report
        assert "boxes for the 2 of 5 trials whose image has no segmentation" in report
    assert_ok(train(tmp_path / "energy", None, *common, "loss=energy"))
    # The committee consensus of the two, scored against VOC's masks too.
    members = f"ckpts=[{checkpoint},{read_summary(tmp_path / 'energy')['last_checkpoint']}]"
    consensus = subprocess.run([sys.executable, "-m", "evaluation.consensus", f"hydra.run.dir={tmp_path / 'cons'}",
                                "data=voc2007", f"data.data_dir={root}", *REAL_DATA, members, "num_images=4",
                                "explainer=gradcam"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert_ok(consensus)
    table = json.loads((tmp_path / "cons" / "consensus.json").read_text())
    assert len(table["members"]) == 2 and "mAP of the consensus" in (tmp_path / "cons" / "consensus.md").read_text()
