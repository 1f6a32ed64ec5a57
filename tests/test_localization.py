"""Localisation trials: images with the mask of their class, aligned through the eval geometry."""
import pytest
import torch
from PIL import Image, ImageDraw

from datamodules.imagenet import ImageNetDataModule
from evaluation.preflight import unsupported_metrics

BOX_XML = """<annotation><size><width>{w}</width><height>{h}</height></size>{objects}</annotation>"""
OBJECT = ("<object><name>{name}</name><difficult>{difficult}</difficult>"
          "<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def imagenet_module(root, box_dir):
    return ImageNetDataModule(root, batch_size=2, num_workers=0, image_size=32, skip_corrupt=False, box_dir=box_dir)


def make_imagenet(root, boxes):
    """Two classes; val image i of class n0<i> has a red box drawn where its XML says."""
    for split in ("train", "val"):
        for index, (wnid, (x0, y0, x1, y1), difficult) in enumerate(boxes):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            image = Image.new("RGB", (80, 60))
            ImageDraw.Draw(image).rectangle((x0, y0, x1, y1), fill=(255, 0, 0))
            image.save(folder / f"ILSVRC2012_val_{index:08d}.JPEG", quality=95)
            if split == "val":
                (root / "boxes").mkdir(exist_ok=True)
                # ILSVRC writes 1-based inclusive corners: pixel x0 (0-based) is x0 + 1 there.
                objects = OBJECT.format(name=wnid, difficult=int(difficult), x0=x0 + 1, y0=y0 + 1, x1=x1 + 1, y1=y1 + 1)
                objects += OBJECT.format(name="n09999999", difficult=0, x0=1, y0=1, x1=6, y1=6)  # another class
                (root / "boxes" / f"ILSVRC2012_val_{index:08d}.xml").write_text(
                    BOX_XML.format(w=80, h=60, objects=objects))


def test_imagenet_box_masks_follow_the_image_through_resize_and_crop(tmp_path):
    make_imagenet(tmp_path, [("n01000001", (30, 20, 59, 44), False), ("n02000002", (10, 10, 30, 30), True)])
    data = imagenet_module(tmp_path, box_dir=tmp_path / "boxes")
    trials = data.localization_dataset()
    assert trials is not None
    assert len(trials) == 1 and trials.skipped_difficult == 1  # the all-difficult image is left out
    trial = trials[0]
    assert trial["image"].shape == (3, 32, 32) and trial["mask"].shape == (32, 32) and trial["target"] == 0
    red = (trial["image"][0] > 0.5) & (trial["image"][1] < 0.3)
    overlap = (red & trial["mask"]).sum() / (red | trial["mask"]).sum()
    assert overlap > 0.85, overlap  # the mask covers the drawn box, not the other class's box
    # The geometry by hand: Resize(int(32 * 256 / 224) = 36) scales 80x60 by 0.6 to 48x36, and
    # CenterCrop(32) drops 8 columns and 2 rows. The box's pixel edges, x in [30, 60) and
    # y in [20, 45), land on whole pixels, [18, 36) and [12, 27), so any nearest rule gives
    # columns [10, 28) and rows [10, 25) of the crop.
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[10:25, 10:28] = True
    assert torch.equal(trial["mask"], expected)


def test_imagenet_without_boxes_has_no_localisation(tmp_path):
    make_imagenet(tmp_path, [("n01000001", (30, 20, 59, 44), False), ("n02000002", (10, 10, 30, 30), False)])
    data = imagenet_module(tmp_path, box_dir=None)
    assert data.localization_dataset() is None
    assert list(unsupported_metrics(data, ["acc", "spg", "nqh"])) == ["spg"]
    with pytest.raises(FileNotFoundError, match="data.box_dir: directory not found"):
        imagenet_module(tmp_path, box_dir=tmp_path / "nope").localization_dataset()
