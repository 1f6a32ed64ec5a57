"""CGC's tensor functions against independent references: the batched warp against a per-sample
crop, resize and flip with torchvision, and against the authors' Python loop; InfoNCE against a
literal transcription of the authors' NCESoftmaxLoss; the normalisation against its formula."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF

from datamodules.images import center_crop_geometry, to_float_image
from datamodules.views import ContrastiveViews
from gcmodels.objectives import OBJECTIVES, cgc_objective
from losses.cgc import info_nce, normalize_maps, warp_maps
from tests.conftest import gradcheck_in_weights, tiny_net


def random_boxes(generator: torch.Generator, batch: int, side: int) -> torch.Tensor:
    heights = torch.randint(2, side + 1, (batch,), generator=generator)
    widths = torch.randint(2, side + 1, (batch,), generator=generator)
    tops = torch.stack([torch.randint(0, side - h + 1, (1,), generator=generator)[0] for h in heights])
    lefts = torch.stack([torch.randint(0, side - w + 1, (1,), generator=generator)[0] for w in widths])
    return torch.stack([tops, lefts, heights, widths], dim=1)


def authors_warp(maps, boxes, flips, size):
    """models/utils.py perform_gradcam_aug, one sample at a time (without .cuda())."""
    out = torch.zeros(len(maps), size, size, dtype=maps.dtype)
    for b in range(len(maps)):
        top, left, height, width = boxes[b].tolist()
        crop = maps[b][top:top + height, left:left + width].unsqueeze(0).unsqueeze(0)
        crop = F.interpolate(crop, size=size, mode="bilinear").squeeze()
        out[b] = crop.flip(-1) if flips[b] else crop
    return out


@pytest.mark.parametrize("side, size", [(32, 32), (20, 48), (40, 24)])
def test_the_batched_warp_is_a_per_sample_crop_resize_and_flip(side, size):
    generator = torch.Generator().manual_seed(side * size)
    maps = torch.rand(6, side, side, generator=generator, dtype=torch.float64)
    boxes = random_boxes(generator, 6, side)
    flips = torch.tensor([True, False, True, False, False, True])
    warped = warp_maps(maps, boxes, flips, size)
    views = [TF.resized_crop(m[None], *box.tolist(), [size, size], InterpolationMode.BILINEAR, antialias=False)[0]
             for m, box in zip(maps, boxes)]
    expected = torch.stack([TF.hflip(view) if flip else view for view, flip in zip(views, flips)])
    torch.testing.assert_close(warped, expected, rtol=1e-10, atol=1e-10)
    if size >= side:  # the authors upsample (a crop of a 224 px map to 224 px) with F.interpolate
        torch.testing.assert_close(warped, authors_warp(maps, boxes, flips, size), rtol=1e-10, atol=1e-10)
    # A whole-map box without a flip is the map itself, resized.
    whole = torch.tensor([[0, 0, side, side]])
    torch.testing.assert_close(warp_maps(maps[:1], whole, torch.tensor([False]), side), maps[:1])


def test_the_warp_is_differentiable_in_the_maps():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 7, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[1, 2, 4, 5], [0, 0, 7, 7], [3, 1, 3, 6]])
    flips = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda m: warp_maps(m, boxes, flips, 9), (maps,))


def authors_nce(aug, orig_aug, temperature):
    """models/resnet_multigpu_cgc.py (the contrastive branch) and train_eval_cgc.py NCESoftmaxLoss,
    transcribed (without .cuda())."""
    pos = (aug * orig_aug).sum(1)
    bsize = pos.shape[0]
    neg = torch.mm(aug, aug.transpose(1, 0))
    neg = neg[(1 - torch.eye(bsize)).bool()].view(-1, bsize - 1)
    out = torch.cat((pos.view(bsize, 1), neg), dim=1)
    x = torch.div(out.squeeze(), temperature)
    return torch.nn.CrossEntropyLoss()(x, torch.zeros([bsize]).long())


@pytest.mark.parametrize("temperature", [0.5, 0.01])
def test_info_nce_is_the_authors_nce_softmax_loss(temperature):
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(5, 6, 6, generator=generator, dtype=torch.float64)
    warped = torch.rand(5, 6, 6, generator=generator, dtype=torch.float64)
    anchors, positives = normalize_maps(maps), normalize_maps(warped)
    loss = info_nce(anchors, positives, temperature)
    torch.testing.assert_close(loss, authors_nce(anchors, positives, temperature))
    # The loss falls when each anchor's positive is itself, and is log(B) when every logit is equal.
    assert info_nce(anchors, anchors, temperature) < loss
    uniform = normalize_maps(torch.ones(5, 6, 6, dtype=torch.float64))
    log_batch = torch.log(torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(info_nce(uniform, uniform, temperature), log_batch)


def test_maps_are_sum_normalised_shifted_and_unit_length():
    maps = torch.tensor([[[0.0, 1.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    normalised = normalize_maps(maps)
    first = torch.tensor([0.0, 0.25, 0.75, 0.0], dtype=torch.float64) + 1e-8
    torch.testing.assert_close(normalised[0], first / first.norm())
    # An all-zero map becomes uniform, not NaN.
    torch.testing.assert_close(normalised[1], torch.full((4,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(normalised.norm(dim=1), torch.ones(2, dtype=torch.float64))


# --------------------------------------------------------------------------- the objective


def authors_gradcam_mask(logits, feats, target, size):
    """models/utils.py compute_gradcam + compute_gradcam_mask, transcribed (one-hot on the CPU)."""
    one_hot = torch.zeros_like(logits)
    one_hot[torch.arange(len(target)), target] = 1
    (grads,) = torch.autograd.grad((one_hot * logits).sum(), feats, create_graph=True)
    gradcam = F.relu((grads * feats).sum(dim=1))
    mask = F.interpolate(gradcam.unsqueeze(1), size=size, mode="bilinear").squeeze(1)
    return mask / (mask.sum(dim=[1, 2])[:, None, None] + 1e-8) + 1e-8


def authors_cgc(net, batch, lam, temperature, contrast=True):
    """models/resnet_multigpu_cgc.py ResNet.forward and train_eval_cgc.py's loss, transcribed:
    three forwards, Grad-CAM of the view's argmax on both views, the loop warp, NCE or MSE."""
    size = batch["view"].shape[-1]
    targets = batch["target"]
    xe_out = net(batch["image"])
    feats = net.forward_features(batch["view"])
    outputs = net.head(feats)
    target = outputs.detach().argmax(-1)
    orig = authors_gradcam_mask(outputs, feats, target, size)
    aug_feats = net.forward_features(batch["augmented"])
    aug_outputs = net.head(aug_feats)
    aug = authors_gradcam_mask(aug_outputs, aug_feats, target, size)
    orig_aug = authors_warp(orig, batch["box"], batch["flip"], size)
    aug, orig_aug = F.normalize(aug.flatten(1), dim=1), F.normalize(orig_aug.flatten(1), dim=1)
    xe = sum(F.cross_entropy(out, targets) for out in (xe_out, outputs, aug_outputs))
    sim = authors_nce(aug, orig_aug, temperature) if contrast else F.mse_loss(aug, orig_aug)
    return xe + lam * sim


