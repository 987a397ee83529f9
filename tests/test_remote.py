"""Remote runners: the offline Dataflow dry run, and staging a local backbone for workers."""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from backbones import cache
from backbones.standin import save_standin_backbone
from pipeline import cli, dataset, preprocess, remote
from schemas import manifest as manifest_lib
from schemas.cli import UsageError
from storage import artifacts
from tests.conftest import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATAFLOW = [
    "--runner=DataflowRunner",
    "--dry_run=True",
    "--project=my-project",
    "--region=us-central1",
    "--temp_location=gs://my-bucket/tmp",
    f"--setup_file={REPO}/setup.py",
]
STAGED = re.compile(r"gs://my-bucket/tmp/hubflow-staged/backbone-[0-9a-f]{64}")


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    write_dataset(root, per_class=4)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "source", ["--input_csv=gs://my-bucket/csv/*.csv", "--image_dir=gs://my-bucket/images"]
)
def test_dataflow_dry_run_builds_and_translates_the_job_offline(
    source, tiny_backbone, no_gcs, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    argv = [source, "--output_dir=gs://my-bucket/out", f"--backbone={tiny_backbone}", *DATAFLOW]
    assert preprocess.main(argv) == 0
    assert time.monotonic() - start < 120
    out = capsys.readouterr().out
    assert out.startswith("hubflow-preprocess: dry run on DataflowRunner: the job was built and ")
    steps = re.search(r"steps \(\d+\): (.*)", out).group(1).split(", ")
    assert steps[0] == "ReadRows" and {"EncodeAndEmbed", "EmbeddingStatistics"} <= set(steps)
    assert steps[-1] == "WriteManifest"
    assert "  RunInference: EncodeAndEmbed/Embed\n" in out
    # the --setup_file sdist, built offline
    assert re.search(
        r"files the runner would stage: .*workflow\.tar\.gz \(hubflow-[\d.]+\.tar\.gz\)", out
    )
    assert re.search(
        rf"--backbone {tiny_backbone} would be staged for the workers as {STAGED.pattern}", out
    )
    assert "skipped in a dry run: the output dir's lock" in out
    assert os.listdir(tmp_path) == []  # no "gs:" folder, nothing written here


def test_direct_runner_dry_run_writes_nothing(images, tiny_backbone, tmp_path, capsys):
    out = tmp_path / "data"
    argv = [f"--image_dir={images}", f"--output_dir={out}", f"--backbone={tiny_backbone}"]
    assert preprocess.main([*argv, "--dry_run=True"]) == 0
    text = capsys.readouterr().out
    assert "dry run on DirectRunner" in text and "RunInference: EncodeAndEmbed/Embed" in text
    assert "would be staged" not in text  # the DirectRunner reads local files itself
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--temp_location=gs://b/tmp"], "--temp_location: Invalid GCS bucket (gs://b/tmp)"),
        (["--temp_location=/tmp/x"], "--temp_location: Invalid GCS path (/tmp/x)"),
        ([], "--temp_location is required on Dataflow"),
    ],
)
def test_dataflow_locations_are_checked_before_beam_goes_looking_for_a_bucket(
    flags, expected, tiny_backbone, no_gcs, capsys
):
    argv = [
        "--input_csv=gs://my-bucket/a.csv",
        "--output_dir=gs://my-bucket/out",
        f"--backbone={tiny_backbone}",
        "--runner=DataflowRunner",
        "--dry_run=True",
        "--project=my-project",
        *flags,
    ]
    assert preprocess.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hubflow-preprocess: error: {expected}") and "\n" not in err


def test_dry_run_refuses_what_it_cannot_read_offline(tiny_backbone, no_gcs, capsys):
    base = ["--output_dir=gs://my-bucket/out", *DATAFLOW]
    handle = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
    assert preprocess.main(["--input_csv=gs://my-bucket/a.csv", f"--backbone={handle}", *base]) == 2
    assert capsys.readouterr().err.startswith("hubflow-preprocess: error: --backbone: a dry run")
    argv = ["--input_csv=gs://my-bucket/a.csv", f"--backbone={tiny_backbone}"]
    assert preprocess.main([*argv, "--label_dict=gs://my-bucket/labels.txt", *base]) == 2
    assert capsys.readouterr().err.startswith("hubflow-preprocess: error: --label_dict: a dry run")


def test_a_real_run_is_never_a_dry_run(images, tiny_backbone, tmp_path):
    config, beam_args = preprocess.parse_config(
        [f"--image_dir={images}", f"--output_dir={tmp_path}/o", f"--backbone={tiny_backbone}"]
    )
    job = preprocess.resolve(config, preprocess.resolve_inputs(config))
    with pytest.raises(ValueError, match="dry_run"):
        cli.run_staged(job, preprocess.build_pipeline, ["--dry_run=True"], None, "m", list)


# --- staging local folders for remote workers ------------------------------------------------

FLINK = ["--runner=FlinkRunner"]


