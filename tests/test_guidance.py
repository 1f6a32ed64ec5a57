"""Explanation guidance with masks (loss=energy|l1|rrr|ppce): each loss against its closed form on
hand-made maps and masks and against a transcription of the authors' box losses, the authors'
post-processing order, finite differences of the second-order gradient, and the training samples'
masks (moved with the image, grown, drawn for a share of the images)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from torchvision.transforms import v2

from datamodules import ImageNetDataModule
from datamodules.guidance import CocoTrainingMasks, GuidedSamples, annotated_images
from datamodules.images import load_rgb, to_float_image
from gcmodels.gradcam import gradcam
from gcmodels.objectives import OBJECTIVES, guidance_objective
from gcmodels.options import ConfigError
from losses.guidance import GUIDANCE_LOSSES, energy_loss, guidance_terms, l1_loss, ppce_loss, rrr_loss
from tests.conftest import gradcheck_in_weights, tiny_net
from tests.test_datamodules import coco_module, synthetic_module, write_coco_split

# ------------------------------------------------------------------ the authors' losses, transcribed
# sukrutrao/Model-Guidance losses.py (one image [H, W], a list of boxes (xmin, ymin, xmax, ymax)),
# and attribution_methods.py's post-processing, without .cuda().


def box_mask(boxes, shape):
    mask = torch.zeros(shape, dtype=torch.long)
    for xmin, ymin, xmax, ymax in boxes:
        mask[ymin:ymax, xmin:xmax] = 1
    return mask


def authors_energy(attributions, boxes):
    positive = attributions.clamp(min=0)
    mask = box_mask(boxes, positive.shape)
    num = positive[torch.where(mask == 1)].sum()
    den = positive.sum()
    if den < 1e-7:
        return 1 - num
    return 1 - num / den


def authors_rrr(attributions, boxes):
    mask = box_mask(boxes, attributions.shape)
    return torch.square(attributions[torch.where(mask == 0)]).sum()


def authors_l1(attributions, boxes):
    return torch.nn.L1Loss(reduction="mean")(attributions, box_mask(boxes, attributions.shape))


def authors_ppce(attributions, boxes):
    inside = attributions[torch.where(box_mask(boxes, attributions.shape) == 1)]
    return torch.nn.BCELoss(reduction="mean")(inside, torch.ones_like(inside))


AUTHORS = {"energy": authors_energy, "l1": authors_l1, "rrr": authors_rrr, "ppce": authors_ppce}


def authors_post_processing(attributions, only_positive, binarize, size):
    """AttributorBase.apply_post_processing on [B, 1, h, w]: positive part, division by max |a|,
    then captum's bilinear interpolation."""
    if only_positive:
        attributions = attributions.clamp(min=0)
    if binarize:
        attr_max = attributions.abs().amax(dim=(1, 2, 3), keepdim=True)
        attributions = torch.where(attr_max == 0, attributions, attributions / attr_max)
    return F.interpolate(attributions, size=size, mode="bilinear")


def random_boxes(generator, count, side):
    boxes = []
    for _ in range(count):
        x0, y0 = torch.randint(0, side - 2, (2,), generator=generator).tolist()
        x1 = int(torch.randint(x0 + 1, side + 1, (), generator=generator))
        y1 = int(torch.randint(y0 + 1, side + 1, (), generator=generator))
        boxes.append((x0, y0, x1, y1))
    return boxes


@pytest.mark.parametrize("name", GUIDANCE_LOSSES)
def test_each_loss_is_the_authors_on_boxes_after_their_post_processing(name):
    generator = torch.Generator().manual_seed(2)
    side, size = 4, 16
    # Grad-CAM-like maps at a coarse layer (non-negative, one all zero) and signed maps.
    maps = torch.cat([torch.rand(3, side, side, generator=generator, dtype=torch.float64),
                      torch.zeros(1, side, side, dtype=torch.float64),
                      torch.randn(2, side, side, generator=generator, dtype=torch.float64)])
    boxes = [random_boxes(generator, 1 + index % 2, size) for index in range(len(maps))]
    masks = torch.stack([box_mask(image_boxes, (size, size)).bool() for image_boxes in boxes])
    _, positive, scaled = GUIDANCE_LOSSES[name]
    processed = authors_post_processing(maps[:, None], positive, scaled, (size, size))[:, 0]
    expected = torch.stack([AUTHORS[name](map_, image_boxes) for map_, image_boxes in zip(processed, boxes)])
    torch.testing.assert_close(guidance_terms(name, maps, masks), expected.to(torch.float64))


