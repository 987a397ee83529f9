"""The job's dataset-wide analyses: the label vocabulary (Beam) and the embedding statistics
(tf.Transform).

* ``LabelVocabulary``: the distinct labels of the accepted labeled rows (after duplicate and
  conflict resolution; unlabeled rows have none), in alphabetical order, as Keras users expect
  from ``image_dataset_from_directory``. It runs on the small row records, so label indices are
  known before any image is re-encoded. It is Beam's ``Distinct`` and a sort, not
  ``tft.vocabulary``: that orders by frequency (so it was re-sorted anyway), and its transform
  graph was written to a scratch dir nobody read, while tracing it when the job was built and
  running it before the first image could be embedded cost ~1 CPU s of every job's start-up
  (``benchmarks/startup.py``).
* ``AnalyzeAndWriteTransformFn``: per-dimension mean and variance of the embeddings of the
  labeled records, all labeled splits (``tft.scale_to_z_score(elementwise=True)``), written as
  ``transform_fn/`` and ``transformed_metadata/`` for training and the serving export to reuse.
  Unlabeled images are left out, so adding some does not move a model's normalisation. It feeds
  tf.Transform Arrow record batches (its TFXIO input format) built directly, not instance dicts,
  which it would encode to tf.Examples and parse back one row at a time.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from schemas import features

_TFT_TEMP_DIR = ".tft_tmp"


def tft_temp_dir(output_dir: str) -> str:
    """Scratch space of tf.Transform inside the output dir (deleted after the run)."""
    return FileSystems.join(output_dir, _TFT_TEMP_DIR)


def embedding_statistics_fn(inputs):
    """tf.Transform: per-dimension z-score of the embedding (mean/variance over the dataset)."""
    import tensorflow_transform as tft

    return {features.EMBEDDING: tft.scale_to_z_score(inputs[features.EMBEDDING], elementwise=True)}


def _metadata(spec):
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    return dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))


class LabelVocabulary(beam.PTransform):
    """Label strings -> a singleton PCollection with the alphabetical list of distinct labels
    (``[]`` when there is none)."""

    def expand(self, labels):
        return (
            labels
            | "Distinct" >> beam.Distinct()
            | "Collect" >> beam.combiners.ToList()
            | "Sort" >> beam.Map(sorted)
        )


class AnalyzeAndWriteTransformFn(beam.PTransform):
    """float32 ``[D]`` embeddings -> ``transform_fn/`` + ``transformed_metadata/`` in ``output_dir``.

    The embeddings reach tf.Transform as Arrow record batches (its TFXIO input format) built
    straight from numpy, not as instance dicts, which tf.Transform would encode to tf.Examples
    and parse back one by one. Returns the completion PCollection of the write, to order later
    steps after it.
    """

    def __init__(
        self, output_dir: str, embedding_dim: int, batch_size: int = 1000, temp_dir: str = ""
    ):
        super().__init__()
        self._output_dir = output_dir
        self._temp_dir = temp_dir or tft_temp_dir(output_dir)
        self._embedding_dim = embedding_dim
        self._batch_size = batch_size

    def expand(self, embeddings):
        import tensorflow_transform.beam as tft_beam

        config = adapter_config(features.transform_feature_spec(self._embedding_dim))
        batches = (
            embeddings
            | "Batch"
            >> beam.BatchElements(min_batch_size=self._batch_size, max_batch_size=self._batch_size)
            | "ToRecordBatch" >> beam.Map(embeddings_to_record_batch, config.arrow_schema)
        )
        with tft_beam.Context(temp_dir=self._temp_dir):
            transform_fn = (batches, config) | "Analyze" >> tft_beam.AnalyzeDataset(
                embedding_statistics_fn
            )
            return transform_fn | "Write" >> tft_beam.WriteTransformFn(self._output_dir)


def adapter_config(spec: dict):
    """The TFXIO ``TensorAdapterConfig`` of a feature spec: how tf.Transform reads Arrow input."""
    from tfx_bsl.public import tfxio

    return tfxio.TFExampleBeamRecord(
        physical_format="inmem", telemetry_descriptors=["hubflow"], schema=_metadata(spec).schema
    ).TensorAdapterConfig()


def embeddings_to_record_batch(batch, arrow_schema):
    """A list of float32 ``[D]`` embeddings -> one Arrow record batch of ``arrow_schema``."""
    import numpy as np
    import pyarrow as pa

    values = np.stack(batch).astype(np.float32, copy=False)
    count, dim = values.shape
    offsets = pa.array(np.arange(0, (count + 1) * dim, dim, dtype=np.int64))
    column = pa.LargeListArray.from_arrays(offsets, pa.array(values.reshape(-1)))
    return pa.RecordBatch.from_arrays([column], schema=arrow_schema)
