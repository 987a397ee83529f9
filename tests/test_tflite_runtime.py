"""``--inference_runtime``: the backbone converted to TFLite (cached), checked against TensorFlow,
used by the RunInference handler, refused or replaced by TensorFlow when it does not convert."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from backbones import hub, registry, tflite_runtime
from backbones.standin import save_standin_backbone
from pipeline import inference, preprocess
from schemas import features
from schemas import manifest as manifest_lib
from schemas.backbones import RUNTIME_TENSORFLOW, RUNTIME_TFLITE
from schemas.csv_format import SPLITS
from tests.conftest import TINY_DIM, TINY_SIZE, write_dataset

BATCH = 8
LOGGER = "backbones.tflite_runtime"


@pytest.fixture(scope="module", autouse=True)
def hubflow_cache(tmp_path_factory):
    """One cache dir for the module, so conversions made by one test are reused by the next."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("hubflow-cache")
        patch.setenv("HUBFLOW_CACHE", str(path))
        yield path


class _SvdFeatures(tf.Module):
    """A feature-vector model built on an op TFLite lacks (``Svd``)."""

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)])
    def __call__(self, images):
        gray = tf.reduce_mean(tf.image.resize(images, [8, 8]), axis=-1)
        return tf.linalg.svd(gray, compute_uv=False)


@pytest.fixture(scope="module")
def unconvertible(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("svd") / "model")
    tf.saved_model.save(_SvdFeatures(), path)
    return path


def _spec(handle: str):
    return hub.probe(registry.resolve(handle))


def _pixels(n: int, size: int = TINY_SIZE, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, [n, size, size, 3], dtype=np.uint8))


def _embed(spec, runtime, pixels) -> np.ndarray:
    handler = inference.ImageEmbeddingModelHandler(spec, BATCH, runtime)
    results = handler.run_inference(pixels, handler.load_model())
    return np.stack([r.inference for r in results])


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_tflite_embeddings_match_tensorflow_in_the_handler(tiny_backbone):
    spec = _spec(tiny_backbone)
    runtime = tflite_runtime.resolve(spec, "auto")
    assert runtime.name == RUNTIME_TFLITE
    assert runtime.batch_size == tflite_runtime.MODEL_BATCH_SIZE
    assert runtime.min_cosine >= tflite_runtime.PARITY_MIN_COSINE
    # The job's batches (full, partial, larger than the handler's) through the model.
    for n in (BATCH, 3, BATCH + 3):
        pixels = _pixels(n)
        lite = _embed(spec, runtime, pixels)
        reference = _embed(spec, None, pixels)
        assert lite.shape == (n, TINY_DIM) and lite.dtype == np.float32
        assert tflite_runtime.min_cosine(lite, reference) >= 0.9999


def test_a_model_of_a_larger_batch_runs_partial_batches_resized_or_padded(tiny_backbone):
    spec = _spec(tiny_backbone)
    runtime = tflite_runtime.resolve(spec, "auto", batch_size=BATCH)
    assert runtime.batch_size == BATCH and runtime.resize_partial
    with open(os.path.join(runtime.model_dir, tflite_runtime.MODEL_FILE), "rb") as f:
        content = f.read()
    pixels = np.stack(_pixels(BATCH + 3))
    reference = _embed(spec, None, list(pixels))
    for resize in (True, False):
        model = tflite_runtime.TFLiteEmbedder(content, BATCH, resize_partial=resize)
        for n in (3, BATCH, BATCH + 3, 1):  # sizes change from call to call
            assert tflite_runtime.min_cosine(model(pixels[:n]), reference[:n]) >= 0.9999


def test_the_conversion_is_cached_and_redone_when_the_backbone_changes(tmp_path, caplog):
    backbone = save_standin_backbone(str(tmp_path / "b"), TINY_SIZE, TINY_DIM)
    spec = _spec(backbone)
    with caplog.at_level(logging.INFO, logger="backbones"):
        first = tflite_runtime.resolve(spec, "auto")
        again = tflite_runtime.resolve(spec, "auto")
    builds = [m for m in caplog.messages if m.startswith("building the TFLite conversion")]
    assert len(builds) == 1  # the second run reused the entry
    assert again == first

    shutil.rmtree(backbone)  # the same path, another model
    save_standin_backbone(backbone, TINY_SIZE, TINY_DIM + 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="backbones"):
        changed = tflite_runtime.resolve(_spec(backbone), "auto")
    assert any(m.startswith("building the TFLite conversion") for m in caplog.messages)
    assert changed.model_dir != first.model_dir and changed.model_sha256 != first.model_sha256
    assert _embed(_spec(backbone), changed, _pixels(2)).shape == (2, TINY_DIM + 1)

    # Conversions of a local model that is gone are removed at the next conversion; nothing
    # else in the cache folder is: not another model's conversion, not a folder hubflow did not
    # write (no conversion record).
    kept = save_standin_backbone(str(tmp_path / "kept"), TINY_SIZE, TINY_DIM)
    kept_entry = tflite_runtime.resolve(_spec(kept), "auto").model_dir
    stranger = os.path.join(os.path.dirname(kept_entry), "not-hubflows")
    os.makedirs(stranger)
    shutil.rmtree(backbone)
    other = save_standin_backbone(str(tmp_path / "other"), TINY_SIZE, TINY_DIM)
    assert tflite_runtime.resolve(_spec(other), "auto").name == RUNTIME_TFLITE
    assert not os.path.exists(first.model_dir) and not os.path.exists(changed.model_dir)
    assert os.path.isdir(kept_entry) and os.path.isdir(stranger)