def test_closed_forms_on_hand_made_maps_and_masks():
    maps = torch.tensor([[[0.0, 2.0], [-1.0, 2.0]]], dtype=torch.float64)
    mask = torch.tensor([[[False, True], [False, False]]])
    # Energy: positive mass inside 2 of 4.
    torch.testing.assert_close(energy_loss(maps, mask), torch.tensor([0.5], dtype=torch.float64))
    # L1: |0-0| + |2-1| + |-1-0| + |2-0|, over 4 pixels.
    torch.testing.assert_close(l1_loss(maps, mask), torch.tensor([1.0], dtype=torch.float64))
    # RRR: 0 + 1 + 4 outside.
    torch.testing.assert_close(rrr_loss(maps, mask), torch.tensor([5.0], dtype=torch.float64))
    # PPCE: -log(0.5) at the one pixel inside.
    half = torch.full((1, 2, 2), 0.5, dtype=torch.float64)
    torch.testing.assert_close(ppce_loss(half, mask), torch.log(torch.tensor([2.0], dtype=torch.float64)))


@pytest.mark.parametrize("name", GUIDANCE_LOSSES)
def test_an_empty_mask_and_an_all_zero_map_give_defined_values(name):
    zero, some = torch.zeros(1, 3, 3, dtype=torch.float64), torch.rand(1, 3, 3, dtype=torch.float64)
    empty, full = torch.zeros(1, 3, 3, dtype=torch.bool), torch.ones(1, 3, 3, dtype=torch.bool)
    expected = {  # (zero map, some mask), (some map, empty mask)
        "energy": (1.0, 1.0),  # no positive mass: 1 - 0; nothing inside: 1 - 0 / sum
        "l1": (1.0, None),  # |0 - 1| everywhere
        "rrr": (0.0, None),
        "ppce": (100.0, 0.0),  # BCE's log clamped at -100; no pixel inside to score
    }[name]
    for maps, masks, value in ((zero, full, expected[0]), (some, empty, expected[1])):
        maps = maps.clone().requires_grad_(True)
        term = guidance_terms(name, maps, masks)
        assert torch.isfinite(term).all()
        if value is not None:
            torch.testing.assert_close(term, torch.tensor([value], dtype=torch.float64))
        (grad,) = torch.autograd.grad(term.sum(), maps)
        assert torch.isfinite(grad).all()


def guided_batch(batch=4, side=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch, side, side, dtype=torch.bool)
    for index in range(batch):
        masks[index, index % 3:index % 3 + 4, 1:6] = True
    return {"image": torch.rand(batch, 3, side, side, generator=generator, dtype=torch.float64),
            "target": torch.arange(batch) % 4, "guide_class": torch.arange(batch) % 4, "mask": masks,
            "annotated": torch.tensor([True, True, False, True])[:batch]}


@pytest.mark.parametrize("name", GUIDANCE_LOSSES)
@pytest.mark.parametrize("attribution", ["gradcam", "input_x_gradient"])
def test_guidance_gradient_matches_finite_differences(name, attribution):
    torch.manual_seed(0)
    net = tiny_net(num_classes=4).double()
    batch = guided_batch(batch=3, side=6)
    assert gradcheck_in_weights(
        net, lambda functional: guidance_objective(functional, batch, name, lam=2.0, attribution=attribution).loss)


