"""Chaos: SIGKILL the three CLIs at many points; their output dirs stay honest (issue 11, Proof).

Each job runs as a subprocess in a session of its own and is killed, with its whole process group
(Beam's workers and TensorFlow's threads die with it), when a file or folder first appears (the
phases of a run: shards in ``.hubflow-staging/``, the staged manifest, publishing, checkpoints,
the export) or after a delay drawn from a seeded schedule (a share of an undisturbed run's
duration). Triggers are polled every few milliseconds, so each test hits the same phases every
time rather than by luck. The jobs are then rerun, with and without ``--overwrite``, and these
invariants are checked after every kill and every rerun:

1. no ``manifest.json`` / ``summary.json`` unless the outputs match it (records per split and
   label, ``labels.txt``, error records, prediction lines);
2. no ``export/<n>`` unless complete (``saved_model.pb``, ``variables/variables.index``,
   ``assets.extra/labels.txt``) and it loads and serves a JPEG;
3. the previous complete output intact (byte for byte) after a killed ``--overwrite`` run;
4. the final counts equal an undisturbed run's.

A killed dir must also stay usable: a rerun without ``--overwrite`` either completes (nothing
was published) or is refused with exit 2 and one line (an output is there), never a traceback;
a completed run leaves no staging folder behind.

Publishing itself (old marker deleted first, new marker moved in last) takes milliseconds
locally; the two ``..._while_publishing_...`` tests kill inside it every time by running the
same entry point with storage slowed to an object store's pace while it publishes
(``SLOW_PUBLISH``), then rerun the real CLI.

The schedule's seed is ``HUBFLOW_CHAOS_SEED`` (default below); every failure message names it,
with the kill point and the time of the kill.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tensorflow as tf

from tests.conftest import write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SEED = int(os.environ.get("HUBFLOW_CHAOS_SEED", "1107"))
POLL_S = 0.005  # how often a trigger is checked; a stat or a glob, nothing more
RUN_LIMIT_S = 240  # one CLI run; far above an undisturbed run's 5-15 s
SPLITS = ("train", "eval", "test")
STAGING = ".hubflow-staging"
PREVIOUS = ".hubflow-previous"  # where hubflow-train --overwrite keeps the old model
PREVIOUS_MARKER = ".complete"
LOCK_FILES = (".hubflow.lock", ".hubflow.lock.json")
PER_CLASS = 12  # 36 images
TRAIN_FLAGS = ("--epochs=12", "--batch_size=8", "--patience=50")  # no early stop: 12 epochs

# What each job writes into its output dir (README, "Safety").
DATASET_LAYOUT = (
    "manifest.json",
    "labels.txt",
    "train-*.tfrecord",
    "eval-*.tfrecord",
    "test-*.tfrecord",
    "errors-*.jsonl",
    "transform_fn",
    "transformed_metadata",
)
PREDICTIONS_LAYOUT = (
    "predictions-*.jsonl",
    "errors-*.jsonl",
    "predictions.csv",
    "summary.json",
    "metrics.json",
    "confusion_matrix.png",
)
MODEL_LAYOUT = (
    "config.json",
    "history.json",
    "labels.txt",
    "metrics.json",
    "confusion_matrix.png",
    "training_curves.png",
    "checkpoints",
    "logs",
    "export",
)

NONE, PARTIAL, COMPLETE = "nothing published", "outputs without their marker", "complete"

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def _cli(name: str, module: str) -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), name)
    return [script] if os.path.exists(script) else [sys.executable, "-m", module]


# The same entry point, on storage as slow as an object store's: while ``storage.staging``
# publishes, each rename and delete takes SLOW_IO_S (a gs:// move is a server-side copy and a
# delete per object). Locally a publish takes a few milliseconds, too short to kill inside it
# every time; so slowed, a kill polled every POLL_S lands inside it on every run.
SLOW_IO_S = 0.05
SLOW_PUBLISH = """
import sys, time
import schemas  # pins Keras 2 before TensorFlow loads, as every hubflow entry point does
import tensorflow as tf
from storage import staging
publishing = False
def slowed(call):
    def slow(*args, **kwargs):
        if publishing:
            time.sleep(float(sys.argv[2]))
        return call(*args, **kwargs)
    return slow
