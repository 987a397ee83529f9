"""The trainer never mislabels, loses or half-writes a model: resume identity, --overwrite, misuse.

Issue 11, trainer parts: a resume on other data is refused (3); a failed ``--overwrite`` leaves
the previous model readable and user files are never deleted (4); user mistakes are one line
with exit 2 and leave ``--model_dir`` untouched (12); the CLI logs under ``python -m`` (13).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from pipeline import preprocess
from schemas import features
from tests.conftest import CLASS_COLOURS, write_dataset
from training import layout, task
from training.config import parse_config

pytestmark = pytest.mark.slow

RELABEL = {"daisy": "zebra", "rose": "apple", "tulip": "mango"}
ONE_EPOCH = ("--epochs=1", "--batch_size=64")


def _preprocess(out, backbone, *, images=None, labels_csv=None):
    source = f"--input_csv={labels_csv}" if labels_csv else f"--image_dir={images}"
    preprocess.run(
        [f"--output_dir={out}", f"--backbone={backbone}", "--eval_fraction=0.2", source]
        + ["--test_fraction=0.2"]
    )
    return str(out)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety_images")
    write_dataset(root, per_class=10)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_backbone, images):
    return _preprocess(tmp_path_factory.mktemp("safety_x"), tiny_backbone, images=images)


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory, tiny_backbone, images):
    """The same images as ``data_dir`` with every label renamed (daisy -> zebra, ...)."""
    rows = [
        f"{p.relative_to(images).as_posix()},{RELABEL[label]}"
        for label in CLASS_COLOURS
        for p in sorted((images / label).glob("*.jpg"))
    ]
    csv = images / "relabelled.csv"
    csv.write_text("\n".join(rows) + "\n")
    return _preprocess(tmp_path_factory.mktemp("safety_y"), tiny_backbone, labels_csv=csv)


def _main(data_dir, model_dir, *flags) -> int:
    return task.main([f"--data_dir={data_dir}", f"--model_dir={model_dir}", *flags])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("hubflow-train: error: "), err
    return err[0]


def _snapshot(root) -> dict[str, tuple]:
    """Every file and folder under ``root`` with its content digest and mtime."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = ("dir",)
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, root)] = (digest, os.stat(path).st_mtime_ns)
    return found


def _trained(data_dir, model_dir):
    assert _main(data_dir, model_dir, *ONE_EPOCH) == 0
    return _snapshot(model_dir)


def _serving_labels(export_dir) -> list[str]:
    with open(os.path.join(export_dir, "assets.extra", "labels.txt")) as f:
        return f.read().split()


# --- 3: a model dir knows which data it was trained on ---------------------------------------


def test_resume_on_relabelled_data_is_refused_and_changes_nothing(
    data_dir, relabelled, tmp_path, capsys
):
    model_dir = tmp_path / "m"
    before = _trained(data_dir, model_dir)
    capsys.readouterr()
    assert _main(relabelled, model_dir, *ONE_EPOCH) == 2
    line = _one_line_error(capsys)
    assert line.endswith("pass --overwrite to start fresh") and "label" in line, line
    assert _snapshot(model_dir) == before
    assert _main(relabelled, model_dir, *ONE_EPOCH, "--overwrite") == 0
    assert _serving_labels(model_dir / "export" / "1") == sorted(RELABEL.values())


def test_resume_on_rewritten_shards_with_the_same_counts_is_refused(data_dir, tmp_path, capsys):
    model_dir = tmp_path / "m"
    before = _trained(data_dir, model_dir)
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    shard = sorted(other.glob("train-*.tfrecord"))[0]
    records = []
    for record in tf.data.TFRecordDataset(str(shard)):
        example = tf.train.Example.FromString(record.numpy())
        values = example.features.feature[features.EMBEDDING].float_list.value
        values[:] = [v * 1.5 for v in values]
        # A size-changing edit: one to the same byte size is the fingerprint's documented limit.
        example.features.feature[features.IMAGE_SOURCE].bytes_list.value[0] += b"?edited"
        records.append(example.SerializeToString())
    size = shard.stat().st_size
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for record in records:
            writer.write(record)
    assert shard.stat().st_size != size  # same labels and counts, other content
    capsys.readouterr()
    assert _main(other, model_dir, *ONE_EPOCH) == 2
    assert _one_line_error(capsys).endswith("pass --overwrite to start fresh")
    assert _snapshot(model_dir) == before


def test_same_data_in_another_place_resumes(data_dir, tmp_path):
    model_dir = tmp_path / "m"
    _trained(data_dir, model_dir)
    moved = shutil.copytree(data_dir, tmp_path / "moved")
    assert _main(moved, model_dir, *ONE_EPOCH) == 0
    assert (model_dir / "export" / "2").is_dir()


