"""Backbone benchmark: throughput against accuracy of the built-in EfficientNet-Lite presets.

Usage::

    python -m benchmarks.backbones [--work_dir DIR] [--presets lite0,lite1,lite2,lite0+lite2]
                                   [--datasets hymenoptera,catsdogs] [--seeds 42,7,1]
                                   [--raw_seconds 12] [--skip_raw] [--startup_n 4]
                                   [--reuse_data]
                                   [--job_flag=--runner=FnApiRunner ...]

Method (one run prints every figure and writes ``<work_dir>/backbones_benchmark.json``, rewritten
after every step so a partial run keeps what it measured). ``efficientnet_lite0`` is the baseline
of every comparison, measured in the same run:

1. **Cache.** Each preset is built into ``$HUBFLOW_CACHE`` and converted to TFLite (the job's
   runtime on CPU) first, so no timed job pays the one-time build and conversion.
2. **Embedding alone** (unless ``--skip_raw``). Each preset's TFLite model (the job's conversion,
   batch 1, XNNPACK, one thread per core) embeds pre-made uint8 pixels at its input size, in this
   process. The presets are timed round-robin, 3 rounds of ``--raw_seconds / 3`` each, and each
   keeps its best round, so load from other work hits every preset alike. Reported: images/s
   and CPU ms per image (this process, all threads).
3. **Start-up.** Each preset's job runs on ``--startup_n`` photos per class of hymenoptera's
   ``train/`` (pinned in turn to train, eval and test): its fixed cost (process start, imports,
   backbone load, tf.Transform analysis, writing), which a job on 398 photos mostly is.
4. **Real data.** For each dataset, and each preset in turn, the real preprocessing job
   (``python -m pipeline.preprocess``, default DirectRunner, ``--backbone efficientnet_liteN``,
   otherwise default flags) runs in a subprocess on a label CSV ``image_uri,label,split``:

   * ``hymenoptera`` (``shared/data/hymenoptera``): the 245 ``train/{ants,bees}`` photos with a
     blank split, hashed into train/eval by ``--eval_fraction 0.2 --test_fraction 0``, and the
     153 ``val/`` photos pinned to ``test``;
   * ``catsdogs`` (``shared/data/cats-vs-dogs-2k``): the 1,000 ``train/`` photos hashed the
     same way and the 1,000 ``test/`` photos pinned to ``test`` (part 1 of
     :mod:`benchmarks.real_data`).

   Splits hash image bytes, so every preset sees the same train/eval/test images. Reported:
   rows / job wall time (images/s end to end, start-up included), the job's CPU seconds (user +
   system of the job and its children) per image, the steady rate and CPU per image with the
   start-up run's cost taken out (``(N - n0) / (wall(N) - wall(n0))``, and the same for CPU),
   the embedding rate the job logs, and the 1-min load average before the step. Then the
   trainer (``python -m training.task``) with default flags (the embedding head) trains once
   per ``--seeds`` value (``--seed S`` is the only flag given); reported: test accuracy per
   seed, their mean, and the mean's difference from Lite0's.

The machine may be shared: compare CPU seconds, and wall-clock rates only between steps with a
similar load (the steady wall rate subtracts two wall times and suffers most). Test accuracy on
153 photos moves in steps of 0.65 points, so read hymenoptera's accuracy differences against
that and against the spread over seeds; the trainer is not bit-reproducible on CPU (seed 42 on
Lite0's hymenoptera embeddings gave 0.9216 and 0.9346 in two runs).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from benchmarks import common, real_data
from benchmarks.common import SHARED_DATA, BenchmarkError
from schemas.csv_format import SPLITS

RESULTS_FILE = "backbones_benchmark.json"
# "lite0+lite2": both at once (--backbone efficientnet_lite0,efficientnet_lite2), features
# concatenated; not in the default list.
PRESETS = ("lite0", "lite1", "lite2", "lite0+lite2")
DEFAULT_PRESETS = ("lite0", "lite1", "lite2")
BASELINE = "lite0"
RAW_ROUNDS = 3
# name -> (data dir, folder -> split pinned in the CSV; "" = hashed by the job)
DATASETS = {
    "hymenoptera": (os.path.join(SHARED_DATA, "hymenoptera"), {"train": "", "val": "test"}),
    "catsdogs": (os.path.join(SHARED_DATA, "cats-vs-dogs-2k"), {"train": "", "test": "test"}),
}
JOB_FLAGS = ("--eval_fraction=0.2", "--test_fraction=0")


def preset_name(preset: str) -> str:
    """``lite1`` -> the ``--backbone`` preset ``efficientnet_lite1``; ``lite0+lite2`` -> the
    composite ``efficientnet_lite0,efficientnet_lite2``."""
    return ",".join(f"efficientnet_{part}" for part in preset.split("+"))


def write_startup_csv(data_dir: str, path: str, per_label: int) -> int:
    """A tiny label CSV for the start-up run: the first ``per_label`` photos of each class of
    ``data_dir/train``, pinned round-robin to train, eval and test (none empty). Returns rows."""
    rows = []
    root = os.path.join(data_dir, "train")
    for label in sorted(d for d in os.listdir(root) if not d.startswith(".")):
        names = sorted(n for n in os.listdir(os.path.join(root, label)) if not n.startswith("."))
        for i, name in enumerate(names[:per_label]):
            rows.append([os.path.join(root, label, name), label, SPLITS[i % len(SPLITS)]])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_uri", "label", "split"])
        writer.writerows(rows)
    return len(rows)


# ----------------------------------------------------------------------------------------------
# In this process: the cache, and the embedding alone
# ----------------------------------------------------------------------------------------------


def warm_cache(preset: str):
    """Builds the preset into the cache and converts it as the job does; returns the TFLite model.

    Raises:
      BenchmarkError: the preset does not convert to TFLite (the job would embed with TF).
    """
    from backbones import hub, registry, tflite_runtime
    from schemas.backbones import RUNTIME_TFLITE

    started = time.perf_counter()
    spec = hub.probe(registry.resolve(preset_name(preset)))
    runtime = tflite_runtime.resolve(spec, "auto")
    if runtime.name != RUNTIME_TFLITE:
        raise BenchmarkError(f"{spec.name}: the job would not embed with TFLite: {runtime.reason}")
    common.log(
        f"  {spec.name}: {spec.image_size} px, {spec.embedding_dim} features, TFLite min cosine "
        f"{runtime.min_cosine:.7f} ({time.perf_counter() - started:.1f} s, built on first use)"
    )
    return spec, tflite_runtime.load(runtime)


def raw_throughput(models: dict, seconds: float, rounds: int = RAW_ROUNDS) -> dict:
    """Images/s and CPU ms/image of each preset's TFLite model on uint8 pixels, round-robin.

    Args:
      models: preset -> (spec, TFLite embedder), from :func:`warm_cache`.
    """
    import tensorflow as tf

    rng = np.random.default_rng(1)
    inputs = {
        preset: rng.integers(0, 256, [1, spec.image_size, spec.image_size, 3], dtype=np.uint8)
        for preset, (spec, _) in models.items()
    }
    results: dict[str, dict] = {}
    for round_ in range(rounds):
        for preset, (_, model) in models.items():
            load = common.loadavg()
            calls, elapsed, cpu = common.time_calls(
                lambda x, m=model: tf.constant(m(x)),
                inputs[preset],
                seconds / rounds,
                warmup=3 if round_ == 0 else 1,
            )
            rate = calls / elapsed
            entry = results.setdefault(preset, {"round_images_per_s": []})
            entry["round_images_per_s"].append(rate)
            if rate >= max(entry["round_images_per_s"]):
                entry.update(
                    images_per_s=round(rate, 1),
                    cpu_ms_per_image=round(cpu * 1000 / calls, 2),
                    loadavg_1m_before=load,
                )
    for preset, entry in results.items():
        entry["round_images_per_s"] = [round(r, 1) for r in entry["round_images_per_s"]]
        common.log(
            f"  {preset_name(preset)}: {entry['images_per_s']:.1f} images/s, "
            f"{entry['cpu_ms_per_image']:.1f} CPU ms/image (rounds {entry['round_images_per_s']})"
        )
    return results


# ----------------------------------------------------------------------------------------------
# Subprocesses: the job and the trainer per dataset and preset
# ----------------------------------------------------------------------------------------------


def _job_run(prep: dict) -> dict:
    return {"n": prep["rows"]["read"], "wall_s": prep["wall_s"], "cpu_s": prep["cpu_s"]}


def startup_run(preset: str, csv_path: str, args, work_dir: str) -> dict:
    """The job on the tiny start-up CSV: its fixed cost, taken out of the steady rates."""
    job = [f"--input_csv={csv_path}", f"--backbone={preset_name(preset)}", *JOB_FLAGS]
    return real_data.preprocess(f"startup_{preset}", job, args, work_dir)


def run_dataset(
    dataset: str, preset: str, csv_path: str, startup: dict | None, args, work_dir: str
) -> dict:
    """Preprocesses ``dataset`` with ``preset``, then trains once per seed; returns the figures.

    With ``startup`` (the preset's :func:`startup_run`), the job's steady images/s and CPU ms per
    image are estimated without its fixed cost: ``(N - n0) / (wall(N) - wall(n0))``.
    """
    name = f"{dataset}_{preset}"
    job = [f"--input_csv={csv_path}", f"--backbone={preset_name(preset)}", *JOB_FLAGS]
    prep = real_data.preprocess(name, job, args, work_dir)
    if "cpu_s" in prep:
        prep["cpu_ms_per_image"] = round(prep["cpu_s"] * 1000 / prep["rows"]["read"], 1)
        if startup and "cpu_s" in startup:
            rate, cpu_ms = common.steady(_job_run(prep), _job_run(startup))
            prep["steady_images_per_s"] = round(rate, 1) if rate else None
            prep["steady_cpu_ms_per_image"] = round(cpu_ms, 1) if cpu_ms else None
            common.log(
                f"  steady (start-up of {startup['rows']['read']} images taken out): "
                f"{common.cell(rate, 0, 1)} images/s, {common.cell(cpu_ms, 0, 1)} CPU ms/image"
            )
    runs = {}
    for seed in args.seeds:
        common.log(f"\n-- {dataset}, {preset_name(preset)}: trainer, default flags, --seed {seed}")
        runs[seed] = real_data.train(f"{name}_seed{seed}", prep["output_dir"], [f"--seed={seed}"],
                                     work_dir)  # fmt: skip
    accuracies = [run["test_accuracy"] for run in runs.values()]
    return {
        "preprocess": prep,
        "train": runs,
        "test_accuracy": accuracies,
        "test_accuracy_mean": round(float(np.mean(accuracies)), 4),
        "test_examples": next(iter(runs.values()))["test_examples"],
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _format_table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_report(results: dict) -> str:
    lines = common.report_header("EfficientNet-Lite presets: throughput against accuracy", results)
    raw = results.get("raw") or {}
    if raw:
        base = raw.get(BASELINE, {}).get("images_per_s")
        rows = [("preset", "input", "img/s", "CPU ms/img", "x lite0", "load")]
        for preset, entry in raw.items():
            size = results["specs"][preset]["image_size"]
            rows.append(
                (preset_name(preset), f"{size}px", f"{entry['images_per_s']:.1f}",
                 f"{entry['cpu_ms_per_image']:.1f}",
                 common.cell(common.ratio(entry["images_per_s"], base), 0, 2),
                 f"{entry['loadavg_1m_before']}")
            )  # fmt: skip
        lines += ["", "embedding alone (TFLite, batch 1, uint8 pixels, best of 3 rounds):"]
        lines += _format_table(rows)
    for dataset in results["options"]["datasets"]:
        per_preset = results.get(dataset) or {}
        if not per_preset:
            continue
        base = per_preset.get(BASELINE, {}).get("test_accuracy_mean")
        rows = [
            ("preset", "img/s e2e", "steady", "CPU s", "CPU ms/img", "steady CPU", "embed/s",
             "load", "test acc (seeds)", "mean", "vs lite0"),
        ]  # fmt: skip
        for preset, r in per_preset.items():
            if "error" in r:
                rows.append((preset_name(preset), *["-"] * 9, "ERROR"))
                continue
            p = r["preprocess"]
            timed = "wall_s" in p
            mean = r["test_accuracy_mean"]
            rows.append(
                (preset_name(preset),
                 f"{p['images_per_s']}" if timed else "reused",
                 common.cell(p.get("steady_images_per_s"), 0, 1),
                 f"{p['cpu_s']:.0f}" if timed else "-",
                 f"{p['cpu_ms_per_image']}" if timed else "-",
                 common.cell(p.get("steady_cpu_ms_per_image"), 0, 1),
                 f"{p.get('job_embed_rate_per_s') or '-'}",
                 f"{p.get('load_1m_before', '-')}",
                 " ".join(f"{a:.4f}" for a in r["test_accuracy"]),
                 f"{mean:.4f}",
                 f"{(mean - base) * 100:+.2f} pts" if base is not None else "-")
            )  # fmt: skip
        first = next((r for r in per_preset.values() if "error" not in r), None)
        splits = first["preprocess"]["splits"] if first else {}
        lines += ["", f"{dataset}: splits {splits}; seeds {results['options']['seeds']}"]
        lines += _format_table(rows)
    lines += [
        "",
        "img/s e2e = rows / job wall time (start-up, tf.Transform and writing included); steady ="
        " the same",
        "without the start-up run's fixed cost; CPU s = the job's user+system (steady CPU: per"
        " image, start-up",
        "taken out); embed/s = the rate the job logs; load = 1-min load average before the job.",
        f"results: {results['json']}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _names(choices: Sequence[str]):
    def parse(value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names from {', '.join(choices)}, got {value!r}"
            )
        return names

    return parse


def _non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", default="/tmp/hubflow-backbones-benchmark")
    p.add_argument(
        "--presets",
        type=_names(PRESETS),
        default=list(DEFAULT_PRESETS),
        help=f"comma-separated, from {', '.join(PRESETS)} (default: the first three)",
    )
    p.add_argument("--datasets", type=_names(tuple(DATASETS)), default=list(DATASETS))
    p.add_argument(
        "--seeds", type=common.int_list, default=[42, 7, 1], help="trainer seeds (default 42,7,1)"
    )
    p.add_argument(
        "--raw_seconds", type=float, default=12.0, help="timed seconds per preset, embedding alone"
    )
    p.add_argument("--skip_raw", action="store_true", help="skip the embedding-alone timing")
    p.add_argument(
        "--startup_n",
        type=_non_negative,
        default=4,
        help="photos per class in the start-up run (default 4; 0 skips it and the steady rates)",
    )
    p.add_argument("--reuse_data", action="store_true", help="keep existing preprocessed data")
    common.add_job_flag(p, "the preprocessing jobs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    presets = [BASELINE, *(p for p in args.presets if p != BASELINE)]  # the baseline always runs
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    import tensorflow as tf

    results: dict = {
        "command": common.command_line(),
        "git_revision": common.git_revision(),
        "machine": common.machine_info(tf.__version__),
        "hubflow_cache": os.environ.get("HUBFLOW_CACHE", "~/.cache/hubflow (default)"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "json": os.path.join(work_dir, RESULTS_FILE),
        "options": {
            "presets": presets,
            "datasets": args.datasets,
            "seeds": args.seeds,
            "raw_seconds": args.raw_seconds,
            "job_flag": args.job_flag,
        },
    }
    common.log(f"command: {results['command']}  (code {results['git_revision']})")
    common.log(f"CPUs: {results['machine']['cpus']}; load average 1/5/15 min: {os.getloadavg()}")
    started = time.perf_counter()
    try:
        common.log("\n== 1. build and convert each preset (cached; not timed) ==")
        models = {preset: warm_cache(preset) for preset in presets}
        results["specs"] = {preset: spec.to_json() for preset, (spec, _) in models.items()}
        if not args.skip_raw:
            common.log(f"\n== 2. embedding alone, TFLite, {args.raw_seconds:g} s per preset ==")
            results["raw"] = raw_throughput(models, args.raw_seconds)
        del models
        common.write_json(results["json"], results)
        startups: dict[str, dict] = {}
        if args.startup_n:
            csv_path = os.path.join(work_dir, "startup_labels.csv")
            n = write_startup_csv(DATASETS["hymenoptera"][0], csv_path, args.startup_n)
            common.log(f"\n== 3. the job's fixed cost: {n} images per preset ({csv_path}) ==")
            for preset in presets:
                common.log(f"\n-- start-up run, {preset_name(preset)}")
                try:
                    startups[preset] = startup_run(preset, csv_path, args, work_dir)
                except BenchmarkError as e:
                    common.log(f"  FAILED: {e}")
            results["startup"] = startups
            common.write_json(results["json"], results)
        for dataset in args.datasets:
            data_dir, folders = DATASETS[dataset]
            csv_path = os.path.join(work_dir, f"{dataset}_labels.csv")
            counts = common.write_folder_csv(data_dir, folders, csv_path)
            common.log(f"\n== 4. {dataset}: label CSV {csv_path}: {counts} ==")
            results[dataset] = {}
            for preset in presets:
                common.log(f"\n-- {dataset}, {preset_name(preset)}: preprocessing")
                try:
                    results[dataset][preset] = run_dataset(
                        dataset, preset, csv_path, startups.get(preset), args, work_dir
                    )
                except BenchmarkError as e:
                    common.log(f"  FAILED: {e}")
                    results[dataset][preset] = {"error": str(e)}
                common.write_json(results["json"], results)
    except BenchmarkError as e:
        return common.fail(results, e)
    results["total_wall_s"] = round(time.perf_counter() - started, 1)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    common.write_json(results["json"], results)
    common.log("\n" + format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
