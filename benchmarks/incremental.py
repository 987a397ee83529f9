"""Incremental runs (``hubflow-preprocess --reuse_from``): a rerun with a few new images against a
full run, on real photos.

Usage::

    python -m benchmarks.incremental [--data DIR | --generate WxH:N] [--new_fraction 0.05]
                                     [--rounds 1] [--work_dir DIR] [--job_flag=--FLAG=VALUE ...]

Method (one run prints every figure):

1. **Photos.** Every image under ``--data`` (default ``../shared/data/cats-vs-dogs-2k``: 2,000
   photos, ``<split folder>/<class>/<file>``), labeled with its class folder, in one CSV
   (``all.csv``). A seeded ``--new_fraction`` of them (default 5 %) is held out of ``base.csv``:
   they are the images "added since the last run". ``--generate 4032x3024:160`` instead makes
   N phone-sized photos from the hymenoptera photos (:func:`benchmarks.photo_mix.generate`:
   resized, sensor noise, JPEG q90; 2-5 MB each at 12 MP) and uses those.
2. **Jobs.** Each runs in a subprocess (``python -m pipeline.preprocess``, default flags, the
   DirectRunner) and is timed by wall clock and CPU (user + system of the job's process tree):

   * ``base``: a full run on ``base.csv``, the earlier dataset;
   * ``full``: a full run on ``all.csv``;
   * ``incremental``: ``all.csv`` with ``--reuse_from`` the base run;
   * two tiny runs (the first ``--startup_n`` images, then the same with ``--reuse_from`` the
     first): the fixed start-up cost of a full and of an incremental run (imports, backbone probe
     and TFLite check, pipeline construction, tf.Transform tracing, runner start).

   ``full`` and ``incremental`` alternate ``--rounds`` times. The incremental run's manifest must
   count every base image as reused and the rest as embedded, with the full run's split counts,
   or the benchmark fails.
3. **Where an incremental run's time goes.** The per-image work an incremental run still does is
   timed alone in this process, one thread, CPU seconds over every image: read + sha256 of every
   image (its key), the header check of every image, the full decode that validates an image
   (a full run does it for every image, an incremental one for the new ones), reading the
   earlier dataset's records twice (the index of their sha256, then the stored values),
   building and writing the output records. With the new images' full per-image cost (the
   full run's steady CPU per image), their sum is what the incremental run's steady CPU should
   be; the rest is Beam's per-element work and its shuffles.

Reported: wall and CPU seconds of each run, incremental / full both end to end and with the
start-up runs' cost taken out, each run's wall time by phase (imports and input listing; backbone
probe and TFLite check; pipeline build, tf.Transform tracing and runner start; the work), read
from the timestamps of its log lines, and the breakdown. Figures go to
``<work_dir>/incremental_benchmark.json``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import random
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from benchmarks import common, photo_mix
from benchmarks.common import BenchmarkError

RESULTS_FILE = "incremental_benchmark.json"
DEFAULT_DATA = os.path.join(common.SHARED_DATA, "cats-vs-dogs-2k")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SEED = 12
# Log lines that end the phases of a job's start-up (timestamps of configure_logging's format).
PHASE_ENDS = (
    ("imports, flags, input listing", re.compile(r"INFO pipeline\.files: ")),
    ("backbone probe, TFLite check", re.compile(r"INFO backbones\.tflite_runtime: embedding with")),
    ("pipeline build, tf.Transform tracing, runner start", re.compile(r"checked images: started")),
)
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def list_photos(data_dir: str) -> list[tuple[str, str]]:
    """``(absolute path, class)`` of every image ``<data>/<folder>/<class>/<file>``, sorted."""
    found = []
    for folder in sorted(os.listdir(data_dir)):
        top = os.path.join(data_dir, folder)
        if not os.path.isdir(top):
            continue
        for label in sorted(os.listdir(top)):
            class_dir = os.path.join(top, label)
            if not os.path.isdir(class_dir) or label.startswith("."):
                continue
            for name in sorted(os.listdir(class_dir)):
                if name.lower().endswith(IMAGE_SUFFIXES):
                    found.append((os.path.join(class_dir, name), label))
    if not found:
        raise BenchmarkError(f"no images under {data_dir}/<folder>/<class>/")
    return found


def write_csv(path: str, rows: Sequence[tuple[str, str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_uri", "label"])
        writer.writerows(rows)
    return path


def phases(log_path: str, wall_s: float) -> dict[str, float | None]:
    """Seconds of each start-up phase of a job (:data:`PHASE_ENDS`) and of the rest ("work"),
    from its log's timestamps; the job's start is the log's last write minus its wall time."""
    end = os.path.getmtime(log_path)
    start = end - wall_s
    stamps: dict[str, float] = {}
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _STAMP.match(line)
            if not m:
                continue
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for name, pattern in PHASE_ENDS:
                if name not in stamps and pattern.search(line):
                    stamps[name] = t
    found: dict[str, float | None] = {}
    last = start
    for name, _ in PHASE_ENDS:
        if name in stamps:
            found[name] = round(stamps[name] - last, 1)
            last = stamps[name]
        else:
            found[name] = None
    found["work (after the first image check), finish"] = round(end - last, 1)
    return found


