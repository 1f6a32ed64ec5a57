"""The embedded synthetic data set's generator: shapes on clutter, written in real on-disk formats.

``generate_synthetic`` writes, under ``<root>/synthetic_<hash of the parameters>/``::

    train/<class_name>/<NNNNN>.png          ImageFolder layout, read by ClassFolderDataset
    val/<class_name>/<NNNNN>.png
    annotations/instances_train.json        COCO instances format, read by pycocotools
    annotations/instances_val.json
    meta.json                               the parameters; written last, marks completion

:class:`~datamodules.synthetic.SyntheticDataModule` reads them.

Every image has a cluttered background (low-frequency colour field, random strokes and small
blobs, pixel noise), a few textured decoys, and exactly one object of its class. Classes differ
only by the object's SHAPE; its colour is random, its side a random fraction of the image side in
``object_scale``, and its position uniform over every place where it fits whole (touching the
border included), so the object is rarely at the centre: a map that points at the centre of every
image scores low. Decoys (``decoys``: how many per image, a range) are rectangles of 15%-35% of
the side filled with high-contrast stripes or checks in random colours, placed clear of the object:
salient regions that compete with the object for a model's attention, yet never look like a class
(objects are solid, decoys are textured, blobs are smaller than any object). Each object has one
COCO annotation whose segmentation is the RLE of the exact set of pixels the object was painted
on, so evaluation masks are exact. Fields beyond the COCO format (pycocotools ignores them):
- annotation ``"color"``: the object's RGB colour (every mask pixel has exactly this colour);
- image ``"context_cue"``: null, or ``{"corner", "box": [x, y, w, h], "color"}`` of the cue.

Context cue (``context_bias``): with that probability a TRAINING image also carries a solid patch
of a class-specific colour in a corner that does not overlap the object. It is a shortcut that
predicts the class without looking at the object, the kind of spurious evidence the GC loss
should suppress. Validation images never carry it, so validation accuracy and heatmap scores show
whether a model relies on the cue. The random stream draws the cue last, so the same image with a
different ``context_bias`` differs only by the patch.

Determinism: image i of class c in split s comes from ``numpy.random.default_rng([seed, s, c, i])``
alone, so regeneration gives byte-identical files and any image can be rebuilt on its own.
"""

from __future__ import annotations

import colorsys
import json
import math
import shutil
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw
from pydantic import Field, ValidationInfo, field_validator

from gcmodels.files import json_digest, staged
from gcmodels.options import Options, Sequence

# Bump when the generator's output changes, so that data cached by an older version is not reused.
GENERATOR_VERSION = 3

SPLIT_IDS = {"train": 0, "val": 1}
MIN_IMAGE_SIZE = 32
# Below this side in pixels the thin parts and gaps of some shapes (the ring's hole, the bars'
# gap, the cross's arms) shrink to a pixel or two and shapes stop being told apart.
MIN_OBJECT_PIXELS = 14


def _radial_polygon(radii: list[float]) -> tuple[tuple[float, float], ...]:
    """Polygon centred in the unit box, vertices at equal angles from the top, given radii."""
    step = 2 * math.pi / len(radii)
    return tuple(
        (0.5 + r * math.sin(k * step), 0.5 - r * math.cos(k * step)) for k, r in enumerate(radii)
    )


# Each shape is a list of drawing operations in the unit box [0, 1]^2, scaled to the object's box.
# Fill 255 adds pixels to the object mask, fill 0 removes them (holes, the crescent's bite).
SHAPES: dict[str, list[tuple[str, Any, int]]] = {
    "circle": [("ellipse", (0, 0, 1, 1), 255)],
    "square": [("rectangle", (0.1, 0.1, 0.9, 0.9), 255)],
    "triangle": [("polygon", ((0.5, 0), (1, 1), (0, 1)), 255)],
    "cross": [("rectangle", (0.35, 0, 0.65, 1), 255), ("rectangle", (0, 0.35, 1, 0.65), 255)],
    "ring": [("ellipse", (0, 0, 1, 1), 255), ("ellipse", (0.3, 0.3, 0.7, 0.7), 0)],
    "star": [("polygon", _radial_polygon([0.5, 0.2] * 5), 255)],
    "diamond": [("polygon", _radial_polygon([0.5] * 4), 255)],
    "hexagon": [("polygon", _radial_polygon([0.5] * 6), 255)],
    "bars": [("rectangle", (0, 0.1, 1, 0.38), 255), ("rectangle", (0, 0.62, 1, 0.9), 255)],
    "l_shape": [("rectangle", (0, 0, 0.35, 1), 255), ("rectangle", (0, 0.65, 1, 1), 255)],
    "arrow": [
        (
            "polygon",
            ((0, 0.35), (0.55, 0.35), (0.55, 0.1), (1, 0.5), (0.55, 0.9), (0.55, 0.65), (0, 0.65)),
            255,
        )
    ],
    "crescent": [("ellipse", (0, 0, 1, 1), 255), ("ellipse", (0.35, -0.1, 1.15, 0.8), 0)],
}
MAX_CLASSES = len(SHAPES)