def test_model_dir_without_a_fingerprint_resumes_only_on_matching_labels(
    data_dir, relabelled, tmp_path, capsys, caplog
):
    model_dir = tmp_path / "m"
    _trained(data_dir, model_dir)
    config_path = model_dir / layout.CONFIG_FILE
    old = json.loads(config_path.read_text())
    old.pop("data_fingerprint")  # as written before fingerprints were recorded
    config_path.write_text(json.dumps(old))
    before = _snapshot(model_dir)
    capsys.readouterr()
    assert _main(relabelled, model_dir, *ONE_EPOCH) == 2
    assert _one_line_error(capsys).endswith("pass --overwrite to start fresh")
    assert _snapshot(model_dir) == before
    caplog.set_level("WARNING", logger="training")
    assert _main(data_dir, model_dir, *ONE_EPOCH) == 0
    assert "no data fingerprint" in caplog.text
    assert "data_fingerprint" in json.loads(config_path.read_text())


# --- 4: --overwrite replaces the previous model only once the new one is complete -------------


def _with_user_files(model_dir):
    (model_dir / "NOTES.txt").write_text("mine")
    (model_dir / "mine").mkdir()
    (model_dir / "mine" / "data.csv").write_text("a,b\n")


def test_failed_overwrite_leaves_the_previous_model_as_it_was(data_dir, tmp_path, monkeypatch):
    model_dir = tmp_path / "m"
    _trained(data_dir, model_dir)
    _with_user_files(model_dir)
    before = _snapshot(model_dir)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during export")

    monkeypatch.setattr(task.export, "export", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        task.train(
            parse_config(
                [f"--data_dir={data_dir}", f"--model_dir={model_dir}", *ONE_EPOCH, "--overwrite"]
            )
        )
    assert _snapshot(model_dir) == before
    assert tf.saved_model.load(str(model_dir / "export" / "1")).signatures["serving_default"]


def test_overwrite_keeps_user_files_and_drops_the_previous_model_after_export(data_dir, tmp_path):
    model_dir = tmp_path / "m"
    _trained(data_dir, model_dir)
    assert _main(data_dir, model_dir, *ONE_EPOCH) == 0  # export/2
    _with_user_files(model_dir)
    assert _main(data_dir, model_dir, *ONE_EPOCH, "--overwrite") == 0
    assert sorted(os.listdir(model_dir / "export")) == ["1"]
    assert (model_dir / "NOTES.txt").read_text() == "mine"
    assert (model_dir / "mine" / "data.csv").read_text() == "a,b\n"
    assert not (model_dir / layout.PREVIOUS_DIR).exists()


def _tree(root: str) -> dict[str, str]:
    found = {}
    for folder, _, files in tf.io.gfile.walk(root):
        for name in files:
            with tf.io.gfile.GFile(f"{folder}/{name}") as f:
                found[f"{folder}/{name}"[len(root) + 1 :]] = f.read()
    return found


def _write(path: str, text: str) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


@pytest.mark.parametrize("remote", [False, True], ids=["local", "ram"])
def test_set_aside_restore_and_recovery_of_a_killed_run(remote, tmp_path):
    # ram:// goes through tf.io.gfile file by file, as gs:// does.
    root = f"ram://safety-{os.getpid()}/m" if remote else str(tmp_path / "m")
    old = {
        "config.json": "old config",
        "checkpoints/stage1/ckpt-0001.index": "ckpt",
        "export/1/saved_model.pb": "pb",
        "NOTES.txt": "mine",
    }
    for name, text in old.items():
        _write(f"{root}/{name}", text)

    layout.set_aside(root)  # an --overwrite run starts ...
    assert _tree(root) == {
        "NOTES.txt": "mine",
        **{f"{layout.PREVIOUS_DIR}/{k}": v for k, v in old.items() if k != "NOTES.txt"},
        f"{layout.PREVIOUS_DIR}/{layout.COMPLETE_MARKER}": "",
    }
    _write(f"{root}/config.json", "new config")
    _write(f"{root}/logs/stage1/events", "new")
    layout.restore(root)  # ... and fails
    assert _tree(root) == old

    layout.set_aside(root)  # killed after it wrote some outputs: the previous model is kept
    _write(f"{root}/config.json", "new config")
    layout.set_aside(root)  # the next --overwrite run drops the killed run's outputs
    layout.restore(root)
    assert _tree(root) == old

    # killed half way through setting aside (no marker): the next run puts everything back
    tf.io.gfile.makedirs(f"{root}/{layout.PREVIOUS_DIR}")
    tf.io.gfile.rename(f"{root}/config.json", f"{root}/{layout.PREVIOUS_DIR}/config.json")
    layout.recover(root)
    assert _tree(root) == old

    layout.set_aside(root)
    layout.discard(root)  # the new export is complete
    assert _tree(root) == {"NOTES.txt": "mine"}
    if remote:
        tf.io.gfile.rmtree(root)


# --- 12: user mistakes are one line, exit 2, and change nothing -------------------------------


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--learning_rate=nan"], "--learning_rate"),
        (["--learning_rate=inf"], "--learning_rate"),
        (["--fine_tune_learning_rate=nan"], "--fine_tune_learning_rate"),
        (["--fine_tune_learning_rate=0"], "--fine_tune_learning_rate"),
        (["--dropout=nan"], "--dropout"),
        (["--l2=nan"], "--l2"),
        (["--label_smoothing=nan"], "--label_smoothing"),
        (["--epochs=0"], "--epochs must be positive"),
        (["--batch_size=0"], "--batch_size must be positive"),
        (["--fine_tune_epochs=0"], "--fine_tune_epochs must be positive"),
        (["--patience=-1"], "--patience"),
    ],
)
def test_unusable_numbers_are_one_line(flags, needle, capsys):
    assert _main("d", "m", *flags) == 2
    assert needle in _one_line_error(capsys)


