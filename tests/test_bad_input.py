"""Bad input to train.py: each error names the key, value, path or file, before any work starts."""

import pytest

from tests.conftest import assert_ok, logged_metrics, train

pytestmark = pytest.mark.slow  # subprocesses: python train.py, DDP


@pytest.mark.parametrize(
    "overrides, messages",
    [
        (["model=vgg19"], ["Could not find 'model/vgg19'", "alexnet", "resnet18", "vgg16", "vit"]),
        (["loss=focal"], ["Could not find 'loss/focal'", "ce", "gc"]),
        (["data=mnist"], ["Could not find 'data/mnist'", "coco", "imagenet", "synthetic", "voc2007"]),
        # The schema's refusals: the key, then the value.
        (["model.name=vgg19"], ["ConfigError: model.name: 'vgg19'"]),
        (["loss.name=focal"], ["ConfigError: loss.name: 'focal'"]),
        (["data.name=mnist"], ["data.name: 'mnist'"]),
        (["loss.lambda=-1", "data.context_bias=1.5", "optimizer.lr=0"],
         ["loss.lambda:", "(got -1)", "data.context_bias:", "(got 1.5)", "optimizer.lr:", "(got 0)"]),
        (["model=alexnet", "model.pooling=max"], ["model.pooling:", "(got 'max')"]),
        (["data.num_classes=50"], ["data.num_classes:", "(got 50)"]),
    ],
)
def test_bad_config_is_refused_before_any_work(tmp_path, overrides, messages):
    data_dir = tmp_path / "data"
    run = train(tmp_path / "out", data_dir, *overrides)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    for message in messages:
        assert message in output, output[-3000:]
    assert not data_dir.exists()  # nothing was generated


def test_missing_data_directory_is_named(tmp_path):
    missing = tmp_path / "no_imagenet_here"
    run = train(tmp_path / "out", None, "data=imagenet", f"data.data_dir={missing}")
    assert run.returncode != 0
    assert str(missing) in run.stderr and "not found" in run.stderr


def test_empty_data_directory_is_named(tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    run = train(tmp_path / "out", None, "data=imagenet", f"data.data_dir={empty}")
    assert run.returncode != 0
    assert str(empty / "train") in run.stderr


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    data_dir = tmp_path / "data"
    assert_ok(train(tmp_path / "first", data_dir, "loss=ce", "heatmap_images=0"))
    victim = sorted(data_dir.glob("synthetic_*/train/*/*.png"))[0]
    victim.write_bytes(b"this is not a png")
    failed = train(tmp_path / "failed", data_dir, "loss=ce", "heatmap_images=0")
    assert failed.returncode != 0
    assert f"corrupt image file {victim}" in failed.stderr
    skipped = train(tmp_path / "skipped", data_dir, "loss=ce", "heatmap_images=0", "data.skip_corrupt=true")
    assert_ok(skipped)
    counts = [float(row["train/skipped_corrupt"]) for row in logged_metrics(tmp_path / "skipped")
              if row.get("train/skipped_corrupt")]
    assert counts == [1.0]


def test_missing_checkpoint_is_named(tmp_path):
    run = train(tmp_path / "out", tmp_path / "data", f"ckpt_path={tmp_path}/nope.ckpt")
    assert run.returncode != 0
    assert f"checkpoint not found: {tmp_path}/nope.ckpt" in run.stderr


def test_file_that_is_not_a_checkpoint_is_named(tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("hello")
    run = train(tmp_path / "out", tmp_path / "data", f"ckpt_path={bogus}")
    assert run.returncode != 0
    assert f"not a readable PyTorch checkpoint: {bogus}" in run.stderr
