"""TensorFlow Lite export for edge devices: ``model.tflite``, checked against the SavedModel.

The TFLite model is the serving model of the export (an embedding head is stitched to its
backbone first, so it always takes images) without the decoding: one float32 image
``[1, S, S, C]`` in, as the export's decode function produces it from image bytes (for a
backbone: RGB framed into its input size as the dataset's ``--crop_fraction`` says, values in
its value range, see :mod:`backbones.inputs`), and probabilities ``[1, num_labels]`` out, in the order of the run's
``labels.txt`` next to it. Decoding and resizing are the app's side of the contract.

``--quantize int8`` quantizes weights and activations to int8, calibrated on up to
:data:`REPRESENTATIVE_IMAGES` train-split images; input and output stay float32. TFLite's
``QuantizationDebugger`` then compares each layer with float on some of them, and a few layers
stay float (listed in ``metrics.json``): the classifier layer (a few thousand multiply-adds), and
those with an error far above rounding, such as EfficientNet-Lite's stem convolution and first
depthwise convolution (about 2.7 quantization steps RMS, against 0.3-0.6 for the others).

The trainer then runs it on every test image against the SavedModel it was converted from: the
SavedModel gets the stored JPEG bytes, the TFLite model the same bytes through the export's own
decode function, so both see the same pixels. Accuracy, agreement, the largest probability
difference, size, conversion time and latency go into ``metrics.json`` (:data:`METRICS_KEY`).
A TFLite accuracy more than :data:`TOLERANCE` away from the SavedModel's is a warning, not a
failure: the SavedModel is the run's product and stays valid, and on a small test split one
image is more than a point.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tf_keras

from evaluation import metrics
from schemas import csv_format, features, serving
from schemas.backbones import CROP_SQUASH, VALUE_RANGE
from schemas.manifest import LABELS_FILE
from storage.fileops import basename, join
from training import data
from training.config import QUANTIZE_INT8, TrainConfig
from training.layout import TFLITE_FILE

_LOGGER = logging.getLogger(__name__)
METRICS_KEY = "tflite"  # the section of metrics.json
REPRESENTATIVE_IMAGES = 200  # train-split images that calibrate int8 quantization
TOLERANCE = 0.01  # the largest accepted |TFLite - SavedModel| test accuracy (1 point)
DEBUG_IMAGES = 32  # calibration images on which each int8 layer is compared with float
FLOAT_LAYER_ERROR = 1.0  # RMSE in quantization steps above which a layer stays float (~0.29: ideal)
MAX_FLOAT_LAYERS = 3  # at most this many such layers
_BATCH = 32  # test images decoded (and sent to the SavedModel) at a time


def convert(
    model: tf_keras.Model,
    image_shape: tuple[int, int, int],
    quantize: str,
    representative: Callable[[], Iterator[list[np.ndarray]]] | None = None,
) -> tuple[bytes, list[dict]]:
    """The TFLite flatbuffer of ``model`` on one float32 image ``[1, *image_shape]``.

    Args:
      quantize: ``none`` (float32 weights) or ``int8`` (weights and activations; float I/O).
      representative: for int8, yields ``[image]`` calibration inputs of shape ``[1, *image_shape]``.

    Returns:
      The flatbuffer and, for int8, the layers kept in float (:func:`_float_layers`).
    """

    @tf.function(input_signature=[tf.TensorSpec([1, *image_shape], tf.float32, name="image")])
    def classify(image):
        return {serving.PROBABILITIES: model(image, training=False)}

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [classify.get_concrete_function()], model
    )
    if quantize != QUANTIZE_INT8:
        return converter.convert(), []
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # Calibrates once; the debugger then measures each quantized layer against float on a few
    # calibration images, and quantizes the calibrated model again without the worst layers.
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=lambda: itertools.islice(representative(), DEBUG_IMAGES),
    )
    debugger.run()
    layers = _float_layers(debugger)
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=[layer["tensor"] for layer in layers]
    )
    return debugger.get_nondebug_quantized_model(), layers


def _float_layers(debugger) -> list[dict]:
    """The int8 model's layers to keep in float: the classifier layer (its fully connected op
    and softmax, so probabilities are not rounded to 1/256 steps and cannot tie), and the at
    most :data:`MAX_FLOAT_LAYERS` layers whose quantization error exceeds
    :data:`FLOAT_LAYER_ERROR` steps. None where that would leave less than half the ops int8."""
    out = io.StringIO()
    debugger.layer_statistics_dump(out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    for row in rows:  # RMSE against float, in quantization steps of the layer's output
        row["rmse_steps"] = math.sqrt(float(row["mean_squared_error"])) / float(row["scale"])
    worst = sorted(rows, key=lambda row: -row["rmse_steps"])[:MAX_FLOAT_LAYERS]
    head = [row for row in rows[-2:] if row["op_name"] in ("FULLY_CONNECTED", "SOFTMAX")]
    chosen = head + [row for row in worst if row["rmse_steps"] > FLOAT_LAYER_ERROR]
    layers = {  # by tensor, in order: the classifier layer may also be among the worst
        row["tensor_name"]: {
            "op": row["op_name"],
            "tensor": row["tensor_name"],
            "rmse_steps": round(row["rmse_steps"], 3),
        }
        for row in chosen
    }
    layers = list(layers.values())
    return layers if 2 * len(layers) <= len(rows) else []


class Classifier:
    """A TFLite model in ``tf.lite.Interpreter``: one float image in, probabilities out."""

    def __init__(self, content: bytes, num_threads: int | None = None):
        self.interpreter = tf.lite.Interpreter(model_content=content, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        (self.input,) = self.interpreter.get_input_details()
        (self.output,) = self.interpreter.get_output_details()
        self.seconds: list[float] = []  # of each invoke()

    def op_counts(self) -> dict:
        """How many ops the model runs, and how many of them compute in float32."""
        tensors = {t["index"]: t["dtype"] for t in self.interpreter.get_tensor_details()}
        ops = [  # the debugger's own way to list ops
            op
            for op in self.interpreter._get_ops_details()  # noqa: SLF001
            if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "DELEGATE")
        ]
        computes_in_float = [
            op for op in ops if any(tensors.get(i) == np.float32 for i in op["inputs"] if i >= 0)
        ]
        return {"ops": len(ops), "float_ops": len(computes_in_float)}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``[1, S, S, C]`` float32 -> ``[1, num_labels]`` probabilities."""
        self.interpreter.set_tensor(self.input["index"], image)
        started = time.perf_counter()
        self.interpreter.invoke()
        self.seconds.append(time.perf_counter() - started)
        return self.interpreter.get_tensor(self.output["index"])


