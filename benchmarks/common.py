"""What the benchmarks share: environment figures, subprocess timing, results files and the
synthetic inputs (photo-like JPEGs and a random-weight MobileNetV2 backbone).

Keras 2 is pinned by ``import schemas`` (in ``benchmarks/__init__.py``), never here. TensorFlow
is only imported inside the functions that need it, so a benchmark that only drives
subprocesses (``real_data``) never loads it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from schemas.csv_format import SPLITS

# TensorFlow's C++ INFO and WARNING lines, in this process and in the jobs it starts.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))
MANIFEST_FILE = "manifest.json"  # in every preprocessing output dir
MOBILENET_DIR = "backbone_mobilenet_v2_100_224_random"  # built by build_mobilenet_backbone
LOG_TAIL_LINES = 25
REPORT_RULE = "=" * 100

CLASSES = ("daisy", "dandelion", "rose", "tulip")
# A colour tint per class so the classes differ a little, as real ones do.
CLASS_TINTS = {
    "daisy": (40.0, 40.0, 30.0),
    "dandelion": (50.0, 40.0, -30.0),
    "rose": (50.0, -20.0, -10.0),
    "tulip": (-10.0, -10.0, 40.0),
}


class BenchmarkError(RuntimeError):
    """A step failed, a job dropped rows or images, or the set-up is unusable."""


# ----------------------------------------------------------------------------------------------
# The machine and the run
# ----------------------------------------------------------------------------------------------


def command_line() -> str:
    """This benchmark's command line, as it can be pasted into a shell (from the repository
    root: ``python -m benchmarks.<name> ...`` when it was run that way)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return shlex.join([sys.executable, *program, *sys.argv[1:]])


def loadavg() -> float:
    """The 1-minute load average, rounded to 2 decimals."""
    return round(os.getloadavg()[0], 2)


def machine_info(tensorflow: str | None = None) -> dict:
    """CPUs, platform, Python (and TensorFlow, when given) versions, and the load now."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count() or 1,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if tensorflow:
        info["tensorflow"] = tensorflow
    info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def git_revision() -> str:
    """``HEAD``'s commit, with ``+dirty`` when tracked files differ (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def log(message: str = "") -> None:
    """Prints a progress line at once (the benchmarks run for minutes)."""
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# Results: JSON, failure, report cells and derived rates
# ----------------------------------------------------------------------------------------------


def write_json(path: str, results: dict) -> None:
    """Writes ``results`` to ``path`` through a temporary file, so a complete file is replaced
    only by another complete one (benchmarks rewrite it after every step)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path: str, what: str) -> Any:
    """The JSON in ``path``.

    Raises:
      BenchmarkError: the file is missing or not JSON (``what`` names it in the message).
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"no readable {what} at {path}: {e}") from e


def fail(results: dict, error: BenchmarkError) -> int:
    """Reports ``error``, records it in ``results`` and writes them to ``results['json']``;
    returns the exit code."""
    print(f"benchmark failed: {error}", file=sys.stderr)
    results["error"] = str(error)
    write_json(results["json"], results)
    return 1


def cell(value: float | None, width: int, decimals: int) -> str:
    """A right-aligned table cell; ``-`` for a figure that does not apply."""
    return f"{value:{width}.{decimals}f}" if value is not None else f"{'-':>{width}}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or zero."""
    return numerator / denominator if numerator and denominator else None


def steady(run: dict, startup: dict) -> tuple[float | None, float | None]:
    """(images/s, CPU ms per image) of ``run`` with ``startup``'s fixed cost taken out.

    Both are job runs with ``n``, ``wall_s`` and ``cpu_s``: the steady rate is
    ``(N - n0) / (wall(N) - wall(n0))``; each is None where the difference is not positive.
    """
    net_wall = run["wall_s"] - startup["wall_s"]
    net_cpu = run["cpu_s"] - startup["cpu_s"]
    extra = run["n"] - startup["n"]
    return (
        extra / net_wall if net_wall > 0 else None,
        net_cpu * 1000 / extra if net_cpu > 0 else None,
    )


def report_header(title: str, results: dict) -> list[str]:
    """The first lines of a report: rule, title, command and machine."""
    m = results["machine"]
    tensorflow = f"TF {m['tensorflow']}, " if "tensorflow" in m else ""
    return [
        REPORT_RULE,
        title,
        f"command : {results['command']}",
        f"machine : {m['cpus']} CPUs (affinity {m['cpus_usable']}), {m['platform']}, "
        f"{tensorflow}load avg at start {m['loadavg_at_start']}",
    ]


