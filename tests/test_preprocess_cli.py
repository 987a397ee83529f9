"""CLI misuse stops before the pipeline starts, with one line naming the flag."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import preprocess
from tests.conftest import write_dataset


@pytest.fixture
def csv_file(tmp_path):
    write_dataset(tmp_path, per_class=1)
    path = tmp_path / "labels.csv"
    path.write_text("daisy/daisy_0.jpg,daisy\n")
    return path


def _error_line(capsys, argv) -> str:
    assert preprocess.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("hubflow-preprocess: error: ")
    return err[0]


def test_missing_output_dir(capsys, csv_file, tiny_backbone):
    line = _error_line(capsys, [f"--input_csv={csv_file}", f"--backbone={tiny_backbone}"])
    assert "--output_dir" in line


def test_unreadable_csv(capsys, tmp_path, tiny_backbone):
    line = _error_line(
        capsys,
        [
            f"--input_csv={tmp_path}/nope*.csv",
            f"--output_dir={tmp_path}/o",
            f"--backbone={tiny_backbone}",
        ],
    )
    assert "--input_csv" in line


def test_unknown_preset(capsys, csv_file, tmp_path):
    line = _error_line(
        capsys, [f"--input_csv={csv_file}", f"--output_dir={tmp_path}/o", "--backbone=resnet_9000"]
    )
    assert "--backbone" in line and "mobilenet_v2_100_224" in line


def test_backbone_that_does_not_load(capsys, csv_file, tmp_path):
    line = _error_line(
        capsys,
        [
            f"--input_csv={csv_file}",
            f"--output_dir={tmp_path}/o",
            f"--backbone={tmp_path}/no_model",
        ],
    )
    assert "--backbone" in line and "cannot load" in line


def test_backbone_offline_hub_url_is_reported(capsys, csv_file, tmp_path, monkeypatch):
    # No network here (and none in CI): a Hub URL must fail as a one-line flag error.
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub_cache"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # make sure nothing is fetched
    line = _error_line(
        capsys,
        [
            f"--input_csv={csv_file}",
            f"--output_dir={tmp_path}/o",
            "--backbone=mobilenet_v2_100_224",
        ],
    )
    assert "--backbone" in line


def test_both_inputs_or_none(capsys, csv_file, tmp_path, tiny_backbone):
    line = _error_line(capsys, [f"--output_dir={tmp_path}/o", f"--backbone={tiny_backbone}"])
    assert "--input_csv" in line and "--image_dir" in line


def test_bad_fraction_and_int(capsys, csv_file, tmp_path, tiny_backbone):
    base = [f"--input_csv={csv_file}", f"--output_dir={tmp_path}/o", f"--backbone={tiny_backbone}"]
    assert "--eval_fraction" in _error_line(capsys, base + ["--eval_fraction=1.5"])
    assert "--batch_size" in _error_line(capsys, base + ["--batch_size=zero"])
    assert "--test_fraction" in _error_line(
        capsys, base + ["--eval_fraction=0.5", "--test_fraction=0.5"]
    )


def test_misspelled_flag_is_not_passed_silently_to_beam(capsys, csv_file, tmp_path, tiny_backbone):
    base = [f"--input_csv={csv_file}", f"--output_dir={tmp_path}/o", f"--backbone={tiny_backbone}"]
    assert "--batchsize" in _error_line(capsys, base + ["--batchsize=8"])


def test_existing_output_needs_overwrite(capsys, csv_file, tmp_path, tiny_backbone):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    base = [f"--input_csv={csv_file}", f"--output_dir={out}", f"--backbone={tiny_backbone}"]
    assert "--overwrite" in _error_line(capsys, base)


def test_console_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.preprocess", "--backbone=x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "hubflow-preprocess: error: --output_dir is required"
    )
