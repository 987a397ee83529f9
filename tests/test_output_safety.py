"""No run loses or corrupts an output dir: locks, staged publishing, what --overwrite deletes,
and what the manifest records (issue 11, items 1, 2, 4, 6 and the pipeline's part of 12)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import tensorflow as tf

from pipeline import cli, options, preprocess
from schemas import manifest as manifest_lib
from schemas.cli import UsageError
from storage import locks, staging
from tests.conftest import write_dataset

HOLD_LOCK = (
    "import sys, time\n"
    "from storage.locks import DirLock\n"
    "with DirLock(sys.argv[1], 'hubflow-preprocess', '--output_dir'):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(120)\n"
)


def _hold_lock_in_subprocess(directory) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


# ---------------------------------------------------------------------------------------------
# Locks


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_holder_frees_it(tmp_path):
    holder = _hold_lock_in_subprocess(tmp_path)
    try:
        with pytest.raises(UsageError) as e:
            with locks.DirLock(str(tmp_path), "hubflow-train", "--model_dir"):
                pass
        message = str(e.value)
        assert message.startswith(f"--model_dir: {tmp_path} is in use by hubflow-preprocess")
        assert f"pid {holder.pid}" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with locks.DirLock(str(tmp_path), "hubflow-train", "--model_dir"):  # the OS released it
        assert json.loads((tmp_path / locks.OWNER_FILE).read_text())["prog"] == "hubflow-train"
    assert not (tmp_path / locks.OWNER_FILE).exists()


def test_the_same_process_cannot_take_a_dir_twice(tmp_path):
    with locks.DirLock(str(tmp_path), "a", "--output_dir"):
        with pytest.raises(UsageError, match="in use by this process"):
            with locks.DirLock(str(tmp_path / "."), "b", "--output_dir"):
                pass
    with locks.DirLock(str(tmp_path), "c", "--output_dir"):
        pass


def test_an_output_dir_that_is_a_file_is_a_usage_error(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a dir")
    with pytest.raises(UsageError, match=r"^--output_dir: .* is a file, not a directory$"):
        with locks.DirLock(str(path), "p", "--output_dir"):
            pass


class FakeGcs:
    """Lock objects with GCS's semantics: create only if absent, delete by generation."""

    def __init__(self):
        self.objects: dict[str, tuple[str, int]] = {}
        self.generation = 0

    def create(self, path, text):
        if path in self.objects:
            return None
        self.generation += 1
        self.objects[path] = (text, self.generation)
        return self.generation

    def read(self, path):
        return self.objects.get(path, (None, None))

    def delete(self, path, token):
        if path in self.objects and self.objects[path][1] == token:
            del self.objects[path]


def test_remote_lock_refuses_a_live_holder_breaks_a_dead_one_and_honours_break_lock():
    gcs = FakeGcs()
    url = "gs://bucket/out"
    with locks.DirLock(url, "hubflow-preprocess", "--output_dir", backend=gcs):
        assert list(gcs.objects) == [f"{url}/{locks.LOCK_FILE}"]
    assert gcs.objects == {}  # released: deleted

    def left_by(pid, host):
        owner = locks.Owner("hubflow-predict", pid, host, "u", "2026-01-01T00:00:00+00:00")
        gcs.create(f"{url}/{locks.LOCK_FILE}", owner.to_json())

    left_by(os.getppid(), locks.socket.gethostname())  # a live run on this host
    with pytest.raises(UsageError, match="in use by hubflow-predict.*--break_lock"):
        with locks.DirLock(url, "hubflow-predict", "--output_dir", backend=gcs):
            pass
    gcs.objects.clear()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left_by(dead.pid, locks.socket.gethostname())  # killed on this host: stale
    with locks.DirLock(url, "hubflow-predict", "--output_dir", backend=gcs):
        pass
    left_by(12345, "another-host")  # cannot tell: refused unless --break_lock
    with pytest.raises(UsageError, match="pid 12345 on another-host"):
        with locks.DirLock(url, "hubflow-predict", "--output_dir", backend=gcs):
            pass
    with locks.DirLock(url, "hubflow-predict", "--output_dir", break_lock=True, backend=gcs):
        assert json.loads(gcs.read(f"{url}/{locks.LOCK_FILE}")[0])["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------------
# Staged publishing


def _write(path: str, text: str) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    with tf.io.gfile.GFile(path) as f:
        return f.read()


@pytest.mark.parametrize("root", ["local", "ram://hubflow-test/out"])
def test_publish_replaces_only_the_layout_and_moves_the_marker_last(tmp_path, root):
    out = str(tmp_path / "out") if root == "local" else root
    for name, text in (("manifest.json", "old"), ("a-0.gz", "old"), ("NOTES.txt", "mine")):
        _write(f"{out}/{name}", text)
    work = staging.reset(out)
    for name in ("manifest.json", "b-0.gz", "dir/x", "beam-temp-1/t"):
        _write(f"{work}/{name}", "new")
    staging.publish(
        out,
        ["manifest.json", "b-0.gz", "dir"],
        [f"{out}/manifest.json", f"{out}/a-0.gz"],
        "manifest.json",
    )
    names = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(out))
    assert names == ["NOTES.txt", "b-0.gz", "dir", "manifest.json"]  # a-0.gz and staging gone
    assert _read(f"{out}/manifest.json") == "new" and _read(f"{out}/dir/x") == "new"
    assert _read(f"{out}/NOTES.txt") == "mine"
    with pytest.raises(RuntimeError, match="did not complete"):
        staging.reset(out)
        staging.publish(out, ["b-0.gz"], [], "manifest.json")
    assert _read(f"{out}/manifest.json") == "new"  # an incomplete run publishes nothing