def add_job_flag(parser: argparse.ArgumentParser, job: str = "the job") -> None:
    """Adds the repeatable ``--job_flag`` (extra flags passed on to ``job``; default ``[]``)."""
    parser.add_argument(
        "--job_flag",
        action="append",
        default=[],
        help=f"extra flag for {job}, repeatable "
        "(e.g. --job_flag=--direct_running_mode=multi_processing)",
    )


def int_list(value: str, minimum: int = 1) -> list[int]:
    """An argparse type: comma-separated integers, each at least ``minimum`` (positive unless
    given: ``type=functools.partial(int_list, minimum=0)`` allows 0)."""
    try:
        numbers = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {value!r}"
        ) from None
    if not numbers or min(numbers) < minimum:
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {value!r}")
    return numbers


# ----------------------------------------------------------------------------------------------
# Timing: calls in this process, commands in a subprocess
# ----------------------------------------------------------------------------------------------


def time_calls(
    fn: Callable, arg: Any, seconds: float, warmup: int = 3, min_calls: int = 3
) -> tuple[int, float, float]:
    """Calls ``fn(arg).numpy()`` ``warmup`` times, then for ``seconds`` (and ``min_calls``).

    Returns:
      (calls, wall seconds, CPU seconds of this process, all threads).
    """
    for _ in range(warmup):
        fn(arg).numpy()
    calls = 0
    cpu_start, start = time.process_time(), time.perf_counter()
    while True:
        fn(arg).numpy()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= min_calls:
            return calls, elapsed, time.process_time() - cpu_start


