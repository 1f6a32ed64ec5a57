"""``python -m evaluation.consensus`` end to end on tiny trained checkpoints, the store, the
training callback, and bad input; plus the store on its own."""
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from evaluation.consensus import committee as committee_module
from evaluation.consensus.__main__ import ConsensusConfig, check_members
from evaluation.consensus.__main__ import run as consensus_run
from evaluation.consensus.callback import ConsensusCallback
from evaluation.consensus.committee import find_checkpoints, weights_digest
from evaluation.consensus.report import ReportConfig
from evaluation.consensus.stats import average_precision
from evaluation.consensus.store import ExplanationStore, settings_digest
from evaluation.metrics import functional
from evaluation.references import trial_noise_maps
from evaluation.settings import default_settings
from gcmodels.config import ConfigError, check_config, check_targets, compose_group
from tests.conftest import PYTHON, ROOT, TINY, TORCHRUN_2, assert_ok, module_command, read_summary, run_module, train
from tests.test_config import compose_config

CHEAP_LIME = ["explainer=lime", "explainer.num_samples=24", "explainer.num_segments=8"]
CHEAP_SMOOTHGRAD = ["explainer=smoothgrad", "explainer.num_samples=3"]


def test_store_entries_are_complete_or_absent(tmp_path):
    store = ExplanationStore(tmp_path, {"explainer": {"name": "gradcam"}, "num_images": 4})
    assert store.load_member("abc") is None
    maps = np.random.default_rng(0).random((4, 8, 8)).astype(np.float16)
    store.save_member("abc", {"explanations": maps}, {"accuracy": 0.5})
    entry = store.load_member("abc")
    assert np.array_equal(entry["explanations"], maps) and entry["meta"] == {"accuracy": 0.5}
    assert isinstance(entry["explanations"], np.memmap)  # read back lazily, not held in memory
    # Another run's settings are another folder: nothing is shared by mistake.
    assert ExplanationStore(tmp_path, {"explainer": {"name": "lime"}, "num_images": 4}).load_member("abc") is None
    # A folder without meta.json (a crash mid-write) is not an entry.
    (store.run_dir / "half").mkdir()
    np.save(store.run_dir / "half" / "explanations.npy", maps)
    assert store.load_member("half") is None
    assert settings_digest({"a": 1, "b": 2}) == settings_digest({"b": 2, "a": 1})


def test_concurrent_writers_lose_nothing_and_leave_no_partial_entry(tmp_path):
    """Eight threads store one member at once, and eight others a member each: every call returns,
    every entry reads back whole, and no staging folder is left behind."""
    store = ExplanationStore(tmp_path, {"explainer": {"name": "gradcam"}, "num_images": 4})
    maps = np.random.default_rng(0).random((4, 8, 8)).astype(np.float16)
    jobs = [("same", maps)] * 8 + [(f"member{index}", maps + index) for index in range(8)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda job: store.save_member(job[0], {"explanations": job[1]}, {"name": job[0]}), jobs))
    for name, expected in dict(jobs).items():
        entry = store.load_member(name)
        assert entry is not None and np.array_equal(entry["explanations"], expected) and entry["meta"]["name"] == name
    assert sorted(path.name for path in store.run_dir.iterdir()) == sorted({name for name, _ in jobs})


def test_a_member_is_its_weights_not_its_file():
    model = {"name": "resnet18", "pooling": "avg", "pretrained": False, "output_stride": 32}
    # Batch norm keeps a 0-dim counter among the weights.
    weights = {"net.fc.weight": torch.arange(6.0).view(2, 3), "net.bn.num_batches_tracked": torch.tensor(7),
               "epoch_counter": 3}
    same = weights_digest(model, {**weights, "epoch_counter": 4})
    assert weights_digest(model, weights) == same  # training state around the weights does not count
    assert weights_digest(model, {**weights, "net.fc.weight": torch.arange(6.0).view(2, 3) + 1}) != same
    assert weights_digest({**model, "pooling": "max"}, weights) != same


