"""Start-up of the preprocessing job: from the command to its first embedded batch, by phase.

Usage::

    python -m benchmarks.startup [--data DIR] [--n 20] [--repeats 3]
                                 [--baseline_root DIR] [--work_dir DIR]

Method (one run prints every figure):

1. **Input.** The first ``--n`` photos (half per class, sorted by name) of ``--data`` (default
   ``../shared/data/hymenoptera/train``: real 0.1-5 MP photos), in one label CSV.
2. **Trees.** The code of this checkout and, with ``--baseline_root``, another copy of the
   repository (e.g. a snapshot taken before a change: ``git archive`` or a copy of the tree),
   each run from its own root with the same Python, venv and ``$HUBFLOW_CACHE``. Each tree runs
   the job once untimed first, so the cache is warm (the default backbone built, its TFLite
   conversion made) and the files are in the page cache.
3. **Timed runs.** ``--repeats`` runs of ``python -m pipeline.preprocess --input_csv … --output_dir
   … --overwrite`` per tree, the trees alternating. This process watches the job's log (10 ms
   polls) and, on each line ending a phase, reads the wall time since it started the job and the
   job's CPU seconds (user + system, all threads, ``/proc/<pid>/stat``). The phases end at the
   log lines both trees print: the input listed (``pipeline.files``: interpreter, imports, flags),
   the runtime chosen (``embedding with …``: backbone load or cached metadata, digest, TFLite
   check), the first bundle (``checked images: started``: pipeline construction with tf.Transform
   tracing, runner start) and the first embedded batch (``embedded images: started``).
   Medians over the repeats; the 1-minute load average before each run is reported beside them.
4. **Breakdown.** One more run per tree through a wrapper that calls the same ``main()`` with the
   same flags but times the calls behind each phase (wall and process CPU): imports, the
   backbone probe or metadata lookup, the runtime resolution and its GPU check, the content
   digests, the pipeline construction and within it each tf.Transform analysis, and the runner
   until the first embedded batch. Names a tree lacks are left out.
5. **Imports.** One more run per tree with ``python -X importtime``: the import time of the
   whole job (all of it happens before the first embedded batch), summed by top-level package.

The manifests of every run must record the same backbone digest and runtime, or the benchmark
fails. Figures go to ``<work_dir>/startup_benchmark.json``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from benchmarks import common
from benchmarks.common import BenchmarkError

RESULTS_FILE = "startup_benchmark.json"
DEFAULT_DATA = os.path.join(common.SHARED_DATA, "hymenoptera", "train")
TARGET_S = 8.0  # issue 12: command to first embedded batch, default backbone cached
POLL_S = 0.01
# Log lines that end each phase, in order; the last one is the first embedded batch.
PHASES = (
    ("interpreter, imports, flags, input listing", re.compile(r" pipeline\.files: ")),
    ("backbone, digest, runtime (TFLite check)", re.compile(r" embedding with ")),
    ("pipeline build (tf.Transform tracing), runner start", re.compile(r"checked images: started")),
    ("first bundle -> first embedded batch", re.compile(r"embedded images: started")),
)
FIRST_EMBEDDED = PHASES[-1][0]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_COLUMN = 28  # report column width

# The wrapper of the breakdown run (step 4). It patches module attributes before calling main(),
# so calls made through a module (``hub.probe(...)``) or a module global are timed.
_TIMED_CALLS = (
    ("pipeline.preprocess", "resolve_inputs"),
    ("pipeline.preprocess", "resolve"),
    ("backbones.hub", "probe"),
    ("backbones.hub", "describe"),
    ("backbones.hub", "load"),
    ("pipeline.inference", "resolve_runtime"),
    ("pipeline.inference", "workers_have_gpu"),
    ("backbones.tflite_runtime", "converted"),
    ("backbones.tflite_runtime", "content_digest"),
    ("backbones.hub", "content_digest"),
    ("backbones.cache", "entry_digest"),
    ("pipeline.preprocess", "build_pipeline"),
    ("pipeline.analyze", "LabelVocabulary.expand"),
    ("pipeline.analyze", "AnalyzeAndWriteTransformFn.expand"),
    ("apache_beam.pipeline", "Pipeline.run"),
)
_WRAPPER = r"""
import importlib, json, logging, os, sys, time
launched = float(os.environ["STARTUP_LAUNCHED"])
def now():
    return time.time() - launched, time.process_time()