def _images(files: list[str], embedding_dim: int) -> tf.data.Dataset:
    """``(encoded image bytes, label)`` of stored records."""
    return features.read_dataset(files, embedding_dim).map(
        lambda r: (r[features.IMAGE_ENCODED], r[features.LABEL])
    )


def representative_images(
    files: list[str], embedding_dim: int, decode: Callable, limit: int, seed: int
) -> Callable[[], Iterator[list[np.ndarray]]]:
    """The converter's representative dataset: up to ``limit`` decoded images (shuffled)."""

    def images() -> Iterator[list[np.ndarray]]:
        records = _images(files, embedding_dim).shuffle(4 * limit, seed=seed).take(limit)
        for encoded, _ in records.batch(_BATCH):
            for image in decode(encoded).numpy():
                yield [image[None]]

    return images


def compare(
    classifier: Classifier,
    export_dir: str,
    files: list[str],
    embedding_dim: int,
    decode: Callable,
    labels: list[str],
) -> dict:
    """Test accuracy of the TFLite model and of the SavedModel on the same stored images."""
    serve = tf.saved_model.load(export_dir).signatures[serving.SIGNATURE_NAME]
    truth, lite, saved = [], [], []
    for encoded, label in _images(files, embedding_dim).batch(_BATCH):
        saved.append(serve(**{serving.INPUT_KEY: encoded})[serving.PROBABILITIES].numpy())
        lite += [classifier(image[None]) for image in decode(encoded).numpy()]
        truth.append(label.numpy())
    y, lite_p, saved_p = np.concatenate(truth), np.concatenate(lite), np.concatenate(saved)
    lite_acc = metrics.classification_report(y, lite_p, labels)["accuracy"]
    saved_acc = metrics.classification_report(y, saved_p, labels)["accuracy"]
    return {
        "test_examples": int(len(y)),
        "test_accuracy": lite_acc,
        "savedmodel_test_accuracy": saved_acc,
        "accuracy_difference": lite_acc - saved_acc,
        "agreement": float(np.mean(lite_p.argmax(1) == saved_p.argmax(1))),
        "max_abs_probability_diff": float(np.max(np.abs(lite_p - saved_p))),
    }


