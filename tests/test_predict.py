"""Batch prediction on the DirectRunner with a model trained in a fixture."""

from __future__ import annotations

import glob
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import images, inference, predict, prediction_report, preprocess, scoring
from tests.conftest import CLASS_COLOURS, photo, write_dataset
from training import task
from training.config import parse_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("predict_images")
    files = write_dataset(root, per_class=16)
    data = str(tmp_path_factory.mktemp("predict_data"))
    preprocess.run(
        [
            f"--image_dir={root}",
            f"--output_dir={data}",
            f"--backbone={tiny_backbone}",
            "--eval_fraction=0.2",
            "--test_fraction=0.2",
        ]
    )
    model_dir = tmp_path_factory.mktemp("predict_model")
    task.train(
        parse_config(
            [
                f"--data_dir={data}",
                f"--model_dir={model_dir}",
                "--epochs=60",
                "--learning_rate=0.01",
            ]
        )
    )
    return root, files, str(model_dir)


def _lines(pattern):
    out = []
    for path in glob.glob(pattern):
        out += [json.loads(x) for x in open(path) if x.strip()]
    return out


def test_predictions_match_the_savedmodel_and_errors_are_recorded(trained, tmp_path):
    root, files, model_dir = trained
    (root / "broken.jpg").write_bytes((root / files["rose"][0]).read_bytes()[:300])
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo(CLASS_COLOURS["rose"]))).save(buf, "WEBP")
    (root / "rose.webp").write_bytes(buf.getvalue())
    good = [(p, label) for label, paths in files.items() for p in paths[:6]]
    rows = ["image_uri,label"] + [f"{p},{label}" for p, label in good]
    rows += [
        "broken.jpg,rose",
        "missing.jpg,tulip",
        "rose.webp,rose",
        f"{files['tulip'][7]},lily",
        f"{files['daisy'][7]},",
    ]
    csv_path = root / "score.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    # the parent of export/<n>: the highest version is used
    assert (
        predict.main(
            [
                f"--model={model_dir}/export",
                f"--input_csv={csv_path}",
                f"--output_dir={out}",
                "--batch_size=4",
                "--format=csv",
            ]
        )
        == 0
    )

    predictions = {os.path.basename(p["uri"]): p for p in _lines(str(out / "predictions-*.jsonl"))}
    errors = {os.path.basename(e["uri"]): e for e in _lines(str(out / "errors-*.jsonl"))}
    assert len(predictions) == len(good) + 3 and len(errors) == 2
    assert errors["broken.jpg"]["category"] == "undecodable"
    assert errors["missing.jpg"]["category"] == "unreadable"
    assert predictions["rose.webp"]["true_label"] == "rose"  # WebP: trained on, so scored
    assert errors["broken.jpg"]["line"] == len(good) + 2

    # the job normalises each image as preprocessing stored it (JPEG, quality 95), then serves it
    serve = tf.saved_model.load(f"{model_dir}/export/1").signatures["serving_default"]
    names = sorted(predictions)
    stored = [images.reencode(open(predictions[n]["uri"], "rb").read()).jpeg for n in names]
    direct = serve(image_bytes=tf.constant(stored))
    assert [predictions[n]["label"] for n in names] == [
        c.decode() for c in direct["classes"].numpy()
    ]
    np.testing.assert_allclose(
        [predictions[n]["score"] for n in names], direct["scores"].numpy(), rtol=1e-5
    )
    assert len(predictions[names[0]]["top_k"]) == 3

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == len(rows) - 1 == summary["predictions"] + summary["errors"]
    assert summary["unknown_labels"] == {"lily": 1}
    # metrics over the labeled rows whose label the model knows, computed by hand
    labels = sorted(CLASS_COLOURS)
    matrix = np.zeros((3, 3), int)
    for p, label in [*good, ("rose.webp", "rose")]:
        matrix[labels.index(label), labels.index(predictions[os.path.basename(p)]["label"])] += 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["confusion_matrix"] == matrix.tolist()
    assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert (out / "confusion_matrix.png").stat().st_size > 0
    csv_lines = (out / "predictions.csv").read_text().splitlines()
    assert csv_lines[0] == "uri,label,score,top_k,true_label" and len(csv_lines) == len(good) + 4