for name in ("rename", "remove", "rmtree"):
    setattr(tf.io.gfile, name, slowed(getattr(tf.io.gfile, name)))
publish = staging.publish
def slow_publish(*args, **kwargs):
    global publishing
    publishing = True
    try:
        return publish(*args, **kwargs)
    finally:
        publishing = False
staging.publish = slow_publish
main = __import__(sys.argv[1], fromlist=["main"]).main
sys.exit(main(sys.argv[3:]))
"""


def _slow_publish(module: str) -> list[str]:
    return [sys.executable, "-c", SLOW_PUBLISH, module, str(SLOW_IO_S)]


PREPROCESS = _cli("hubflow-preprocess", "pipeline.preprocess")
TRAIN = _cli("hubflow-train", "training.task")
PREDICT = _cli("hubflow-predict", "pipeline.predict")
PREPROCESS_SLOW_PUBLISH = _slow_publish("pipeline.preprocess")
PREDICT_SLOW_PUBLISH = _slow_publish("pipeline.predict")


# ---------------------------------------------------------------------------------------------
# Running and killing


@dataclasses.dataclass(frozen=True)
class Kill:
    """When to SIGKILL a run: ``fire(started, elapsed)`` turns true (checked every POLL_S);
    ``started`` is the run's start (``time.time()``), ``elapsed`` its seconds since."""

    phase: str
    fire: Callable[[float, float], bool]
    timed: bool = False  # a timed kill may come after the run ended; a file trigger may not


def when(
    phase: str,
    *patterns: str | Path,
    new: tuple[str | Path, ...] = (),
    gone: str | Path | None = None,
) -> Kill:
    """Fires when every glob in ``patterns`` matches, every glob in ``new`` matches a path
    written by this run (a killed run's leftovers do not count), and ``gone`` does not exist."""

    def written_since(pattern, started: float) -> bool:
        for path in glob.glob(str(pattern)):
            try:
                if os.stat(path).st_mtime >= started - 0.05:
                    return True
            except FileNotFoundError:
                pass
        return False

    def fire(started: float, _: float) -> bool:
        if gone is not None and os.path.lexists(gone):
            return False
        return all(glob.glob(str(p)) for p in patterns) and all(
            written_since(p, started) for p in new
        )

    return Kill(phase, fire)


def after(seconds: float) -> Kill:
    return Kill(f"timed kill after {seconds:.2f}s (seed {SEED})", lambda _, t: t >= seconds, True)


@dataclasses.dataclass
class Outcome:
    phase: str
    killed: bool
    seconds: float
    returncode: int | None
    log: Path

    def where(self) -> str:
        what = f"killed at {self.seconds:.2f}s" if self.killed else f"exited {self.returncode}"
        return f"[seed {SEED}; kill point: {self.phase}; {what}; log {self.log}]"

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _group_gone(pgid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process group {pgid} survived SIGKILL")


_RUNS = itertools.count(1)


def run_and_kill(cmd: list[str], kill: Kill, log: Path) -> Outcome:
    """Runs ``cmd`` in a new session and SIGKILLs its process group when ``kill`` fires."""
    log = log.with_name(f"{log.stem}-{next(_RUNS):02d}.log")
    wall_start = time.time()
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - started
                if kill.fire(wall_start, elapsed):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
                    _group_gone(proc.pid)
                    outcome = Outcome(kill.phase, proc.returncode < 0, elapsed, None, log)
                    if not outcome.killed:  # it had exited just before
                        outcome.returncode = proc.returncode
                        assert proc.returncode == 0, f"{outcome.where()}\n{outcome.tail()}"
                    JOURNAL.append(outcome.where())
                    return outcome
                if elapsed > RUN_LIMIT_S:
                    raise AssertionError(f"{cmd[0]} ran past {RUN_LIMIT_S}s; log {log}")
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    outcome = Outcome(kill.phase, False, time.monotonic() - started, proc.returncode, log)
    JOURNAL.append(outcome.where())
    assert kill.timed, f"the run ended before its kill point {outcome.where()}\n{outcome.tail()}"
    assert proc.returncode == 0, f"{outcome.where()}\n{outcome.tail()}"
    return outcome


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=ENV, timeout=RUN_LIMIT_S, start_new_session=True
    )
    flags = " ".join(a for a in cmd if a.startswith("--"))
    JOURNAL.append(f"[run {flags} -> exit {result.returncode}]")
    return result


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"[seed {SEED}] {result.args}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr


def assert_refused_in_one_line(result: subprocess.CompletedProcess, prog: str) -> None:
    """Exit 2, one ``prog: error: --output_dir …`` line that says how to go on, no traceback."""
    context = f"[seed {SEED}] {result.args}\n{result.stderr[-4000:]}"
    assert result.returncode == 2, context
    assert "Traceback" not in result.stderr, context
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, context
    assert errors[0] == result.stderr.strip().splitlines()[-1], context
    assert errors[0].startswith(f"{prog}: error: --output_dir: ") and "--overwrite" in errors[0]


JOURNAL: list[str] = []


@pytest.fixture(autouse=True)
def _journal():
    """Prints every kill and rerun of the test (shown by pytest on failure)."""
    JOURNAL.clear()
    yield
    print("\n".join(JOURNAL))


# ---------------------------------------------------------------------------------------------
# Looking at a dir


def layout_paths(directory: Path, layout: tuple[str, ...]) -> list[Path]:
    found = set()
    for pattern in layout:
        found.update(Path(p) for p in glob.glob(str(directory / pattern)))
    return sorted(found)


def digest_tree(paths: list[Path], root: Path) -> dict[str, str]:
    """sha256 of every file under ``paths``, by path relative to ``root``."""
    digests = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            digests[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


def copy_output(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*LOCK_FILES))