def run_job(name: str, csv_path: str, work_dir: str, flags: Sequence[str]) -> dict:
    """One timed job run into ``<work_dir>/<name>``; returns timings and its manifest."""
    out = os.path.join(work_dir, name)
    command = common.preprocess_command(
        f"--input_csv={csv_path}", f"--output_dir={out}", "--overwrite", *flags
    )
    common.log(f"  {name}: {shlex.join(command)}")
    result = common.run_logged(command, os.path.join(work_dir, "logs", f"{name}.log"))
    manifest = common.read_manifest(out)
    result.update(
        output_dir=out,
        command=shlex.join(command),
        rows=manifest["rows"],
        reuse=manifest.get("reuse"),
        splits={split: v["count"] for split, v in manifest["splits"].items()},
        inference_runtime=manifest.get("inference_runtime"),
    )
    result["n"] = manifest["rows"]["read"]
    result["phases_s"] = phases(result["log"], result["wall_s"])
    reuse = manifest.get("reuse") or {}
    common.log(
        f"  {name}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
        f"written {manifest['rows']['written']}, reused {reuse.get('reused', '-')} "
        f"(load {result['loadavg_1m_before']:.1f} before)"
    )
    return result


def check_incremental(incremental: dict, base: dict, full: dict) -> None:
    """The incremental run reused every base image, embedded the rest, and matches the full run.

    Raises:
      BenchmarkError: otherwise.
    """
    reuse = incremental.get("reuse") or {}
    if reuse.get("skipped"):
        raise BenchmarkError(f"the incremental run reused nothing: {reuse['skipped']}")
    if reuse.get("reused") != base["rows"]["written"]:
        raise BenchmarkError(
            f"reused {reuse.get('reused')} images, the base run wrote {base['rows']['written']}"
        )
    if incremental["rows"] != full["rows"] or incremental["splits"] != full["splits"]:
        raise BenchmarkError(
            f"incremental rows {incremental['rows']} / splits {incremental['splits']} differ "
            f"from the full run's {full['rows']} / {full['splits']}"
        )


# ----------------------------------------------------------------------------------------------
# The incremental run's per-image work, without Beam
# ----------------------------------------------------------------------------------------------


def _cpu(fn: Callable[[], int]) -> tuple[float, int]:
    """CPU seconds of one call of ``fn`` (which returns how many items it handled)."""
    start = time.process_time()
    count = fn()
    return time.process_time() - start, count


