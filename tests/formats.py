"""Tiny copies of ImageNet and MS-COCO in exactly their distributed formats, for the tests.

ImageNet: ``train/<wnid>/*.JPEG``; validation flat (``val/ILSVRC2012_val_*.JPEG`` with the
ILSVRC2012 box XML files beside them, 1-based inclusive corners) or in class folders. COCO:
``<split>/*.jpg`` and ``annotations/instances_<split>.json`` with polygon, RLE and crowd
annotations and an image without any. Images have different sizes and a solid object drawn where
the annotations say, on a noisy background.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850")
OTHER_WNID = "n09999999"  # an object of a class outside the training classes
COLOURS = ((230, 40, 40), (40, 200, 60), (50, 70, 230))
VAL_SIZES = ((48, 36), (36, 48), (40, 40))  # width, height

# Validation images: (class, size index, [(wnid or None for its own class, box, difficult)]);
# boxes are (xmin, ymin, xmax, ymax), 1-based and inclusive as in the XML files.
VAL_IMAGES = (
    (0, 0, [(None, (3, 4, 20, 18), False)]),
    (1, 0, [(None, (20, 10, 40, 30), False), (OTHER_WNID, (1, 1, 8, 8), False)]),
    (2, 1, [(None, (5, 20, 30, 44), False)]),
    (0, 1, [(None, (2, 2, 12, 12), True)]),  # only difficult boxes: out of PG and SPG
    (1, 2, [(None, (10, 10, 20, 22), False), (None, (28, 26, 38, 38), True)]),  # union of two boxes
    (2, 2, [(None, (30, 2, 39, 12), False)]),
    (0, 2, [(None, (1, 25, 15, 40), False)]),
    (1, 1, [(None, (15, 30, 34, 46), False)]),
    (2, 0, [(None, (35, 5, 47, 20), False)]),
)


def _background(size: tuple[int, int], seed: int) -> Image.Image:
    noise = np.random.default_rng(seed).integers(90, 160, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(noise)


def draw_box(image: Image.Image, box: tuple[int, int, int, int], colour) -> None:
    """Fill a 1-based inclusive box."""
    xmin, ymin, xmax, ymax = box
    pixels = np.array(image)
    pixels[ymin - 1:ymax, xmin - 1:xmax] = colour
    image.paste(Image.fromarray(pixels))


def box_xml(path: Path, image_name: str, size: tuple[int, int], objects, database: str = "ILSVRC_2012",
            segmented: bool = False) -> None:
    """An ILSVRC2012 validation box file or a PASCAL VOC annotation (the same schema):
    ``objects`` = [(class, (xmin, ymin, xmax, ymax), difficult[, truncated])]."""
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>{int(truncated)}</truncated>"
        f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1), difficult, truncated in ((*entry, False)[:4] for entry in objects)
    )
    path.write_text(
        f"<annotation><folder>val</folder><filename>{image_name}</filename><source><database>{database}"
        f"</database></source><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"<segmented>{int(segmented)}</segmented>{body}</annotation>"
    )


def write_imagenet(root: Path, flat: bool = True, train_per_class: int = 4) -> list[dict]:
    """The tree under ``root``; returns the validation images as dicts (path, label, size, objects)."""
    for label, wnid in enumerate(WNIDS):
        for index in range(train_per_class):
            size = VAL_SIZES[index % len(VAL_SIZES)]
            image = _background(size, seed=100 * label + index)
            draw_box(image, (4 + 2 * index, 4, 24 + 2 * index, 24), COLOURS[label])
            path = root / "train" / wnid / f"{wnid}_{index}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=95)
    images = []
    for number, (label, size_index, objects) in enumerate(VAL_IMAGES, start=1):
        size = VAL_SIZES[size_index]
        objects = [(wnid or WNIDS[label], box, difficult) for wnid, box, difficult in objects]
        image = _background(size, seed=number)
        for wnid, box, _ in objects:
            draw_box(image, box, COLOURS[WNIDS.index(wnid)] if wnid in WNIDS else (250, 250, 250))
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        folder = root / "val" if flat else root / "val" / WNIDS[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / name, quality=95)
        box_xml(folder / name.replace(".JPEG", ".xml"), Path(name).stem, size, objects)
        images.append({"path": folder / name, "label": label, "size": size, "objects": objects})
    return images


# --------------------------------------------------------------------------- COCO

CATEGORIES = ({"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"})
COCO_SIZES = ((48, 36), (40, 40))


def _rle(height: int, width: int, box: tuple[int, int, int, int], compressed: bool) -> dict:
    """RLE of a 0-based (x, y, w, h) box: compressed (string counts) or uncompressed (a list, as
    COCO stores crowds)."""
    x, y, w, h = box
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y:y + h, x:x + w] = 1
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    counts, current, run = [], 0, 0  # column-major runs, starting with a run of zeros
    for value in mask.flatten(order="F"):
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": [height, width], "counts": counts}


def write_coco(root: Path, year: int = 2014, images_per_split: int = 6) -> None:
    """``train<year>`` and ``val<year>``: image i holds categories by a fixed pattern, drawn as
    boxes and annotated as a polygon, a compressed RLE or an uncompressed crowd RLE in turn; the
    last image of each split has no annotation."""
    for split in ("train", "val"):
        name = f"{split}{year}"
        images, annotations = [], []
        for image_id in range(1, images_per_split + 1):
            width, height = COCO_SIZES[image_id % len(COCO_SIZES)]
            image = _background((width, height), seed=image_id + (0 if split == "train" else 50))
            file_name = f"COCO_{name}_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            if image_id < images_per_split:
                present = [k for k in range(len(CATEGORIES)) if (image_id + k) % 3 != 0] or [0]
                for order, k in enumerate(present):
                    box = (2 + 16 * order, 3 + 4 * k, 14, 12)  # x, y, w, h
                    x, y, w, h = box
                    draw_box(image, (x + 1, y + 1, x + w, y + h), COLOURS[k])
                    kind = (image_id + order) % 3
                    if kind == 0:
                        segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                    else:
                        segmentation = _rle(height, width, box, compressed=kind == 1)
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": CATEGORIES[k]["id"], "iscrowd": int(kind == 2),
                                        "segmentation": segmentation, "area": float(w * h), "bbox": list(box)})
            path = root / name / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=95)
        ann_file = root / "annotations" / f"instances_{name}.json"
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                        "categories": list(CATEGORIES)}))


# --------------------------------------------------------------------------- a user's own folders

FOLDER_CLASSES = ("cat", "dog", "fox")


def write_folder(root: Path, train_per_class: int = 4, val_per_class: int = 3, annotations: bool = True) -> dict:
    """``train/<class>/*.png`` and ``val/<class>/*.jpg`` (torchvision's ImageFolder), and with
    ``annotations`` a COCO instances json per split (``annotations/{train,val}.json``, file names
    ``<class>/<file>``, categories named after the class folders, ids not in class order):
    each image holds its class's object as a box, annotated as a polygon or an RLE in turn; the
    last validation image of the first class has no annotation. Returns the val json's path and
    the validation images' boxes by file name (0-based x, y, w, h)."""
    categories = [{"id": 10 * (index + 1) + 3, "name": name} for index, name in enumerate(reversed(FOLDER_CLASSES))]
    category_of = {category["name"]: category["id"] for category in categories}
    boxes = {}
    for split, count, extension in (("train", train_per_class, "png"), ("val", val_per_class, "jpg")):
        images, objects = [], []
        for label, name in enumerate(FOLDER_CLASSES):
            for index in range(count):
                width, height = COCO_SIZES[index % len(COCO_SIZES)]
                image = _background((width, height), seed=1000 * (split == "val") + 10 * label + index)
                box = (2 + 3 * index, 4 + 2 * label, 16, 14)
                x, y, w, h = box
                draw_box(image, (x + 1, y + 1, x + w, y + h), COLOURS[label])
                file_name = f"{name}/{name}_{index}.{extension}"
                path = root / split / file_name
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
                image_id = len(images) + 7
                images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
                if split == "val" and label == 0 and index == count - 1:
                    continue  # an image without objects
                segmentation = ([[x, y, x + w, y, x + w, y + h, x, y + h]] if index % 2 == 0
                                else _rle(height, width, box, compressed=True))
                objects.append({"id": len(objects) + 1, "image_id": image_id, "category_id": category_of[name],
                                "iscrowd": 0, "segmentation": segmentation, "area": float(w * h), "bbox": list(box)})
                if split == "val":
                    boxes[file_name] = box
        if annotations:
            ann_file = root / "annotations" / f"{split}.json"
            ann_file.parent.mkdir(parents=True, exist_ok=True)
            ann_file.write_text(json.dumps({"images": images, "annotations": objects, "categories": categories}))
    return {"val_annotations": root / "annotations" / "val.json",
            "train_annotations": root / "annotations" / "train.json", "boxes": boxes}


# --------------------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
# A segmentation averages annotators: 255 where all agree, 204 where most do, 102 where few do.
CUB_LEVELS = (255, 204, 102)


def write_cub(root: Path, per_class: int = 4) -> dict:
    """``CUB_200_2011/`` as distributed, and ``segmentations/`` beside ``images/``: per class,
    images alternately in the training and test split (ids in class order, from 1), each with its
    bird as a filled box whose ``bounding_boxes.txt`` entry is 0-based (x, y, width, height),
    and a segmentation PNG of the box's top rows at 255, middle rows at 204, bottom rows at 102;
    the last test image has no segmentation. Returns each image's record by relative path."""
    lines = {name: [] for name in ("images", "classes", "image_class_labels", "train_test_split", "bounding_boxes")}
    records = {}
    for class_id, name in enumerate(CUB_CLASSES, start=1):
        lines["classes"].append(f"{class_id} {name}")
        for index in range(per_class):
            image_id = (class_id - 1) * per_class + index + 1
            width, height = COCO_SIZES[index % len(COCO_SIZES)]
            box = (3 + 2 * index, 5 + class_id, 18, 15)
            x, y, w, h = box
            image = _background((width, height), seed=500 + image_id)
            draw_box(image, (x + 1, y + 1, x + w, y + h), COLOURS[class_id - 1])
            relative = f"{name}/{name.split('.')[1]}_{image_id:04d}_{index}.jpg"
            (root / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / "images" / relative, quality=95)
            train = index % 2 == 0
            segmentation = np.zeros((height, width), dtype=np.uint8)
            for band, level in enumerate(CUB_LEVELS):
                segmentation[y + 5 * band:y + 5 * (band + 1), x:x + w] = level
            last_test = class_id == len(CUB_CLASSES) and index == per_class - 1
            if not last_test:
                png = root / "segmentations" / Path(relative).with_suffix(".png")
                png.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(segmentation).save(png)
            lines["images"].append(f"{image_id} {relative}")
            lines["image_class_labels"].append(f"{image_id} {class_id}")
            lines["train_test_split"].append(f"{image_id} {int(train)}")
            lines["bounding_boxes"].append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
            records[relative] = {"label": class_id - 1, "train": train, "box": box, "size": (width, height),
                                 "segmented": not last_test}
    for name, rows in lines.items():
        (root / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return records


# --------------------------------------------------------------------------- PASCAL VOC 2007

# Test images: (id, (width, height), [(class, box, PASCAL difficult, truncated)], segmented);
# boxes 1-based and inclusive as in the XML files.
VOC_TEST = (
    # A small dog (a quarter of the image is 480 px; its box 120) beside a large person: the dog
    # is in Zhang et al.'s difficult subset, the person is not. Segmented, the dog in front.
    ("000001", (48, 40), [("dog", (5, 5, 16, 14), False, False), ("person", (3, 2, 46, 38), False, True)], True),
    # One large cat: easy.
    ("000002", (40, 40), [("cat", (2, 2, 39, 39), False, False)], False),
    # A cat in two boxes, one PASCAL-difficult (its union counts), and a dog whose only box is
    # PASCAL-difficult: no dog trial (TorchRay skips it).
    ("000004", (48, 36), [("cat", (2, 2, 12, 12), False, True), ("cat", (30, 20, 44, 33), True, False),
                          ("dog", (20, 4, 28, 12), True, False)], True),
    # A small person alone: not difficult (no other class).
    ("000007", (40, 48), [("person", (10, 10, 18, 20), False, False)], False),
)
VOC_TRAIN = (
    ("000005", (48, 40), [("cat", (4, 4, 30, 30), False, False), ("person", (32, 6, 46, 38), False, False)], True),
    ("000006", (40, 40), [("dog", (6, 8, 34, 36), False, False)], False),
    ("000009", (48, 36), [("person", (2, 3, 20, 34), False, False), ("dog", (24, 10, 46, 30), True, False)], False),
    ("000012", (40, 48), [("cat", (8, 12, 36, 44), False, True)], False),
)


def _voc_palette() -> list[int]:
    """VOC's colour map: a palette index's bits spread over R, G and B from the high bit down."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        for shift in range(8):
            red |= ((index >> (3 * shift)) & 1) << (7 - shift)
            green |= ((index >> (3 * shift + 1)) & 1) << (7 - shift)
            blue |= ((index >> (3 * shift + 2)) & 1) << (7 - shift)
        palette += [red, green, blue]
    return palette


def write_voc(root: Path, classes: tuple[str, ...]) -> dict:
    """``VOC2007/`` as distributed (``classes``: VOC's 20 names, in their order): JPEGImages,
    Annotations (with PASCAL-difficult and truncated objects), ImageSets/Main/{trainval,test}.txt
    and, for the segmented images, SegmentationClass palette PNGs (index k + 1 for class k, 0 the
    background, a 1-pixel 255 border around each object) and SegmentationObject PNGs. Each object
    is drawn as a filled box, later objects over earlier ones. Returns each image's entry by id."""
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main", "SegmentationClass", "SegmentationObject"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    records = {}
    for split, images in (("test", VOC_TEST), ("trainval", VOC_TRAIN)):
        for image_id, size, objects, segmented in images:
            image = _background(size, seed=700 + int(image_id))
            labels = np.zeros((size[1], size[0]), dtype=np.uint8)
            instances = np.zeros_like(labels)
            # Largest first, so that the smaller objects are in front, as in the pictures.
            order = sorted(range(len(objects)), key=lambda i: -(objects[i][1][2] - objects[i][1][0]))
            for rank, index in enumerate(order, start=1):
                name, (x0, y0, x1, y1), _, _ = objects[index]
                draw_box(image, (x0, y0, x1, y1), COLOURS[classes.index(name) % len(COLOURS)])
                labels[y0 - 2:y1 + 1, x0 - 2:x1 + 1] = 255
                instances[y0 - 2:y1 + 1, x0 - 2:x1 + 1] = 255
                labels[y0 - 1:y1, x0 - 1:x1] = classes.index(name) + 1
                instances[y0 - 1:y1, x0 - 1:x1] = rank
            image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            box_xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", size, objects, "The VOC2007 Database",
                    segmented)
            if segmented:
                for folder, pixels in (("SegmentationClass", labels), ("SegmentationObject", instances)):
                    png = Image.fromarray(pixels, mode="P")
                    png.putpalette(_voc_palette())
                    png.save(root / folder / f"{image_id}.png")
            records[image_id] = {"split": split, "size": size, "objects": objects, "segmented": segmented,
                                 "segmentation": labels if segmented else None}
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(
            "".join(f"{image_id}\n" for image_id, *_ in images))
        # The per-class lists beside them, as distributed: "<id> 1|-1|0".
        for name in ("cat", "dog", "person"):
            (root / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text(
                "".join(f"{image_id} {1 if any(o[0] == name for o in objects) else -1}\n"
                        for image_id, _, objects, _ in images))
    return records