# One saturated colour per class for the context cue, far apart from each other.
CUE_COLORS = [
    (255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (128, 0, 255), (0, 128, 128), (128, 64, 0), (255, 160, 200), (0, 0, 0),
]  # fmt: skip

CUE_SCALE = 0.12  # cue patch side as a fraction of the image side
DECOY_SCALE = (0.15, 0.35)  # decoy sides as fractions of the image side
BLOB_SCALE = (0.03, 0.12)  # background blobs' sides: solid ellipses, so smaller than any object
DECOY_PLACEMENT_TRIES = 20  # a decoy that finds no free place in this many draws is left out


class SyntheticParams(Options):
    """Every parameter the generated files depend on (the synthetic ``data`` group's own options).

    No defaults: the values live in ``conf/data/synthetic.yaml``.
    """

    num_classes: Annotated[int, Field(ge=2, le=MAX_CLASSES)]
    image_size: Annotated[int, Field(ge=MIN_IMAGE_SIZE)]
    train_per_class: Annotated[int, Field(ge=1)]
    val_per_class: Annotated[int, Field(ge=1)]
    # [smallest, largest] object side as a fraction of the image side. With two cue patches per
    # axis beside it, an object never touches both the left and right (or top and bottom) patches,
    # so the context cue always finds a free corner; the smallest must exceed the largest solid
    # background blob, which could pass for a circle.
    object_scale: Annotated[Sequence[Annotated[float, Field(gt=BLOB_SCALE[1], lt=1 - 2 * CUE_SCALE)]],
                            Field(min_length=2, max_length=2)]
    # [fewest, most] textured decoys per image.
    decoys: Annotated[Sequence[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]
    context_bias: Annotated[float, Field(ge=0, le=1)]
    # numpy seeds must be non-negative.
    seed: Annotated[int, Field(ge=0)]

    @field_validator("object_scale")
    @classmethod
    def ordered_and_drawable(cls, scale: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError("must be [smallest, largest]")
        size = info.data.get("image_size")
        if size is not None and scale[0] * size < MIN_OBJECT_PIXELS:
            raise ValueError(f"at data.image_size={size} makes objects of {scale[0] * size:.1f} px; at least "
                             f"{MIN_OBJECT_PIXELS} px keep shapes apart: raise the smallest scale or the image size")
        return scale

    @field_validator("decoys")
    @classmethod
    def ordered(cls, decoys: tuple[int, int]) -> tuple[int, int]:
        if decoys[0] > decoys[1]:
            raise ValueError("must be [fewest, most]")
        return decoys

    def to_dict(self) -> dict[str, Any]:
        # Lists, as JSON reads them back (meta.json is compared with this).
        fields = {key: list(value) if isinstance(value, tuple) else value for key, value in self.model_dump().items()}
        return {"generator_version": GENERATOR_VERSION, **fields}

    @property
    def digest(self) -> str:
        return json_digest(self.to_dict(), 10)

    @property
    def class_names(self) -> list[str]:
        return [f"class_{index:02d}_{shape}" for index, shape in enumerate(list(SHAPES)[: self.num_classes])]


def synthetic_dir(root: str | Path, params: SyntheticParams) -> Path:
    """Directory that holds (or will hold) the data set generated with ``params``."""
    return Path(root) / f"synthetic_{params.digest}"


def is_complete(directory: Path, params: SyntheticParams) -> bool:
    """True when ``directory`` holds a finished generation with ``params`` (meta.json written last)."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("params") == params.to_dict()


def generate_synthetic(root: str | Path, params: SyntheticParams) -> Path:
    """Generate the data set under ``root`` unless it is already there; return its directory.

    Files are written into a temporary sibling directory that is renamed into place when
    complete, so a crash never leaves a half-written data set under the final name, and two
    processes generating at once do not write into the same files. A directory under the final
    name without a valid meta.json (e.g. copied partially) is deleted and generated again.
    """
    target = synthetic_dir(root, params)
    if is_complete(target, params):
        return target
    if target.exists():
        shutil.rmtree(target)
    try:
        with staged(target, directory=True) as staging:
            _write_dataset(staging, params)
    except OSError:
        if not is_complete(target, params):  # anything but "another process finished first"
            raise
    return target


def _write_dataset(directory: Path, params: SyntheticParams) -> None:
    counts = {}
    for split, per_class in (("train", params.train_per_class), ("val", params.val_per_class)):
        coco = _write_split(directory, split, per_class, params)
        (directory / "annotations").mkdir(exist_ok=True)
        with (directory / "annotations" / f"instances_{split}.json").open("w") as handle:
            json.dump(coco, handle, separators=(",", ":"))
        counts[split] = len(coco["images"])
    meta = {"params": params.to_dict(), "class_names": params.class_names, "num_images": counts}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))  # last: marks completion


def _write_split(directory: Path, split: str, per_class: int, params: SyntheticParams) -> dict[str, Any]:
    """Render and save one split's images; return its COCO instances dictionary."""
    images, annotations = [], []
    for class_index, class_name in enumerate(params.class_names):
        (directory / split / class_name).mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([params.seed, SPLIT_IDS[split], class_index, i])
            pixels, mask, color, cue = _render(rng, params, class_index, with_cue=split == "train")
            file_name = f"{class_name}/{i:05d}.png"
            Image.fromarray(pixels).save(directory / split / file_name, format="PNG")
            image_id = len(images) + 1  # one object per image: the annotation shares the id
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": params.image_size,
                    "height": params.image_size,
                    "context_cue": cue,
                }
            )
            annotations.append(
                {
                    "id": image_id,
                    "image_id": image_id,
                    "category_id": class_index + 1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                    "color": color,
                }
            )
    categories = [
        {"id": index + 1, "name": name, "supercategory": "shape"}
        for index, name in enumerate(params.class_names)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def _render(
    rng: np.random.Generator, params: SyntheticParams, class_index: int, with_cue: bool
) -> tuple[np.ndarray, np.ndarray, list[int], dict[str, Any] | None]:
    """One image: (pixels uint8 [S, S, 3], object mask bool [S, S], object colour, cue or None)."""
    size = params.image_size
    pixels = _background(rng, size)

    smallest, largest = (round(scale * size) for scale in params.object_scale)
    side = int(rng.integers(smallest, largest + 1))
    left, top = (int(v) for v in rng.integers(0, size - side + 1, size=2))  # anywhere it fits whole
    mask = _shape_mask(list(SHAPES)[class_index], size, left, top, side)
    _draw_decoys(rng, pixels, (left, top, side), int(rng.integers(params.decoys[0], params.decoys[1] + 1)))
    # Bright object on a dark background and dark on a bright one, so it is always visible.
    dark_background = pixels[mask].mean() < 128
    hue, saturation, value = rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.0, 1.0)
    value = 0.75 + 0.25 * value if dark_background else 0.1 + 0.25 * value
    color = [round(255 * channel) for channel in colorsys.hsv_to_rgb(hue, saturation, value)]
    pixels[mask] = color

    # The cue's random numbers come last (see the module docstring) and are drawn for val too,
    # so that every image consumes the same stream; val images simply never paint the patch.
    cue_drawn = rng.random() < params.context_bias
    cue = _cue_patch(rng, mask, size, class_index)
    if not (with_cue and cue_drawn):
        return pixels, mask, color, None
    x, y, w, h = cue["box"]
    pixels[y : y + h, x : x + w] = cue["color"]
    return pixels, mask, color, cue


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour field + random strokes and small blobs + pixel noise, as uint8."""
    coarse = rng.integers(40, 216, size=(3, 3, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    max_width = max(1, size // 40)
    for _ in range(int(rng.integers(3, 7))):
        points = [tuple(p) for p in rng.integers(0, size, size=(int(rng.integers(2, 5)), 2)).tolist()]
        color = tuple(rng.integers(0, 256, size=3).tolist())
        draw.line(points, fill=color, width=int(rng.integers(1, max_width + 1)))
    # Blobs stay below the smallest object (object_scale[0] > BLOB_SCALE[1]) and are plain
    # ellipses, so they are clutter and never look like an instance of a class.
    for _ in range(int(rng.integers(2, 5))):
        w, h = (rng.uniform(*BLOB_SCALE, size=2) * size).tolist()
        x, y = (rng.uniform(0, size, size=2)).tolist()
        draw.ellipse((x, y, x + w, y + h), fill=tuple(rng.integers(0, 256, size=3).tolist()))
    noise = rng.integers(-12, 13, size=(size, size, 3), dtype=np.int16)  # uniform, std ~7
    return np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)


def _draw_decoys(rng: np.random.Generator, pixels: np.ndarray, object_box: tuple[int, int, int], count: int) -> None:
    """Paint ``count`` textured rectangles (stripes or checks of two random colours) into
    ``pixels`` in place, each clear of the object's box by a margin of 2 px and of the other
    decoys; one that finds no free place in ``DECOY_PLACEMENT_TRIES`` draws is left out."""
    size = pixels.shape[0]
    left, top, side = object_box
    taken = [(left - 2, top - 2, left + side + 2, top + side + 2)]
    rows, cols = np.mgrid[0:size, 0:size]
    for _ in range(count):
        w, h = (int(v) for v in np.round(rng.uniform(*DECOY_SCALE, size=2) * size))
        for _ in range(DECOY_PLACEMENT_TRIES):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x, y, x + w, y + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                break
        else:
            continue
        taken.append(box)
        # Stripes of 2 px at 80 px, up to 6 px at 224 px: a texture, never a shape's part.
        period = int(rng.integers(2, max(2, round(size / 40)) + 1))
        pattern = int(rng.integers(3))  # 0 horizontal stripes, 1 vertical, 2 checks
        r, c = rows[y : y + h, x : x + w] // period, cols[y : y + h, x : x + w] // period
        on = (r if pattern == 0 else c if pattern == 1 else r + c) % 2 == 1
        # Each channel of the second colour 64-192 levels from the first's (mod 256): never a
        # near-solid rectangle that could pass for a square object.
        first = rng.integers(0, 256, size=3)
        second = (first + rng.integers(64, 193, size=3)) % 256
        pixels[y : y + h, x : x + w] = np.where(on[..., None], first, second)


def _shape_mask(shape: str, size: int, left: int, top: int, side: int) -> np.ndarray:
    """Exact pixel mask of ``shape`` drawn in the box (left, top, side, side), as bool [S, S]."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)

    def scale(points: Any) -> list[float]:
        flat = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return (flat * side + (left, top)).ravel().tolist()

    for kind, points, fill in SHAPES[shape]:
        getattr(draw, kind)(scale(points), fill=fill)
    return np.asarray(mask) > 0


def _cue_patch(rng: np.random.Generator, mask: np.ndarray, size: int, class_index: int) -> dict[str, Any]:
    """A cue patch in a random image corner that does not overlap the object's bounding box."""
    patch = max(4, round(CUE_SCALE * size))
    rows, cols = np.nonzero(mask)
    corners = {
        "top_left": (0, 0),
        "top_right": (size - patch, 0),
        "bottom_left": (0, size - patch),
        "bottom_right": (size - patch, size - patch),
    }
    free = [
        name
        for name, (x, y) in corners.items()
        if x + patch <= cols.min() or x > cols.max() or y + patch <= rows.min() or y > rows.max()
    ]
    corner = free[int(rng.integers(len(free)))]
    x, y = corners[corner]
    return {"corner": corner, "box": [x, y, patch, patch], "color": list(CUE_COLORS[class_index])}

