"""Issue 13 item 2: augmented train views (``--train_views K``).

Views must be deterministic per image and seed (not per worker, batch or run), only on train
records, leave the centre embedding, the row accounting and the normalisation as they are, and
survive an incremental run; the trainer's head samples them per epoch, deterministically.
"""

from __future__ import annotations

import glob
import os
import pathlib
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from PIL import Image

from pipeline import preprocess, reuse, views
from schemas import csv_format, features
from schemas import manifest as manifest_lib
from schemas.cli import UsageError
from tests.conftest import CLASS_COLOURS, TINY_DIM, photo, write_dataset
from training import data, tuning
from training.config import parse_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHA = "3f" * 32
K4 = manifest_lib.TrainViews(count=4, seed=7)


def _image(width=90, height=60) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8), "RGB")


# --- the views: pure functions ----------------------------------------------------------------


def test_views_are_a_function_of_image_seed_and_index_alone():
    image = _image()
    first = views.view_pixels(image, 24, SHA, K4)
    assert first.shape == (4, 24, 24, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, views.view_pixels(image, 24, SHA, K4))
    # The first K of more views are the K views: view i does not depend on the count.
    more = views.view_pixels(image, 24, SHA, manifest_lib.TrainViews(count=8, seed=7))
    np.testing.assert_array_equal(first, more[:4])
    # Another seed or another image draws other views; the views differ from each other.
    other_seed = views.view_pixels(image, 24, SHA, manifest_lib.TrainViews(count=4, seed=8))
    other_image = views.view_pixels(image, 24, "40" * 32, K4)
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first, other_image)
    assert len({v.tobytes() for v in first}) == 4


def test_crop_boxes_follow_the_recipe_and_the_switches():
    low, high = manifest_lib.VIEW_CROP_AREA
    flips = []
    for i in range(200):
        sha = f"{i:064x}"
        (left, top, right, bottom), flip = views.view_box(90, 60, sha, K4, i)
        assert 0 <= left < right <= 90 and 0 <= top < bottom <= 60
        assert (right - left) * (bottom - top) <= high * 90 * 60 + 1e-6
        assert (right - left) * (bottom - top) >= low * 90 * 60 * 0.74  # clipped by the ratio
        flips.append(flip)
    assert 60 < sum(flips) < 140  # p = 0.5
    no_crop = manifest_lib.TrainViews(count=2, crop=False)
    assert all(views.view_box(90, 60, SHA, no_crop, i)[0] == (0, 0, 90, 60) for i in range(5))
    no_flip = manifest_lib.TrainViews(count=2, flip=False)
    assert not any(views.view_box(90, 60, f"{i:064x}", no_flip, 0)[1] for i in range(50))
    # Switching crop off keeps the flips (their draws are separate).
    assert [views.view_box(90, 60, f"{i:064x}", no_crop, 0)[1] for i in range(50)] == [
        views.view_box(90, 60, f"{i:064x}", manifest_lib.TrainViews(count=2), 0)[1]
        for i in range(50)
    ]


class _SumHandler(ModelHandler):
    """Embeds an image as its per-channel sums, recording the batch sizes it is called with."""

    def __init__(self):
        self.calls = []

    def load_model(self):
        return None

    def run_inference(self, batch, model, inference_args=None):
        stacked = np.stack(batch)
        self.calls.append(len(stacked))
        return [PredictionResult(None, x.sum(axis=(0, 1)).astype(np.float32)) for x in stacked]

    def batch_elements_kwargs(self):
        return {"min_batch_size": 32, "max_batch_size": 32}


def test_views_run_in_the_same_model_call_and_come_back_per_element():
    inner = _SumHandler()
    handler = views.ViewsModelHandler(inner, views=3)
    rng = np.random.default_rng(1)
    single = rng.integers(0, 9, (5, 5, 3), np.uint8)
    stacked = rng.integers(0, 9, (4, 5, 5, 3), np.uint8)
    out = list(handler.run_inference([single, stacked, single], None))
    assert inner.calls == [6]  # one model call for the centres and the views
    np.testing.assert_array_equal(out[0].inference, single.sum(axis=(0, 1)))
    np.testing.assert_array_equal(out[1].inference, stacked.sum(axis=(1, 2)))
    assert out[1].inference.shape == (4, 3) and out[2].inference.shape == (3,)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 8}


# --- the record and the manifest --------------------------------------------------------------


