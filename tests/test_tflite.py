"""``--export_tflite``: model.tflite on images for embedding and image models, float and int8,
measured against the SavedModel in metrics.json, and the flag's misuse."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from pipeline import preprocess
from schemas import csv_format, features, serving
from schemas import manifest as manifest_lib
from tests.conftest import TINY_SIZE, write_dataset
from training import data, task, tflite
from training.config import parse_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("tflite_images")
    write_dataset(root, per_class=24)
    out = tmp_path_factory.mktemp("tflite_data")
    preprocess.run(
        [
            f"--output_dir={out}",
            f"--backbone={tiny_backbone}",
            f"--image_dir={root}",
            "--eval_fraction=0.2",
            "--test_fraction=0.2",
        ]
    )
    return str(out)


def _config(data_dir, model_dir, *flags):
    return parse_config([f"--data_dir={data_dir}", f"--model_dir={model_dir}", *flags])


def _test_split(data_dir):
    """The stored test JPEGs and their labels, in file order."""
    manifest = manifest_lib.read_manifest(data_dir)
    pattern = os.path.join(data_dir, features.tfrecord_pattern(csv_format.TEST))
    records = features.read_dataset(pattern, manifest.backbone.embedding_dim)
    return [r[features.IMAGE_ENCODED].numpy() for r in records]


def _interpreter(path):
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


MODES = {
    "embedding": ["--epochs=60"],
    "image": ["--features=image", "--epochs=25"],
    "linear": ["--model=linear", "--image_size=8", "--channels=3", "--epochs=40"],
}
# The backbone's input; a from-scratch net takes its own --image_size.
INPUT_SHAPES = {"linear": [1, 8, 8, 3]}
BACKBONE_INPUT = [1, TINY_SIZE, TINY_SIZE, 3]


@pytest.mark.parametrize(
    "mode, quantize",
    [
        ("embedding", "none"),
        ("embedding", "int8"),
        ("image", "none"),
        ("image", "int8"),
        ("linear", "none"),
    ],
)
def test_tflite_takes_images_and_matches_the_savedmodel(mode, quantize, data_dir, tmp_path):
    input_shape = INPUT_SHAPES.get(mode, BACKBONE_INPUT)
    model_dir = tmp_path / "model"
    flags = ["--learning_rate=0.01", *MODES[mode], "--export_tflite", f"--quantize={quantize}"]
    config = _config(data_dir, model_dir, *flags)
    result = task.train(config)

    interpreter = _interpreter(model_dir / "model.tflite")
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert inp["shape"].tolist() == input_shape and inp["dtype"] == np.float32
    assert out["shape"].tolist() == [1, 3] and out["dtype"] == np.float32
    quantized = any(t["dtype"] == np.int8 for t in interpreter.get_tensor_details())
    assert quantized == (quantize == "int8")
    manifest = manifest_lib.read_manifest(data_dir)
    assert (model_dir / "labels.txt").read_text() == manifest_lib.labels_text(manifest.labels)

    section = json.loads((model_dir / "metrics.json").read_text())[tflite.METRICS_KEY]
    assert section == result.metrics[tflite.METRICS_KEY]
    assert section["file"] == "model.tflite" and section["labels_file"] == "labels.txt"
    assert section["quantize"] == quantize
    assert section["size_bytes"] == (model_dir / "model.tflite").stat().st_size
    assert section["compared_with"] == os.path.join("export", "1")
    calibration = min(tflite.REPRESENTATIVE_IMAGES, manifest.split_count(csv_format.TRAIN))
    assert section["representative_images"] == (0 if quantize == "none" else calibration)
    # How an app frames an image for it: as the dataset did; a from-scratch net squashes.
    framing = 0.0 if mode == "linear" else manifest.crop_fraction()
    assert manifest.crop_fraction() == 0.875  # the job's default, recorded
    assert section["input"] == {
        "shape": input_shape,
        "dtype": "float32",
        "value_range": [0, 1],
        "crop_fraction": framing,
    }
    assert section["savedmodel_test_accuracy"] >= 0.9
    assert abs(section["test_accuracy"] - section["savedmodel_test_accuracy"]) <= 0.01
    assert section["within_tolerance"] and section["agreement"] == 1.0
    assert section["convert_seconds"] > 0 and section["latency_ms_per_image"] > 0
    if quantize == "int8":  # mostly int8: the few layers kept in float are listed
        assert section["float_ops"] == len(section["float_layers"]) <= section["ops"] // 2
        assert len(section["float_layers"]) <= 2 + tflite.MAX_FLOAT_LAYERS
    else:
        assert section["float_ops"] == section["ops"] > 0 and section["float_layers"] == []

    # Independently of the trainer: the stored JPEGs through the export's decoding, one by one.
    jpegs = _test_split(data_dir)[:8]
    serve = tf.saved_model.load(result.export_dir).signatures[serving.SIGNATURE_NAME]
    saved = serve(image_bytes=tf.constant(jpegs))[serving.PROBABILITIES].numpy()
    preprocess_fn, shape = data.image_preprocessor(config, manifest)
    lite = []
    for image in data.decode_batch(preprocess_fn, shape)(tf.constant(jpegs)).numpy():
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        lite.append(interpreter.get_tensor(out["index"])[0])
    assert np.argmax(lite, axis=1).tolist() == np.argmax(saved, axis=1).tolist()
    np.testing.assert_allclose(lite, saved, atol=1e-4 if quantize == "none" else 0.1)


def test_out_of_tolerance_warns_and_keeps_the_file(data_dir, tmp_path, monkeypatch, caplog):
    model_dir = tmp_path / "model"
    monkeypatch.setattr(tflite, "TOLERANCE", -1.0)  # no accuracy can be within it
    with caplog.at_level(logging.WARNING, logger="training.tflite"):
        result = task.train(_config(data_dir, model_dir, "--epochs=5", "--export_tflite"))
    section = result.metrics[tflite.METRICS_KEY]
    assert not section["within_tolerance"] and section["tolerance"] == -1.0
    assert (model_dir / "model.tflite").exists()
    assert any("OUT OF TOLERANCE" in r.getMessage() for r in caplog.records)

    caplog.clear()  # a rerun without the flag resumes, exports again and flags the old file
    with caplog.at_level(logging.WARNING, logger="training.tflite"):
        task.train(_config(data_dir, model_dir, "--epochs=5"))
    assert any("from an earlier run" in r.getMessage() for r in caplog.records)
    assert tflite.METRICS_KEY not in json.loads((model_dir / "metrics.json").read_text())


@pytest.mark.parametrize(
    "flags, needle",
    [(["--quantize=int8"], "--quantize"), (["--export_tflite", "--quantize=fp16"], "--quantize")],
    ids=["without_export_tflite", "unknown_choice"],
)
def test_quantize_misuse_is_one_line(flags, needle, capsys):
    assert task.main(["--data_dir=d", "--model_dir=m", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("hubflow-train: error:")
