"""The job's TFRecord files: uncompressed shards, and the GZIP shards of older datasets read."""

from __future__ import annotations

import glob

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline

from pipeline import sinks
from schemas import features


def _records(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    # Incompressible "JPEG" bytes plus a ReLU-like embedding (half zeros), like a hubflow record.
    return [
        rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
        + np.maximum(rng.normal(size=1280), 0).astype(np.float32).tobytes()
        + i.to_bytes(4, "little")
        for i in range(n)
    ]


def test_job_writes_uncompressed_tfrecords_that_tf_reads(tmp_path):
    records = _records(300)
    prefix = str(tmp_path / "train")
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        _ = p | beam.Create(records) | sinks.WriteToTFRecord(prefix)
    files = sorted(glob.glob(str(tmp_path / features.tfrecord_pattern("train"))))
    assert files and all(f.endswith("-of-00001.tfrecord") for f in files)
    assert features.tfrecord_compression(files) == ""
    read = [r.numpy() for r in tf.data.TFRecordDataset(files)]
    assert sorted(read) == sorted(records)
    # Uncompressed: each record is on disk as it is, with 16 bytes of framing.
    assert sum(len(open(f, "rb").read()) for f in files) == sum(len(r) + 16 for r in records)


def test_empty_split_writes_no_file_only_when_asked(tmp_path):
    for skip, expected in ((True, 0), (False, 1)):
        prefix = str(tmp_path / f"skip{skip}" / "unlabeled")
        with TestPipeline(runner="BundleBasedDirectRunner") as p:
            _ = (
                p
                | beam.Create([], reshuffle=False)
                | sinks.WriteToTFRecord(prefix, skip_if_empty=skip)
            )
        assert len(glob.glob(f"{prefix}-*")) == expected


@pytest.mark.parametrize("suffix", [features.TFRECORD_SUFFIX, features.GZIP_TFRECORD_SUFFIX])
def test_write_and_read_outside_beam_by_file_name(tmp_path, suffix):
    records = [f"record {i}".encode() * (i + 1) for i in range(50)]
    path = str(tmp_path / f"train-00000-of-00001{suffix}")
    assert sinks.write_tfrecords(path, iter(records)) == 50
    with open(path, "rb") as f:
        gzip_magic = f.read(2) == b"\x1f\x8b"
    assert gzip_magic == (suffix == features.GZIP_TFRECORD_SUFFIX)
    assert list(sinks.read_tfrecords(path)) == records
    compression = features.tfrecord_compression(path)
    assert [r.numpy() for r in tf.data.TFRecordDataset(path, compression)] == records


def test_a_mix_of_gzip_and_uncompressed_shards_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"a-0\.tfrecord and /d/b-0\.tfrecord\.gz .* one dataset"):
        features.tfrecord_compression(["/d/a-0.tfrecord", "/d/b-0.tfrecord.gz"])
    assert features.tfrecord_compression([]) == ""
    assert features.tfrecord_compression(["/d/a.tfrecord.gz", "/d/b.tfrecord.gz"]) == "GZIP"