out = {"calls": {}, "markers": {}}
t = now()
out["python_ready"] = t
import pipeline.preprocess as entry
out["imported"] = now()
def wrap(owner, attr, label):
    fn = getattr(owner, attr)
    stats = out["calls"].setdefault(label, {"calls": 0, "wall_s": 0.0, "cpu_s": 0.0})
    def timed(*args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            stats["calls"] += 1
            stats["wall_s"] += time.perf_counter() - w
            stats["cpu_s"] += time.process_time() - c
    setattr(owner, attr, timed)
for module, name in json.loads(os.environ["STARTUP_CALLS"]):
    try:
        owner = importlib.import_module(module)
        *path, attr = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        if hasattr(owner, attr):
            wrap(owner, attr, f"{module}.{name}")
    except ImportError:
        pass
markers = json.loads(os.environ["STARTUP_MARKERS"])
class Marks(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        for name, needle in markers:
            if needle in f" {record.name}: {message}" and name not in out["markers"]:
                out["markers"][name] = now()
from schemas.cli import configure_logging
configure_logging()  # the job's log format on the root logger first, then the marker handler
logging.getLogger().addHandler(Marks())
try:
    code = entry.main(sys.argv[1:])
finally:
    out["end"] = now()
    with open(os.environ["STARTUP_OUT"], "w") as f:
        json.dump(out, f)
sys.exit(code)
"""
# Plain substrings of the PHASES patterns, for the wrapper's log handler.
_MARKER_TEXT = (
    (PHASES[0][0], " pipeline.files: "),
    (PHASES[1][0], " embedding with "),
    (PHASES[2][0], "checked images: started"),
    (PHASES[3][0], "embedded images: started"),
)


def write_csv(path: str, data_dir: str, n: int) -> str:
    """The first ``n`` photos of ``data_dir``'s class folders (half per class), as a label CSV."""
    classes = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    if not classes:
        raise BenchmarkError(f"no class folders in {data_dir}")
    per_class = -(-n // len(classes))
    rows = []
    for label in classes:
        folder = os.path.join(data_dir, label)
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg")))
        rows += [(os.path.join(folder, f), label) for f in names[:per_class]]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_uri", "label"])
        writer.writerows(rows[:n])
    return path


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process, all its threads (``/proc/<pid>/stat``)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


def _env(root: str, extra: dict | None = None) -> dict:
    env = common.subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def job_flags(csv_path: str, out: str) -> list[str]:
    return [f"--input_csv={csv_path}", f"--output_dir={out}", "--overwrite"]


def timed_run(root: str, csv_path: str, out: str, log_path: str) -> dict:
    """One job run from ``root``; wall and CPU seconds at each phase's end, and at the exit."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pipeline.preprocess", *job_flags(csv_path, out)]
    load = common.loadavg()
    marks: dict[str, dict] = {}
    pending, buffer = list(PHASES), ""

    def scan(text: str, pid: int) -> str:
        *lines, rest = text.split("\n")
        for line in lines:
            if pending and pending[0][1].search(line):
                name, _ = pending.pop(0)
                marks[name] = {
                    "wall_s": round(time.perf_counter() - start, 3),
                    "cpu_s": _cpu_seconds(pid),
                }
            elif any(pattern.search(line) for _, pattern in pending[1:]):
                raise BenchmarkError(f"{log_path}: the phases ended out of order: {line}")
        return rest

    with open(log_path, "wb") as log_file, open(log_path, encoding="utf-8") as reader:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, cwd=root, env=_env(root), stdout=log_file, stderr=subprocess.STDOUT
        )
        while True:
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            buffer = scan(buffer + reader.read(), proc.pid)
            if done:
                break
            time.sleep(POLL_S)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise BenchmarkError(
            f"job exited {proc.returncode}; log {log_path}:\n{common.log_tail(log_path)}"
        )
    if FIRST_EMBEDDED not in marks:
        raise BenchmarkError(f"{log_path}: no first embedded batch logged")
    manifest = common.read_manifest(out)
    return {
        "marks": marks,
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "loadavg_1m_before": load,
        "manifest": {k: manifest[k] for k in ("backbone_sha256", "inference_runtime", "backbone")},
        "log": log_path,
    }


def breakdown_run(root: str, csv_path: str, out: str, log_path: str) -> dict:
    """One job run through the timing wrapper (see the module docstring, step 4)."""
    shutil.rmtree(out, ignore_errors=True)
    result_path = log_path + ".json"
    env = _env(
        root,
        {
            "STARTUP_LAUNCHED": repr(time.time()),
            "STARTUP_OUT": result_path,
            "STARTUP_CALLS": json.dumps(_TIMED_CALLS),
            "STARTUP_MARKERS": json.dumps(_MARKER_TEXT),
        },
    )
    env["STARTUP_LAUNCHED"] = repr(time.time())
    command = [sys.executable, "-c", _WRAPPER, *job_flags(csv_path, out)]
    with open(log_path, "wb") as log_file:
        code = subprocess.call(command, cwd=root, env=env, stdout=log_file, stderr=log_file)
    if code:
        raise BenchmarkError(
            f"wrapped job exited {code}; log {log_path}:\n{common.log_tail(log_path)}"
        )
    return common.read_json(result_path, "breakdown")


def import_times(root: str, csv_path: str, out: str, log_path: str, top: int = 10) -> dict:
    """``-X importtime`` of a whole job run: total and the top-level packages' self time (s)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "pipeline.preprocess",
        *job_flags(csv_path, out),
    ]
    with open(log_path, "wb") as log_file:
        code = subprocess.call(
            command, cwd=root, env=_env(root), stdout=log_file, stderr=subprocess.STDOUT
        )
    if code:
        raise BenchmarkError(f"job exited {code}; log {log_path}:\n{common.log_tail(log_path)}")
    by_package: collections.Counter = collections.Counter()
    line_re = re.compile(r"^import time:\s+(\d+) \|\s+\d+ \| +([\w.]+)")
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = line_re.match(line)
            if m:
                by_package[m.group(2).split(".")[0]] += int(m.group(1)) / 1e6
    return {
        "total_s": round(sum(by_package.values()), 2),
        "modules_by_package": {k: round(v, 2) for k, v in by_package.most_common(top)},
    }


def median_marks(runs: list[dict]) -> dict:
    """Per phase: median wall and CPU seconds at its end, and the median phase length."""
    table = {}
    previous = [{"wall_s": 0.0, "cpu_s": 0.0}] * len(runs)
    for name, _ in PHASES:
        ends = [r["marks"][name] for r in runs]
        table[name] = {
            "end_wall_s": round(statistics.median(e["wall_s"] for e in ends), 2),
            "end_cpu_s": round(statistics.median(e["cpu_s"] for e in ends), 2),
            "wall_s": round(
                statistics.median(
                    e["wall_s"] - p["wall_s"] for e, p in zip(ends, previous, strict=True)
                ),
                2,
            ),
            "cpu_s": round(
                statistics.median(
                    e["cpu_s"] - p["cpu_s"] for e, p in zip(ends, previous, strict=True)
                ),
                2,
            ),
        }
        previous = ends
    return table


def check_same_outputs(results: dict) -> None:
    """Every run's manifest names the same backbone, digest and runtime."""
    seen = {
        json.dumps(r["manifest"], sort_keys=True)
        for tree in results["trees"].values()
        for r in tree["runs"]
    }
    if len(seen) != 1:
        raise BenchmarkError(f"the runs recorded different backbones or runtimes: {seen}")


def _cell(figures: dict | None, calls: bool = False) -> str:
    """``wall / CPU`` seconds (and the call count), in a column of fixed width."""
    if figures is None:
        return f"{'-':>{_COLUMN - 6}}".ljust(_COLUMN)
    count = f" x{figures['calls']}" if calls and "calls" in figures else ""
    return f"{figures['wall_s']:>{_COLUMN - 14}.2f} / {figures['cpu_s']:>5.2f}{count}".ljust(
        _COLUMN
    )


def format_report(results: dict) -> str:
    lines = common.report_header("Preprocessing start-up: command -> first embedded batch", results)
    lines.append(f"input   : {results['images']} photos from {results['data']}")
    names = list(results["trees"])
    trees = results["trees"]
    for tree in names:
        loads = [r["loadavg_1m_before"] for r in trees[tree]["runs"]]
        lines.append(f"{tree:<9}: {trees[tree]['root']} (1-min load avg before runs {loads})")
    lines.append("")
    head = f"phase (median of {results['repeats']} runs)"
    lines.append(
        f"{head:<54}"
        + "".join(f"{t + ' wall / CPU s':>{_COLUMN - 6}}".ljust(_COLUMN) for t in names)
    )
    for phase, _ in PHASES:
        cells = "".join(_cell(trees[t]["median"][phase]) for t in names)
        lines.append(f"  {phase:<52}{cells}")
    ends = {
        t: {
            "wall_s": trees[t]["median"][FIRST_EMBEDDED]["end_wall_s"],
            "cpu_s": trees[t]["median"][FIRST_EMBEDDED]["end_cpu_s"],
        }
        for t in names
    }
    cells = "".join(_cell(ends[t]) for t in names)
    lines.append(f"{'command -> first embedded batch':<54}{cells}(target <= {TARGET_S:.0f} s)")
    whole = {
        t: {
            "wall_s": statistics.median(r["wall_s"] for r in trees[t]["runs"]),
            "cpu_s": statistics.median(r["cpu_s"] for r in trees[t]["runs"]),
        }
        for t in names
    }
    cells = "".join(_cell(whole[t]) for t in names)
    lines.append(f"{'whole job (' + str(results['images']) + ' photos)':<54}{cells}")
    lines.append("")
    lines.append(
        "breakdown, one wrapped run per tree (wall / CPU s, calls; nested calls count twice):"
    )
    labels: list[str] = []
    for t in names:
        for label in trees[t]["breakdown"]:
            if label not in labels:
                labels.append(label)
    for label in labels:
        cells = "".join(_cell(trees[t]["breakdown"].get(label), calls=True) for t in names)
        lines.append(f"  {label.removeprefix('apache_beam.'):<52}{cells}")
    lines.append("")
    lines.append("imports (-X importtime, whole job; self time by top-level package, s):")
    for t in names:
        imports = trees[t]["imports"]
        top = ", ".join(f"{k} {v:.2f}" for k, v in imports["modules_by_package"].items())
        lines.append(f"  {t:<9} total {imports['total_s']:.2f}: {top}")
    lines.append(common.REPORT_RULE)
    return "\n".join(lines)


def summarise_breakdown(raw: dict) -> dict:
    """The wrapped run's figures as rows: imports, each timed call, the runner's share."""
    rows = {"imports (python start -> main)": _span(raw["python_ready"], raw["imported"])}
    rows["python start (interpreter, site)"] = {
        "wall_s": round(raw["python_ready"][0], 2),
        "cpu_s": round(raw["python_ready"][1], 2),
    }
    for label, stats in raw["calls"].items():
        if stats["calls"]:
            rows[label] = {
                "wall_s": round(stats["wall_s"], 2),
                "cpu_s": round(stats["cpu_s"], 2),
                "calls": stats["calls"],
            }
    markers = raw["markers"]
    if PHASES[2][0] in markers and FIRST_EMBEDDED in markers:
        rows["first bundle -> first embedded batch (wrapped)"] = _span(
            markers[PHASES[2][0]], markers[FIRST_EMBEDDED]
        )
    if FIRST_EMBEDDED in markers:
        rows["command -> first embedded batch (wrapped)"] = _span(
            [0.0, 0.0], markers[FIRST_EMBEDDED]
        )
    return rows


def _span(a, b) -> dict:
    return {"wall_s": round(b[0] - a[0], 2), "cpu_s": round(b[1] - a[1], 2)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="<data>/<class>/<photo>")
    parser.add_argument("--n", type=int, default=20, help="photos in the job (default 20)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--baseline_root",
        default=None,
        help="another copy of the repository to time beside this one (e.g. before a change)",
    )
    parser.add_argument(
        "--work_dir", default=os.path.join(tempfile.gettempdir(), "hubflow-startup")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    trees = {"current": common.REPO_ROOT}
    if args.baseline_root:
        trees = {"baseline": os.path.abspath(args.baseline_root), **trees}
    results: dict = {
        "command": common.command_line(),
        "machine": common.machine_info(),
        "git": common.git_revision(),
        "json": os.path.join(work_dir, RESULTS_FILE),
        "data": args.data,
        "images": args.n,
        "repeats": args.repeats,
        "hubflow_cache": os.environ.get("HUBFLOW_CACHE", "(default)"),
        "trees": {t: {"root": root, "runs": []} for t, root in trees.items()},
    }
    try:
        csv_path = write_csv(os.path.join(work_dir, "photos.csv"), args.data, args.n)
        out = os.path.join(work_dir, "out")
        for tree, root in trees.items():
            common.log(f"{tree}: warm-up run (cache, page cache)")
            timed_run(root, csv_path, out, os.path.join(work_dir, f"{tree}-warmup.log"))
        for i in range(args.repeats):
            for tree, root in trees.items():
                run = timed_run(root, csv_path, out, os.path.join(work_dir, f"{tree}-{i}.log"))
                first = run["marks"][FIRST_EMBEDDED]
                common.log(
                    f"{tree} run {i + 1}: first embedded batch at {first['wall_s']:.2f} s wall, "
                    f"{first['cpu_s']:.2f} s CPU (load {run['loadavg_1m_before']})"
                )
                results["trees"][tree]["runs"].append(run)
                common.write_json(results["json"], results)
        for tree, root in trees.items():
            common.log(f"{tree}: breakdown run, import-time run")
            raw = breakdown_run(root, csv_path, out, os.path.join(work_dir, f"{tree}-wrapped.log"))
            results["trees"][tree]["breakdown_raw"] = raw
            results["trees"][tree]["breakdown"] = summarise_breakdown(raw)
            results["trees"][tree]["imports"] = import_times(
                root, csv_path, out, os.path.join(work_dir, f"{tree}-importtime.log")
            )
        for tree in trees:
            results["trees"][tree]["median"] = median_marks(results["trees"][tree]["runs"])
        check_same_outputs(results)
    except BenchmarkError as e:
        return common.fail(results, e)
    common.write_json(results["json"], results)
    print(format_report(results))
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