def view_batch(batch=5, side=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(batch, 3, side, side, generator=generator, dtype=torch.float64),
            "view": torch.rand(batch, 3, side, side, generator=generator, dtype=torch.float64),
            "augmented": torch.rand(batch, 3, side, side, generator=generator, dtype=torch.float64),
            "box": random_boxes(generator, batch, side),
            "flip": torch.rand(batch, generator=generator) < 0.5,
            "target": torch.randint(0, 4, (batch,), generator=generator)}


@pytest.mark.parametrize("contrast", [True, False])
def test_the_cgc_objective_is_the_authors_forward(contrast):
    torch.manual_seed(0)
    net = tiny_net(num_classes=4).double()
    batch = view_batch()
    out = cgc_objective(net, batch, lam=0.5, temperature=0.5, contrast=contrast)
    expected = authors_cgc(net, batch, 0.5, 0.5, contrast)
    torch.testing.assert_close(out.loss, expected)
    assert out.consistency_loss > 0
    # And so are its gradients, the second-order terms included.
    weights = list(net.parameters())
    torch.testing.assert_close(torch.autograd.grad(out.loss, weights), torch.autograd.grad(expected, weights))


def test_the_label_target_explains_the_label_on_both_views():
    torch.manual_seed(0)
    net = tiny_net(num_classes=4).double()
    batch = view_batch()
    out = cgc_objective(net, batch, lam=1.0, temperature=0.5, target="label")
    size = batch["view"].shape[-1]
    maps = []
    for key in ("view", "augmented"):
        feats = net.forward_features(batch[key])
        maps.append(authors_gradcam_mask(net.head(feats), feats, batch["target"], size))
    anchors = F.normalize(maps[1].flatten(1), dim=1)
    positives = F.normalize(authors_warp(maps[0], batch["box"], batch["flip"], size).flatten(1), dim=1)
    torch.testing.assert_close(out.consistency_loss, authors_nce(anchors, positives, 0.5))