def subprocess_env() -> dict:
    """This environment, with the repository importable and Python output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of the log at ``path``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


class Watcher(Protocol):
    """Something that observes a running process (e.g. samples its memory)."""

    def start(self, pid: int) -> Any: ...

    def stop(self) -> None: ...


def run_logged(command: Sequence[str], log_path: str, watcher: Watcher | None = None) -> dict:
    """Runs ``command`` to completion from the repository root, output to ``log_path``.

    ``watcher`` (optional) is started on the child's pid and stopped when it exits. CPU time is
    user + system of the process and its waited-for children (``wait4``).

    Returns:
      ``wall_s``, ``cpu_s``, ``loadavg_1m_before`` and ``log``.

    Raises:
      BenchmarkError: non-zero exit (the log's tail is in the message).
    """
    command = list(command)
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    load = os.getloadavg()[0]
    with open(log_path, "wb") as log_file:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=subprocess_env(), stdout=log_file, stderr=subprocess.STDOUT
        )
        if watcher is not None:
            watcher.start(proc.pid)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            wall = time.perf_counter() - start
            if watcher is not None:
                watcher.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise BenchmarkError(
            f"{shlex.join(command)} exited {proc.returncode}; log {log_path}:\n{log_tail(log_path)}"
        )
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "loadavg_1m_before": load,
        "log": log_path,
    }


def preprocess_command(*flags: str) -> list[str]:
    """The preprocessing job (``python -m pipeline.preprocess``) with ``flags``."""
    return [sys.executable, "-m", "pipeline.preprocess", *flags]


def trainer_command(*flags: str) -> list[str]:
    """The trainer (``python -m training.task``) with ``flags``."""
    return [sys.executable, "-m", "training.task", *flags]


def read_manifest(output_dir: str) -> dict:
    """The ``manifest.json`` a preprocessing job wrote to ``output_dir``, as JSON."""
    return read_json(os.path.join(output_dir, MANIFEST_FILE), "manifest")


def split_counts(manifest: dict, output_dir: str) -> dict[str, int]:
    """Examples per split of a manifest (from :func:`read_manifest`).

    Raises:
      BenchmarkError: a labeled split (train, eval, test) is empty; ``unlabeled`` may be.
    """
    splits = {split: v["count"] for split, v in manifest["splits"].items()}
    if min(splits.get(split, 0) for split in SPLITS) == 0:
        raise BenchmarkError(f"{output_dir}: a split is empty: {splits}")
    return splits


# ----------------------------------------------------------------------------------------------
# Synthetic inputs: a realistic backbone and photo-like images
# ----------------------------------------------------------------------------------------------


def build_mobilenet_backbone(path: str, image_size: int = 224) -> str:
    """Saves a random-weight MobileNetV2 feature-vector model as a TF-Hub-format SavedModel.

    The architecture and compute of the ``mobilenet_v2_100_224`` preset (random weights: there
    is no network). The model takes float32 RGB ``[N, image_size, image_size, 3]`` in [0, 1],
    scales it to [-1, 1] inside (what MobileNetV2 expects) and returns ``[N, 1280]``
    average-pooled features. Nothing is done when ``path`` already holds a SavedModel.

    Returns:
      ``path``.
    """
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input([image_size, image_size, 3], dtype="float32")
    scaled = tf_keras.layers.Rescaling(2.0, offset=-1.0)(inputs)
    base = tf_keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3), include_top=False, pooling="avg", weights=None
    )
    model = tf_keras.Model(inputs, base(scaled), name="mobilenet_v2_100_224_feature_vector")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(model, tmp)
    os.replace(tmp, path)
    return path


def synthetic_photo(index: int) -> tuple[bytes, str]:
    """Generates image ``index`` deterministically: (JPEG bytes, label).

    About 500x375 (width 440-560, aspect 0.68-0.82, one in five portrait), a smooth multi-scale
    colour texture with a class tint plus Gaussian noise, saved at JPEG quality 85-92: 30-60 KB,
    like a phone photo downscaled for a dataset.
    """
    rng = np.random.default_rng(1_000_003 + index)
    label = CLASSES[index % len(CLASSES)]
    width = int(rng.integers(440, 561))
    height = int(round(width * rng.uniform(0.68, 0.82)))
    if rng.random() < 0.2:
        width, height = height, width
    pixels = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 90.0), (16, 40.0), (64, 20.0)):
        coarse = rng.normal(0.0, 1.0, (max(2, height * cells // width), cells, 3))
        coarse = (coarse - coarse.min()) / (np.ptp(coarse) + 1e-6) * 255.0
        layer = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
        pixels += (np.asarray(layer, np.float32) / 255.0 - 0.5) * amplitude
    pixels += rng.uniform(60.0, 200.0, 3) + np.asarray(CLASS_TINTS[label], np.float32)
    pixels += rng.normal(0.0, rng.uniform(5.0, 9.0), pixels.shape)
    buffer = io.BytesIO()
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    image.save(buffer, "JPEG", quality=int(rng.integers(85, 93)))
    return buffer.getvalue(), label


def write_photo(task: tuple[str, int]) -> int:
    """Pool worker: writes :func:`synthetic_photo` ``index`` to ``path`` unless it exists.

    Returns:
      the file's size in bytes.
    """
    path, index = task
    if os.path.exists(path):
        return os.path.getsize(path)
    data, _ = synthetic_photo(index)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def write_photos(tasks: Sequence[tuple[str, int]], processes: int, chunksize: int) -> np.ndarray:
    """Makes sure every ``(path, index)`` photo exists, in parallel; their sizes in bytes."""
    for folder in {os.path.dirname(path) for path, _ in tasks}:
        os.makedirs(folder, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return np.array(pool.map(write_photo, tasks, chunksize=chunksize), np.float64)


def size_stats(sizes: np.ndarray) -> dict:
    """Mean, smallest and largest of file sizes in bytes, in KiB."""
    return {
        "mean_kib": round(float(sizes.mean()) / 1024, 1),
        "min_kib": round(float(sizes.min()) / 1024, 1),
        "max_kib": round(float(sizes.max()) / 1024, 1),
    }


def write_folder_csv(data_dir: str, folders: dict[str, str], path: str) -> dict[str, int]:
    """Label CSV ``image_uri,label,split`` of ``data_dir/<folder>/<label>/*``, each folder's rows
    pinned to its split (blank: hashed). Returns files per ``folder/label``."""
    counts: dict[str, int] = {}
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_uri", "label", "split"])
        for folder, split in folders.items():
            root = os.path.join(data_dir, folder)
            for label in sorted(d for d in os.listdir(root) if not d.startswith(".")):
                names = sorted(
                    n for n in os.listdir(os.path.join(root, label)) if not n.startswith(".")
                )
                for name in names:
                    writer.writerow([os.path.join(root, label, name), label, split])
                counts[f"{folder}/{label}"] = len(names)
    return counts