def test_input_pattern_without_labels(trained, tmp_path):
    root, files, model_dir = trained
    out = tmp_path / "out"
    predict.run(
        [
            f"--model={model_dir}/export/1",
            f"--input_pattern={root}/daisy/*.jpg",
            f"--output_dir={out}",
        ]
    )
    predictions = _lines(str(out / "predictions-*.jsonl"))
    assert len(predictions) == len(files["daisy"])
    assert all("true_label" not in p for p in predictions)
    assert not (out / "metrics.json").exists()
    assert sum(p["label"] == "daisy" for p in predictions) >= 0.9 * len(predictions)


def test_one_undecodable_image_does_not_fail_its_batch(trained):
    root, files, model_dir = trained
    handler = scoring.ServingSignatureModelHandler(f"{model_dir}/export/1")
    model = handler.load_model()
    good = (root / files["rose"][0]).read_bytes()
    results = handler.run_inference([good, b"not an image", good], model)
    assert isinstance(results[1].inference, Exception)
    assert results[0].inference["label"] == results[2].inference["label"]


def test_summarize_by_hand():
    summary = prediction_report.summarize(
        5,
        {"unreadable": 1},
        [(("a", "a"), 2), (("a", "b"), 1), (("b", "b"), 1), (("z", "a"), 1)],
        ["a", "b"],
    )
    assert summary["images"] == 6 and summary["unknown_label_predictions"] == 1
    metrics = summary["metrics"]
    assert metrics["confusion_matrix"] == [[2, 1], [0, 1]]
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert metrics["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(1 / 2)


def test_misuse(capsys, tmp_path, trained):
    _, _, model_dir = trained
    assert (
        predict.main([f"--model={tmp_path}", "--input_pattern=x", f"--output_dir={tmp_path}/o"])
        == 2
    )
    assert "--model" in capsys.readouterr().err
    assert (
        predict.main(
            [
                f"--model={model_dir}/export",
                f"--input_pattern={tmp_path}/none*.jpg",
                f"--output_dir={tmp_path}/o",
            ]
        )
        == 2
    )
    assert "--input_pattern" in capsys.readouterr().err


def test_overwrite_replaces_only_the_predictions_and_never_an_input(trained, tmp_path, capsys):
    root, files, model_dir = trained
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "score.csv").write_text("".join(f"{root / p},daisy\n" for p in files["daisy"][:3]))
    (proj / "NOTES.txt").write_text("mine")
    model = f"--model={model_dir}/export"

    # an output dir that holds the input CSV, or the images a pattern reads, is refused
    assert predict.main([model, f"--input_csv={proj}/score.csv", f"--output_dir={proj}"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"holds the input {proj}/score.csv; choose another")
    )
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.jpg").write_bytes((root / files["rose"][0]).read_bytes())
    assert predict.main([model, f"--input_pattern={images}/*.jpg", f"--output_dir={images}"]) == 2
    assert "overlaps the input pattern" in capsys.readouterr().err
    assert sorted(os.listdir(proj)) == ["NOTES.txt", "score.csv"]
    assert os.listdir(images) == ["a.jpg"]

    out = proj / "out"
    out.mkdir()
    (out / "NOTES.txt").write_text("also mine")
    argv = [model, f"--input_csv={proj}/score.csv", f"--output_dir={out}"]
    assert predict.main(argv) == 0
    assert predict.main(argv) == 2  # predictions are there: not without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert predict.main([*argv, "--overwrite", "--format=csv"]) == 0
    assert (out / "NOTES.txt").read_text() == "also mine"
    assert (proj / "score.csv").exists() and (proj / "NOTES.txt").read_text() == "mine"
    assert sorted(n for n in os.listdir(out) if not n.startswith(".hubflow.lock")) == [
        "NOTES.txt",
        "confusion_matrix.png",
        "errors-00000-of-00001.jsonl",
        "metrics.json",
        "predictions-00000-of-00001.jsonl",
        "predictions.csv",
        "summary.json",
    ]


