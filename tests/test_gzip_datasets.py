"""Datasets written before records were uncompressed: GZIP ``.tfrecord.gz`` shards.

Every reader takes them as they are (training, ``read_dataset``, ``--reuse_from``), and a
rerun with ``--overwrite`` replaces them with the job's uncompressed shards.
"""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import tensorflow as tf

from pipeline import preprocess
from schemas import csv_format, features
from schemas import manifest as manifest_lib
from schemas.cli import UsageError
from tests.conftest import write_dataset
from training import task
from training.config import parse_config

pytestmark = pytest.mark.slow  # runs the real job


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("gzip_images")
    write_dataset(root, per_class=8)
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, images, tiny_backbone):
    """(today's dataset, the same dataset as an older version wrote it: GZIP shards)."""
    new = tmp_path_factory.mktemp("gzip") / "new"
    argv = [f"--image_dir={images}", f"--output_dir={new}", f"--backbone={tiny_backbone}"]
    preprocess.run([*argv, "--eval_fraction=0.25", "--test_fraction=0.25"])
    old = new.parent / "old"
    shutil.copytree(new, old)
    for shard in glob.glob(str(old / f"*{features.TFRECORD_SUFFIX}")):
        with tf.io.TFRecordWriter(shard + ".gz", "GZIP") as writer:
            for record in tf.data.TFRecordDataset(shard):
                writer.write(record.numpy())
        os.remove(shard)
    return new, old


def _shards(directory) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(directory / "*.tfrecord*")))


def _records(directory) -> dict[str, list[bytes]]:
    """Each split's serialized records, sorted, whatever kind its shards are."""
    found = {}
    for split in csv_format.SPLITS:
        files = [
            path
            for pattern in features.tfrecord_patterns(split)
            for path in glob.glob(str(directory / pattern))
        ]
        compression = features.tfrecord_compression(files)
        found[split] = sorted(r.numpy() for r in tf.data.TFRecordDataset(files, compression))
    return found


def test_the_older_layout_is_gzip_and_reads_back_the_same_records(datasets):
    new, old = datasets
    assert all(name.endswith(".tfrecord") for name in _shards(new))
    assert all(name.endswith(".tfrecord.gz") for name in _shards(old))
    with open(glob.glob(str(old / "train-*"))[0], "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    assert _records(old) == _records(new)
    assert sum(len(v) for v in _records(new).values()) == 24
    dim = manifest_lib.read_manifest(str(old)).backbone.embedding_dim
    pattern = str(old / features.tfrecord_patterns(csv_format.TRAIN)[1])
    parsed = list(features.read_dataset(pattern, dim))
    assert len(parsed) == len(_records(new)[csv_format.TRAIN]) > 0


def test_training_on_gzip_shards_gives_the_same_model(datasets, tmp_path):
    new, old = datasets
    flags = ["--no_tune", "--epochs=3", "--batch_size=8", "--seed=3"]
    results = [
        task.train(parse_config([f"--data_dir={d}", f"--model_dir={tmp_path / d.name}", *flags]))
        for d in (new, old)
    ]
    on_new, on_old = (r.metrics for r in results)
    assert on_old["test"]["examples"] == on_new["test"]["examples"] > 0
    assert on_old["test"]["loss"] == pytest.approx(on_new["test"]["loss"], abs=1e-6)
    assert on_old["test"]["confusion_matrix"] == on_new["test"]["confusion_matrix"]


def test_shards_of_both_kinds_in_one_split_are_refused(datasets, tmp_path):
    new, old = datasets
    mixed = tmp_path / "mixed"
    shutil.copytree(old, mixed)
    shutil.copy(glob.glob(str(new / "train-*"))[0], mixed / "train-00000-of-00002.tfrecord")
    with pytest.raises(UsageError, match=r"^--data_dir: .*train-00000-of-00002\.tfrecord and "):
        task.train(parse_config([f"--data_dir={mixed}", f"--model_dir={tmp_path / 'm'}"]))


def test_reuse_from_a_gzip_dataset_reuses_everything_and_writes_uncompressed(
    datasets, images, tiny_backbone, tmp_path
):
    new, old = datasets
    target = tmp_path / "old_in_place"
    shutil.copytree(old, target)
    argv = [f"--image_dir={images}", f"--output_dir={target}", f"--backbone={tiny_backbone}"]
    argv += ["--eval_fraction=0.25", "--test_fraction=0.25", "--overwrite"]
    preprocess.run([*argv, f"--reuse_from={target}"])
    manifest = manifest_lib.read_manifest(str(target))
    assert manifest.reuse.reused == manifest.rows.written == 24
    # The rerun in place replaced the older shards: none of them is left beside the new ones.
    assert _shards(target) == _shards(new)
    assert _records(target) == _records(new)
