"""Issue 13 item 4: fine-tuning never makes the exported model worse on eval.

With ``--fine_tune`` the trainer exports the fine-tuned model only when its eval loss is below
the head stage's; otherwise the head stage's weights, which the export must then serve exactly
(the same predictions as a run that never fine-tuned). ``metrics.json`` says which.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from schemas import csv_format, features, serving
from schemas import manifest as manifest_lib
from tests.conftest import preprocessed_folders
from training import task
from training.config import parse_config

pytestmark = pytest.mark.slow
HEAD = ["--features=image", "--epochs=15", "--learning_rate=0.01"]
FINE_TUNE = ["--fine_tune", "--fine_tune_epochs=2", "--fine_tune_layers=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_backbone):
    return preprocessed_folders(tmp_path_factory, tiny_backbone, 16, "fallback")


def _train(data_dir, model_dir, *flags):
    return task.train(parse_config([f"--data_dir={data_dir}", f"--model_dir={model_dir}", *flags]))


def _served(export_dir, data_dir) -> np.ndarray:
    manifest = manifest_lib.read_manifest(data_dir)
    files = sorted(tf.io.gfile.glob(f"{data_dir}/{features.tfrecord_pattern(csv_format.TEST)}"))
    jpegs = [
        r[features.IMAGE_ENCODED].numpy()
        for r in features.read_dataset(files, manifest.backbone.embedding_dim)
    ]
    serve = tf.saved_model.load(export_dir).signatures[serving.SIGNATURE_NAME]
    return serve(image_bytes=tf.constant(jpegs))["probabilities"].numpy()


def test_fine_tuning_that_worsens_eval_exports_the_head_stage(data_dir, tmp_path):
    absurd = [*FINE_TUNE, "--fine_tune_learning_rate=30"]
    result = _train(data_dir, tmp_path / "ft", *HEAD, *absurd)
    stages = result.metrics["fine_tune"]
    assert stages["exported_stage"] == "head", stages
    worse = stages["fine_tune_eval_loss"]
    assert worse is None or worse > stages["head_eval_loss"], stages
    history = json.loads((tmp_path / "ft" / "history.json").read_text())
    assert history["stage"].count("stage2") == 2  # fine-tuning did run
    assert result.metrics["eval"]["loss"] == pytest.approx(stages["head_eval_loss"], rel=1e-5)
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())["fine_tune"]
    assert saved == stages

    # The export serves the head stage: a run of the same head stage that never fine-tuned.
    head_only = _train(data_dir, tmp_path / "head", *HEAD)
    np.testing.assert_allclose(
        _served(result.export_dir, data_dir), _served(head_only.export_dir, data_dir), atol=1e-5
    )
    assert head_only.metrics["eval"]["loss"] == pytest.approx(stages["head_eval_loss"], rel=1e-5)


def test_exported_stage_is_the_lower_eval_loss_and_survives_resume(data_dir, tmp_path, capsys):
    model_dir = tmp_path / "m"
    argv = [f"--data_dir={data_dir}", f"--model_dir={model_dir}", *HEAD, *FINE_TUNE]
    assert task.main([*argv, "--fine_tune_learning_rate=0.01"]) == 0
    stages = json.loads((model_dir / "metrics.json").read_text())["fine_tune"]
    losses = {"head": stages["head_eval_loss"], "fine_tune": stages["fine_tune_eval_loss"]}
    expected = "fine_tune" if losses["fine_tune"] < losses["head"] else "head"
    assert stages["exported_stage"] == expected
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["eval"]["loss"] == pytest.approx(losses[expected], rel=1e-5)
    out = capsys.readouterr().out
    assert f"exported stage: {expected} (eval loss: head stage {losses['head']:.4f}" in out
    first = _served(str(model_dir / "export" / "1"), data_dir)

    # A rerun finds both stages finished: it decides the same and exports the same model.
    assert task.main([*argv, "--fine_tune_learning_rate=0.01"]) == 0
    again = json.loads((model_dir / "metrics.json").read_text())["fine_tune"]
    assert again == stages
    np.testing.assert_allclose(_served(str(model_dir / "export" / "2"), data_dir), first, atol=1e-6)
    assert os.path.isdir(model_dir / "export" / "2")