def test_reference_noise_maps_are_seeded_per_image_whatever_the_slicing(monkeypatch):
    """As ``python -m evaluation``: an image's noise maps depend on the seed, its position and the
    map's number alone (a sequential generator gave other maps for other slice sizes)."""
    generator = np.random.default_rng(0)
    masks = np.zeros((10, 16, 16), dtype=bool)
    for image, (row, col) in enumerate(generator.integers(0, 12, size=(10, 2))):
        masks[image, row:row + 4, col:col + 4] = True
    shared = {"labels": np.zeros(10, dtype=np.int64), "masks": masks}
    settings = default_settings(seed=3, batch_size=4, noise_seeds=2)
    whole = committee_module.reference_map(shared, settings)
    monkeypatch.setattr(committee_module, "SLICE_VALUES", 3 * 16 * 16)  # slices of 3 images
    assert committee_module.reference_map(shared, settings) == whole
    expected = [average_precision(trial_noise_maps(3, torch.tensor([[image, number]]), 16, 16, "cpu")[0],
                                  torch.from_numpy(masks[image])) for image in range(10) for number in (1, 2)]
    assert whole["noise"] == pytest.approx(np.mean(expected), rel=1e-12)


def pixel_weights(resize, size: int) -> torch.Tensor:
    """The total weight each pixel of a ``size`` px map gets in the resized map: the gradient of
    the resized map's sum (the resize is linear), i.e. the resized mass of a map hot at that pixel."""
    source = torch.zeros(1, size, size, requires_grad=True)
    resize(source).sum().backward()
    return source.grad[0]