# ---------------------------------------------------------------------------------------------
# The preprocess job


@pytest.fixture
def images(tmp_path):
    write_dataset(tmp_path / "images", per_class=6)
    return tmp_path / "images"


def _preprocess(images, out, backbone, *flags) -> int:
    return preprocess.main(
        [f"--image_dir={images}", f"--output_dir={out}", f"--backbone={backbone}", *flags]
    )


@pytest.mark.slow
def test_failed_overwrite_keeps_the_previous_dataset_and_a_good_one_replaces_it(
    tmp_path, images, tiny_backbone, monkeypatch, capsys
):
    out = tmp_path / "data"
    assert _preprocess(images, out, tiny_backbone) == 0
    (out / "NOTES.txt").write_text("mine")
    before = {p: (out / p).read_bytes() for p in os.listdir(out) if p.endswith(".tfrecord")}
    manifest = manifest_lib.read_manifest(str(out))

    def crash(build, beam_args, test_pipeline=None):
        (out / staging.STAGING_DIR / "train-00000-of-00001.tfrecord").write_bytes(b"half")
        raise RuntimeError("worker lost")

    monkeypatch.setattr(cli, "run_pipeline", crash)
    with pytest.raises(RuntimeError, match="worker lost"):
        _preprocess(images, out, tiny_backbone, "--overwrite")
    assert manifest_lib.read_manifest(str(out)) == manifest  # still the complete old dataset
    assert {p: (out / p).read_bytes() for p in before} == before
    monkeypatch.undo()

    (out / "beam-temp-errors-0123abcd").mkdir()  # left by an older run's writer
    (out / "beam-temp-errors-0123abcd" / "part").write_text("x")
    assert _preprocess(images, out, tiny_backbone, "--overwrite") == 0
    assert (out / "NOTES.txt").read_text() == "mine"
    assert not (out / staging.STAGING_DIR).exists()
    assert not [p for p in os.listdir(out) if p.startswith("beam-temp")]
    assert manifest_lib.read_manifest(str(out)).rows == manifest.rows


@pytest.mark.slow
def test_a_second_run_on_a_locked_output_dir_is_refused_in_one_line(
    tmp_path, images, tiny_backbone
):
    out = tmp_path / "data"
    holder = _hold_lock_in_subprocess(out)
    try:
        result = subprocess.run(
            ["hubflow-preprocess", f"--image_dir={images}", f"--output_dir={out}",
             f"--backbone={tiny_backbone}"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"hubflow-preprocess: error: --output_dir: {out} is in use by hubflow-preprocess (pid "
        )
    )
    assert "Traceback" not in result.stderr
    assert not (out / manifest_lib.MANIFEST_FILE).exists()


def test_output_dir_holding_an_input_is_refused(tmp_path, images):
    csv = tmp_path / "labels.csv"
    csv.write_text("a.jpg,x\n")
    with pytest.raises(UsageError, match="holds the input"):
        options.check_inputs_outside(str(tmp_path), input_files=[str(csv)])
    with pytest.raises(UsageError, match="overlaps the input folder"):
        options.check_inputs_outside(str(images / "out"), input_dirs=[str(images)])
    with pytest.raises(UsageError, match="overlaps the input pattern"):
        options.check_inputs_outside(str(images), input_patterns=[f"{images}/daisy/*.jpg"])
    options.check_inputs_outside(str(tmp_path / "out"), [str(csv)], [str(images)], [f"{images}/*"])
    options.check_inputs_outside(str(images / "pred"), input_patterns=[f"{images}/*.jpg"])
    with pytest.raises(UsageError, match="overlaps the input pattern"):
        options.check_inputs_outside(str(images / "pred"), input_patterns=[f"{images}/**"])


def test_manifest_options_never_record_a_credential():
    config, beam_args = preprocess.parse_config(
        [
            "--input_csv=x.csv",
            "--output_dir=/tmp/o",
            "--runner=DirectRunner",
            "--s3_secret_access_key=SECRET",
            "--direct_num_workers",
            "2",
            "--s3_access_key_id",
            "KEY",
        ]
    )
    recorded = json.dumps(config.options)
    assert "SECRET" not in recorded and "KEY" not in recorded
    assert config.options["beam_args"] == ["--runner=DirectRunner", "--direct_num_workers", "2"]
    assert config.options["beam_args_withheld"] == ["--s3_access_key_id", "--s3_secret_access_key"]
    assert "--s3_secret_access_key=SECRET" in beam_args  # still passed to Beam


