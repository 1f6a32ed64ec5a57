"""FGSM against its closed form on a linear model (input gradient known), eps in 1/255 units."""
import pytest
import torch
import torch.nn.functional as F

from evaluation.attacks import fgsm, fgsm_attacks
from gcmodels.networks import build_network
from tests.conftest import fgsm_case


@pytest.mark.parametrize("multilabel", [False, True])
def test_fgsm_follows_the_closed_form_gradient(multilabel):
    net, images, targets = fgsm_case(multilabel)
    weight, bias = net.head[1].weight.detach(), net.head[1].bias.detach()
    logits = images.flatten(1) @ weight.T + bias
    # d loss / d logits: softmax - onehot (CE) or sigmoid - y (BCE), up to the positive mean factor.
    residual = torch.sigmoid(logits) - targets if multilabel else logits.softmax(1) - F.one_hot(targets, 6)
    gradient = (residual @ weight).view_as(images)
    eps = 8  # in 1/255 units, as at every interface
    with torch.no_grad():  # fgsm turns gradients on for itself
        adversarial = fgsm(net, images, targets, eps)
    assert torch.equal(adversarial, (images + eps / 255 * gradient.sign()).clamp(0, 1))
    assert all(parameter.grad is None for parameter in net.parameters())
    assert not adversarial.requires_grad and adversarial.min() >= 0 and adversarial.max() <= 1


def test_fgsm_attacks_share_one_gradient_over_eps(monkeypatch):
    net, images, targets = fgsm_case(False)
    eps_list = [0, 1, 8, 64]
    expected = [fgsm(net, images, targets, eps) for eps in eps_list]
    passes = []
    original_forward = net.forward
    monkeypatch.setattr(net, "forward", lambda x: passes.append(len(x)) or original_forward(x))
    attacks = list(fgsm_attacks(net, images, targets, eps_list))
    assert passes == [len(images)]  # one gradient for every eps
    assert all(torch.equal(a, e) for a, e in zip(attacks, expected)) and torch.equal(attacks[0], images)


def test_fgsm_takes_a_custom_loss_and_refuses_inference_mode():
    net, images, targets = fgsm_case(False)
    # Minus the loss: the step goes the other way.
    toward = fgsm(net, images, targets, 2, loss=lambda logits, y: -F.cross_entropy(logits, y))
    away = fgsm(net, images, targets, 2)
    inner = (images > 2 / 255) & (images < 1 - 2 / 255)
    assert torch.equal((toward - images)[inner].sign(), -(away - images)[inner].sign())
    # The whole image, clipping included: the closed-form CE input gradient of the linear model, negated.
    weight, bias = net.head[1].weight.detach(), net.head[1].bias.detach()
    logits = images.flatten(1) @ weight.T + bias
    gradient = ((logits.softmax(1) - F.one_hot(targets, 6)) @ weight).view_as(images)
    assert torch.equal(toward, (images - 2 / 255 * gradient.sign()).clamp(0, 1))
    assert not torch.equal(toward, away)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        fgsm(net, images, targets, 2)


def test_fgsm_in_normalized_space_steps_the_networks_normalised_input():
    """The attack on the normalised input ``z = (x - mean) / std``, done by hand: z moves by
    eps/255 along the sign of dL/dz (= the sign of dL/dx, std > 0), then back to pixels."""
    torch.manual_seed(0)
    net = build_network("resnet18", 6).eval().double()
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([0, 3, 5])
    mean, std = net.normalize.mean, net.normalize.std
    z = ((images - mean) / std).requires_grad_(True)
    (gradient,) = torch.autograd.grad(F.cross_entropy(net.head(net.features(z)), targets), z)
    expected = ((z.detach() + 8 / 255 * gradient.sign()) * std + mean).clamp(0, 1)
    adversarial = fgsm(net, images, targets, 8, space="normalized")
    torch.testing.assert_close(adversarial, expected, rtol=0, atol=1e-12)
    assert (adversarial - images).abs().max() < 8 / 255 * 0.23  # ImageNet's std < 0.23: smaller steps
    with pytest.raises(ValueError, match="'gray'"):
        fgsm(net, images, targets, 8, space="gray")
    linear, pixels, labels = fgsm_case(False)
    with pytest.raises(ValueError, match="Normalize"):
        fgsm(linear, pixels, labels, 8, space="normalized")