def stage_costs(paths: Sequence[str], new_paths: Sequence[str], base_dir: str) -> dict:
    """CPU seconds (one thread) of the work an incremental run still does, over every image."""
    from pipeline import dataset, files, images, reuse, sinks
    from schemas import features
    from schemas.backbones import DEFAULT_CROP_FRACTION

    max_bytes = images.DEFAULT_MAX_FILE_BYTES
    data = {}

    def read_and_hash() -> int:
        for path in paths:
            data[path] = files.read_image_bytes(path, max_bytes)
            images.sha256_hex(data[path])
        return len(paths)

    def header() -> int:
        for path in paths:
            images.image_format(data[path])
        return len(paths)

    def validate() -> int:
        for path in paths:
            images.validate(data[path])
        return len(paths)

    def index_previous() -> int:
        count = 0
        for shard in dataset.shard_paths(base_dir):
            for record in sinks.read_tfrecords(shard):
                reuse.stored_sha256(record)
                count += 1
        return count

    stored = []

    def read_stored() -> int:
        stored.clear()
        for shard in dataset.shard_paths(base_dir):
            stored.extend(reuse.parse_stored(r) for r in sinks.read_tfrecords(shard))
        return len(stored)

    def write_records() -> int:
        with tempfile.TemporaryDirectory() as tmp:
            examples = (
                features.make_example(
                    jpeg=s.jpeg,
                    height=s.height,
                    width=s.width,
                    source="/photos/x.jpg",
                    sha256=s.sha256,
                    label=0,
                    label_text="cats",
                    embedding=s.embedding,
                ).SerializeToString()
                for s in stored
            )
            return sinks.write_tfrecords(
                os.path.join(tmp, f"t{features.TFRECORD_SUFFIX}"), examples
            )

    def reencode_new() -> int:
        for path in new_paths:
            images.reencode(
                data[path],
                max_side=images.DEFAULT_MAX_SIDE,
                backbone_size=224,
                crop_fraction=DEFAULT_CROP_FRACTION,
            )
        return len(new_paths)

    stages = {}
    for name, fn in (
        ("read_sha256_all", read_and_hash),
        ("header_check_all", header),
        ("full_validation_all", validate),
        ("index_previous", index_previous),
        ("read_parse_stored", read_stored),
        ("build_write_stored", write_records),
        ("reencode_new", reencode_new),
    ):
        seconds, count = _cpu(fn)
        stages[name] = {"cpu_s": round(seconds, 3), "items": count}
        common.log(f"  {name}: {seconds:.2f} s CPU over {count} items")
    return stages


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def summarise(results: dict) -> None:
    startup, startup_inc = results["startup_full"], results["startup_incremental"]
    rounds = []
    for full, inc in zip(results["full"], results["incremental"], strict=True):
        rounds.append(
            {
                "wall_ratio": round(inc["wall_s"] / full["wall_s"], 3),
                "cpu_ratio": round(inc["cpu_s"] / full["cpu_s"], 3),
                "net_wall_ratio": common.ratio(
                    inc["wall_s"] - startup_inc["wall_s"], full["wall_s"] - startup["wall_s"]
                ),
                "net_cpu_ratio": common.ratio(
                    inc["cpu_s"] - startup_inc["cpu_s"], full["cpu_s"] - startup["cpu_s"]
                ),
                "startup_share_of_incremental_wall": round(
                    startup_inc["wall_s"] / inc["wall_s"], 3
                ),
                "startup_share_of_incremental_cpu": round(startup_inc["cpu_s"] / inc["cpu_s"], 3),
            }
        )
    results["rounds"] = rounds
    stages = results["stages"]
    n, k = results["images"], results["new_images"]
    full = results["full"][-1]
    full_steady_cpu_per_image = (full["cpu_s"] - startup["cpu_s"]) / (full["n"] - startup["n"])
    expected = {
        "read_sha256_all": stages["read_sha256_all"]["cpu_s"],
        "header_check_all": stages["header_check_all"]["cpu_s"],
        "full_validation_new": stages["full_validation_all"]["cpu_s"] * k / n,
        "index_previous (read 1)": stages["index_previous"]["cpu_s"],
        "read_parse_stored (read 2)": stages["read_parse_stored"]["cpu_s"],
        "build_write_stored": stages["build_write_stored"]["cpu_s"],
        "new images, full run's steady CPU each": full_steady_cpu_per_image * k,
    }
    results["incremental_steady_cpu_model"] = {key: round(v, 2) for key, v in expected.items()}
    results["full_steady_cpu_ms_per_image"] = round(full_steady_cpu_per_image * 1000, 2)


