"""Issue 13 items 3 and 5: the embedding head tunes itself on eval; ``--examples_per_class``.

The tuned run must export the candidate it chose (its recorded eval loss is the exported
model's), record every candidate, keep flags given on the command line, and reuse its choice on
resume. ``--examples_per_class K --subsample_seed S`` trains on exactly K train records per
class (the sampler's, at its positions in file order), reproducibly, leaving eval and test
alone; another K or S in the same model dir is another run.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from schemas import csv_format, features
from schemas import manifest as manifest_lib
from schemas.cli import UsageError
from tests.conftest import CLASS_COLOURS, preprocessed_folders
from training import data, models, sampling, task, tuning
from training.config import TUNING_CANDIDATES, parse_config

pytestmark = pytest.mark.slow
PER_CLASS = 24
LABELS = sorted(CLASS_COLOURS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_backbone):
    return preprocessed_folders(tmp_path_factory, tiny_backbone, PER_CLASS, "tuning")


def _config(data_dir, model_dir, *flags):
    return parse_config([f"--data_dir={data_dir}", f"--model_dir={model_dir}", *flags])


def _metrics(model_dir) -> dict:
    return json.loads((model_dir / "metrics.json").read_text())


# --- the tuned head -------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--classifier=cosine"]], ids=["default", "cosine"])
def test_head_is_tuned_and_the_chosen_candidate_is_what_is_exported(flags, data_dir, tmp_path):
    model_dir = tmp_path / "m"
    config = _config(data_dir, model_dir, "--epochs=30", *flags)
    assert config.tune and len(config.tune_fixed) == len(flags)
    result = task.train(config)
    record = _metrics(model_dir)["tuning"]
    grid = tuning.candidates(config)
    assert len(grid) > 1
    assert [c["params"] for c in record["candidates"]] == grid
    for candidate in record["candidates"]:
        assert set(candidate) >= {"params", "eval_loss", "eval_accuracy", "epochs", "seconds"}
        assert 1 <= candidate["best_epoch"] <= candidate["epochs"] <= 30
    losses = [c["eval_loss"] for c in record["candidates"]]
    assert record["chosen_index"] == int(np.argmin(losses))
    assert record["chosen"] == grid[record["chosen_index"]]
    assert record["eval_loss"] == min(losses)
    # The head stage trained the chosen settings from the candidate's start, on its batches:
    # the evaluated model is the chosen candidate (the same eval loss, not a near miss).
    assert result.metrics["eval"]["loss"] == pytest.approx(record["eval_loss"], rel=1e-4)
    assert np.isclose(losses, record["eval_loss"], rtol=1e-3).sum() < len(losses)  # not all alike
    assert json.loads((model_dir / "config.json").read_text())["train"]["tune"] is True

    # The rerun of the same command resumes: the choice is reused, not measured again.
    again = task.train(_config(data_dir, model_dir, "--epochs=30", *flags))
    assert _metrics(model_dir)["tuning"] == record
    assert again.metrics["eval"]["loss"] == pytest.approx(result.metrics["eval"]["loss"])
    assert again.export_dir.endswith(os.path.join("export", "2"))


def test_a_flag_given_holds_in_every_candidate_and_no_tune_trains_one_head(data_dir, tmp_path):
    config = _config(data_dir, tmp_path / "fixed", "--epochs=5", "--l2=0.05")
    assert config.tune and config.tune_fixed == ("l2",)
    task.train(config)
    record = _metrics(tmp_path / "fixed")["tuning"]
    assert record["fixed"] == {"l2": 0.05}
    assert {c["params"]["l2"] for c in record["candidates"]} == {0.05}
    expected = {c["classifier"] for c in TUNING_CANDIDATES}  # one per classifier is left
    assert sorted(c["params"]["classifier"] for c in record["candidates"]) == sorted(expected)

    flags = ["--epochs=5", "--no_tune", "--learning_rate=0.01"]
    result = task.train(_config(data_dir, tmp_path / "one", *flags))
    assert "tuning" not in _metrics(tmp_path / "one") and "tuning" not in result.metrics
    # nothing left to tune: one candidate left by the flags given, or another mode
    assert not _config(data_dir, tmp_path / "x", "--classifier=zscore", "--l2=0").tune
    assert not _config(data_dir, tmp_path / "x", "--features=image").tune
    assert not _config(data_dir, tmp_path / "x", "--model=linear").tune


def test_resume_across_no_tune_is_refused_in_one_line(data_dir, tmp_path, capsys):
    model_dir = tmp_path / "m"
    assert task.main([f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--epochs=2"]) == 0
    capsys.readouterr()
    argv = [f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--epochs=2", "--no_tune"]
    assert task.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no_tune" in err[0] and "--overwrite" in err[0], err


def test_summary_names_the_choice(data_dir, tmp_path, capsys):
    argv = [f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'm'}", "--epochs=3"]
    assert task.main(argv) == 0
    out = capsys.readouterr().out
    record = _metrics(tmp_path / "m")["tuning"]
    line = next(line for line in out.splitlines() if line.startswith("head tuned on eval:"))
    assert f"eval loss {record['eval_loss']:.4f}" in line
    assert f"best of {len(record['candidates'])} candidates" in line
    for name, value in record["chosen"].items():
        assert (
            f"{name} {value:g}" in line if isinstance(value, float) else f"{name} {value}" in line
        )


# --- --examples_per_class -------------------------------------------------------------------


def test_fit_head_returns_the_head_its_eval_loss_was_measured_on(data_dir, tmp_path):
    # benchmarks.head_grid scores the fitted candidate on held-out data: the head it gets back
    # must be the best-eval-loss weights the recorded figures describe, not the last epoch's.
    config = _config(data_dir, tmp_path, "--epochs=40", "--classifier=cosine")
    dataset = data.load(config)
    train = data.embedding_arrays(config, dataset, csv_format.TRAIN)
    evaluation = data.embedding_arrays(config, dataset, csv_format.EVAL)
    head, result = tuning.fit_head(config, dataset, train, evaluation)
    probabilities = head.predict(evaluation[0], verbose=0)
    picked = probabilities[np.arange(len(evaluation[1])), evaluation[1]]
    assert float(-np.mean(np.log(picked))) == pytest.approx(result["eval_loss"], rel=1e-4)
    assert float(np.mean(probabilities.argmax(1) == evaluation[1])) == pytest.approx(
        result["eval_accuracy"]
    )
    assert tuning.fit_candidate(config, dataset, train, evaluation) == {
        **result,
        "seconds": pytest.approx(result["seconds"], abs=60),
    }


def _train_split(data_dir):
    manifest = manifest_lib.read_manifest(data_dir)
    files = data.split_files(data_dir, csv_format.TRAIN)
    return [
        (r[features.EMBEDDING].numpy(), int(r[features.LABEL]))
        for r in features.read_dataset(files, manifest.backbone.embedding_dim)
    ]


def _trained_on(config, dataset):
    """The (embedding, label) pairs the trainer's train dataset yields in one epoch."""
    train = data.make_split_datasets(config, dataset)[csv_format.TRAIN]
    return [
        (x, int(y)) for xs, ys in train.as_numpy_iterator() for x, y in zip(xs, ys, strict=True)
    ]


