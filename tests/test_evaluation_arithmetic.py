"""``evaluation.channels_last``: a network in channels_last (NHWC) memory explains and scores as
the same network in the default layout, up to float rounding, for every family of network and
every explainer; the scripts load it so and say so; the consensus store keys it apart.

(``evaluation.precision`` has its bound in tests/test_faithfulness.py.)"""
from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from evaluation.consensus import committee as committee_module
from evaluation.consensus.store import settings_digest
from evaluation.explainers import build_explainer, check_explainer
from evaluation.settings import default_settings
from gcmodels.config import compose_group, options_of
from gcmodels.networks import ExplainableNet, Normalize, build_network
from tests.conftest import SMALL_VIT, assert_ok, read_summary, run_module, small_vit, train
from tests.test_evaluation import SquaresModule, evaluator

NETWORKS = {"resnet18_gmp": (lambda: build_network("resnet18", 5, pooling="max"), 64),
            "alexnet": (lambda: build_network("alexnet", 5), 96),
            "vgg16_bn": (lambda: build_network("vgg16", 5, batch_norm=True), 64),
            "convnext_tiny": (lambda: build_network("convnext_tiny", 5), 64),
            "vit": (lambda: small_vit(5), SMALL_VIT["image_size"])}
# The shipped options, with fewer samples: the comparison needs every pass, not many.
CHEAP = {"smoothgrad": {"num_samples": 3}, "integrated_gradients": {"steps": 4},
         "lime": {"num_samples": 32, "num_segments": 8}}


def explainer_named(name: str):
    return build_explainer(**{**options_of(compose_group("explainer", name)), **CHEAP.get(name, {})})


def in_channels_last(net: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(net).to(memory_format=torch.channels_last)


@functools.cache
def both_layouts(network: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The network in the default layout and in channels_last, built once for every explainer
    (explainers leave a network as it is; VGG16 alone takes seconds to build)."""
    torch.manual_seed(0)
    net = NETWORKS[network][0]().eval()
    return net, in_channels_last(net)


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("name", ["gradcam", "gradcam_standard", "gradient", "smoothgrad", "integrated_gradients",
                                  "fullgrad", "cmwp", "lime"])
def test_a_network_in_channels_last_explains_as_in_the_default_layout(network, name):
    net, fast = both_layouts(network)
    explainer = explainer_named(name)
    try:
        check_explainer(explainer, net)
    except (ValueError, NotImplementedError) as err:
        pytest.skip(f"{name} does not explain {network}: {err}")
    convolutions = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    size = NETWORKS[network][1]
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([1, 3])
    expected, actual = explainer(net, images, targets), explainer(fast, images, targets)
    assert actual.shape == expected.shape
    # Another summation order can flip a near-tie of a ReLU or a max pooling in the gradient
    # passes of VGG and AlexNet (as float64 does too): a few pixels then move by up to ~1% of the
    # peak. A wrong layout would move every pixel by the map's own size.
    difference = (actual - expected).abs() / expected.abs().amax().clamp_min(1e-12)
    assert difference.mean().item() < 1e-3 and difference.amax().item() < 3e-2, name


def squares_net(datamodule: SquaresModule) -> ExplainableNet:
    """A small convolutional net (batch norm, max pooling, a position-aware head) fitted to the
    squares' classes, so that its scores, maps and attacks are not a constant's."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    net = ExplainableNet(features, nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(1), nn.Linear(8 * 4 * 4, 4)),
                         Normalize())
    batch = default_collate(list(datamodule.data))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(net(batch["image"]), batch["target"]).backward()
        optimizer.step()
    return net.eval()


def test_scores_in_channels_last_equal_the_default_layouts():
    """Every family of metric (accuracy, localisation, composites, faithfulness, randomisation,
    FGSM) scores a
    network in channels_last as in the default layout."""
    datamodule = SquaresModule(count=8, size=64)
    net = squares_net(datamodule)
    metrics = ["acc", "pg", "spg", "ch", "nqh", "insertion", "deletion", "road", "mprt", "fgsm"]
    settings = dict(fgsm_eps=[2, 8], perturbation_steps=4, other_images=1, road_percentages=[30, 70])
    results = {name: dict(flatten(evaluator(explainer_named("gradcam"), metrics, batch_size=4, **settings)
                                  .run(model, datamodule, progress=False)))
               for name, model in (("default", net), ("channels_last", in_channels_last(net)))}
    expected = results["default"]
    assert expected.keys() == results["channels_last"].keys()
    # Not a constant network's numbers: it classifies, points and can be attacked.
    assert expected["acc"] == 1 and expected["pg"] > 0.5 and expected["fgsm/eps=8"] < 1
    for key, value in expected.items():
        assert results["channels_last"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def flatten(results: dict, prefix: str = ""):
    for key, value in results.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def test_the_consensus_store_keys_the_arithmetic_apart_where_it_is_not_the_default():
    key = {}
    for name, overrides in (("default", {}), ("bf16", {"precision": "bf16-mixed"}), ("nhwc", {"channels_last": True})):
        settings = default_settings(seed=0, batch_size=4, **overrides)
        key[name] = settings_digest(committee_module.run_settings({"name": "synthetic"}, {"name": "gradcam"}, "label",
                                                                  16, 4, 6, settings.arithmetic))
    assert default_settings(seed=0, batch_size=4).arithmetic == {}
    # A store of default runs keeps the key it had before these settings existed.
    assert key["default"] == settings_digest(committee_module.run_settings({"name": "synthetic"}, {"name": "gradcam"},
                                                                           "label", 16, 4, 6))
    assert len(set(key.values())) == 3
    # A bfloat16 run keeps the key it had before channels_last existed.
    assert key["bf16"] == settings_digest({**committee_module.run_settings({"name": "synthetic"}, {"name": "gradcam"},
                                                                         "label", 16, 4, 6),
                                           "precision": "bf16-mixed"})


@pytest.mark.slow  # a training run and two evaluations
def test_the_evaluation_script_in_channels_last_reports_the_same_numbers_and_says_so(tmp_path):
    assert_ok(train(tmp_path / "run", tmp_path / "data", "loss=gc", "~callbacks.explanation_metrics",
                    "~callbacks.fgsm_robustness"))
    checkpoint = read_summary(tmp_path / "run")["last_checkpoint"]
    reports = {}
    for layout in ("false", "true"):
        out = tmp_path / f"channels_last_{layout}"
        assert_ok(run_module("evaluation", out, tmp_path / "data", f"ckpt_path={checkpoint}", "max_images=12",
                             "metrics=[acc,pg,ch,nqh,insertion,fgsm]", "evaluation.fgsm_eps=[8]",
                             f"evaluation.channels_last={layout}"))
        reports[layout] = json.loads((out / "report.json").read_text())
        assert reports[layout]["settings"]["channels_last"] == (layout == "true")
    assert "networks in contiguous (NCHW) memory" in (tmp_path / "channels_last_false" / "report.md").read_text()
    assert "networks in channels_last memory" in (tmp_path / "channels_last_true" / "report.md").read_text()
    expected, actual = (dict(flatten(reports[layout]["checkpoints"][0]["results"])) for layout in ("false", "true"))
    assert expected.keys() == actual.keys() and {"pg", "nqh", "insertion", "fgsm/eps=8"} <= expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
