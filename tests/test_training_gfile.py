"""The trainer on Vertex AI: ``--data_dir`` and ``--model_dir`` on an object store, and TF_CONFIG.

``ram://`` stands in for ``gs://``: TensorFlow's in-memory filesystem, reachable only through
``tf.io.gfile``, with no folder rename (like GCS). A trainer that fell back to ``os`` or
``open`` on those paths would fail, or create a local ``ram:`` folder, which is checked.

One TensorFlow bug of ``ram://`` alone is worked around here, not in the product: opening an
existing file for writing appends to it instead of replacing it (``RamFileSystem`` reuses the
file's buffer), so ``history.json``, rewritten each epoch, would hold every version. On
``gs://`` (and locally) a write replaces the object; :class:`_ReplacingGFile` makes ``ram://``
do the same for Python writes. TensorFlow's C++ checkpoint writer has the same problem there (a
stage's ``final/weights.index`` written again by a resumed run comes out corrupt on ``ram://``),
so the test never reads back a checkpoint written twice.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from pipeline import preprocess
from schemas import csv_format, features, serving
from schemas import manifest as manifest_lib
from schemas.cli import UsageError
from storage import fileops
from tests.conftest import write_dataset
from training import cluster, layout, task
from training.config import parse_config

RAM = f"ram://hubflow-gfile-{os.getpid()}"
FLAGS = ("--learning_rate=0.05", "--patience=100", "--batch_size=16")


class _ReplacingGFile(tf.io.gfile.GFile):
    """``tf.io.gfile.GFile`` whose writes replace an existing ``ram://`` file, as on gs://."""

    def __init__(self, name, mode="r"):
        if str(name).startswith("ram://") and "w" in mode and tf.io.gfile.exists(name):
            if not tf.io.gfile.isdir(name):
                tf.io.gfile.remove(name)
        super().__init__(name, mode)


def _copy_to(local: str, remote: str) -> None:
    for folder, _, names in os.walk(local):
        relative = os.path.relpath(folder, local)
        target = remote if relative == "." else fileops.join(remote, relative)
        tf.io.gfile.makedirs(target)
        for name in names:
            tf.io.gfile.copy(os.path.join(folder, name), fileops.join(target, name), True)


def _read(path: str, mode: str = "r"):
    with tf.io.gfile.GFile(path, mode) as f:
        return f.read()


def _tree(root: str) -> dict[str, bytes]:
    return {name: _read(fileops.join(root, name), "rb") for name in fileops.list_files(root)}


@pytest.fixture(scope="module")
def local_data(tmp_path_factory, tiny_backbone) -> str:
    images = tmp_path_factory.mktemp("gfile_images")
    write_dataset(images, per_class=10)
    out = tmp_path_factory.mktemp("gfile_data")
    preprocess.run(
        [f"--output_dir={out}", f"--backbone={tiny_backbone}", f"--image_dir={images}"]
        + ["--eval_fraction=0.2", "--test_fraction=0.2"]
    )
    return str(out)


@pytest.fixture
def ram_data(local_data, monkeypatch):
    monkeypatch.setattr(tf.io.gfile, "GFile", _ReplacingGFile)
    data_dir = f"{RAM}/data"
    _copy_to(local_data, data_dir)
    yield data_dir
    fileops.delete(RAM)


def _write(path: str, text: str) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def _train(data_dir: str, model_dir: str, *flags: str) -> task.TrainResult:
    return task.train(parse_config([f"--data_dir={data_dir}", f"--model_dir={model_dir}", *flags]))


def _assert_complete_version(version: str, labels: list[str]) -> None:
    """An export version as a reader on gs:// finds it: every file there, labels in order."""
    for name in ("saved_model.pb", "variables/variables.index", serving.PREPROCESSING_ASSET):
        assert tf.io.gfile.exists(fileops.join(version, name)), (version, name)
    assert _read(fileops.join(version, serving.LABELS_ASSET)).split() == labels