def _example(**extra):
    return features.make_example(
        jpeg=b"\xff\xd8x",
        height=2,
        width=3,
        source="a.jpg",
        sha256=SHA,
        label=1,
        label_text="b",
        embedding=[1.0, 2.0],
        **extra,
    )


def test_a_record_without_views_is_unchanged_and_views_round_trip():
    plain = _example().SerializeToString()
    assert _example(views=None).SerializeToString() == plain
    assert features.EMBEDDING_VIEWS not in _example().features.feature
    with_views = _example(views=np.arange(6, dtype=np.float32).reshape(3, 2)).SerializeToString()
    spec = {**features.feature_spec(2), **features.views_feature_spec(2, 3)}
    parsed = tf.io.parse_single_example(with_views, spec)
    np.testing.assert_array_equal(parsed[features.EMBEDDING_VIEWS], [[0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(parsed[features.EMBEDDING], [1, 2])


def test_views_key_is_spelled_only_in_schemas():
    key = re.escape(features.EMBEDDING_VIEWS)
    for folder in ("pipeline", "training", "backbones", "evaluation", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not re.search(rf"[\"']{key}[\"']", path.read_text()), path


def test_manifest_options_record_the_views_and_old_manifests_have_none():
    assert manifest_lib.TrainViews.from_options({}) == manifest_lib.TrainViews()
    options = {"train_views": 4, "view_seed": 7, "view_crop": True, "view_flip": True}
    options["view_recipe"] = manifest_lib.VIEW_RECIPE
    assert manifest_lib.TrainViews.from_options(options) == K4
    assert K4.same_recipe(manifest_lib.TrainViews(count=2, seed=7))
    assert not K4.same_recipe(manifest_lib.TrainViews(count=4, seed=8))
    assert not K4.same_recipe(manifest_lib.TrainViews(count=4, seed=7, flip=False))


@pytest.mark.parametrize(
    "argv, flag",
    [(["--train_views=-1"], "--train_views"), (["--train_views=x"], "--train_views")],
)
def test_a_bad_view_count_is_one_line_naming_the_flag(argv, flag, capsys):
    assert preprocess.main(["--input_csv=a.csv", "--output_dir=/tmp/o", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def test_views_that_would_all_be_the_centre_are_refused():
    with pytest.raises(UsageError, match="--train_views"):
        preprocess.parse_config(
            ["--input_csv=a.csv", "--output_dir=/o", "--train_views=2"]
            + ["--no-view_crop", "--no-view_flip"]
        )
    with pytest.raises(UsageError, match="--view_seed"):
        preprocess.parse_config(["--input_csv=a.csv", "--output_dir=/o", "--view_seed=-1"])
    config, _ = preprocess.parse_config(["--input_csv=a.csv", "--output_dir=/o"])
    assert config.train_views.count == views.DEFAULT_TRAIN_VIEWS


# --- reuse: stored views per record -----------------------------------------------------------


def test_stored_views_are_used_only_where_this_run_writes_them():
    centre = np.ones(2, np.float32)
    stored = reuse.Stored(SHA, b"j", 1, 1, centre, np.arange(8, dtype=np.float32))  # 4 views
    infer = reuse.stored_inference
    k2 = manifest_lib.TrainViews(count=2, seed=7)
    # Eval (or a run without views): the centre alone, the views dropped.
    assert infer(stored, csv_format.EVAL, 2, k2, K4).shape == (2,)
    assert infer(stored, csv_format.TRAIN, 2, manifest_lib.TrainViews(), K4).shape == (2,)
    # Train: the first K stored views when made the same way; else embedded again (None).
    np.testing.assert_array_equal(
        infer(stored, csv_format.TRAIN, 2, k2, K4), [[1, 1], [0, 1], [2, 3]]
    )
    assert infer(stored, csv_format.TRAIN, 2, manifest_lib.TrainViews(count=8, seed=7), K4) is None
    assert infer(stored, csv_format.TRAIN, 2, manifest_lib.TrainViews(count=2, seed=1), K4) is None
    no_views = reuse.Stored(SHA, b"j", 1, 1, centre)
    assert infer(no_views, csv_format.TRAIN, 2, k2, manifest_lib.TrainViews()) is None


# --- the trainer's sampling -------------------------------------------------------------------


def test_the_head_samples_one_of_centre_and_views_per_example_and_epoch_reproducibly():
    n, k = 64, 3
    # Row j of example i is (i, j): the sample says which view was drawn.
    x = np.stack([[[i, j] for j in range(k + 1)] for i in range(n)]).astype(np.float32)
    y = np.arange(n)
    config = parse_config(["--data_dir=d", "--model_dir=m", "--batch_size=16", "--seed=3"])

    def epochs(count):
        ds = data.batches(
            tf.data.Dataset.from_tensor_slices((x, y)), config, training=True, num_examples=n
        )
        return [np.concatenate([b[0] for b in ds.as_numpy_iterator()]) for _ in range(count)]

    first, second = epochs(2)
    assert first.shape == (n, 2)
    assert sorted(first[:, 0].tolist()) == list(range(n))  # every example once per epoch
    assert set(first[:, 1].tolist()) == set(range(k + 1))  # centre and views drawn
    assert not np.array_equal(first[:, 1], second[:, 1])  # new draws each epoch
    again = epochs(2)
    np.testing.assert_array_equal(first, again[0])  # the same seed, the same views
    np.testing.assert_array_equal(second, again[1])
    evaluation = data.batches(
        tf.data.Dataset.from_tensor_slices((x, y)), config, training=False, num_examples=n
    )
    assert next(iter(evaluation))[0].shape == (16, k + 1, 2)  # eval is never sampled here


# --- the real job on generated images ---------------------------------------------------------


def _records(out) -> dict[str, tuple[str, tf.train.Example]]:
    found = {}
    for split in csv_format.ALL_SPLITS:
        for path in sorted(glob.glob(os.path.join(out, features.tfrecord_pattern(split)))):
            for raw in tf.data.TFRecordDataset(path):
                example = tf.train.Example.FromString(raw.numpy())
                sha = example.features.feature[features.IMAGE_SHA256].bytes_list.value[0]
                found[sha.decode()] = (split, example)
    return found


def _floats(example, key) -> np.ndarray:
    return np.asarray(example.features.feature[key].float_list.value, np.float32)


def _argv(csv_path, out, backbone, *extra):
    return [
        f"--input_csv={csv_path}",
        f"--output_dir={out}",
        f"--backbone={backbone}",
        "--eval_fraction=0.25",
        "--test_fraction=0.25",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_backbone):
    """Full runs with K = 0 and K = 2 (batch sizes 32 and 1), and an incremental K = 2 run from
    the K = 0 dataset after adding two images."""
    root = tmp_path_factory.mktemp("views")
    files = write_dataset(root / "images", per_class=8)
    (root / "images" / "u.jpg").write_bytes(photo((40, 200, 60), (44, 40), seed=5))
    rows = [f"{p},{label}" for label, paths in files.items() for p in paths] + ["u.jpg,"]
    first = root / "images" / "first.csv"
    first.write_text("\n".join(rows) + "\n")
    for i in range(2):
        (root / "images" / f"n{i}.jpg").write_bytes(
            photo(CLASS_COLOURS["rose"], (50, 42), seed=77 + i)
        )
    second = root / "images" / "second.csv"
    second.write_text("\n".join([*rows, "n0.jpg,rose", "n1.jpg,rose"]) + "\n")
    out = SimpleNamespace(root=root, backbone=tiny_backbone)
    out.k0 = root / "k0"
    preprocess.run(_argv(first, out.k0, tiny_backbone))
    out.k2 = root / "k2"
    preprocess.run(_argv(first, out.k2, tiny_backbone, "--train_views=2"))
    out.k2_b1 = root / "k2_b1"
    preprocess.run(_argv(first, out.k2_b1, tiny_backbone, "--train_views=2", "--batch_size=1"))
    out.full = root / "full"
    preprocess.run(_argv(second, out.full, tiny_backbone, "--train_views=2"))
    out.incremental = root / "incremental"
    shutil.copytree(out.k0, out.incremental)
    out.result = preprocess.run(
        _argv(second, out.incremental, tiny_backbone, "--train_views=2")
        + [f"--reuse_from={out.incremental}", "--overwrite"]
    )
    return out


@pytest.mark.slow
def test_views_only_on_train_and_the_centre_unchanged(runs):
    plain, viewed = _records(runs.k0), _records(runs.k2)
    assert plain.keys() == viewed.keys()
    splits = {split for split, _ in plain.values()}
    assert splits == {*csv_format.SPLITS, csv_format.UNLABELED}
    for sha, (split, example) in viewed.items():
        plain_split, plain_example = plain[sha]
        assert split == plain_split
        has_views = features.EMBEDDING_VIEWS in example.features.feature
        assert has_views == (split == csv_format.TRAIN), (split, sha)
        assert (
            example.features.feature[features.IMAGE_ENCODED]
            == plain_example.features.feature[features.IMAGE_ENCODED]
        )
        centre = _floats(example, features.EMBEDDING)
        np.testing.assert_allclose(centre, _floats(plain_example, features.EMBEDDING), atol=1e-5)
        if has_views:
            stored = _floats(example, features.EMBEDDING_VIEWS).reshape(2, TINY_DIM)
            assert not np.allclose(stored, centre, atol=1e-4)  # they are other images
        else:  # nothing but the views differs: the record is the K = 0 record
            del plain_example.features.feature[features.EMBEDDING]
            del example.features.feature[features.EMBEDDING]
            assert example.SerializeToString() == plain_example.SerializeToString()
    k0, k2 = manifest_lib.read_manifest(str(runs.k0)), manifest_lib.read_manifest(str(runs.k2))
    assert k2.rows == k0.rows and k2.splits == k0.splits  # row accounting unchanged
    assert k2.train_views() == manifest_lib.TrainViews(count=2)
    assert k0.train_views().count == 0


@pytest.mark.slow
def test_views_are_deterministic_whatever_the_batching(runs):
    a, b = _records(runs.k2), _records(runs.k2_b1)
    for sha, (split, example) in a.items():
        if split == csv_format.TRAIN:
            np.testing.assert_allclose(
                _floats(example, features.EMBEDDING_VIEWS),
                _floats(b[sha][1], features.EMBEDDING_VIEWS),
                atol=1e-5,
            )


@pytest.mark.slow
def test_the_normalisation_is_the_centre_views(runs):
    # tf.Transform's statistics come from the centre embeddings alone: the views do not move
    # the head's z-score.
    mean0, std0 = data.embedding_normalization(str(runs.k0), TINY_DIM)
    mean2, std2 = data.embedding_normalization(str(runs.k2), TINY_DIM)
    np.testing.assert_allclose(mean2, mean0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std2, std0, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_an_incremental_run_gets_the_views_a_full_run_gets(runs):
    full, incremental = _records(runs.full), _records(runs.incremental)
    assert full.keys() == incremental.keys()
    for sha, (split, example) in full.items():
        other_split, other = incremental[sha]
        assert split == other_split
        assert (features.EMBEDDING_VIEWS in example.features.feature) == (
            features.EMBEDDING_VIEWS in other.features.feature
        )
        if split == csv_format.TRAIN:
            np.testing.assert_allclose(
                _floats(other, features.EMBEDDING_VIEWS),
                _floats(example, features.EMBEDDING_VIEWS),
                atol=1e-5,
            )
    # The K = 0 dataset had no views: its eval, test and unlabeled records were reused, its
    # train records embedded again with their views.
    manifest = manifest_lib.read_manifest(str(runs.incremental))
    stored = _records(runs.k0)
    assert manifest.reuse.reused == sum(1 for s, _ in stored.values() if s != csv_format.TRAIN)
    assert manifest.rows == manifest_lib.read_manifest(str(runs.full)).rows


@pytest.mark.slow
def test_the_tuned_head_trains_on_views_and_exports_its_candidate(runs, tmp_path):
    from training import task

    config = parse_config(
        [f"--data_dir={runs.k2}", f"--model_dir={tmp_path / 'm'}", "--epochs=8", "--patience=3"]
    )
    dataset = data.load(config)
    assert dataset.views == 2
    train = data.embedding_arrays(config, dataset, csv_format.TRAIN, views=True)
    assert train[0].shape[1:] == (3, TINY_DIM)
    np.testing.assert_array_equal(
        train[0][:, 0], data.embedding_arrays(config, dataset, csv_format.TRAIN)[0]
    )
    result = task.train(config)
    record = result.metrics[tuning.METRICS_KEY]
    # The head stage trains on the same sampled views as the chosen candidate did.
    assert result.metrics["eval"]["loss"] == pytest.approx(record["eval_loss"], rel=1e-4)
    no_views = parse_config(
        [f"--data_dir={runs.k2}", f"--model_dir={tmp_path / 'n'}", "--no-views"]
    )
    assert data.load(no_views).views == 0
