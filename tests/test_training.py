"""The trainer on data written by the real pipeline: every mode, export, resume, bad input."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import preprocess
from schemas import csv_format, features, serving
from schemas import manifest as manifest_lib
from schemas.cli import UsageError
from tests.conftest import CLASS_COLOURS, write_dataset
from training import task
from training.config import parse_config

pytestmark = pytest.mark.slow


def _preprocess(images_root, out, backbone, labels_csv=None, **fractions):
    argv = [
        f"--output_dir={out}",
        f"--backbone={backbone}",
        f"--eval_fraction={fractions.get('eval', 0.2)}",
        f"--test_fraction={fractions.get('test', 0.2)}",
    ]
    argv.append(f"--input_csv={labels_csv}" if labels_csv else f"--image_dir={images_root}")
    preprocess.run(argv)
    return str(out)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("train_images")
    write_dataset(root, per_class=24)
    return _preprocess(root, tmp_path_factory.mktemp("train_data"), tiny_backbone)


def _config(data_dir, model_dir, *flags):
    return parse_config([f"--data_dir={data_dir}", f"--model_dir={model_dir}", *flags])


def _train(data_dir, model_dir, *flags):
    return task.train(_config(data_dir, model_dir, *flags))


def _serve(export_dir):
    serve = tf.saved_model.load(export_dir).signatures[serving.SIGNATURE_NAME]
    assert set(serve.structured_outputs) == set(serving.OUTPUT_KEYS)  # the serving contract
    assert list(serve.structured_input_signature[1]) == [serving.INPUT_KEY]
    return serve


def _test_images(data_dir):
    manifest = manifest_lib.read_manifest(data_dir)
    pattern = os.path.join(data_dir, features.tfrecord_pattern(csv_format.TEST))
    return [
        (r[features.IMAGE_ENCODED].numpy(), int(r[features.LABEL]))
        for r in features.read_dataset(pattern, manifest.backbone.embedding_dim)
    ]


def _png(jpeg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, "PNG")
    return buf.getvalue()


MODES = {
    "embedding": ["--epochs=60"],
    "embedding+options": [
        "--epochs=40",
        "--optimizer=sgd",
        "--lr_schedule=one-cycle",
        "--label_smoothing=0.1",
        "--l2=1e-4",
        "--class_weight=balanced",
        "--hidden_units=16",
        "--dropout=0.1",
    ],
    "image+augment": ["--features=image", "--augment", "--no-flip", "--epochs=25"],
    "image+fine_tune": [
        "--features=image",
        "--epochs=25",
        "--fine_tune",
        "--fine_tune_epochs=3",
        "--fine_tune_layers=2",
    ],
    "linear": ["--model=linear", "--image_size=8", "--channels=3", "--epochs=40"],
    "dnn": ["--model=dnn", "--image_size=8", "--channels=3", "--epochs=30"],
    "cnn": ["--model=cnn", "--image_size=16", "--channels=3", "--batch_norm", "--epochs=15"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_learns_and_export_matches_keras(mode, data_dir, tmp_path):
    model_dir = tmp_path / "model"
    result = _train(data_dir, model_dir, "--learning_rate=0.01", *MODES[mode])
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.9, metrics["test"]
    assert metrics["eval"]["examples"] > 0
    cm = np.array(metrics["test"]["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == metrics["test"]["examples"]
    for name in (
        "confusion_matrix.png",
        "training_curves.png",
        "history.json",
        "config.json",
        "labels.txt",
    ):
        assert (model_dir / name).stat().st_size > 0, name
    assert os.listdir(model_dir / "logs")
    assert result.export_dir == str(model_dir / "export" / "1")

    serve = _serve(result.export_dir)
    images = _test_images(data_dir)
    jpegs = [jpeg for jpeg, _ in images]
    served = serve(image_bytes=tf.constant(jpegs))
    from_png = serve(image_bytes=tf.constant([_png(j) for j in jpegs]))
    labels = manifest_lib.read_manifest(data_dir).labels
    # The Keras model on the same preprocessing (the pipeline's stored JPEGs).
    config = _config(data_dir, model_dir, *MODES[mode])
    preprocess_fn, shape = task.data.image_preprocessor(
        config, manifest_lib.read_manifest(data_dir)
    )
    if mode.startswith("embedding"):
        keras_in = np.stack([_embedding_of(data_dir, j) for j in jpegs])
    else:
        keras_in = task.data.decode_batch(preprocess_fn, shape)(tf.constant(jpegs))
    keras_classes = [labels[i] for i in np.argmax(result.model(keras_in, training=False), axis=1)]
    assert [c.decode() for c in served["classes"].numpy()] == keras_classes
    assert [c.decode() for c in from_png["classes"].numpy()] == keras_classes
    np.testing.assert_allclose(served["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert served["top_k_classes"].shape == (len(jpegs), 3)
    np.testing.assert_allclose(served["scores"].numpy(), served["top_k_scores"].numpy()[:, 0])


def _embedding_of(data_dir, jpeg):
    manifest = manifest_lib.read_manifest(data_dir)
    pattern = os.path.join(data_dir, features.tfrecord_pattern(csv_format.TEST))
    for r in features.read_dataset(pattern, manifest.backbone.embedding_dim):
        if r[features.IMAGE_ENCODED].numpy() == jpeg:
            return r[features.EMBEDDING].numpy()
    raise AssertionError("image not found")


def test_random_labels_do_not_reach_separable_accuracy(tiny_backbone, tmp_path):
    # Negative control: with labels unrelated to the images the same recipe must fail.
    root = tmp_path / "images"
    files = write_dataset(root, per_class=24)
    rng = np.random.default_rng(0)
    rows = [f"{p},{rng.choice(sorted(CLASS_COLOURS))}" for paths in files.values() for p in paths]
    (root / "random.csv").write_text("\n".join(rows) + "\n")
    data = _preprocess(root, tmp_path / "data", tiny_backbone, labels_csv=root / "random.csv")
    result = _train(data, tmp_path / "model", "--epochs=60", "--learning_rate=0.01")
    assert result.metrics["test"]["accuracy"] < 0.75


def test_export_is_hermetic(tiny_backbone, tmp_path):
    backbone = shutil.copytree(tiny_backbone, tmp_path / "backbone_copy")
    root = tmp_path / "images"
    write_dataset(root, per_class=12)
    data = _preprocess(root, tmp_path / "data", backbone)
    jpegs = [j for j, _ in _test_images(data)]
    model_dir = tmp_path / "model"
    result = _train(data, model_dir, "--epochs=40", "--learning_rate=0.01")
    before = _serve(result.export_dir)(image_bytes=tf.constant(jpegs))["classes"].numpy()
    kept = tmp_path / "served"
    shutil.move(result.export_dir, kept)
    for path in (model_dir, tmp_path / "data", backbone, root):
        shutil.rmtree(path)
    after = _serve(str(kept))(image_bytes=tf.constant(jpegs))
    assert after["classes"].numpy().tolist() == before.tolist()
    assert (kept / "assets.extra" / "labels.txt").read_text().split() == sorted(CLASS_COLOURS)


def test_rerun_resumes_from_last_checkpoint(data_dir, tmp_path):
    model_dir = tmp_path / "model"
    _train(data_dir, model_dir, "--epochs=2", "--patience=100")
    assert len(json.loads((model_dir / "history.json").read_text())["loss"]) == 2
    result = _train(data_dir, model_dir, "--epochs=5", "--patience=100")
    history = json.loads((model_dir / "history.json").read_text())
    assert len(history["loss"]) == 5  # 2 from the first run + epochs 3..5
    assert os.path.exists(str(model_dir / "checkpoints" / "stage1" / "ckpt-0005.index"))
    assert not os.path.exists(str(model_dir / "checkpoints" / "stage1" / "ckpt-0006.index"))
    assert result.export_dir.endswith(os.path.join("export", "2"))
    again = _train(data_dir, model_dir, "--epochs=5", "--patience=100")  # nothing left to train
    assert len(json.loads((model_dir / "history.json").read_text())["loss"]) == 5
    assert again.metrics["test"] == result.metrics["test"]
    assert again.export_dir.endswith(os.path.join("export", "3"))
    fresh = _train(data_dir, model_dir, "--epochs=1", "--overwrite")
    assert fresh.export_dir.endswith(os.path.join("export", "1"))


def test_linear_mnist_sized_model_has_7850_parameters():
    from training import models

    config = parse_config(
        ["--data_dir=d", "--model_dir=m", "--model=linear", "--image_size=28", "--channels=1"]
    )
    assert models.scratch_model(10, (28, 28, 1), config).count_params() == 7850


def _usage_error(argv) -> str:
    with pytest.raises(UsageError) as e:
        task.train(parse_config(argv))
    return str(e.value)


def test_bad_data_dirs(tmp_path, data_dir):
    model = f"--model_dir={tmp_path}/m"
    assert "does not exist" in _usage_error([f"--data_dir={tmp_path}/nope", model])
    (tmp_path / "empty").mkdir()
    assert "manifest.json not found" in _usage_error([f"--data_dir={tmp_path}/empty", model])

    old = tmp_path / "old"
    shutil.copytree(data_dir, old)
    raw = json.loads((old / "manifest.json").read_text())
    raw["schema_version"] = 0
    (old / "manifest.json").write_text(json.dumps(raw))
    assert "schema_version" in _usage_error([f"--data_dir={old}", model])

    corrupt = tmp_path / "corrupt"
    shutil.copytree(data_dir, corrupt)
    shard = sorted(corrupt.glob("train-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-40])
    message = _usage_error([f"--data_dir={corrupt}", model])
    assert shard.name in message and "corrupt" in message


def test_empty_split_and_missing_images(tmp_path, tiny_backbone, data_dir):
    root = tmp_path / "images"
    write_dataset(root, per_class=4)
    no_test = _preprocess(root, tmp_path / "no_test", tiny_backbone, test=0.0)
    message = _usage_error([f"--data_dir={no_test}", f"--model_dir={tmp_path}/m"])
    assert "test split has no examples" in message

    stripped = tmp_path / "stripped"
    shutil.copytree(data_dir, stripped)
    for shard in stripped.glob("*.tfrecord"):
        examples = []
        for record in tf.data.TFRecordDataset(str(shard)):
            example = tf.train.Example.FromString(record.numpy())
            example.features.feature[features.IMAGE_ENCODED].bytes_list.value[:] = [b""]
            examples.append(example.SerializeToString())
        with tf.io.TFRecordWriter(str(shard)) as writer:
            for e in examples:
                writer.write(e)
    message = _usage_error(
        [f"--data_dir={stripped}", f"--model_dir={tmp_path}/m2", "--features=image"]
    )
    assert "without images" in message


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--model=linear", "--features=image"], "--features"),
        (["--augment"], "--features image"),
        (["--model=cnn", "--fine_tune"], "--fine_tune"),
        (["--dropout=2"], "--dropout"),
        (["--optimizer=lbfgs"], "--optimizer"),
    ],
)
def test_flag_misuse_is_one_line(flags, needle, capsys):
    assert task.main(["--data_dir=d", "--model_dir=m", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("hubflow-train: error:")


def test_resume_with_other_architecture_is_refused(data_dir, tmp_path):
    _train(data_dir, tmp_path / "m", "--epochs=1")
    message = _usage_error(
        [f"--data_dir={data_dir}", f"--model_dir={tmp_path}/m", "--hidden_units=8"]
    )
    assert "--hidden_units" in message and "--overwrite" in message


def test_fine_tune_changes_only_top_layers_and_keeps_batch_norm_statistics(
    data_dir, tmp_path, monkeypatch
):
    # What fine-tuning changes: the fine-tuned model is made the one exported here (which stage
    # is exported is tests/test_fine_tune_fallback.py's).
    monkeypatch.setattr(task, "_eval_loss", lambda model, _: float(model.name != "fine_tune"))
    result = _train(
        data_dir,
        tmp_path / "m",
        "--features=image",
        "--epochs=2",
        "--fine_tune",
        "--fine_tune_epochs=2",
        "--fine_tune_layers=2",
        "--learning_rate=0.05",
    )
    handle = manifest_lib.read_manifest(data_dir).backbone.handle
    original = {v.name: v.numpy() for v in tf.saved_model.load(handle).variables}
    tuned = {v.name: v.numpy() for v in result.model.get_layer("backbone").weights}
    assert set(tuned) == set(original)
    changed = {n for n in tuned if not np.array_equal(tuned[n], original[n])}
    assert changed, "fine-tuning did not touch the backbone"
    trainable = [v.name for v in result.model.get_layer("backbone").trainable_weights]
    frozen = set(trainable) - changed
    assert frozen, "--fine_tune_layers=2 must leave the lower layers frozen"
    assert changed <= set(trainable)  # moving mean/variance (non-trainable) untouched
    # the tuned variables are the last ones in creation order, i.e. the top of the network
    assert max(trainable.index(n) for n in frozen) < min(trainable.index(n) for n in changed)


@pytest.mark.parametrize("gpus, kind", [(0, "default"), (1, "default"), (4, "mirrored")])
def test_strategy_follows_the_local_gpus(gpus, kind):
    # One machine trains; TF_CONFIG clusters: tests/test_training_gfile.py.
    from training import cluster

    assert cluster.strategy_kind(gpus) == kind