def test_a_parity_failure_falls_back_to_tensorflow_with_one_warning(
    tiny_backbone, monkeypatch, caplog
):
    spec = _spec(tiny_backbone)
    monkeypatch.setattr(tflite_runtime, "PARITY_MIN_COSINE", 1.5)  # nothing can pass
    with caplog.at_level(logging.INFO, logger="backbones"):
        runtime = tflite_runtime.resolve(spec, "auto")
    assert runtime.name == RUNTIME_TENSORFLOW and runtime.model_dir is None
    (warning,) = _warnings(caplog)
    assert "embeddings unlike TensorFlow's" in warning and "embedding with TensorFlow" in warning
    with pytest.raises(ValueError, match="^--inference_runtime tflite: .*min cosine") as err:
        tflite_runtime.resolve(spec, "tflite")
    assert "\n" not in str(err.value)


def test_a_backbone_that_does_not_convert_falls_back_once_converted(unconvertible, caplog):
    spec = _spec(unconvertible)
    for attempt in range(2):  # the second run reads the cached failure
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="backbones"):
            runtime = tflite_runtime.resolve(spec, "auto")
        assert runtime.name == RUNTIME_TENSORFLOW
        (warning,) = _warnings(caplog)
        assert "does not convert to TFLite (ops TFLite lacks: Svd)" in warning
        building = any(m.startswith("building the TFLite") for m in caplog.messages)
        assert building == (attempt == 0)
    assert _embed(spec, runtime, _pixels(2, size=16)).shape == (2, 8)


def test_forced_tflite_on_a_backbone_that_does_not_convert_is_one_line_exit_2(
    unconvertible, tmp_path, capsys
):
    (tmp_path / "x.jpg").write_bytes(b"never read")
    (tmp_path / "rows.csv").write_text("x.jpg,a\n")
    code = preprocess.main(
        [
            f"--input_csv={tmp_path / 'rows.csv'}",
            f"--output_dir={tmp_path / 'out'}",
            f"--backbone={unconvertible}",
            f"--batch_size={BATCH}",
            "--inference_runtime=tflite",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--inference_runtime tflite:" in err and "Svd" in err


def test_auto_picks_tensorflow_for_gpu_workers_and_remote_workers_get_a_staged_copy(
    tiny_backbone, tmp_path
):
    spec = _spec(tiny_backbone)
    gpu_args = [
        "--runner=DataflowRunner",
        "--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1",
    ]
    assert inference.workers_have_gpu(gpu_args)
    assert not inference.workers_have_gpu(["--runner=DataflowRunner"])
    runtime, _ = inference.resolve_runtime(spec, "auto", [*gpu_args, "--temp_location=x"])
    assert runtime.name == RUNTIME_TENSORFLOW
    forced, _ = inference.resolve_runtime(spec, "tensorflow")
    assert forced.name == RUNTIME_TENSORFLOW

    temp = str(tmp_path / "fake-gcs-temp")
    args = ["--runner=FlinkRunner", f"--temp_location={temp}"]
    runtime, notes = inference.resolve_runtime(spec, "auto", args)
    assert runtime.name == RUNTIME_TFLITE
    assert runtime.model_dir.startswith(f"{temp}/hubflow-staged/tflite-")
    assert "staged" in notes[-1]
    assert _embed(spec, runtime, _pixels(2)).shape == (2, TINY_DIM)


def test_old_manifests_without_the_runtime_read_as_tensorflow():
    manifest = manifest_lib.Manifest(
        labels=["a"],
        backbone=registry.resolve("efficientnet_lite0"),
        splits=manifest_lib.empty_splits(["a"]),
        rows=manifest_lib.RowCounts(),
        rejected_by_reason={},
        options={},
        versions={},
        created="2024-01-01T00:00:00+00:00",
        inference_runtime=RUNTIME_TFLITE,
    )
    data = manifest.to_json()
    assert manifest_lib.Manifest.from_json(data).inference_runtime == RUNTIME_TFLITE
    del data["inference_runtime"]
    assert manifest_lib.Manifest.from_json(data).inference_runtime == RUNTIME_TENSORFLOW


@pytest.mark.slow
def test_a_job_with_auto_embeds_as_one_with_tensorflow(tiny_backbone, tmp_path):
    write_dataset(tmp_path / "images", per_class=4)
    embeddings = {}
    for runtime in ("auto", "tensorflow"):
        out = tmp_path / runtime
        preprocess.run(
            [
                f"--image_dir={tmp_path / 'images'}",
                f"--output_dir={out}",
                f"--backbone={tiny_backbone}",
                f"--batch_size={BATCH}",
                f"--inference_runtime={runtime}",
            ]
        )
        manifest = manifest_lib.read_manifest(str(out))
        expected = RUNTIME_TFLITE if runtime == "auto" else RUNTIME_TENSORFLOW
        assert manifest.inference_runtime == expected
        assert manifest.options["inference_runtime"] == runtime
        shards = [tf.io.gfile.glob(str(out / features.tfrecord_pattern(s))) for s in SPLITS]
        records = features.read_dataset(sum(shards, []), TINY_DIM)
        embeddings[runtime] = {
            r[features.IMAGE_SHA256].numpy(): r[features.EMBEDDING].numpy() for r in records
        }
    assert len(embeddings["auto"]) == 12
    assert embeddings["auto"].keys() == embeddings["tensorflow"].keys()
    keys = sorted(embeddings["auto"])
    lite = np.stack([embeddings["auto"][k] for k in keys])
    reference = np.stack([embeddings["tensorflow"][k] for k in keys])
    assert tflite_runtime.min_cosine(lite, reference) >= 0.9999