def test_explicit_values_are_never_replaced_by_mode_defaults():
    def config(*flags):
        return parse_config(["--data_dir=d", "--model_dir=m", *flags])

    default = config()
    assert (default.epochs, default.batch_size, default.patience) == (200, 128, 10)
    assert config("--features=image").epochs == 15
    assert config("--patience=0").patience == 0  # stop at the first epoch without improvement


def test_model_dir_that_is_a_file(data_dir, tmp_path, capsys):
    path = tmp_path / "model.txt"
    path.write_text("not a dir")
    assert _main(data_dir, path, *ONE_EPOCH) == 2
    assert "--model_dir" in _one_line_error(capsys)
    assert path.read_text() == "not a dir"


def _break(data_dir, broken, breakage: str) -> str:
    """A copy of ``data_dir`` with one thing wrong; returns a text the error must contain."""
    shutil.copytree(data_dir, broken)
    manifest = broken / "manifest.json"
    if breakage == "embedding_dim":
        raw = json.loads(manifest.read_text())
        raw["backbone"]["embedding_dim"] += 3
        manifest.write_text(json.dumps(raw))
        return "embedding"
    if breakage == "no_transform_fn":
        shutil.rmtree(broken / "transform_fn")
        return "transform_fn"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    return str(manifest)


@pytest.mark.parametrize("breakage", ["embedding_dim", "no_transform_fn", "truncated_manifest"])
def test_bad_data_dir_is_one_line_and_leaves_model_dir_alone(breakage, data_dir, tmp_path, capsys):
    needle = _break(data_dir, tmp_path / "data", breakage)
    model_dir = tmp_path / "m"
    assert _main(tmp_path / "data", model_dir, *ONE_EPOCH) == 2
    assert needle in _one_line_error(capsys)
    assert not model_dir.exists()


# --- 13: the CLI's own log lines under python -m ----------------------------------------------


def test_cli_under_python_m_logs_as_training_task_and_cleans_tmp(data_dir, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), TF_CPP_MIN_LOG_LEVEL="2")
    argv = [sys.executable, "-m", "training.task", f"--data_dir={data_dir}"]
    argv += [f"--model_dir={tmp_path / 'm'}", *ONE_EPOCH]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "INFO training.task: distribution strategy" in done.stderr, done.stderr[-2000:]
    # TF autograph writes __autograph_generated_file*.py to TMPDIR and deletes them at exit.
    assert not [n for n in os.listdir(tmp) if n.startswith("__autograph_generated_file")]


def test_a_second_trainer_on_a_locked_model_dir_is_refused_and_changes_nothing(
    data_dir, tmp_path, capsys
):
    import signal

    from tests.test_output_safety import _hold_lock_in_subprocess

    model_dir = tmp_path / "model"
    holder = _hold_lock_in_subprocess(model_dir)
    try:
        before = sorted(os.listdir(model_dir))
        assert _main(data_dir, model_dir, *ONE_EPOCH) == 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    error = _one_line_error(capsys)
    assert f"--model_dir: {model_dir} is in use by hubflow-preprocess (pid {holder.pid}" in error
    assert sorted(os.listdir(model_dir)) == before  # nothing written by the refused run
    assert _main(data_dir, model_dir, *ONE_EPOCH) == 0  # the killed holder's lock is free