def test_the_term_averages_over_the_batch_and_images_without_a_mask_add_nothing():
    torch.manual_seed(0)
    net = tiny_net(num_classes=4).double()
    batch = guided_batch()
    out = guidance_objective(net, batch, "energy", lam=3.0)
    _, maps = gradcam(net, batch["image"], batch["guide_class"], "standard", normalize=False)
    terms = guidance_terms("energy", maps, batch["mask"])
    torch.testing.assert_close(out.guidance_loss, terms[batch["annotated"]].sum() / 4)
    torch.testing.assert_close(out.loss, out.classification_loss + 3.0 * out.guidance_loss)
    # Input x gradient: at the normalised input, against a direct computation.
    out = guidance_objective(net, batch, "rrr", lam=1.0, attribution="input_x_gradient")
    normalized = net.normalize(batch["image"]).detach().requires_grad_(True)
    scores = net.head(net.features(normalized)).gather(1, batch["guide_class"][:, None]).sum()
    (grads,) = torch.autograd.grad(scores, normalized)
    terms = guidance_terms("rrr", (grads * normalized).sum(1), batch["mask"])
    torch.testing.assert_close(out.guidance_loss, terms[batch["annotated"]].sum() / 4)


# --------------------------------------------------------------------------- the training samples


class Pictures(torch.utils.data.Dataset):
    """Images whose red channel is their mask (255 inside), with a training transform that must
    not be used for guided samples (the wrapper decodes through a copy)."""

    def __init__(self, masks, targets):
        self.masks, self.targets = masks, targets
        self.transform = lambda image: pytest.fail("the training transform ran")

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, index):
        pixels = np.zeros((*self.masks[index].shape, 3), dtype=np.uint8)
        pixels[..., 0] = self.masks[index].numpy() * 255
        pixels[..., 1] = np.arange(pixels.shape[1], dtype=np.uint8)[None] * 9  # left-right asymmetric
        image = Image.fromarray(pixels)
        return {"image": self.transform(image), "target": self.targets[index]}


def test_the_mask_takes_the_images_random_steps():
    side = 24
    masks = [torch.zeros(side, side, dtype=torch.bool) for _ in range(6)]
    for index, mask in enumerate(masks):
        mask[2 + index:10 + index, 1 + 2 * index:6 + 2 * index] = True
    dataset = Pictures(masks, torch.arange(6) % 3)
    samples = GuidedSamples(dataset, lambda index, _: masks[index],
                            [v2.RandomResizedCrop(16), v2.RandomHorizontalFlip()], torch.ones(6, dtype=torch.bool),
                            multilabel=False)
    torch.manual_seed(0)
    for index in range(6):
        for _ in range(4):
            sample = samples[index]
            assert sample["image"].shape == (3, 16, 16) and sample["mask"].shape == (16, 16)
            # Nearest for the mask, bilinear for the image: they agree away from the mask's edge.
            red = sample["image"][0]
            assert ((red > 0.99) <= sample["mask"]).all() and (sample["mask"] <= (red > 0.01)).all()
            assert int(sample["guide_class"]) == index % 3
            # A crop that leaves the object out leaves no mask to guide towards.
            assert bool(sample["annotated"]) == bool(sample["mask"].any())


def test_images_outside_the_annotated_share_carry_an_empty_mask():
    chosen = annotated_images(10, 0.3, seed=4)
    assert int(chosen.sum()) == 3 and torch.equal(chosen, annotated_images(10, 0.3, seed=4))
    assert not torch.equal(chosen, annotated_images(10, 0.3, seed=5))
    masks = [torch.ones(8, 8, dtype=torch.bool)] * 10
    samples = GuidedSamples(Pictures(masks, torch.zeros(10, dtype=torch.long)), lambda index, _: masks[index], [],
                            chosen, multilabel=False)
    for index in range(10):
        sample = samples[index]
        assert bool(sample["annotated"]) == bool(chosen[index]) == bool(sample["mask"].all())
        assert sample["annotated"] or not sample["mask"].any()