def test_an_export_without_its_variables_is_refused_in_one_line(trained, tmp_path, capsys):
    import shutil

    _, _, model_dir = trained
    broken = tmp_path / "export" / "1"
    shutil.copytree(f"{model_dir}/export/1", broken)
    shutil.rmtree(broken / "variables")
    argv = [f"--model={broken}", f"--input_pattern={tmp_path}/*", f"--output_dir={tmp_path}/o"]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"hubflow-predict: error: --model: {broken} is not a complete hubflow export "
        "(variables/variables.index missing)"
    )


def _odd_images(folder) -> list[str]:
    """One image per format, mode and EXIF orientation preprocessing accepts."""
    rng = np.random.default_rng(7)
    pixels = np.clip(
        np.array(CLASS_COLOURS["rose"])[None, None] + rng.normal(0, 40, (40, 56, 3)), 0, 255
    ).astype(np.uint8)
    pixels[:10, :20] = CLASS_COLOURS["tulip"]  # a corner that shows the orientation
    base = Image.fromarray(pixels, "RGB")
    variants = {
        "plain.jpg": (base, "JPEG", {}),
        "cmyk.jpg": (base.convert("CMYK"), "JPEG", {}),
        "palette.png": (base.convert("P"), "PNG", {}),
        "rgba.png": (base.convert("RGBA"), "PNG", {}),
        "gray16.png": (base.convert("L").convert("I;16"), "PNG", {}),
        "lossless.webp": (base, "WEBP", {"lossless": True}),
        "image.tiff": (base, "TIFF", {}),
        "image.gif": (base, "GIF", {}),
        "image.bmp": (base, "BMP", {}),
    }
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        variants[f"exif{orientation}.jpg"] = (base, "JPEG", {"exif": exif})
    folder.mkdir()
    for name, (image, fmt, kwargs) in variants.items():
        image.save(folder / name, fmt, **kwargs)
    return sorted(variants)


def test_predict_sends_the_model_what_preprocessing_stored_for_every_format(
    trained, tmp_path, tiny_backbone
):
    """Batch prediction accepts what training accepted and scores it as the stored image."""
    _, _, model_dir = trained
    names = _odd_images(tmp_path / "odd")
    csv_path = tmp_path / "odd.csv"
    csv_path.write_text("".join(f"odd/{name},rose\n" for name in names))
    stored_dir = tmp_path / "stored"
    preprocess.run(  # what training would have stored for these images
        [
            f"--input_csv={csv_path}",
            f"--output_dir={stored_dir}",
            f"--backbone={tiny_backbone}",
            "--eval_fraction=0",
            "--test_fraction=0",
        ]
    )
    stored = {}
    for path in glob.glob(str(stored_dir / "train-*.tfrecord")):
        for record in tf.data.TFRecordDataset(path):
            example = tf.train.Example.FromString(record.numpy()).features.feature
            source = example["image/source"].bytes_list.value[0].decode()
            stored[os.path.basename(source)] = example["image/encoded"].bytes_list.value[0]
    assert sorted(stored) == names  # preprocessing took every one (no duplicates among them)
    serve = tf.saved_model.load(f"{model_dir}/export/1").signatures["serving_default"]
    expected = serve(image_bytes=tf.constant([stored[n] for n in names]))

    out = tmp_path / "pred"
    assert predict.main([f"--model={model_dir}/export", f"--input_csv={csv_path}",
                         f"--output_dir={out}"]) == 0  # fmt: skip
    got = {os.path.basename(p["uri"]): p for p in _lines(str(out / "predictions-*.jsonl"))}
    assert sorted(got) == names and not _lines(str(out / "errors-*.jsonl"))
    assert [got[n]["label"] for n in names] == [c.decode() for c in expected["classes"].numpy()]
    np.testing.assert_allclose(
        [got[n]["score"] for n in names], expected["scores"].numpy(), rtol=1e-6, atol=1e-7
    )


