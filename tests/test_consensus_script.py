"""``python -m evaluation.consensus`` end to end on tiny trained checkpoints, the store, the
training callback, and bad input; plus the store on its own."""
import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from evaluation.consensus.store import ExplanationStore, file_digest, settings_digest
from tests.conftest import assert_ok, read_summary, run_module, train

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
    first, second = tmp_path / "one.bin", tmp_path / "two.bin"
    first.write_bytes(b"same bytes")
    second.write_bytes(b"same bytes")
    assert file_digest(first) == file_digest(second)  # a member is its content, not its name


def consensus(out: Path, data_dir: Path, store: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_module("evaluation.consensus", out, data_dir, f"store_dir={store}", "num_images=6", "resolution=16",
                      "picture_images=2", *overrides)


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
    first = consensus(tmp_path / "first", root / "data", store, f"ckpts=[{','.join(paths)}]", "leave_one_out=true",
                      *explainer)
    assert_ok(first)
    for name in ("consensus.md", "consensus.csv", "consensus.json", "scatter.png", "explanations.png",
                 "convergence.png"):
        assert (tmp_path / "first" / name).stat().st_size > 0, name
    report = read_json(tmp_path / "first")
    members = report["members"]
    assert [m["checkpoint"] for m in members] == paths and all(m["computed_now"] for m in members)
    assert min(m["rank"] for m in members) == 1
    for member in members:
        assert 0 <= member["consensus_score"] <= 1 and 0 <= member["accuracy"] <= 1
        assert {"pg", "ch", "map", "consensus_score_loo", "forward_passes"} <= set(member)
    correlations = report["correlations"]
    assert {(c["x"], c["y"]) for c in correlations} >= {("consensus_score", "accuracy"), ("consensus_score", "map")}
    for item in correlations:
        assert {"x", "y", "n", "pearson", "pearson_p", "spearman", "spearman_p"} <= set(item) and item["n"] == 3
    assert 0 <= report["summary"]["consensus_map"] <= 1
    with open(tmp_path / "first" / "consensus.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["checkpoint"] for row in table] == paths and "consensus_score" in table[0]
    # LIME's perturbations go through the network in batches, not one forward pass per sample.
    if explainer == CHEAP_LIME:
        assert all(m["forward_passes"] < 6 * 24 / 4 for m in members)

    # Run again with one checkpoint listed twice under another name: nothing new is computed.
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(Path(paths[0]).read_bytes())
    again = consensus(tmp_path / "again", root / "data", store, f"ckpts=[{','.join(paths)},{copy}]",
                      "leave_one_out=true", *explainer)
    assert_ok(again)
    rerun = read_json(tmp_path / "again")["members"]
    assert not any(m["computed_now"] for m in rerun) and "from the store" in again.stdout
    assert [m["accuracy"] for m in rerun[:3]] == [m["accuracy"] for m in members]


@pytest.mark.slow
def test_scores_do_not_depend_on_the_order_of_members_and_a_folder_is_a_committee(tmp_path, committee):
    paths, root = committee
    runs = {}
    for name, listing in (("forward", paths), ("reversed", paths[::-1])):
        assert_ok(consensus(tmp_path / name, root / "data", tmp_path / "store", f"ckpts=[{','.join(listing)}]"))
        runs[name] = {m["checkpoint"]: (m["consensus_score"], m["rank"]) for m in read_json(tmp_path / name)["members"]}
    assert runs["forward"] == runs["reversed"]
    folder = consensus(tmp_path / "folder", root / "data", tmp_path / "store", f"ckpts_dir={root / 'runs'}")
    assert_ok(folder)
    found = [m["checkpoint"] for m in read_json(tmp_path / "folder")["members"]]
    assert set(paths) <= set(found) and found == sorted(found)  # every *.ckpt below it, best ones too


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ckpts=[ONE]"], "a committee needs at least 2 checkpoints, got 1"),
        (["ckpts_dir=EMPTY"], "ckpts_dir: no .ckpt file under"),
        (["ckpts=[ONE,TWO]", "ckpts_dir=EMPTY"], "not both or neither"),
        (["ckpts=[ONE,TWO]", "explainer=nope"], "Could not find 'explainer/nope'"),
        (["ckpts=[ONE,TWO]", "explainer.name=nope"], "explainer 'nope' is unknown"),
        (["ckpts=[ONE,TWO]", "aggregation=median"], "aggregation='median' is unknown; allowed: ['linear', 'squared']"),
        (["ckpts=[ONE,TWO]", "target=random"], "target='random' is unknown"),
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