def test_a_local_folder_is_staged_once_by_content(tiny_backbone, tmp_path, monkeypatch):
    temp = str(tmp_path / "temp")
    args = [*FLINK, f"--temp_location={temp}"]
    kw = dict(kind="backbone", flag="--backbone", value="mine", dry_run=False)
    staged, note = remote.for_workers(tiny_backbone, args, **kw)
    assert staged.startswith(f"{temp}/hubflow-staged/backbone-") and "staged as" in note
    assert artifacts.tree_digest(staged) == artifacts.tree_digest(tiny_backbone)
    assert os.path.exists(os.path.join(staged, artifacts.COMPLETE_MARKER))

    copies = []
    monkeypatch.setattr(artifacts.tf.io.gfile, "copy", lambda *a, **k: copies.append(a))
    assert remote.for_workers(tiny_backbone, args, **kw)[0] == staged
    assert copies == []  # reused: identical content, marker present


def test_a_changed_or_half_staged_folder_is_copied_again(tiny_backbone, tmp_path):
    mine = str(tmp_path / "mine")
    shutil.copytree(tiny_backbone, mine)
    temp = str(tmp_path / "temp")
    first, _ = artifacts.stage(mine, temp, "backbone")
    with open(os.path.join(mine, "README"), "w") as f:
        f.write("changed\n")
    second, copied = artifacts.stage(mine, temp, "backbone")
    assert second != first and copied
    os.remove(os.path.join(second, artifacts.COMPLETE_MARKER))  # a copy killed half-way
    os.remove(os.path.join(second, "README"))
    again, copied = artifacts.stage(mine, temp, "backbone")
    assert again == second and copied
    assert open(os.path.join(again, "README")).read() == "changed\n"


def test_staging_needs_a_temp_location_and_not_on_local_runners(tiny_backbone):
    kw = dict(kind="backbone", flag="--backbone", value="x", dry_run=False)
    with pytest.raises(UsageError, match="^--temp_location is required: --backbone"):
        remote.for_workers(tiny_backbone, FLINK, **kw)
    for args in ([], ["--runner=DirectRunner"], ["--runner=PrismRunner"]):
        assert remote.for_workers(tiny_backbone, [*args, "--temp_location=/x"], **kw) == (
            tiny_backbone,
            None,
        )
    assert remote.for_workers("gs://my-bucket/model", FLINK, **kw) == ("gs://my-bucket/model", None)


@pytest.mark.slow
def test_workers_load_the_staged_builtin_and_the_manifest_keeps_its_name(
    images, tmp_path, monkeypatch
):
    """A built-in backbone is built once by the launcher and staged; the workers load the
    staged copy (they could not build it: their cache is empty and building fails)."""
    standin = save_standin_backbone(str(tmp_path / "standin"), 224, 16)
    monkeypatch.setenv("HUBFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "build_builtin", lambda name, path: shutil.copytree(standin, path))
    temp = str(tmp_path / "fake-gcs-temp")
    out = str(tmp_path / "data")
    config, _ = preprocess.parse_config(
        [f"--image_dir={images}", f"--output_dir={out}", "--backbone=efficientnet_lite0"]
    )
    args = [*FLINK, f"--temp_location={temp}"]
    job = preprocess.resolve(config, preprocess.resolve_inputs(config), args)
    assert job.backbone.handle == "hubflow-builtin://efficientnet_lite0"
    assert job.worker_backbone.handle.startswith(f"{temp}/hubflow-staged/backbone-")
    assert job.notes and "--backbone efficientnet_lite0" in job.notes[0]

    shutil.rmtree(tmp_path / "cache")  # a worker's empty cache
    monkeypatch.setattr(cache, "build_builtin", lambda name, path: 1 / 0)
    cli.run_staged(
        job,
        preprocess.build_pipeline,
        [],
        TestPipeline(),
        manifest_lib.MANIFEST_FILE,
        dataset.output_names,
    )
    manifest = manifest_lib.read_manifest(out)
    assert manifest.backbone.handle == "hubflow-builtin://efficientnet_lite0"
    assert manifest.rows.written > 0


@pytest.mark.slow
def test_with_a_container_image_the_builtin_backbone_is_not_staged(
    tmp_path, no_gcs, capsys, caplog, monkeypatch
):
    standin = save_standin_backbone(str(tmp_path / "standin"), 224, 16)
    monkeypatch.setenv("HUBFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "build_builtin", lambda name, path: shutil.copytree(standin, path))
    image = "us-central1-docker.pkg.dev/my-project/hubflow/hubflow:0.1.0-beam2.77.0"
    argv = ["--input_csv=gs://my-bucket/a.csv", "--output_dir=gs://my-bucket/out", *DATAFLOW]
    argv.append("--backbone=efficientnet_lite0")  # a built-in of the standin's input size
    assert preprocess.main([*argv, f"--sdk_container_image={image}"]) == 0
    out = capsys.readouterr().out
    assert not [line for line in out.splitlines() if "--backbone" in line and "staged for" in line]
    # the TFLite conversion is not in the image: that one is staged
    assert re.search(r"--inference_runtime auto \(.*\) would be staged for the workers", out)
    assert (
        f"--backbone efficientnet_lite0: not staged; the workers load it from the cache of {image}"
        in out
    )
    old = image.replace("0.1.0-beam", "0.0.9-beam")  # built from another hubflow
    assert preprocess.main([*argv, f"--sdk_container_image={old}"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("holds hubflow 0.0.9 (from its tag), but this launcher runs" in m for m in warned)
    assert preprocess.main(argv) == 0  # no image: the launcher's build is staged
    assert re.search(
        f"--backbone efficientnet_lite0 (.*) would be staged .* as {STAGED.pattern}",
        capsys.readouterr().out,
    )