@pytest.mark.parametrize("size, resolution", [(80, 16), (224, 64)])
def test_reduced_maps_weigh_every_pixel(size, resolution):
    """Area averaging: each common pixel is the mean of the pixels it covers, so every pixel keeps
    weight (the same weight where the size is a multiple of the resolution), and a checkerboard
    averages out to its mean; a bilinear resize without antialiasing reads 4 pixels per output and
    drops the others (67% of a 224 px map at 64 px, 96% of an 80 px map at 16 px)."""
    weights = pixel_weights(lambda maps: committee_module.to_resolution(maps, resolution), size)
    cell = (resolution / size) ** 2  # a pixel's share of its common pixel
    assert bool((weights > 0).all())
    if size % resolution == 0:
        assert torch.allclose(weights, torch.full((), cell))  # every pixel weighs the same
    else:
        # 3.5 px per common pixel: windows of 4 px overlap, and a pixel in two of them on each axis
        # weighs 4 times one in a single window.
        assert torch.allclose(weights.unique(), torch.tensor([1 / 16, 1 / 8, 1 / 4]))
    bilinear = pixel_weights(lambda maps: functional.upsample(maps, (resolution, resolution)), size)
    assert float((bilinear == 0).float().mean()) == pytest.approx({80: 0.96, 224: 0.673}[size], abs=0.001)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((rows + cols) % 2).float()[None]
    if (size // resolution) % 2 == 0:
        assert torch.allclose(committee_module.to_resolution(board, resolution), torch.full((), 0.5))
    # Smaller maps (Grad-CAM's grid) are enlarged bilinearly.
    small = torch.rand(2, 5, 5)
    assert torch.equal(committee_module.to_resolution(small, resolution),
                       functional.upsample(small, (resolution, resolution)))


def test_the_store_key_holds_the_effective_resolution():
    data = SimpleNamespace(image_size=80)
    assert committee_module.effective_resolution(None, data) == 80
    assert committee_module.effective_resolution(32, data) == 32
    digests = {settings_digest(committee_module.run_settings({"name": "synthetic"}, {"name": "smoothgrad"}, "label",
                                                             resolution, 4, 6)) for resolution in (80, 32)}
    assert len(digests) == 2


def test_missing_explanations_are_counted_per_member():
    maps = np.random.default_rng(0).random((3, 70, 4, 4)).astype(np.float16)  # two slices of images
    maps[0, 5] = 0  # an all-zero map (Grad-CAM of nothing)
    maps[0, 66] = 0.25  # constant
    maps[2, 1, 0, 0] = np.nan
    entries = [{"explanations": member} for member in maps]
    assert committee_module.missing_counts(entries, {}, "pixel") == [2, 0, 1]
    weights = np.ones((2, 3, 4), dtype=np.float32)
    weights[1, 2] = 0  # no direction
    segments = np.zeros((3, 2, 2), dtype=np.int32)
    segments[:, 0] = [0, 1]
    segments[0, 1] = [2, 3]  # image 0 has 4 superpixels, the others 2 (padding beyond)
    weights[0, 1, 2:] = np.nan  # on padding: ignored
    entries = [{"explanations": member} for member in weights]
    assert committee_module.missing_counts(entries, {"segments": segments}, "superpixel") == [0, 1]


def test_committee_lists_and_their_errors(tmp_path):
    assert find_checkpoints("runs/a.ckpt", None) == [Path("runs/a.ckpt")]  # one path is one member, not letters
    assert find_checkpoints(["a.ckpt", "b.ckpt"], None) == [Path("a.ckpt"), Path("b.ckpt")]
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
        for name in ("best-epoch01.ckpt", "last.ckpt"):
            (tmp_path / run / name).write_bytes(b"")
    assert len(find_checkpoints(None, str(tmp_path))) == 4
    assert (find_checkpoints(None, str(tmp_path), "last.ckpt")
            == [tmp_path / "one/last.ckpt", tmp_path / "two/last.ckpt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no file matching 'last.ckpt' under"):
        find_checkpoints(None, str(tmp_path / "empty"), "last.ckpt")


def consensus_config(tmp_path: Path, *overrides: str):
    """The consensus script's config on the tiny synthetic data, of two checkpoints that do not exist:
    a refused option stops the script before it looks for them."""
    return compose_config("consensus", "ckpts=[a.ckpt,b.ckpt]", f"output_dir={tmp_path / 'out'}",
                          f"store_dir={tmp_path / 'store'}", f"data.data_dir={tmp_path / 'data'}",
                          *[item for item in TINY if item.startswith("data.")], *overrides)


@pytest.mark.parametrize("overrides, keys", [
    (["sigma=0"], ["sigma"]),
    (["sigma=-0.2"], ["sigma"]),
    (["sigma=true"], ["sigma"]),
    (["aggregation=median"], ["aggregation"]),
    (["target=random"], ["target"]),
    (["resolution=1"], ["resolution"]),
    (["num_images=0"], ["num_images"]),
    (["num_images=true"], ["num_images"]),
    (["leave_one_out=no"], ["leave_one_out"]),
    (["subcommittees.size=2"], ["subcommittees.size"]),
    (["subcommittees.size=abc"], ["subcommittees.size"]),
    (["subcommittees.draws=0"], ["subcommittees.draws"]),
    (["convergence.enabled=off"], ["convergence.enabled"]),
    (["convergence.sizes=[2,abc]"], ["convergence.sizes.1"]),
    (["convergence.sizes=[1,2]"], ["convergence.sizes.0"]),
    (["convergence.sizes=[]"], ["convergence.sizes"]),
    (["convergence.sizes=3"], ["convergence.sizes"]),
    (["convergence.trials=0"], ["convergence.trials"]),
    (["convergence.trials=true"], ["convergence.trials"]),
    (["picture_images=0"], ["picture_images"]),
    (["seed=-1"], ["seed", "evaluation.seed"]),
    (["store_dir=null"], ["store_dir"]),
    (["explainer.name=nope"], ["explainer.name"]),
    (["explainer.num_samples=0"], ["explainer.num_samples"]),
    (["evaluation.protocol=authors"], ["evaluation.protocol"]),
    (["+typo=1"], ["typo"]),
    (["ckpts_dir=runs"], ["ckpts_dir"]),
    (["ckpts=null"], ["ckpts_dir"]),
    (["ckpts=[]"], ["ckpts"]),
    (["ckpts=[a.ckpt,3]"], ["ckpts.1"]),
    # Every refused value at once.
    (["sigma=0", "convergence.trials=0", "picture_images=0"], ["sigma", "convergence.trials", "picture_images"]),
])
def test_consensus_options_are_refused_by_key_before_anything_is_read(tmp_path, overrides, keys):
    with pytest.raises(ConfigError) as err:
        consensus_run(consensus_config(tmp_path, *overrides))
    assert sorted(err.value.keys) == sorted(keys)
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_the_consensus_config_as_shipped_passes_its_schema(tmp_path):
    config = check_config(consensus_config(tmp_path), ConsensusConfig)
    assert (config.sigma, config.aggregation, config.target, config.convergence.sizes) == (0.2, "squared", "label",
                                                                                         None)
    assert check_config(consensus_config(tmp_path, "ckpts=null", "ckpts_dir=runs"), ConsensusConfig).ckpts_dir == "runs"
    assert check_config(consensus_config(tmp_path, "ckpts=one.ckpt", "convergence.sizes=[2,3]"),
                        ConsensusConfig).convergence.sizes == (2, 3)


def test_the_committee_size_rules_name_their_keys():
    members = [committee_module.Member(Path(f"m{index}.ckpt"), str(index), {}) for index in range(2)]
    cfg = OmegaConf.create({"subcommittees": {"size": 3}, "convergence": {"enabled": True, "sizes": [2, 3]}})
    with pytest.raises(ConfigError) as err:
        check_members(cfg, members, explainer=None)
    assert err.value.keys == ["subcommittees.size", "convergence.sizes"]


def consensus_callback(tmp_path: Path, **options) -> dict:
    """``callbacks.consensus`` as train.py resolves it (conf/callbacks/with_consensus.yaml), with
    ``options`` replaced."""
    checkpoint = tmp_path / "member.ckpt"
    checkpoint.write_bytes(b"")
    cfg = compose_config("train", "callbacks=with_consensus", f"callbacks.consensus.committee=[{checkpoint}]",
                         f"callbacks.consensus.store_dir={tmp_path / 'store'}", f"output_dir={tmp_path / 'out'}",
                         f"data.data_dir={tmp_path / 'data'}")
    entry = OmegaConf.to_container(cfg.callbacks.consensus, resolve=True)
    return {**entry, **options}


def test_the_consensus_callback_as_shipped_passes_its_options(tmp_path):
    entry = consensus_callback(tmp_path)
    assert entry["_target_"] == "evaluation.consensus.callback.ConsensusCallback"
    check_targets({"consensus": entry}, "callbacks")
    check_targets({"consensus": consensus_callback(tmp_path, committee="one.ckpt",
                                                   explainer=compose_group("explainer", "lime", num_samples=24))},
                  "callbacks")


@pytest.mark.parametrize("options, key", [
    ({"committee": []}, "committee"),
    ({"committee": ""}, "committee"),
    ({"committee": [3]}, "committee.0"),
    ({"committee": {"a": "b.ckpt"}}, "committee"),
    ({"target": "random"}, "target"),
    ({"aggregation": "median"}, "aggregation"),
    ({"sigma": 0}, "sigma"),
    ({"sigma": "0.2"}, "sigma"),
    ({"resolution": 1}, "resolution"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": True}, "num_images"),
    ({"store_dir": None}, "store_dir"),
    ({"explainer": "shap"}, "explainer"),
    ({"explainer": 3}, "explainer"),
    ({"explainer": {**compose_group("explainer", "smoothgrad"), "num_samples": 0}}, "explainer.num_samples"),
    ({"explainer": {"name": "smoothgrad", "stdev": 0.1, "seed": 0}}, "explainer.num_samples"),
    ({"sigmaa": 0.2}, "sigmaa"),
])
def test_consensus_callback_options_are_refused_by_key(tmp_path, options, key):
    """train.py validates ``callbacks.consensus`` against ``ConsensusCallback.options`` before it
    builds anything: a typo must not cost the run."""
    with pytest.raises(ConfigError) as err:
        check_targets({"consensus": consensus_callback(tmp_path, **options)}, "callbacks")
    assert err.value.keys == [f"callbacks.consensus.{key}"]


def test_consensus_callback_refuses_missing_checkpoints(tmp_path):
    arguments = {"committee": [str(tmp_path / "no_such.ckpt")], "data": {"name": "synthetic"},
                 "explainer": {"name": "gradcam", "layer": None},
                 "settings": default_settings(seed=0, batch_size=4), "num_images": 4, "target": "label",
                 "resolution": 16, "sigma": 0.2, "aggregation": "linear", "store_dir": str(tmp_path / "store")}
    with pytest.raises(FileNotFoundError, match=r"callbacks.consensus.committee: checkpoint\(s\) not found"):
        ConsensusCallback(**arguments)


@pytest.mark.parametrize("overrides, keys", [
    ([], ["table"]),
    (["table=t.csv", "label=m1"], ["label"]),
    (["table=t.csv", "label=[m1,[m2]]"], ["label.1"]),
    (["table=t.csv", "label=[m1,true]"], ["label.1"]),
    (["table=t.csv", "+typo=1"], ["typo"]),
])
def test_report_options_are_refused_by_key(tmp_path, overrides, keys):
    with pytest.raises(ConfigError) as err:
        check_config(compose_config("consensus_report", f"output_dir={tmp_path}", *overrides), ReportConfig)
    assert err.value.keys == keys
    # A model column of numbers: label=[18] is the model "18".
    config = check_config(compose_config("consensus_report", f"output_dir={tmp_path}", "table=t.csv", "label=[m1,18]"),
                          ReportConfig)
    assert config.label == ("m1", "18")


# The committee's images, resolution and pictures in every run of the consensus script here.
CONSENSUS = ["num_images=6", "resolution=16", "picture_images=2"]


def consensus(out: Path, data_dir: Path, store: Path, *overrides: str, launcher=PYTHON) -> subprocess.CompletedProcess:
    return run_module("evaluation.consensus", out, data_dir, f"store_dir={store}", *CONSENSUS, *overrides,
                      launcher=launcher)


@pytest.fixture(scope="module")
def committee(tmp_path_factory):
    """Three tiny trained checkpoints of 3 classes (two losses, two seeds), in one folder."""
    root = tmp_path_factory.mktemp("committee")
    paths = []
    for name, overrides in (("ce", ["loss=ce"]), ("gc", ["loss=gc"]), ("gc_seed1", ["loss=gc", "seed=1"])):
        assert_ok(train(root / "runs" / name, root / "data", *overrides, "~callbacks.explanation_metrics",
                        "~callbacks.fgsm_robustness", "heatmap_images=2"))
        paths.append(read_summary(root / "runs" / name)["last_checkpoint"])
    return paths, root


def read_json(out: Path) -> dict:
    return json.loads((out / "consensus.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("explainer", [["explainer=gradcam"], CHEAP_SMOOTHGRAD, CHEAP_LIME])
def test_consensus_script_writes_every_output_and_reuses_the_store(tmp_path, committee, explainer):
    paths, root = committee
    store = tmp_path / "store"
    # Two members first; the third joins later and is the only one computed then.
    first = consensus(tmp_path / "first", root / "data", store, f"ckpts=[{','.join(paths[:2])}]", *explainer)
    assert_ok(first)
    assert all(m["computed_now"] for m in read_json(tmp_path / "first")["members"])
    # A copy of a member under another name has its weights: it counts once.
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(Path(paths[0]).read_bytes())
    full = consensus(tmp_path / "full", root / "data", store, f"ckpts=[{','.join(paths)},{copy}]",
                     "leave_one_out=true", *explainer)
    assert_ok(full)
    assert f"{copy}: the same weights as {paths[0]}; counted once" in full.stdout
    for name in ("consensus.md", "consensus.csv", "consensus.json", "scatter.png", "explanations.png",
                 "convergence.png"):
        assert (tmp_path / "full" / name).stat().st_size > 0, name
    report = read_json(tmp_path / "full")
    members = report["members"]
    assert [m["checkpoint"] for m in members] == paths
    assert [m["computed_now"] for m in members] == [False, False, True]
    assert min(m["rank"] for m in members) == 1
    for member, similarities in zip(members, report["similarities"]):
        assert 0 <= member["accuracy"] <= 1
        assert {"pg", "ch", "map", "consensus_score_loo", "forward_passes"} <= set(member)
        # A missing explanation (the tiny models' Grad-CAM is often all zero) has no similarity.
        assert member["missing_explanations"] == sum(math.isnan(value) for value in similarities)
    assert report["summary"]["missing_explanations"] == sum(m["missing_explanations"] for m in members)
    assert f"Missing explanations: {report['summary']['missing_explanations']} of 18." in \
        (tmp_path / "full" / "consensus.md").read_text()
    if explainer == CHEAP_LIME:
        # Both papers' rules, the configured (squared) one first; its similarity is a signed cosine.
        assert report["settings"]["aggregation"] == "squared"
        for member in members:
            assert -1 <= member["consensus_score"] <= 1
            assert member["consensus_score"] == member["consensus_score_squared"]
            assert member["rank"] == member["rank_squared"] and "rank_linear" in member
        other = report["other_rule"]
        assert other["rule"] == "linear" and 0 <= other["consensus_map"] <= 1
        assert [c["x"] for c in other["correlations"]] == ["consensus_score_linear"] * 4
        assert "score (linear)" in (tmp_path / "full" / "consensus.md").read_text()
    else:
        assert all(0 <= member["consensus_score"] <= 1 for member in members) and "other_rule" not in report
        # Pixel maps are compared at the image size (80 px) unless resolution says otherwise.
        assert report["summary"]["resolution"] == 16
    # One ce and two gc members: no group of 3 within which to correlate.
    assert report["group_correlations"] == []
    title = (tmp_path / "full" / "consensus.md").read_text().splitlines()[0]
    assert title.startswith("# Grad-CAM committee" if explainer == ["explainer=gradcam"] else "# Committee")
    correlations = report["correlations"]
    assert {(c["x"], c["y"]) for c in correlations} >= {("consensus_score", "accuracy"), ("consensus_score", "map")}
    for item in correlations:
        assert {"x", "y", "n", "pearson", "pearson_p", "spearman", "spearman_p"} <= set(item) and item["n"] == 3
    assert 0 <= report["summary"]["consensus_map"] <= 1
    assert set(report["summary"]["reference_map"]) == {"center", "noise"}
    assert len(report["similarities"]) == 3 and len(report["similarities"][0]) == 6
    with open(tmp_path / "full" / "consensus.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["checkpoint"] for row in table] == paths and "consensus_score" in table[0]
    # LIME's perturbations go through the network in batches, not one forward pass per sample.
    if explainer == CHEAP_LIME:
        assert all(m["forward_passes"] < 6 * 24 / 4 for m in members)


def stored_entries(store: Path) -> dict[str, Path]:
    """The complete member entries in ``store`` by checkpoint (not the shared arrays, not a staging
    folder a killed writer left)."""
    entries = [path for path in store.glob("*/*") if path.name != "shared" and not path.name.startswith(".")]
    return {json.loads((path / "meta.json").read_text())["meta"]["checkpoint"]: path for path in entries
            if (path / "meta.json").is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["devices", "torchrun"])
def test_two_processes_share_the_committee_and_score_as_one(tmp_path, committee, launcher):
    """The members are dealt out over 2 processes, each computed once; rank 0 alone writes the
    outputs, whose scores are one process's; a member already in the store is computed by nobody."""
    paths, root = committee
    members = f"ckpts=[{','.join(paths)}]"
    one = tmp_path / "one"
    assert_ok(consensus(one, root / "data", tmp_path / "store_one", members))
    start = TORCHRUN_2 if launcher == "torchrun" else PYTHON
    options = [] if launcher == "torchrun" else ["devices=2"]
    store = tmp_path / "store"
    # One member is in the store already (a run killed after it): the others are dealt out.
    assert_ok(consensus(tmp_path / "first", root / "data", store, f"ckpts=[{paths[0]},{paths[1]}]"))
    shutil.rmtree(stored_entries(store)[paths[1]])
    two = tmp_path / "two"
    run = consensus(two, root / "data", store, "device=cpu", members, *options, launcher=start)
    assert_ok(run)
    # (The two processes share stdout: their lines may interleave.)
    explaining = re.findall(r"rank (\d): explaining \[(\d)/3\]", run.stdout)
    assert sorted(member for _, member in explaining) == ["2", "3"]  # each missing member once
    assert {rank for rank, _ in explaining} == {"0", "1"}  # one each
    assert run.stdout.count("consensus.json ") == 1  # rank 0 alone writes the outputs
    expected, actual = read_json(one), read_json(two)
    assert [m["computed_now"] for m in actual["members"]] == [False, True, True]
    for mine, theirs in zip(actual["members"], expected["members"]):
        for key in ("consensus_score", "rank", "accuracy", "pg", "ch", "map", "missing_explanations"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, nan_ok=True), key


@pytest.mark.slow
def test_a_run_killed_mid_committee_resumes_with_the_members_it_finished(tmp_path, committee):
    """SIGKILL once the first member is stored; the next run computes only the others, and scores
    as a run that was never interrupted."""
    paths, root = committee
    members = f"ckpts=[{','.join(paths)}]"
    explainer = ["explainer=smoothgrad", "explainer.num_samples=12"]  # a member takes seconds, not less
    store = tmp_path / "store"
    command = module_command("evaluation.consensus", tmp_path / "killed", root / "data", f"store_dir={store}",
                             *CONSENSUS, members, *explainer)
    log = tmp_path / "killed.log"  # a file, not a pipe: nothing blocks the run while it is watched
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not stored_entries(store) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    finished = set(stored_entries(store))
    assert 1 <= len(finished) < 3, finished  # killed mid-committee
    assert not (tmp_path / "killed" / "consensus.json").exists()

    resumed = consensus(tmp_path / "resumed", root / "data", store, members, *explainer)
    assert_ok(resumed)
    report = read_json(tmp_path / "resumed")
    assert [m["computed_now"] for m in report["members"]] == [path not in finished for path in paths]
    assert_ok(consensus(tmp_path / "whole", root / "data", tmp_path / "store_whole", members, *explainer))
    for mine, theirs in zip(report["members"], read_json(tmp_path / "whole")["members"]):
        for key in ("consensus_score", "rank", "accuracy", "map", "missing_explanations"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, nan_ok=True), key


@pytest.mark.slow
def test_scores_do_not_depend_on_the_order_of_members_and_a_folder_is_a_committee(tmp_path, committee):
    paths, root = committee
    runs = {}
    for name, listing in (("forward", paths), ("reversed", paths[::-1])):
        assert_ok(consensus(tmp_path / name, root / "data", tmp_path / "store", f"ckpts=[{','.join(listing)}]"))
        runs[name] = {m["checkpoint"]: (m["consensus_score"], m["rank"]) for m in read_json(tmp_path / name)["members"]}
    assert runs["forward"] == runs["reversed"]
    # Every *.ckpt below the folder: each one-epoch run's best and last checkpoints have the same
    # weights and count once.
    folder = consensus(tmp_path / "folder", root / "data", tmp_path / "store", f"ckpts_dir={root / 'runs'}")
    assert_ok(folder)
    assert len(read_json(tmp_path / "folder")["members"]) == 3 and folder.stdout.count("counted once") == 3
    lasts = consensus(tmp_path / "lasts", root / "data", tmp_path / "store", f"ckpts_dir={root / 'runs'}",
                      "ckpts_glob=last.ckpt")
    assert_ok(lasts)
    assert [m["checkpoint"] for m in read_json(tmp_path / "lasts")["members"]] == sorted(paths)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ckpts=[ONE]"], "a committee needs at least 2 distinct checkpoints, got 1"),
        (["ckpts=ONE"], "a committee needs at least 2 distinct checkpoints, got 1"),
        (["ckpts=[ONE,ONE]"], "a committee needs at least 2 distinct checkpoints, got 1"),
        (["ckpts_dir=EMPTY"], "ckpts_dir: no file matching '*.ckpt' under"),
        (["ckpts=[ONE,TWO]", "explainer=nope"], "Could not find 'explainer/nope'"),
        # Refused values name their keys (the rest of them: test_consensus_options_are_refused_by_key_...).
        (["ckpts=[ONE,TWO]", "aggregation=median"], "aggregation: "),
        (["ckpts=[ONE,TWO]", "data.num_classes=4"], "has 3 classes, but data 'synthetic' has 4"),
    ],
)
def test_consensus_bad_input_is_named(tmp_path, committee, overrides, message):
    paths, root = committee
    (tmp_path / "empty").mkdir()
    overrides = [item.replace("ONE", paths[0]).replace("TWO", paths[1]).replace("EMPTY", str(tmp_path / "empty"))
                 for item in overrides]
    run = consensus(tmp_path / "out", root / "data", tmp_path / "store", *overrides)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-3000:]


@pytest.mark.slow
def test_training_callback_scores_the_model_against_a_committee(tmp_path, committee):
    paths, root = committee
    run = train(tmp_path / "run", root / "data", "callbacks=with_consensus",
                f"callbacks.consensus.committee=[{paths[0]},{paths[1]}]", "callbacks.consensus.num_images=6",
                "callbacks.consensus.resolution=16", f"callbacks.consensus.store_dir={tmp_path / 'store'}",
                "~callbacks.explanation_metrics", "~callbacks.fgsm_robustness")
    assert_ok(run)
    metrics = read_summary(tmp_path / "run")["metrics"]
    assert 0 <= metrics["consensus/score"] <= 1 and metrics["consensus/rank"] in (1.0, 2.0, 3.0)
    assert metrics["consensus/committee_size"] == 3.0
