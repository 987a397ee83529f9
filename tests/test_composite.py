"""Several backbones at once (``--backbone a,b``): resolving, building, embedding, training."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from backbones import cache, hub, registry
from backbones.standin import save_standin_backbone
from pipeline import dataset, preprocess
from schemas import csv_format, features, serving
from schemas import manifest as manifest_lib
from schemas.backbones import BackboneSpec, concat_parts, is_concat
from tests.conftest import write_dataset
from training import task
from training.config import parse_config


def test_presets_joined_by_commas_resolve_to_one_composite_backbone():
    spec = registry.resolve("efficientnet_lite0, efficientnet_lite2")
    assert spec.name == "efficientnet_lite0,efficientnet_lite2"
    assert is_concat(spec.handle)
    assert concat_parts(spec.handle) == [
        "hubflow-builtin://efficientnet_lite0",
        "hubflow-builtin://efficientnet_lite2",
    ]
    # The largest part's input; the features of both, in the order given.
    assert (spec.image_size, spec.embedding_dim) == (260, 2560)
    assert [p.image_size for p in spec.parts] == [224, 260]
    assert spec.feature_ranges() == [
        ("efficientnet_lite0", 0, 1280),
        ("efficientnet_lite2", 1280, 2560),
    ]
    # The manifest keeps the parts.
    assert BackboneSpec.from_json(spec.to_json()) == spec
    single = registry.resolve("efficientnet_lite0")
    assert "parts" not in single.to_json()
    assert single.feature_ranges() == [("efficientnet_lite0", 0, 1280)]


@pytest.mark.parametrize(
    "value, image_size, needle",
    [
        ("efficientnet_lite0,", None, "--backbone"),
        ("efficientnet_lite0,efficientnet_lite0", None, "more than once"),
        ("efficientnet_lite0,no_such_net", None, "no_such_net"),
        ("efficientnet_lite0,efficientnet_lite2", 224, "--image_size"),
    ],
)
def test_a_composite_that_cannot_be_built_is_refused_naming_the_flag(value, image_size, needle):
    with pytest.raises(ValueError, match=needle):
        registry.resolve(value, image_size)


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Two stand-in backbones of different input and feature sizes, and a private cache."""
    monkeypatch.setenv("HUBFLOW_CACHE", str(tmp_path / "cache"))
    big = save_standin_backbone(str(tmp_path / "big"), 32, 16)
    small = save_standin_backbone(str(tmp_path / "small"), 24, 8)
    return big, small


def test_composite_features_are_each_part_on_its_own_input_size_concatenated(parts):
    big, small = parts
    spec, _ = hub.describe(registry.resolve(f"{small},{big}"))
    assert (spec.image_size, spec.embedding_dim) == (32, 24)
    assert [(p.image_size, p.embedding_dim) for p in spec.parts] == [(24, 8), (32, 16)]
    images = tf.random.stateless_uniform([3, 32, 32, 3], seed=(1, 2))
    expected = tf.concat(
        [
            tf.saved_model.load(small)(tf.image.resize(images, [24, 24])),
            tf.saved_model.load(big)(images),
        ],
        axis=-1,
    )
    np.testing.assert_allclose(hub.load(spec)(images), expected, atol=1e-5)


def test_a_composite_is_built_once_and_rebuilt_when_a_part_changes(parts, tmp_path):
    big, small = parts
    handle = registry.resolve(f"{big},{small}").handle
    first = cache.local_handle(handle)
    stamp = os.stat(first).st_mtime_ns
    assert cache.local_handle(handle) == first and os.stat(first).st_mtime_ns == stamp
    # The same path now holds another model: the composite follows it, never the old weights.
    shutil.rmtree(small)
    save_standin_backbone(small, 24, 4)
    second = cache.local_handle(handle)
    assert second != first
    out = tf.saved_model.load(second)(tf.zeros([1, 32, 32, 3]))
    assert out.shape == (1, 20)
    # A part that is gone takes its composites with it at the next build.
    shutil.rmtree(big)
    other = save_standin_backbone(str(tmp_path / "other"), 32, 16)
    cache.local_handle(registry.resolve(f"{other},{small}").handle)
    assert not os.path.exists(first) and not os.path.exists(second)