@pytest.mark.slow
def test_output_dir_that_is_a_file_or_not_writable_is_one_line(tmp_path, images, monkeypatch):
    a_file = tmp_path / "out.txt"
    a_file.write_text("mine")
    result = subprocess.run(
        ["hubflow-preprocess", f"--image_dir={images}", f"--output_dir={a_file}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"hubflow-preprocess: error: --output_dir: {a_file} is a file, not a directory"
    )
    assert a_file.read_text() == "mine"

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(  # tests run as root, for whom chmod 555 changes nothing
        locks.os, "access", lambda p, m: False if str(p) == str(read_only) else real_access(p, m)
    )
    assert preprocess.main([f"--image_dir={images}", f"--output_dir={read_only}"]) == 2
    assert os.listdir(read_only) == []


@pytest.mark.slow
def test_a_run_that_writes_no_manifest_fails_and_only_a_dry_run_may(
    tmp_path, images, tiny_backbone, monkeypatch, capsys
):
    out = tmp_path / "data"
    assert _preprocess(images, out, tiny_backbone) == 0
    manifest = manifest_lib.read_manifest(str(out))
    capsys.readouterr()
    monkeypatch.setattr(cli, "run_pipeline", lambda build, beam_args, p=None: None)
    assert _preprocess(images, out, tiny_backbone, "--overwrite") == 1  # the runner wrote nothing
    assert capsys.readouterr().err.strip() == (
        f"hubflow-preprocess: error: the job wrote no manifest.json; {out} was left as it was "
        "(see the runner's log)"
    )
    assert manifest_lib.read_manifest(str(out)) == manifest  # not the old summary as if new
    assert _preprocess(images, out, tiny_backbone, "--overwrite", "--dry_run=True") == 0
    assert "dry run" in capsys.readouterr().out
    assert manifest_lib.read_manifest(str(out)) == manifest


def test_a_publish_killed_half_way_is_finished_by_the_next_run(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    old = {"manifest.json": "old", "a-0.gz": "old", "labels.txt": "old"}
    new = {"manifest.json": "new", "b-0.gz": "new", "b-1.gz": "new", "labels.txt": "new"}
    for name, text in old.items():
        _write(f"{out}/{name}", text)
    work = staging.reset(out)
    for name, text in new.items():
        _write(f"{work}/{name}", text)

    def layout(directory):
        return [n for n in tf.io.gfile.listdir(directory) if n.endswith((".gz", ".json", ".txt"))]

    real_move, moves = staging.move, []

    def killed_after_one_move(source, target):
        if moves:
            raise KeyboardInterrupt("SIGKILL")  # the process dies here
        moves.append(source)
        real_move(source, target)

    monkeypatch.setattr(staging, "move", killed_after_one_move)
    with pytest.raises(KeyboardInterrupt):
        staging.publish(out, list(new), [f"{out}/{n}" for n in old], "manifest.json")
    monkeypatch.undo()
    assert not os.path.exists(f"{out}/manifest.json")  # the moment a kill can expose

    def existing(directory):
        return [f"{directory}/{n}" for n in layout(directory)]

    assert staging.recover(out, "manifest.json", existing)
    assert {n: _read(f"{out}/{n}") for n in layout(out)} == new  # the new set, whole
    assert not os.path.exists(work)
    assert not staging.recover(out, "manifest.json", existing)  # nothing left to do


@pytest.mark.slow
def test_max_file_bytes_flag_rejects_bigger_files_unread(tmp_path, images, tiny_backbone, capsys):
    sizes = sorted(p.stat().st_size for p in images.rglob("*.jpg"))
    cap = sizes[len(sizes) // 2]  # about half the images are bigger than this
    out = tmp_path / "data"
    assert _preprocess(images, out, tiny_backbone, f"--max_file_bytes={cap}") == 0
    manifest = manifest_lib.read_manifest(str(out))
    bigger = sum(size > cap for size in sizes)
    assert manifest.rejected_by_reason == {"too_large": bigger} and bigger > 0
    assert manifest.rows.written == len(sizes) - bigger
    assert manifest.options["max_file_bytes"] == cap
    assert _preprocess(images, tmp_path / "x", tiny_backbone, "--max_file_bytes=0") == 2
    assert "--max_file_bytes must be positive" in capsys.readouterr().err


def test_leftovers_without_a_manifest_are_called_incomplete(tmp_path, images, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "train-00000-of-00001.tfrecord.gz").write_bytes(b"left by an old version")
    assert preprocess.main([f"--image_dir={images}", f"--output_dir={out}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"hubflow-preprocess: error: --output_dir: {out} already holds an incomplete dataset "
        "(no manifest.json) (1 files); pass --overwrite to replace it or choose another directory"
    )