@pytest.mark.parametrize("contrast", [True, False])
def test_cgc_gradient_matches_finite_differences(contrast):
    torch.manual_seed(0)
    net = tiny_net(num_classes=4).double()
    batch = view_batch(batch=3, side=6)
    assert gradcheck_in_weights(
        net, lambda functional: cgc_objective(functional, batch, lam=3.0, temperature=0.5, contrast=contrast).loss)


# --------------------------------------------------------------------------- the views


def test_the_augmented_view_is_the_views_crop_and_flip_and_its_map_warps_alike():
    side = 48
    ys, xs = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    # A smooth picture, so the image interpolations (PIL's, and the maps' grid_sample) agree closely.
    pixels = torch.stack([xs, ys, (xs * ys)]).mul(255).round().to(torch.uint8)
    picture = TF.to_pil_image(pixels)
    views = ContrastiveViews(to_float_image(v2.RandomHorizontalFlip()), [], side)
    torch.manual_seed(3)
    flips = set()
    for _ in range(12):
        sample = views(picture)
        assert set(sample) == {"image", "view", "augmented", "box", "flip"}
        torch.testing.assert_close(sample["view"], pixels.float() / 255)
        top, left, height, width = sample["box"].tolist()
        assert 0 <= top and top + height <= side and 0 <= left and left + width <= side
        crop = TF.resized_crop(picture, top, left, height, width, [side, side])
        expected = TF.to_tensor(TF.hflip(crop) if sample["flip"] else crop)
        torch.testing.assert_close(sample["augmented"], expected)
        # The box and flip, applied to the view as a map, give the augmented view.
        warped = warp_maps(sample["view"], sample["box"].expand(3, 4), sample["flip"].expand(3), side)
        assert (warped - sample["augmented"]).abs().max() < 0.03
        flips.add(bool(sample["flip"]))
    assert flips == {True, False}


def test_views_take_the_validation_geometry_and_refuse_a_view_of_another_size():
    picture = TF.to_pil_image(torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8))
    sample = ContrastiveViews(to_float_image(v2.Resize((16, 16))), center_crop_geometry(16), 16)(picture)
    assert sample["view"].shape == sample["augmented"].shape == sample["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="data.image_size=16"):
        ContrastiveViews(to_float_image(), [], 16)(picture)


def test_a_batch_without_the_views_is_refused_naming_what_it_lacks():
    objective = OBJECTIVES["cgc"].build(**{"lambda": 0.5, "temperature": 0.5, "target": "prediction",
                                          "contrast": True, "cam_mode": "elementwise"})
    with pytest.raises(ValueError, match=r"loss=cgc needs \['view', 'augmented', 'box', 'flip'\]"):
        objective.check_batch("cgc", {"image": torch.rand(2, 3, 8, 8), "target": torch.tensor([0, 1])})
    objective.check_batch("cgc", view_batch())