# ---------------------------------------------------------------------------------------------
# End to end: preprocess, train, fine-tune, serve


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One image folder preprocessed with part A, part B and the composite A,B."""
    root = tmp_path_factory.mktemp("composite")
    os.environ["HUBFLOW_CACHE"] = str(root / "cache")
    try:
        a = save_standin_backbone(str(root / "a"), 32, 16)
        b = save_standin_backbone(str(root / "b"), 32, 8)
        images = root / "images"
        write_dataset(images, per_class=16)
        outs = {}
        for name, backbone in {"a": a, "b": b, "ab": f"{a},{b}"}.items():
            outs[name] = str(root / f"data_{name}")
            preprocess.run(
                [
                    f"--image_dir={images}",
                    f"--output_dir={outs[name]}",
                    f"--backbone={backbone}",
                    "--eval_fraction=0.2",
                    "--test_fraction=0.2",
                ]
            )
        outs["images"], outs["backbone"] = str(images), f"{a},{b}"
        yield outs
    finally:
        os.environ.pop("HUBFLOW_CACHE", None)


def _embeddings(data_dir) -> dict[bytes, np.ndarray]:
    manifest = manifest_lib.read_manifest(data_dir)
    found = {}
    for split in csv_format.SPLITS:
        pattern = os.path.join(data_dir, features.tfrecord_pattern(split))
        for r in features.read_dataset(pattern, manifest.backbone.embedding_dim):
            found[r[features.IMAGE_SHA256].numpy()] = r[features.EMBEDDING].numpy()
    return found


@pytest.mark.slow
def test_preprocess_with_two_backbones_stores_both_features_and_records_the_parts(runs):
    manifest = manifest_lib.read_manifest(runs["ab"])
    backbone = manifest.backbone
    assert backbone.embedding_dim == 24
    assert [(p.name, p.embedding_dim) for p in backbone.parts] == [
        (os.path.join(os.path.dirname(runs["a"]), "a"), 16),
        (os.path.join(os.path.dirname(runs["a"]), "b"), 8),
    ]
    assert backbone.feature_ranges()[1][1:] == (16, 24)
    # The job's summary says which slice of the embedding each backbone wrote.
    summary = dataset.format_summary(manifest, runs["ab"]).splitlines()
    part_a, part_b = (p.name for p in backbone.parts)
    assert f"embedding: {part_a} [0:16] + {part_b} [16:24]" in summary
    assert manifest.rows.balanced() and manifest.rows.written == 48
    a, b, ab = (_embeddings(runs[k]) for k in ("a", "b", "ab"))
    assert set(ab) == set(a) == set(b)
    for sha, both in ab.items():
        np.testing.assert_allclose(both, np.concatenate([a[sha], b[sha]]), atol=1e-4)
    # The same hash-based splits as a single backbone's run.
    assert manifest.splits == manifest_lib.read_manifest(runs["a"]).splits


@pytest.mark.slow
def test_a_rerun_with_the_same_parts_reuses_every_composite_record(runs, tmp_path):
    out = tmp_path / "again"
    preprocess.run(
        [
            f"--image_dir={runs['images']}",
            f"--output_dir={out}",
            f"--backbone={runs['backbone']}",
            f"--reuse_from={runs['ab']}",
            "--eval_fraction=0.2",
            "--test_fraction=0.2",
        ]
    )
    manifest = manifest_lib.read_manifest(str(out))
    assert manifest.reuse == manifest_lib.Reuse(runs["ab"], 48, "")
    before = _embeddings(runs["ab"])
    again = _embeddings(str(out))
    assert set(again) == set(before)
    for sha, embedding in again.items():
        np.testing.assert_array_equal(embedding, before[sha])


@pytest.mark.slow
def test_a_head_on_two_backbones_trains_and_its_export_serves_image_bytes(runs, tmp_path):
    data_dir = runs["ab"]
    result = task.train(
        parse_config(
            [
                f"--data_dir={data_dir}",
                f"--model_dir={tmp_path / 'm'}",
                "--epochs=40",
                "--learning_rate=0.01",
            ]
        )
    )
    manifest = manifest_lib.read_manifest(data_dir)
    pattern = os.path.join(data_dir, features.tfrecord_pattern(csv_format.TEST))
    records = list(features.read_dataset(pattern, manifest.backbone.embedding_dim))
    jpegs = [r[features.IMAGE_ENCODED].numpy() for r in records]
    stored = np.stack([r[features.EMBEDDING].numpy() for r in records])
    serve = tf.saved_model.load(result.export_dir).signatures[serving.SIGNATURE_NAME]
    served = serve(image_bytes=tf.constant(jpegs))["probabilities"].numpy()
    expected = result.model(stored, training=False).numpy()
    # The export runs both backbones on the bytes; the head sees what preprocessing stored.
    np.testing.assert_allclose(served, expected, atol=1e-3)
    labels = [int(r[features.LABEL]) for r in records]
    assert np.mean(np.argmax(served, axis=1) == labels) >= 0.9


@pytest.mark.slow
def test_fine_tuning_two_backbones_tunes_the_top_of_each_part(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(task, "_eval_loss", lambda model, _: float(model.name != "fine_tune"))
    result = task.train(
        parse_config(
            [
                f"--data_dir={runs['ab']}",
                f"--model_dir={tmp_path / 'm'}",
                "--features=image",
                "--epochs=2",
                "--fine_tune",
                "--fine_tune_epochs=2",
                "--fine_tune_layers=1",
                "--learning_rate=0.05",
            ]
        )
    )
    parts = manifest_lib.read_manifest(runs["ab"]).backbone.parts
    for i, part in enumerate(parts):
        layer = result.model.get_layer(f"backbone_{i}")
        original = {v.name: v.numpy() for v in tf.saved_model.load(part.handle).variables}
        trainable = [v.name for v in layer.trainable_weights]
        changed = {v.name for v in layer.weights if not np.array_equal(v.numpy(), original[v.name])}
        assert changed and changed <= set(trainable), part.name
        frozen = set(trainable) - changed
        assert frozen, f"{part.name}: only its top layer may change"
        assert max(trainable.index(n) for n in frozen) < min(trainable.index(n) for n in changed)
    serve = tf.saved_model.load(result.export_dir).signatures[serving.SIGNATURE_NAME]
    assert serve(image_bytes=tf.constant([_a_jpeg(runs["ab"])]))["probabilities"].shape == (1, 3)


def _a_jpeg(data_dir) -> bytes:
    manifest = manifest_lib.read_manifest(data_dir)
    pattern = os.path.join(data_dir, features.tfrecord_pattern(csv_format.TEST))
    record = next(iter(features.read_dataset(pattern, manifest.backbone.embedding_dim)))
    return record[features.IMAGE_ENCODED].numpy()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--backbone=efficientnet_lite0,efficientnet_lite2", "--image_size=224"], "--image_size"),
        (["--backbone=efficientnet_lite0,,efficientnet_lite2"], "--backbone"),
    ],
)
def test_preprocess_refuses_a_composite_it_cannot_build_in_one_line(
    tmp_path, capsys, flags, needle
):
    write_dataset(tmp_path / "images", per_class=1)
    argv = [f"--image_dir={tmp_path / 'images'}", f"--output_dir={tmp_path / 'out'}", *flags]
    assert preprocess.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_a_dry_run_names_the_part_that_needs_the_network(tiny_backbone, no_gcs, capsys):
    from tests.test_remote import DATAFLOW

    handle = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
    argv = [
        "--input_csv=gs://my-bucket/a.csv",
        "--output_dir=gs://my-bucket/out",
        f"--backbone={tiny_backbone},{handle}",
        *DATAFLOW,
    ]
    assert preprocess.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hubflow-preprocess: error: --backbone: a dry run") and handle in err
    assert "\n" not in err


@pytest.mark.slow
def test_a_dataflow_dry_run_stages_the_composite_as_one_backbone(parts, no_gcs, capsys):
    from tests.test_remote import DATAFLOW, STAGED

    big, small = parts
    argv = [
        "--input_csv=gs://my-bucket/a.csv",
        "--output_dir=gs://my-bucket/out",
        f"--backbone={big},{small}",
        *DATAFLOW,
    ]
    assert preprocess.main(argv) == 0
    text = capsys.readouterr().out
    staged = [line for line in text.splitlines() if "would be staged" in line]
    backbone = [line for line in staged if line.strip().startswith("--backbone")]
    assert len(backbone) == 1 and STAGED.search(backbone[0]), text
    assert "composite" in backbone[0]  # the composite's cache entry, not a part