def test_examples_per_class_draws_exactly_k_reproducibly(data_dir, tmp_path):
    full = data.load(_config(data_dir, tmp_path))
    k = 3
    config = _config(data_dir, tmp_path, f"--examples_per_class={k}", "--subsample_seed=7")
    dataset = data.load(config)
    records = _train_split(data_dir)
    labels = [y for _, y in records]
    expected = sampling.per_class_indices(labels, k, 7)
    np.testing.assert_array_equal(dataset.train_indices, expected)
    trained = _trained_on(config, dataset)
    assert np.bincount([y for _, y in trained]).tolist() == [k] * len(LABELS)
    # the records at the sampler's positions in file order (the order the audit reads)
    want = sorted((records[i][0].tobytes(), records[i][1]) for i in expected)
    assert sorted((x.tobytes(), y) for x, y in trained) == want
    assert dataset.examples(csv_format.TRAIN) == k * len(LABELS)
    for split in (csv_format.EVAL, csv_format.TEST):  # untouched
        assert dataset.examples(split) == full.counts[split] == dataset.counts[split]
        assert dataset.indices(split) is None

    same = data.load(_config(data_dir, tmp_path, f"--examples_per_class={k}", "--subsample_seed=7"))
    np.testing.assert_array_equal(same.train_indices, dataset.train_indices)
    other = data.load(
        _config(data_dir, tmp_path, f"--examples_per_class={k}", "--subsample_seed=8")
    )
    assert not np.array_equal(other.train_indices, dataset.train_indices)
    default = _config(data_dir, tmp_path, f"--examples_per_class={k}")
    assert default.subsample_seed == 0


