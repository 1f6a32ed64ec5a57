"""CGC's tensor functions against independent references: the batched warp against a per-sample
crop, resize and flip with torchvision, and against the authors' Python loop; InfoNCE against a
literal transcription of the authors' NCESoftmaxLoss; the normalisation against its formula."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from losses.cgc import info_nce, normalize_maps, warp_maps


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