def _labels(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def _records(directory: Path, split: str) -> list[tuple[str, str, int]]:
    """(sha256, label text, label index) of every record of a split's shards."""
    files = sorted(glob.glob(str(directory / f"{split}-*.tfrecord")))
    rows = []
    if files:
        for raw in tf.data.TFRecordDataset(files):
            feature = tf.train.Example.FromString(raw.numpy()).features.feature
            rows.append(
                (
                    feature["image/sha256"].bytes_list.value[0].decode(),
                    feature["label/text"].bytes_list.value[0].decode("utf-8"),
                    int(feature["label"].int64_list.value[0]),
                )
            )
    return rows


def _lines(directory: Path, pattern: str) -> list[str]:
    lines = []
    for path in sorted(glob.glob(str(directory / pattern))):
        lines += [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    return lines


def dataset_state(out: Path, where: str) -> str:
    """Invariant 1 for a preprocess dir: a manifest only over shards that match it."""
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        return PARTIAL if layout_paths(out, DATASET_LAYOUT) else NONE
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    labels = manifest["labels"]
    assert (out / "labels.txt").exists(), f"manifest without labels.txt {where}"
    assert _labels(out / "labels.txt") == labels, f"labels.txt differs from the manifest {where}"
    for split in SPLITS:
        rows = _records(out, split)
        expected = manifest["splits"][split]
        assert len(rows) == expected["count"], (
            f"{split}: {len(rows)} records in the shards, manifest says {expected['count']} {where}"
        )
        per_label = collections.Counter(text for _, text, _ in rows)
        assert per_label == collections.Counter(
            {k: v for k, v in expected["labels"].items() if v}
        ), f"{split}: per-label counts differ from the manifest {where}"
        for _, text, index in rows:
            assert labels[index] == text, f"{split}: label {index} is not {text!r} {where}"
    assert len(_lines(out, "errors-*.jsonl")) == manifest["rows"]["rejected"], where
    assert (out / "transform_fn" / "saved_model.pb").exists(), f"no transform_fn {where}"
    assert (out / "transformed_metadata").is_dir(), f"no transformed_metadata {where}"
    return COMPLETE


def dataset_content(out: Path) -> dict:
    """What an undisturbed run's dataset must equal: labels, row and split counts, records."""
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return {
        "labels": manifest["labels"],
        "rows": manifest["rows"],
        "rejected_by_reason": manifest["rejected_by_reason"],
        "splits": manifest["splits"],
        "records": {s: sorted(_records(out, s)) for s in SPLITS},
    }


def predictions_state(out: Path, where: str) -> str:
    """Invariant 1 for a predict dir: a summary only over predictions and errors that match it."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        return PARTIAL if layout_paths(out, PREDICTIONS_LAYOUT) else NONE
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    predictions = _lines(out, "predictions-*.jsonl")
    errors = _lines(out, "errors-*.jsonl")
    assert len(predictions) == summary["predictions"], f"{len(predictions)} predictions {where}"
    assert len(errors) == summary["errors"], f"{len(errors)} error records {where}"
    assert summary["images"] == summary["predictions"] + summary["errors"], where
    if summary.get("metrics"):
        assert (out / "metrics.json").exists() and (out / "confusion_matrix.png").exists(), where
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        assert metrics == summary["metrics"], f"metrics.json is another run's {where}"
    return COMPLETE


def predictions_content(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    pairs = sorted((p["uri"], p["label"]) for p in map(json.loads, _lines(out, "predictions-*")))
    return {"summary": summary, "predictions": pairs}


_SERVED: dict[str, list[str]] = {}


def assert_servable(version: Path, jpeg: bytes, where: str) -> None:
    """Invariant 2: an export version is complete, loads, and serves a JPEG."""
    for required in ("saved_model.pb", "variables/variables.index", "assets.extra/labels.txt"):
        assert (version / required).exists(), f"{version} has no {required} {where}"
    labels = _labels(version / "assets.extra" / "labels.txt")
    key = json.dumps(digest_tree([version], version), sort_keys=True)
    if key not in _SERVED:
        loaded = tf.saved_model.load(str(version))
        out = loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg]))
        assert out["probabilities"].shape == (1, len(labels)), where
        _SERVED[key] = [c.decode() for c in out["classes"].numpy()]
    assert _SERVED[key][0] in labels, where


def export_versions(model_dir: Path, jpeg: bytes, where: str) -> list[int]:
    """Every ``export/<n>`` in the dir and in the set-aside previous model is servable."""
    versions = []
    for root in (model_dir / "export", model_dir / PREVIOUS / "export"):
        for child in sorted(root.iterdir()) if root.is_dir() else []:
            if child.name.isdigit():
                assert_servable(child, jpeg, where)
                if root.parent == model_dir:
                    versions.append(int(child.name))
    return sorted(versions)


def model_files(model_dir: Path) -> dict[str, str]:
    """The complete model a reader can find in the dir, by its layout name.

    An ``--overwrite`` run keeps the previous model in ``.hubflow-previous/`` (complete once its
    marker is there) until its own export is complete; a run killed while moving entries there
    leaves them split between both places, and the next run moves them back.
    """
    previous = model_dir / PREVIOUS
    if (previous / PREVIOUS_MARKER).exists():
        return digest_tree(layout_paths(previous, MODEL_LAYOUT), previous)
    files = digest_tree(layout_paths(model_dir, MODEL_LAYOUT), model_dir)
    if previous.is_dir():
        files.update(digest_tree(layout_paths(previous, MODEL_LAYOUT), previous))
    return files


def model_content(model_dir: Path, jpeg: bytes) -> dict:
    """What an undisturbed training's model dir must equal (weights may differ on a resume)."""
    versions = export_versions(model_dir, jpeg, f"[seed {SEED}] final")
    assert versions, f"no export in {model_dir}"
    metrics = json.loads((model_dir / "metrics.json").read_text(encoding="utf-8"))
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    state = json.loads(
        (model_dir / "checkpoints" / "stage1" / "state.json").read_text(encoding="utf-8")
    )
    return {
        "labels": _labels(model_dir / "labels.txt"),
        "export_labels": _labels(
            model_dir / "export" / str(versions[-1]) / "assets.extra" / "labels.txt"
        ),
        "data_counts": config["data_counts"],
        "examples": {s: metrics[s]["examples"] for s in ("eval", "test")},
        "epochs": state["epochs"],
    }


def _history_epochs(model_dir: Path) -> int:
    history = json.loads((model_dir / "history.json").read_text(encoding="utf-8"))
    return len(history.get("loss", []))


def assert_clean_after_success(directory: Path, notes: str = "mine") -> None:
    assert not (directory / STAGING).exists(), f"{STAGING} left after a successful run"
    assert not (directory / PREVIOUS).exists(), f"{PREVIOUS} left after a successful run"
    assert not glob.glob(str(directory / "export" / "*.tmp")), "export/<n>.tmp left behind"
    assert not glob.glob(str(directory / "beam-temp-*")), "beam-temp-* left behind"
    assert (directory / "NOTES.txt").read_text() == notes, "the user's file was touched"


def _described(directory: Path, layout: tuple[str, ...], state: str) -> str:
    """A state in words: what the dir and its staging folder hold."""
    held = sorted(p.name for p in layout_paths(directory, layout))
    staging = directory / STAGING
    staged = sorted(p.name for p in staging.iterdir()) if staging.is_dir() else None
    return f"{state}; the dir holds {held}; {STAGING}/ holds {staged}"


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# Undisturbed runs, one per job, shared by the module


@dataclasses.dataclass(frozen=True)
class Baseline:
    path: Path
    seconds: float
    content: dict


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chaos")


@pytest.fixture(scope="module")
def images(workspace) -> Path:
    root = workspace / "images"
    write_dataset(root, per_class=PER_CLASS)
    return root


@pytest.fixture(scope="module")
def jpeg(images) -> bytes:
    return next(images.glob("*/*.jpg")).read_bytes()


@pytest.fixture(scope="module")
def schedule() -> random.Random:
    return random.Random(SEED)


def preprocess_cmd(images: Path, out: Path, backbone: str, *flags: str, cli=PREPROCESS) -> list:
    return [
        *cli,
        f"--image_dir={images}",
        f"--output_dir={out}",
        f"--backbone={backbone}",
        "--eval_fraction=0.2",
        "--test_fraction=0.2",
        *flags,
    ]


def train_cmd(data: Path, model_dir: Path, *flags: str) -> list[str]:
    return [*TRAIN, f"--data_dir={data}", f"--model_dir={model_dir}", *TRAIN_FLAGS, *flags]


def predict_cmd(model: Path, csv: Path, out: Path, *flags: str, cli=PREDICT) -> list[str]:
    return [*cli, f"--model={model}", f"--input_csv={csv}", f"--output_dir={out}", *flags]


def _timed(cmd: list[str]) -> float:
    started = time.monotonic()
    assert_ok(run(cmd))
    return time.monotonic() - started


@pytest.fixture(scope="module")
def baseline_dataset(workspace, images, tiny_backbone) -> Baseline:
    out = workspace / "baseline-data"
    seconds = _timed(preprocess_cmd(images, out, tiny_backbone))
    assert dataset_state(out, "[baseline]") == COMPLETE
    content = dataset_content(out)
    assert all(content["splits"][s]["count"] for s in SPLITS), content["splits"]
    return Baseline(out, seconds, content)


@pytest.fixture(scope="module")
def baseline_model(workspace, baseline_dataset, jpeg) -> Baseline:
    model_dir = workspace / "baseline-model"
    seconds = _timed(train_cmd(baseline_dataset.path, model_dir))
    return Baseline(model_dir, seconds, model_content(model_dir, jpeg))


@pytest.fixture(scope="module")
def score_csv(workspace, images) -> Path:
    """Every image with its label, and one missing file (an error record)."""
    rows = ["image_uri,label"]
    rows += [f"{p},{p.parent.name}" for p in sorted(images.glob("*/*.jpg"))]
    rows.append("missing.jpg,daisy")
    path = workspace / "score.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def baseline_predictions(workspace, baseline_model, score_csv) -> Baseline:
    out = workspace / "baseline-predictions"
    seconds = _timed(predict_cmd(baseline_model.path / "export", score_csv, out))
    assert predictions_state(out, "[baseline]") == COMPLETE
    content = predictions_content(out)
    assert content["summary"]["errors"] == 1 and content["summary"]["predictions"] > 0
    return Baseline(out, seconds, content)


def _fresh(directory: Path) -> Path:
    directory.mkdir()
    (directory / "NOTES.txt").write_text("mine")
    return directory


# ---------------------------------------------------------------------------------------------
# hubflow-preprocess


def test_preprocess_killed_at_each_phase_never_shows_a_wrong_dataset_and_reruns_complete(
    workspace, images, tiny_backbone, baseline_dataset, schedule
):
    out = _fresh(workspace / "chaos-data")
    staging = out / STAGING
    cmd = preprocess_cmd(images, out, tiny_backbone)
    log = workspace / "preprocess.log"

    # A. A new dir, no --overwrite: killed once the staged set is complete (its manifest written,
    # not yet published).
    killed = run_and_kill(cmd, when("staged manifest", staging / "manifest.json"), log)
    state = dataset_state(out, killed.where())

    # The dir is usable: a rerun completes, or (outputs there) is refused in one line.
    result = run(cmd)
    if state == NONE:
        assert_ok(result)
    else:
        assert_refused_in_one_line(result, "hubflow-preprocess")
        assert dataset_state(out, killed.where()) == state
        assert_ok(run([*cmd, "--overwrite"]))
    assert dataset_state(out, "[after the reruns]") == COMPLETE
    assert dataset_content(out) == baseline_dataset.content
    assert_clean_after_success(out)

    # B. A complete dataset, rerun with --overwrite: killed at a seeded time, and while the new
    # shards are written. The previous dataset stays, byte for byte, until the new one is done.
    kills = [
        after(schedule.uniform(0.3, 0.95) * baseline_dataset.seconds),
        when("staging shards under --overwrite", staging / "*-of-*.tfrecord"),
    ]
    for kill in kills:
        before = digest_tree(layout_paths(out, DATASET_LAYOUT), out)
        killed = run_and_kill([*cmd, "--overwrite"], kill, log)
        state = dataset_state(out, killed.where())
        now = digest_tree(layout_paths(out, DATASET_LAYOUT), out)
        if kill.timed and now.get("manifest.json") != before["manifest.json"]:
            # the run got as far as publishing (the old manifest goes first): a manifest there
            # is the new one, complete; a kill inside publish is the next test's subject
            if state == COMPLETE:
                assert dataset_content(out) == baseline_dataset.content, killed.where()
            else:
                assert_ok(run([*cmd, "--overwrite"]))
            continue
        assert now == before, f"the previous dataset changed {killed.where()}"
        if not kill.timed:
            result = run(cmd)  # without --overwrite: refused, and nothing changes
            assert_refused_in_one_line(result, "hubflow-preprocess")
            assert digest_tree(layout_paths(out, DATASET_LAYOUT), out) == before, killed.where()

    assert_ok(run([*cmd, "--overwrite"]))
    assert dataset_state(out, "[final --overwrite]") == COMPLETE
    assert dataset_content(out) == baseline_dataset.content
    assert_clean_after_success(out)


def test_preprocess_killed_while_publishing_over_a_dataset_leaves_a_complete_one(
    workspace, images, tiny_backbone, baseline_dataset
):
    """README: a run that fails or is killed leaves the previous dataset readable. Publishing
    deletes the old manifest first and moves the new one in last, so a kill in between leaves
    no manifest in the dir; the dataset it was replacing, or the complete new one it was moving
    in, must then be put in place by the next run (here the user's plain rerun, without
    --overwrite), not thrown away. The killed run publishes on slowed storage (SLOW_PUBLISH,
    gs://-like moves) so that the kill lands inside the publish every time; the reruns are the
    real CLI."""
    out = workspace / "chaos-data-publish"
    copy_output(baseline_dataset.path, out)
    cmd = preprocess_cmd(images, out, tiny_backbone)
    slowed = preprocess_cmd(images, out, tiny_backbone, "--overwrite", cli=PREPROCESS_SLOW_PUBLISH)
    killed = run_and_kill(
        slowed,
        when(
            "publish over a dataset (old manifest deleted)",
            out / STAGING,
            gone=out / "manifest.json",
        ),
        out.parent / "preprocess-publish.log",
    )
    after_kill = _described(out, DATASET_LAYOUT, dataset_state(out, killed.where()))

    rerun = run(cmd)  # the user's next step: the same command, without --overwrite
    assert "Traceback" not in rerun.stderr, rerun.stderr[-4000:]
    if rerun.returncode != 0:
        assert_refused_in_one_line(rerun, "hubflow-preprocess")
    after_rerun = _described(out, DATASET_LAYOUT, dataset_state(out, "[plain rerun]"))
    complete_after_rerun = after_rerun.startswith(COMPLETE)
    if complete_after_rerun:  # the old dataset or the new one: the same content
        assert dataset_content(out) == baseline_dataset.content, after_rerun

    assert_ok(run([*cmd, "--overwrite"]))  # --overwrite recovers in any case
    assert dataset_state(out, "[--overwrite rerun]") == COMPLETE
    assert dataset_content(out) == baseline_dataset.content
    assert not (out / STAGING).exists()

    assert complete_after_rerun, (
        f"a kill while publishing lost the dataset {killed.where()}. After the kill: "
        f"{after_kill}. After a rerun without --overwrite (exit {rerun.returncode}: "
        f"{_last_line(rerun)}): {after_rerun}"
    )


# ---------------------------------------------------------------------------------------------
# hubflow-train


def test_train_killed_at_each_phase_keeps_exports_complete_and_the_previous_model(
    workspace, baseline_dataset, baseline_model, jpeg, schedule
):
    model_dir = _fresh(workspace / "chaos-model")
    previous = model_dir / PREVIOUS
    cmd = train_cmd(baseline_dataset.path, model_dir)
    log = workspace / "train.log"

    # A. A new dir: killed mid-training, then (resumed) while exporting; then resumed to the end.
    killed = run_and_kill(
        cmd, when("checkpoints", model_dir / "checkpoints/stage1/ckpt-0002.index"), log
    )
    assert export_versions(model_dir, jpeg, killed.where()) == [], killed.where()
    killed = run_and_kill(cmd, when("export", model_dir / "export"), log)
    export_versions(model_dir, jpeg, killed.where())
    assert_ok(run(cmd))  # without --overwrite: resumes
    assert model_content(model_dir, jpeg) == baseline_model.content
    assert_clean_after_success(model_dir)
    resumed_history = _history_epochs(model_dir)  # checked last, so that all else runs first

    # B. A complete model, rerun with --overwrite: killed while the old model is moved aside, at
    # a seeded time, mid-training and mid-export. The previous model stays complete and
    # servable, byte for byte (in .hubflow-previous/ while the new run is unfinished).
    aside = previous / PREVIOUS_MARKER
    kills = [
        when("moving the previous model aside", previous),
        after(schedule.uniform(0.4, 0.95) * baseline_model.seconds),
        when(
            "checkpoints under --overwrite",
            aside,
            new=(model_dir / "checkpoints/*/ckpt-0002.index",),
        ),
        when("export under --overwrite", aside, new=(model_dir / "export/*.tmp",)),
    ]
    for kill in kills:
        before = model_files(model_dir)
        assert any(name.startswith("export/") for name in before), before
        killed = run_and_kill([*cmd, "--overwrite"], kill, log)
        export_versions(model_dir, jpeg, killed.where())
        now = model_files(model_dir)
        if kill.timed and not previous.exists() and now != before:
            # the run had finished (or had completed its export): the new model is complete
            assert model_content(model_dir, jpeg)["labels"] == baseline_model.content["labels"]
            continue
        assert now == before, (
            f"the previous model changed {killed.where()}: "
            f"{sorted(set(before.items()) ^ set(now.items()))[:10]}"
        )

    assert_ok(run(cmd))  # without --overwrite: resumes the killed run and finishes it
    assert model_content(model_dir, jpeg) == baseline_model.content
    assert_clean_after_success(model_dir)
    assert_ok(run([*cmd, "--overwrite"]))
    assert model_content(model_dir, jpeg) == baseline_model.content
    assert export_versions(model_dir, jpeg, "[final --overwrite]") == [1]
    assert_clean_after_success(model_dir)

    # history.json is "per-epoch history" (README), and training_curves.png is drawn from it:
    # a run resumed after a kill mid-training must still list every epoch, as an undisturbed
    # run's does.
    assert _history_epochs(baseline_model.path) == baseline_model.content["epochs"]
    assert resumed_history == baseline_model.content["epochs"], (
        f"[seed {SEED}] after a kill at epoch 2 and a resume, history.json lists "
        f"{resumed_history} of {baseline_model.content['epochs']} epochs"
    )


# ---------------------------------------------------------------------------------------------
# hubflow-predict


def test_predict_killed_at_each_phase_never_shows_wrong_predictions_and_reruns_complete(
    workspace, baseline_model, baseline_predictions, score_csv, schedule
):
    out = _fresh(workspace / "chaos-predictions")
    staging = out / STAGING
    cmd = predict_cmd(baseline_model.path / "export", score_csv, out)
    log = workspace / "predict.log"

    # A. A new dir: killed once the staged set is complete (its summary written, not yet
    # published), then at a seeded time.
    killed = run_and_kill(cmd, when("staged summary", staging / "summary.json"), log)
    predictions_state(out, killed.where())
    killed = run_and_kill(
        cmd, after(schedule.uniform(0.5, 1.0) * baseline_predictions.seconds), log
    )
    state = predictions_state(out, killed.where())
    result = run(cmd)
    if state == NONE:
        assert_ok(result)
    else:
        assert_refused_in_one_line(result, "hubflow-predict")
        if state == PARTIAL:
            assert_ok(run([*cmd, "--overwrite"]))
    assert predictions_state(out, "[after the reruns]") == COMPLETE
    assert predictions_content(out) == baseline_predictions.content
    assert_clean_after_success(out)

    # B. Complete predictions, rerun with --overwrite: killed while the new ones are written.
    # The previous predictions stay, byte for byte, until the new ones are complete.
    before = digest_tree(layout_paths(out, PREDICTIONS_LAYOUT), out)
    kill = when("staging predictions under --overwrite", staging / "predictions-*")
    killed = run_and_kill([*cmd, "--overwrite"], kill, log)
    assert predictions_state(out, killed.where()) == COMPLETE
    now = digest_tree(layout_paths(out, PREDICTIONS_LAYOUT), out)
    assert now == before, f"the previous predictions changed {killed.where()}"
    assert_refused_in_one_line(run(cmd), "hubflow-predict")  # without --overwrite
    assert digest_tree(layout_paths(out, PREDICTIONS_LAYOUT), out) == before, killed.where()

    assert_ok(run([*cmd, "--overwrite"]))
    assert predictions_state(out, "[final --overwrite]") == COMPLETE
    assert predictions_content(out) == baseline_predictions.content
    assert_clean_after_success(out)


def test_predict_killed_while_publishing_over_predictions_leaves_complete_ones(
    workspace, baseline_model, baseline_predictions, score_csv
):
    """As for preprocessing: after a kill between deleting the old summary and moving the new
    one in, the next plain run must leave complete predictions (the old or the new) in the dir.
    Slowed publish as above; the reruns are the real CLI."""
    out = workspace / "chaos-predictions-publish"
    copy_output(baseline_predictions.path, out)
    cmd = predict_cmd(baseline_model.path / "export", score_csv, out)
    slowed = predict_cmd(
        baseline_model.path / "export", score_csv, out, "--overwrite", cli=PREDICT_SLOW_PUBLISH
    )
    killed = run_and_kill(
        slowed,
        when(
            "publish over predictions (old summary deleted)",
            out / STAGING,
            gone=out / "summary.json",
        ),
        out.parent / "predict-publish.log",
    )
    after_kill = _described(out, PREDICTIONS_LAYOUT, predictions_state(out, killed.where()))

    rerun = run(cmd)  # the user's next step: the same command, without --overwrite
    assert "Traceback" not in rerun.stderr, rerun.stderr[-4000:]
    if rerun.returncode != 0:
        assert_refused_in_one_line(rerun, "hubflow-predict")
    after_rerun = _described(out, PREDICTIONS_LAYOUT, predictions_state(out, "[plain rerun]"))
    complete_after_rerun = after_rerun.startswith(COMPLETE)
    if complete_after_rerun:
        assert predictions_content(out) == baseline_predictions.content, after_rerun

    assert_ok(run([*cmd, "--overwrite"]))  # --overwrite recovers in any case
    assert predictions_state(out, "[--overwrite rerun]") == COMPLETE
    assert predictions_content(out) == baseline_predictions.content
    assert not (out / STAGING).exists()

    assert complete_after_rerun, (
        f"a kill while publishing lost the predictions {killed.where()}. After the kill: "
        f"{after_kill}. After a rerun without --overwrite (exit {rerun.returncode}: "
        f"{_last_line(rerun)}): {after_rerun}"
    )