def test_examples_per_class_trains_records_and_refuses_another_draw(data_dir, tmp_path, capsys):
    model_dir = tmp_path / "m"
    flags = ["--examples_per_class=4", "--subsample_seed=1", "--epochs=3", "--no_tune"]
    result = task.train(_config(data_dir, model_dir, *flags))
    recorded = json.loads((model_dir / "config.json").read_text())
    counts = recorded["data_counts"]
    expected = {
        "examples_per_class": 4,
        "subsample_seed": 1,
        "train_examples": 4 * len(LABELS),
        "train_labels": {label: 4 for label in LABELS},
        "train_split_examples": counts[csv_format.TRAIN],
    }
    assert recorded["subsample"] == expected == _metrics(model_dir)["subsample"]
    assert result.metrics["eval"]["examples"] == counts[csv_format.EVAL]
    assert result.metrics["test"]["examples"] == counts[csv_format.TEST]
    history = json.loads((model_dir / "history.json").read_text())
    assert len(history["loss"]) == 3

    for other in (["--examples_per_class=5", "--subsample_seed=1"], ["--examples_per_class=4"]):
        argv = [f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--epochs=3", "--no_tune"]
        assert task.main([*argv, *other]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "other train examples" in err[0], err
        assert "--subsample_seed" in err[0] or "--examples_per_class" in err[0], err
        assert "--overwrite" in err[0], err


def test_too_few_examples_of_a_class_is_one_line_naming_the_class(data_dir, tmp_path, capsys):
    dataset = data.load(_config(data_dir, tmp_path))
    smallest = min(dataset.manifest.splits[csv_format.TRAIN]["labels"].items(), key=lambda i: i[1])
    argv = [f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'm'}"]
    assert task.main([*argv, f"--examples_per_class={smallest[1] + 1}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--examples_per_class" in err[0] and repr(smallest[0]) in err[0], err
    assert not (tmp_path / "m").exists()
    for flags, needle in (
        (["--subsample_seed=3"], "--examples_per_class"),
        (["--examples_per_class=0"], "--examples_per_class"),
    ):
        with pytest.raises(UsageError, match=needle):
            parse_config([*argv, *flags])


def test_examples_per_class_with_image_features(data_dir, tmp_path):
    flags = ["--features=image", "--examples_per_class=2", "--epochs=1"]
    config = _config(data_dir, tmp_path / "m", *flags)
    dataset = data.load(config)
    trained = data.make_split_datasets(config, dataset)[csv_format.TRAIN]
    labels = np.concatenate([y for _, y in trained.as_numpy_iterator()])
    assert np.bincount(labels).tolist() == [2] * len(LABELS)
    result = task.train(config)
    assert result.metrics["subsample"]["train_examples"] == 2 * len(LABELS)


# --- --classifier cosine --------------------------------------------------------------------


def test_cosine_head_starts_as_the_nearest_class_mean_classifier():
    rng = np.random.default_rng(0)
    dim, classes = 12, 3
    centres = rng.normal(size=(classes, dim)) * 3
    labels = np.repeat(np.arange(classes), 20)
    embeddings = (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
    config = parse_config(["--data_dir=d", "--model_dir=m", "--classifier=cosine", "--no_tune"])
    kernel = models.start_kernel(config, embeddings, labels, classes)
    units = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    means = np.stack([units[labels == c].mean(0) for c in range(classes)])
    np.testing.assert_allclose(kernel.T, means / np.linalg.norm(means, axis=1, keepdims=True))
    head = models.embedding_head(dim, classes, np.zeros(dim), np.ones(dim), config, kernel)
    queries = rng.normal(size=(50, dim)).astype(np.float32) * 3
    probabilities = head(queries, training=False).numpy()
    cosine = queries @ kernel / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_array_equal(probabilities.argmax(1), cosine.argmax(1))
    # softmax of the scaled cosine similarities, before any training
    logits = models.COSINE_SCALE * cosine
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probabilities, expected / expected.sum(1, keepdims=True), atol=1e-5)
    zscore = parse_config(["--data_dir=d", "--model_dir=m", "--no_tune"])
    assert models.start_kernel(zscore, embeddings, labels, classes) is None


def test_cosine_head_trains_and_serves(data_dir, tmp_path):
    flags = ["--classifier=cosine", "--no_tune", "--epochs=20"]
    result = task.train(_config(data_dir, tmp_path / "m", *flags))
    assert result.metrics["test"]["accuracy"] >= 0.9
    assert [layer.name for layer in result.model.layers][1:3] == ["normalize", "scale"]
    # a model dir of the cosine head is not resumed with the z-scored one
    with pytest.raises(UsageError, match="--classifier"):
        task.train(_config(data_dir, tmp_path / "m", "--no_tune", "--epochs=20"))