def test_a_multilabel_image_is_guided_towards_one_of_its_labels_uniformly():
    masks = [torch.ones(4, 4, dtype=torch.bool)]
    target = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    samples = GuidedSamples(Pictures(masks, [target]), lambda index, k: masks[index], [],
                            torch.ones(1, dtype=torch.bool), multilabel=True)
    drawn = torch.tensor([int(samples[0]["guide_class"]) for _ in range(600)])
    counts = torch.bincount(drawn, minlength=5)
    assert counts[[0, 2]].sum() == 0 and (counts[[1, 3, 4]] > 150).all()


def test_coco_training_masks_are_the_segmentation_or_the_boxes():
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 7, "file_name": "a.png", "height": 10, "width": 12}],
        "categories": [{"id": 3, "name": "x"}, {"id": 5, "name": "y"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1.5, 2.0, 3.0, 4.0], "iscrowd": 0, "area": 6.0,
             "segmentation": [[2, 3, 4, 3, 4, 5, 2, 5]]},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [6, 0, 2, 2], "iscrowd": 0, "area": 4.0,
             "segmentation": []},
        ],
    }
    coco.createIndex()
    boxes = CocoTrainingMasks(coco, [7], [3, 5], "boxes")
    expected = torch.zeros(10, 12, dtype=torch.bool)
    expected[2:6, 1:5] = True  # every pixel the box [1.5, 4.5] x [2, 6] touches
    assert torch.equal(boxes(0, 0), expected)
    segmented = CocoTrainingMasks(coco, [7], [3, 5], "masks")(0, 0)
    assert segmented.sum() < expected.sum() and (segmented <= expected).all()
    # No segmentation: its box.
    second = torch.zeros(10, 12, dtype=torch.bool)
    second[0:2, 6:8] = True
    assert torch.equal(CocoTrainingMasks(coco, [7], [3, 5], "masks")(0, 1), second)


@pytest.mark.parametrize("name", GUIDANCE_LOSSES)
def test_data_without_training_masks_is_refused_naming_the_data_and_the_objective(name):
    objective = OBJECTIVES[name].build(**{"lambda": 1.0, "attribution": "gradcam", "cam_mode": "standard",
                                          "annotated_fraction": 1.0, "mask_dilation": 0.0})
    assert ImageNetDataModule.guidance_masks is None
    with pytest.raises(ConfigError) as error:
        objective.check_data(SimpleNamespace(name="imagenet", guidance_masks=None), {}, 1)
    assert error.value.keys == ["loss.name"]
    assert f"loss={name}" in str(error.value) and "data.name=imagenet" in str(error.value)
    assert "synthetic" in str(error.value) and "coco" in str(error.value)
    objective.check_data(SimpleNamespace(name="coco", guidance_masks="boxes"), {}, 1)


def test_synthetic_training_samples_carry_their_shapes_exact_mask_flipped_with_the_image(tmp_path):
    datamodule = synthetic_module(tmp_path)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.set_train_masks(1.0, 0.0, seed=0)
    guided = datamodule.train_dataloader().dataset
    plain = datamodule.train_set
    coco = COCO(str(datamodule.dataset_dir / "annotations" / "instances_train.json"))
    by_name = {info["file_name"]: image_id for image_id, info in coco.imgs.items()}
    torch.manual_seed(0)
    flips = set()
    for index, key in enumerate(plain.keys()):
        sample = guided[index]
        label = int(sample["target"])
        assert int(sample["guide_class"]) == label
        (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=by_name[key]))
        exact = torch.from_numpy(coco.annToMask(ann).astype(bool))
        original = to_float_image()(load_rgb(plain.samples[index][0]))
        flipped = torch.equal(sample["image"], original.flip(-1)) and not torch.equal(sample["image"], original)
        assert torch.equal(sample["image"], original.flip(-1) if flipped else original)
        assert torch.equal(sample["mask"], exact.flip(-1) if flipped else exact)
        flips.add(flipped)
    assert flips == {True, False}