def format_report(results: dict) -> str:
    lines = common.report_header("Incremental runs (--reuse_from) vs a full run", results)
    lines.append(
        f"data    : {results['data']}: {results['images']} images, {results['new_images']} new "
        f"({results['new_fraction']:.0%}); inference runtime "
        f"{results['full'][-1]['inference_runtime']}"
    )
    lines.append("")
    lines.append(f"{'run':<34} {'images':>7} {'wall s':>8} {'CPU s':>8} {'load':>6}")
    named = [
        (f"start-up, full (n={results['startup_full']['n']})", results["startup_full"]),
        (
            f"start-up, incremental (n={results['startup_incremental']['n']})",
            results["startup_incremental"],
        ),
        ("base (full run, earlier data)", results["base"]),
    ]
    for i, (full, inc) in enumerate(zip(results["full"], results["incremental"], strict=True)):
        named += [(f"full #{i + 1}", full), (f"incremental #{i + 1}", inc)]
    for name, run in named:
        lines.append(
            f"{name:<34} {run['n']:>7} {run['wall_s']:>8.1f} {run['cpu_s']:>8.1f} "
            f"{run['loadavg_1m_before']:>6.1f}"
        )
    lines.append("")
    lines.append(
        f"{'round':<6} {'inc/full wall':>14} {'inc/full CPU':>13} {'net wall':>9} "
        f"{'net CPU':>8} {'start-up share of inc (wall, CPU)':>34}"
    )
    for i, r in enumerate(results["rounds"]):
        lines.append(
            f"{i + 1:<6} {r['wall_ratio']:>14.3f} {r['cpu_ratio']:>13.3f} "
            f"{common.cell(r['net_wall_ratio'], 9, 3)} {common.cell(r['net_cpu_ratio'], 8, 3)} "
            f"{r['startup_share_of_incremental_wall']:>16.2f}, "
            f"{r['startup_share_of_incremental_cpu']:.2f}"
        )
    lines.append("(net: each run's start-up run subtracted; target inc/full <= 0.15)")
    lines.append("")
    lines.append("wall seconds by phase, from the jobs' log timestamps:")
    for name, run in named:
        parts = ", ".join(f"{k} {common.cell(v, 0, 1).strip()}" for k, v in run["phases_s"].items())
        lines.append(f"  {name}: {parts}")
    lines.append("")
    lines.append(
        f"full run steady CPU: {results['full_steady_cpu_ms_per_image']:.1f} ms per image. "
        "Incremental run's steady CPU, modelled from its per-image work (one thread, no Beam):"
    )
    model = results["incremental_steady_cpu_model"]
    for name, seconds in model.items():
        lines.append(f"  {name:<44} {seconds:>7.2f} s")
    inc, startup_inc = results["incremental"][-1], results["startup_incremental"]
    measured = inc["cpu_s"] - startup_inc["cpu_s"]
    lines.append(f"  {'sum':<44} {sum(model.values()):>7.2f} s")
    lines.append(
        f"  {'measured (incremental - its start-up run)':<44} {measured:>7.2f} s "
        "(the difference: Beam's per-element work, shuffles, more steps)"
    )
    lines.append(common.REPORT_RULE)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="<data>/<folder>/<class>/<image>")
    parser.add_argument(
        "--generate",
        type=photo_mix.parse_mix,
        default=None,
        metavar="WxH:N",
        help="instead of --data: N photos of WxH made from real ones (e.g. 4032x3024:160)",
    )
    parser.add_argument("--new_fraction", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=1, help="full/incremental pairs to time")
    parser.add_argument("--startup_n", type=int, default=20)
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "hubflow-incr"))
    common.add_job_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    results: dict = {
        "command": common.command_line(),
        "machine": common.machine_info(),
        "git": common.git_revision(),
        "json": os.path.join(work_dir, RESULTS_FILE),
        "data": args.data,
        "new_fraction": args.new_fraction,
    }
    try:
        if args.generate:
            (width, height, count), *_ = args.generate
            args.data = os.path.join(work_dir, "photos")
            made = photo_mix.generate(args.data, width, height, count, os.cpu_count() or 1)
            results["data"] = f"{args.data} ({count} photos of {width}x{height}, generated)"
            results["generated_mb"] = {k: made[k] for k in ("mean_mb", "min_mb", "max_mb")}
        photos = list_photos(args.data)
        rng = random.Random(SEED)
        new = set(rng.sample(range(len(photos)), round(args.new_fraction * len(photos))))
        base_rows = [p for i, p in enumerate(photos) if i not in new]
        results.update(images=len(photos), new_images=len(new))
        csv_dir = os.path.join(work_dir, "csv")
        os.makedirs(csv_dir, exist_ok=True)
        all_csv = write_csv(os.path.join(csv_dir, "all.csv"), photos)
        base_csv = write_csv(os.path.join(csv_dir, "base.csv"), base_rows)
        tiny = base_rows[: args.startup_n]
        tiny_csv = write_csv(os.path.join(csv_dir, "tiny.csv"), tiny)
        common.log(f"{len(photos)} photos from {args.data}, {len(new)} of them new")

        flags = list(args.job_flag)
        results["startup_full"] = run_job("startup_full", tiny_csv, work_dir, flags)
        reuse_tiny = f"--reuse_from={os.path.join(work_dir, 'startup_full')}"
        results["startup_incremental"] = run_job(
            "startup_incremental", tiny_csv, work_dir, [*flags, reuse_tiny]
        )
        results["base"] = base = run_job("base", base_csv, work_dir, flags)
        results["full"], results["incremental"] = [], []
        reuse_base = f"--reuse_from={base['output_dir']}"
        for i in range(args.rounds):
            full = run_job(f"full_{i + 1}", all_csv, work_dir, flags)
            incremental = run_job(f"incremental_{i + 1}", all_csv, work_dir, [*flags, reuse_base])
            check_incremental(incremental, base, full)
            results["full"].append(full)
            results["incremental"].append(incremental)
            common.write_json(results["json"], results)
        common.log("per-image work of an incremental run, one thread, no Beam:")
        new_paths = [photos[i][0] for i in sorted(new)]
        results["stages"] = stage_costs([p for p, _ in photos], new_paths, base["output_dir"])
        summarise(results)
    except BenchmarkError as e:
        return common.fail(results, e)
    common.write_json(results["json"], results)
    print(format_report(results))
    for i in range(args.rounds):
        shutil.rmtree(os.path.join(work_dir, f"full_{i + 1}"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