@pytest.mark.slow
def test_dataflow_dry_run_of_predict_builds_offline_with_gs_paths(
    trained, no_gcs, capsys, tmp_path, monkeypatch
):
    _, _, model_dir = trained
    monkeypatch.chdir(tmp_path)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [
        f"--model={model_dir}",  # the trainer's model dir: its highest export/<n>
        "--input_csv=gs://my-bucket/score/*.csv",
        "--input_pattern=gs://my-bucket/photos/**.jpg",
        "--output_dir=gs://my-bucket/predictions",
        "--format=csv",
        "--runner=DataflowRunner",
        "--dry_run=True",
        "--project=my-project",
        "--region=us-central1",
        "--temp_location=gs://my-bucket/tmp",
        f"--setup_file={repo}/setup.py",
    ]
    assert predict.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("hubflow-predict: dry run on DataflowRunner: the job was built and ")
    steps = re.search(r"steps \(\d+\): (.*)", out).group(1).split(", ")
    assert {"ReadImages", "Predict", "WriteCsv", "WriteSummary"} <= set(steps)
    assert "  RunInference: Predict\n" in out
    assert re.search(r"stage: .*workflow\.tar\.gz \(hubflow-[\d.]+\.tar\.gz\)", out)
    staged = re.escape(f"--model {model_dir} ({model_dir}/export/1) would be staged for the ")
    assert re.search(
        staged + r"workers as gs://my-bucket/tmp/hubflow-staged/model-[0-9a-f]{64}", out
    )
    assert os.listdir(tmp_path) == []

    argv[0] = "--model=gs://my-bucket/model"  # cannot be read offline
    assert predict.main(argv) == 2
    assert capsys.readouterr().err.startswith("hubflow-predict: error: --model: a dry run reads")


def test_bfloat16_is_refused_in_one_line_where_the_cpu_lacks_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(inference, "cpu_supports_bfloat16", lambda: False)
    argv = [
        f"--model={tmp_path}",
        f"--input_pattern={tmp_path}/*.jpg",
        f"--output_dir={tmp_path}/o",
        "--precision=bfloat16",
    ]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hubflow-predict: error: --precision bfloat16: ")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(
    not inference.cpu_supports_bfloat16(), reason="this CPU has neither avx512_bf16 nor amx_bf16"
)
def test_bfloat16_predictions_run_in_bfloat16_and_keep_the_float32_labels(trained, tmp_path):
    root, files, model_dir = trained
    argv = [f"--model={model_dir}/export/1", f"--input_pattern={root}/*/*.jpg"]
    predict.run([*argv, f"--output_dir={tmp_path}/f32"])
    # The oneDNN option is process-wide, so bfloat16 runs in the CLI in a child process.
    subprocess.run(
        [sys.executable, "-m", "pipeline.predict", *argv, f"--output_dir={tmp_path}/bf16"]
        + ["--precision=bfloat16"],
        check=True,
        capture_output=True,
    )
    runs = {}
    for name in ("f32", "bf16"):
        summary = prediction_report.read_summary(str(tmp_path / name))
        runs[name] = {p["uri"]: p for p in _lines(str(tmp_path / name / "predictions-*.jsonl"))}
        assert summary["predictions"] == sum(len(v) for v in files.values())
        assert summary["precision"] == {"f32": "float32", "bf16": "bfloat16"}[name]
    f32, bf16 = runs["f32"], runs["bf16"]
    assert f32.keys() == bf16.keys()
    scores = np.array([[f32[u]["score"], bf16[u]["score"]] for u in f32])
    assert not np.array_equal(scores[:, 0], scores[:, 1]), "identical: bfloat16 did not run"
    assert np.abs(scores[:, 0] - scores[:, 1]).max() < 0.05
    # A label can only flip where float32 itself was nearly undecided.
    clear = [u for u in f32 if f32[u]["score"] >= 0.6]
    assert len(clear) >= len(f32) // 2
    assert all(f32[u]["label"] == bf16[u]["label"] for u in clear)