def test_coco_training_samples_are_guided_by_the_boxes_of_one_of_their_labels(tmp_path):
    write_coco_split(tmp_path, "val2017")
    write_coco_split(tmp_path, "train2017")
    datamodule = coco_module(tmp_path)
    datamodule.setup("fit")
    datamodule.set_train_masks(1.0, 0.0, seed=0)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["mask"].shape == (3, 32, 32) and batch["mask"].dtype == torch.bool
    labels = batch["target"].bool()
    assert labels[torch.arange(3), batch["guide_class"]].all()
    # The random crop may leave a class's boxes out: that sample is then not guided.
    assert torch.equal(batch["annotated"], batch["mask"].flatten(1).any(1))
    # Image 1's class cat1: the boxes of its two instances, before the crop.
    boxes = datamodule.training_masks(0.0)
    assert int(boxes(0, 0).sum()) == 5 * 5 + 4 * 3


def two_boxes_coco(segmented: bool) -> COCO:
    """One 20x30 image with two instances of category 3 (boxes 10 wide x 4 high and 4 x 8) and one
    of category 5."""
    def annotation(index, category, box):
        x, y, w, h = box
        polygon = [[x, y, x + w, y, x + w, y + h, x, y + h]] if segmented else []
        return {"id": index, "image_id": 1, "category_id": category, "bbox": list(map(float, box)), "iscrowd": 0,
                "area": float(w * h), "segmentation": polygon}

    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
                    "categories": [{"id": 3, "name": "x"}, {"id": 5, "name": "y"}],
                    "annotations": [annotation(1, 3, (4, 5, 10, 4)), annotation(2, 3, (20, 10, 4, 8)),
                                    annotation(3, 5, (0, 0, 2, 2))]}
    coco.createIndex()
    return coco


def test_dilation_grows_each_instance_by_its_own_box_as_the_authors_enlarge_boxes():
    def enlarge_bb(box, percentage):
        """sukrutrao/Model-Guidance utils.enlarge_bb on one box (xmin, ymin, xmax, ymax), without
        its clamp at pixel 223 (the image is smaller here: clipped to it instead)."""
        xmin, ymin, xmax, ymax = box
        w_margin, h_margin = int(percentage * (xmax - xmin)), int(percentage * (ymax - ymin))
        return max(0, xmin - w_margin), max(0, ymin - h_margin), min(30, xmax + w_margin), min(20, ymax + h_margin)

    expected = torch.zeros(20, 30, dtype=torch.bool)
    for box in ((4, 5, 14, 9), (20, 10, 24, 18)):
        xmin, ymin, xmax, ymax = enlarge_bb(box, 0.3)
        expected[ymin:ymax, xmin:xmax] = True
    assert torch.equal(CocoTrainingMasks(two_boxes_coco(False), [1], [3, 5], "boxes", 0.3)(0, 0), expected)
    # Exact masks grow alike (the polygons here are the boxes); nothing grows without dilation.
    assert torch.equal(CocoTrainingMasks(two_boxes_coco(True), [1], [3, 5], "masks", 0.3)(0, 0), expected)
    plain = CocoTrainingMasks(two_boxes_coco(False), [1], [3, 5], "boxes")(0, 0)
    assert int(plain.sum()) == 10 * 4 + 4 * 8


def test_an_annotation_without_box_or_segmentation_is_an_error_naming_it():
    coco = two_boxes_coco(False)
    del coco.dataset["annotations"][1]["bbox"]
    coco.createIndex()
    with pytest.raises(ValueError, match="annotation 2 of image 1 has neither a box nor a segmentation"):
        CocoTrainingMasks(coco, [1], [3, 5], "boxes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ppce_runs_under_autocast(dtype):
    maps = torch.rand(2, 4, 4, requires_grad=True)
    masks = torch.rand(2, 4, 4) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        term = guidance_terms("ppce", maps.to(dtype), masks)
    assert term.dtype == torch.float32 and torch.isfinite(term).all()
    torch.testing.assert_close(term, guidance_terms("ppce", maps.detach(), masks), rtol=1e-2, atol=1e-2)
