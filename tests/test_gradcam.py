import pytest
import torch
from torch import nn

from gcmodels.gradcam import gradcam, gradcam_from_activations
from gcmodels.networks import ExplainableNet, build_network


def test_elementwise_gradcam_hand_computed_linear_head():
    # GAP + linear: dy_t/dA_kij = w_tk / (h*w) = w_tk / 4.
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, -1.0]]]], requires_grad=True)
    w = torch.tensor([1.0, -2.0])
    score = (a.mean(dim=(2, 3)) * w).sum(1)
    raw = gradcam_from_activations(a, score, "elementwise", normalize=False)
    # (1*[[1,2],[3,4]] - 2*[[0,1],[0,-1]]) / 4 = [[1,0],[3,6]] / 4
    assert torch.allclose(raw, torch.tensor([[[0.25, 0.0], [0.75, 1.5]]]))
    score = (a.mean(dim=(2, 3)) * w).sum(1)
    normalised = gradcam_from_activations(a, score, "elementwise")
    assert torch.allclose(normalised, torch.tensor([[[0.1, 0.0], [0.3, 0.6]]]), atol=1e-6)


def test_gradcam_hand_computed_quadratic_head():
    # y = sum_kij c_k A_kij^2, so dy/dA = 2 c_k A.
    a = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]], [[1.0, 1.0], [-1.0, 3.0]]]], requires_grad=True)
    c = torch.tensor([1.0, -0.5]).view(1, 2, 1, 1)
    score = (c * a**2).sum(dim=(1, 2, 3))
    elementwise = gradcam_from_activations(a, score, "elementwise", normalize=False)
    # sum_k 2 c_k A_k^2 = 2*[[1,1],[4,0]] - [[1,1],[1,9]] = [[1,1],[7,-9]] -> relu
    assert torch.allclose(elementwise, torch.tensor([[[1.0, 1.0], [7.0, 0.0]]]))
    score = (c * a**2).sum(dim=(1, 2, 3))
    standard = gradcam_from_activations(a, score, "standard", normalize=False)
    # alpha_k = mean(2 c_k A_k): alpha_0 = 2*(1-1+2+0)/4 = 1, alpha_1 = -(1+1-1+3)/4 = -1
    # relu(A_0 - A_1) = relu([[0,-2],[3,-3]])
    assert torch.allclose(standard, torch.tensor([[[0.0, 0.0], [3.0, 0.0]]]))


def test_maps_sum_to_one_and_keep_graph():
    torch.manual_seed(0)
    net = build_network("resnet18", 5).eval()
    images = torch.rand(2, 3, 64, 64)
    logits, maps = gradcam(net, images, torch.tensor([1, 3]), create_graph=True)
    assert logits.shape == (2, 5) and maps.shape == (2, 2, 2)
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
    assert maps.requires_grad  # differentiable: second-order backward possible
    grads = torch.autograd.grad(maps[:, 0, 0].sum(), net.head[2].weight)
    assert grads[0].abs().sum() > 0


def test_elementwise_equals_standard_for_average_pooled_resnet():
    torch.manual_seed(0)
    net = build_network("resnet18", 6, pooling="avg").eval()
    images = torch.rand(3, 3, 96, 96)
    classes = torch.tensor([0, 2, 5])
    _, elementwise = gradcam(net, images, classes, "elementwise")
    _, standard = gradcam(net, images, classes, "standard")
    assert torch.allclose(elementwise, standard, atol=1e-6)
    gmp = build_network("resnet18", 6, pooling="max").eval()
    _, elementwise = gradcam(gmp, images, classes, "elementwise")
    _, standard = gradcam(gmp, images, classes, "standard")
    assert not torch.allclose(elementwise, standard, atol=1e-3)  # GMP's gradient is not uniform


def test_gradcam_works_under_no_grad_with_frozen_weights():
    torch.manual_seed(0)
    net = ExplainableNet(nn.Sequential(nn.Conv2d(3, 2, 1)),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(2, 3)))
    net.requires_grad_(False)
    images, classes = torch.rand(2, 3, 4, 4), torch.tensor([0, 1])
    with torch.no_grad():
        logits, maps = gradcam(net, images, classes)
    assert maps.shape == (2, 4, 4)
    # "Works" means the right map, not just a map: 1x1 conv + GAP + linear has the closed form
    # dy_t/dA_kij = W_tk / (h*w), and the default map is L1-normalised (eps 1e-8).
    conv, linear = net.features[0], net.head[2]
    activations = torch.einsum("kc,bchw->bkhw", conv.weight[:, :, 0, 0], images) + conv.bias.view(1, -1, 1, 1)
    assert torch.allclose(logits, activations.mean(dim=(2, 3)) @ linear.weight.T + linear.bias, atol=1e-6)
    raw = torch.relu(torch.einsum("bk,bkhw->bhw", linear.weight[classes], activations) / 16)
    assert (raw.sum(dim=(1, 2)) > 0).all()  # otherwise a zero map would match trivially
    assert torch.allclose(maps, raw / (raw.sum(dim=(1, 2), keepdim=True) + 1e-8), atol=1e-6)


def test_unknown_mode_is_refused():
    a = torch.rand(1, 2, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match="standard"):
        gradcam_from_activations(a, a.sum(dim=(1, 2, 3)), "bogus")