def export_tflite(
    config: TrainConfig, dataset: data.Dataset, serving_model: tf_keras.Model, export_dir: str
) -> dict:
    """Converts ``serving_model``, writes ``model.tflite`` and measures it on the test split.

    Returns:
      The ``metrics.json`` section: file, quantization, input, size, conversion time, the test
      comparison with the SavedModel in ``export_dir`` (:func:`compare`), latency, tolerance.
    """
    manifest = dataset.manifest
    dim = manifest.backbone.embedding_dim
    preprocess, image_shape = data.image_preprocessor(config, manifest)
    decode = tf.function(  # as the export's signature runs it
        data.decode_batch(preprocess, image_shape),
        input_signature=[tf.TensorSpec([None], tf.string)],
    )
    representative = None
    if config.quantize == QUANTIZE_INT8:
        representative = representative_images(
            dataset.files[csv_format.TRAIN], dim, decode, REPRESENTATIVE_IMAGES, config.seed
        )
    started = time.monotonic()
    content, float_layers = convert(serving_model, image_shape, config.quantize, representative)
    convert_seconds = time.monotonic() - started
    path = join(config.model_dir, TFLITE_FILE)
    with tf.io.gfile.GFile(f"{path}.tmp", "wb") as f:
        f.write(content)
    tf.io.gfile.rename(f"{path}.tmp", path, overwrite=True)
    _LOGGER.info("wrote %s (%d bytes) in %.1f s", path, len(content), convert_seconds)

    num_threads = os.cpu_count() or 1
    classifier = Classifier(content, num_threads)
    value_range = VALUE_RANGE if config.from_scratch else manifest.backbone.value_range
    section = {
        "file": TFLITE_FILE,
        "labels_file": LABELS_FILE,
        "quantize": config.quantize,
        "input": {
            "shape": [int(n) for n in classifier.input["shape"]],
            "dtype": np.dtype(classifier.input["dtype"]).name,
            "value_range": list(value_range),
            # How the app frames an image into it: 0 squashed, F the centred square of F x the
            # shorter side (schemas.backbones.crop_box); from-scratch nets squash.
            "crop_fraction": CROP_SQUASH if config.from_scratch else manifest.crop_fraction(),
        },
        "size_bytes": len(content),
        **classifier.op_counts(),
        "float_layers": float_layers,
        "convert_seconds": round(convert_seconds, 2),
        "representative_images": (
            min(REPRESENTATIVE_IMAGES, dataset.counts[csv_format.TRAIN]) if representative else 0
        ),
        "compared_with": join(serving.EXPORT_DIR, basename(export_dir)),
        **compare(
            classifier, export_dir, dataset.files[csv_format.TEST], dim, decode, manifest.labels
        ),
        "latency_ms_per_image": round(1000 * float(np.median(classifier.seconds)), 3),  # invoke
        "num_threads": num_threads,
        "tolerance": TOLERANCE,
    }
    section["within_tolerance"] = abs(section["accuracy_difference"]) <= TOLERANCE
    _report(section)
    return section


def _report(section: dict) -> None:
    what = f"{section['file']} ({section['quantize']})"
    line = (
        f"{what}: test accuracy {section['test_accuracy']:.4f}, SavedModel "
        f"{section['savedmodel_test_accuracy']:.4f} on {section['test_examples']} test images; "
        f"agreement {section['agreement']:.4f}, max |probability difference| "
        f"{section['max_abs_probability_diff']:.2g}, {section['latency_ms_per_image']:.1f} ms "
        "per image"
    )
    if section["within_tolerance"]:
        _LOGGER.info(line)
        return
    _LOGGER.warning(
        "TFLITE ACCURACY OUT OF TOLERANCE: %s. It differs from the SavedModel's by %.1f points "
        "(tolerance %.1f); the file is kept and metrics.json records it (%s.within_tolerance "
        "false): check it before deploying%s",
        line,
        100 * section["accuracy_difference"],
        100 * TOLERANCE,
        METRICS_KEY,
        ", or export without --quantize" if section["quantize"] == QUANTIZE_INT8 else "",
    )


def warn_if_stale(model_dir: str) -> None:
    """Warns about a ``model.tflite`` left by an earlier run in a dir this run exported to."""
    path = join(model_dir, TFLITE_FILE)
    if tf.io.gfile.exists(path):
        _LOGGER.warning(
            "%s is from an earlier run, not from this run's export: rerun with --export_tflite "
            "to replace it, or delete it",
            path,
        )
