"""The job's TFRecord writer: ordinary GZIP TFRecords, faster deflate than Beam's default."""

from __future__ import annotations

import glob
import gzip
import zlib

import apache_beam as beam
import numpy as np
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


def test_written_files_are_gzip_tfrecords_that_tf_reads(tmp_path):
    records = _records(300)
    prefix = str(tmp_path / "train")
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        _ = p | beam.Create(records) | sinks.WriteToTFRecord(prefix)
    files = sorted(glob.glob(f"{prefix}-*{features.TFRECORD_SUFFIX}"))
    assert files
    read = [
        r.numpy()
        for r in tf.data.TFRecordDataset(files, compression_type=features.TFRECORD_COMPRESSION)
    ]
    assert sorted(read) == sorted(records)
    # Compressed, and well-formed GZIP for any reader.
    raw = b"".join(gzip.open(f).read() for f in files)
    on_disk = sum(len(open(f, "rb").read()) for f in files)
    assert on_disk < 0.95 * len(raw)


def test_job_setting_compresses_about_as_well_as_level_6():
    data = b"".join(_records(400))

    def size(level, strategy):
        c = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS | 16, 8, strategy)
        return len(c.compress(data) + c.flush())

    assert size(sinks.GZIP_LEVEL, sinks.GZIP_STRATEGY) <= 1.05 * size(6, zlib.Z_DEFAULT_STRATEGY)
    assert size(sinks.GZIP_LEVEL, sinks.GZIP_STRATEGY) < 0.97 * len(data)


def test_write_tfrecords_outside_beam_reads_back_as_gzip(tmp_path):
    records = [f"record {i}".encode() * (i + 1) for i in range(50)]
    path = str(tmp_path / "one.tfrecord.gz")
    assert sinks.write_tfrecords(path, iter(records)) == 50
    with open(path, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # a GZIP stream
    back = [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type="GZIP")]
    assert back == records