def _serves_like_keras(result: task.TrainResult, local_data: str) -> None:
    manifest = manifest_lib.read_manifest(local_data)
    pattern = os.path.join(local_data, features.tfrecord_pattern(csv_format.TEST))
    records = list(features.read_dataset(pattern, manifest.backbone.embedding_dim))
    jpegs = [r[features.IMAGE_ENCODED].numpy() for r in records]
    embeddings = np.stack([r[features.EMBEDDING].numpy() for r in records])
    serve = tf.saved_model.load(result.export_dir).signatures[serving.SIGNATURE_NAME]
    served = serve(image_bytes=tf.constant(jpegs))
    keras = np.argmax(result.model(embeddings, training=False), axis=1)
    assert [c.decode() for c in served["classes"].numpy()] == [manifest.labels[i] for i in keras]
    np.testing.assert_allclose(served["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_trainer_reads_and_writes_only_through_gfile(ram_data, local_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fall-back to os paths would create ./ram:/...
    moves: list[tuple[str, str]] = []  # every rename, to check the order of export files
    rename = tf.io.gfile.rename

    def recorded(source, target, overwrite=False):
        moves.append((source, target))
        return rename(source, target, overwrite)

    monkeypatch.setattr(tf.io.gfile, "rename", recorded)
    model_dir = f"{RAM}/model"
    labels = manifest_lib.read_manifest(local_data).labels
    version = fileops.join(model_dir, serving.EXPORT_DIR)

    # A fresh run: the export, metrics, plots, history, logs and checkpoints are all in ram://.
    result = _train(ram_data, model_dir, "--epochs=3", *FLAGS)
    assert result.export_dir == f"{version}/1"
    _assert_complete_version(result.export_dir, labels)
    _serves_like_keras(result, local_data)
    assert tf.io.gfile.listdir(version) == ["1"]  # the temp dir export/1.tmp is gone
    metrics = json.loads(_read(fileops.join(model_dir, layout.METRICS_FILE)))
    assert metrics["test"]["accuracy"] == result.metrics["test"]["accuracy"]
    for png in (layout.CONFUSION_PNG, layout.CURVES_PNG):
        assert _read(fileops.join(model_dir, png), "rb").startswith(b"\x89PNG"), png
    history = json.loads(_read(fileops.join(model_dir, layout.HISTORY_FILE)))
    assert len(history["loss"]) == 3
    assert tf.io.gfile.glob(f"{model_dir}/{layout.LOGS_DIR}/stage1/*/events.out.tfevents.*")
    assert not tf.io.gfile.exists(f"{model_dir}/.hubflow.lock")

    # A run killed while copying export/2 to the object store left it without saved_model.pb
    # (and its temp dir): that is not a version; the next export replaces both.
    for name in ("variables/variables.index", "assets.extra/labels.txt"):
        _write(f"{version}/2/{name}", "half")
    tf.io.gfile.makedirs(f"{version}/2.tmp/variables")

    # The same command with more epochs resumes from the last checkpoint in ram://.
    moves.clear()
    result = _train(ram_data, model_dir, "--epochs=5", *FLAGS)
    copied = [fileops.basename(t) for _, t in moves if t.startswith(f"{version}/2/")]
    assert len(copied) >= 4 and copied[-1] == "saved_model.pb", copied  # the marker last
    history = json.loads(_read(fileops.join(model_dir, layout.HISTORY_FILE)))
    assert len(history["loss"]) == 5 and history["stage"] == ["stage1"] * 5
    stage = f"{model_dir}/{layout.CHECKPOINT_DIR}/stage1"
    assert tf.io.gfile.exists(f"{stage}/ckpt-0005.index")
    assert not tf.io.gfile.exists(f"{stage}/ckpt-0006.index")
    assert result.export_dir == f"{version}/2"
    _assert_complete_version(f"{version}/1", labels)
    _assert_complete_version(result.export_dir, labels)
    _serves_like_keras(result, local_data)
    assert sorted(tf.io.gfile.listdir(version)) == ["1", "2"]

    # --overwrite that fails (here in the export) leaves the previous model as it was ...
    _write(f"{model_dir}/NOTES.txt", "mine")
    before = _tree(model_dir)
    moves.clear()

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during export")

    with monkeypatch.context() as patch:
        patch.setattr(task.export, "export", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _train(ram_data, model_dir, "--epochs=2", "--overwrite", *FLAGS)
    assert _tree(model_dir) == before
    out = [fileops.basename(s) for s, _ in moves if s.startswith(f"{version}/1/")]
    back = [fileops.basename(t) for _, t in moves if t.startswith(f"{version}/1/")]
    assert out[0] == back[-1] == "saved_model.pb", (out, back)  # leaves first, returns last

    # ... and one that completes replaces it, keeping only the user's file.
    result = _train(ram_data, model_dir, "--epochs=2", "--overwrite", *FLAGS)
    assert result.export_dir == f"{version}/1"
    assert tf.io.gfile.listdir(version) == ["1"]
    _assert_complete_version(result.export_dir, labels)
    assert len(json.loads(_read(fileops.join(model_dir, layout.HISTORY_FILE)))["loss"]) == 2
    assert not tf.io.gfile.exists(fileops.join(model_dir, layout.PREVIOUS_DIR))
    assert _read(f"{model_dir}/NOTES.txt") == "mine"

    assert not os.path.exists("ram:") and os.listdir(tmp_path) == []


@pytest.mark.parametrize("remote", [False, True], ids=["local", "ram"])
def test_a_run_killed_while_deleting_the_previous_model_never_brings_it_back(remote, tmp_path):
    root = f"{RAM}/discard" if remote else str(tmp_path / "m")
    for name in ("config.json", "checkpoints/stage1/ckpt-0001.index", "export/1/saved_model.pb"):
        _write(f"{root}/{name}", "old")
    layout.set_aside(root)  # an --overwrite run ...
    new = {"config.json": b"new", "export/1/saved_model.pb": b"new"}
    for name, text in new.items():
        _write(f"{root}/{name}", text.decode())
    # ... is killed while deleting the previous model: its .complete marker is already gone.
    previous = f"{root}/{layout.PREVIOUS_DIR}"
    _write(f"{previous}/{layout.DISCARD_MARKER}", "")
    for name in (layout.COMPLETE_MARKER, "config.json"):
        tf.io.gfile.remove(f"{previous}/{name}")
    layout.recover(root)  # the next run finishes deleting it, moving nothing back
    assert _tree(root) == new
    fileops.delete(root)


# --- TF_CONFIG: one replica trains --------------------------------------------------------

VERTEX = {  # TF_CONFIG as Vertex AI sets it: pool 0 is "chief", pool 1 "worker"
    "cluster": {"chief": ["c-0:2222"], "worker": ["w-0:2222", "w-1:2222"]},
    "environment": "cloud",
}
POOLS = {"cluster": {"workerpool0": ["a:2222"], "workerpool1": ["b:2222"]}}  # CLUSTER_SPEC


def _env(spec: dict, task_type: str, index: int = 0, name: str = "TF_CONFIG") -> dict:
    return {name: json.dumps({**spec, "task": {"type": task_type, "index": index}})}


@pytest.mark.parametrize(
    "environ, primary, replicas",
    [
        ({}, True, 1),
        ({"TF_CONFIG": ""}, True, 1),
        (_env({"cluster": {"chief": ["c-0:2222"]}}, "chief"), True, 1),  # one replica
        (_env(VERTEX, "chief"), True, 3),
        (_env(VERTEX, "worker", 0), False, 3),  # a chief exists: worker 0 is not primary
        (_env(VERTEX, "worker", 1), False, 3),
        (_env(VERTEX, "evaluator"), False, 3),
        (_env({"cluster": {"worker": ["w-0:1", "w-1:1"]}}, "worker", 0), True, 2),
        (_env({"cluster": {"worker": ["w-0:1", "w-1:1"]}}, "worker", 1), False, 2),
        (_env({"cluster": {"master": ["m:1"], "ps": ["p:1"]}}, "ps"), False, 2),
        (_env(POOLS, "workerpool0", name="CLUSTER_SPEC"), True, 2),  # Vertex's other variable
        (_env(POOLS, "workerpool1", name="CLUSTER_SPEC"), False, 2),
    ],
)
def test_which_replica_trains(environ, primary, replicas):
    replica = cluster.this_replica(environ)
    assert (replica.primary, replica.replicas) == (primary, replicas)


def test_a_bad_tf_config_is_a_usage_error():
    with pytest.raises(UsageError, match="TF_CONFIG"):
        cluster.this_replica({"TF_CONFIG": "{not json"})


def test_a_non_primary_replica_exits_0_touching_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TF_CONFIG", json.dumps({**VERTEX, "task": {"type": "worker", "index": 1}}))
    caplog.set_level("INFO", logger="training")
    model_dir = tmp_path / "model"
    # The data dir does not exist: a replica that read it would fail with exit 2.
    assert task.main([f"--data_dir={tmp_path}/none", f"--model_dir={model_dir}"]) == 0
    assert not model_dir.exists()
    lines = [r.getMessage() for r in caplog.records if r.name == "training.cluster"]
    assert len(lines) == 1 and "replica worker:1 of 3" in lines[0], lines


def test_the_primary_of_several_replicas_warns_once(caplog):
    caplog.set_level("INFO", logger="training")
    assert cluster.should_train(_env(VERTEX, "chief"))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "other 2 exit" in warnings[0].getMessage()
