"""Photo-size mix of the preprocessing benchmark (``python -m benchmarks.preprocess --photo_mix``).

Users bring camera and phone photos, not 500x375 thumbnails. This module makes, for each size
of the mix (default 500x375, 2592x1944 and 4032x3024), photos with real JPEG structure: real
photos from ``../shared/data/hymenoptera`` resized to that size (LANCZOS; portrait sources stay
portrait), with Gaussian sensor-like noise (sigma 6) and re-encoded at quality 90, so a 12-MP
one is 2-5 MB like a phone photo. Each photo gets its own noise, so no two are duplicates.

Per size it then times, in this process and one thread, the job's per-image functions (pass 2
``transforms.hash_and_validate``, pass 3 ``EncodeFn.work`` with the job's defaults), and runs the
real job twice in a subprocess with default flags (``--batch_size`` as the benchmark's job):
on :data:`TINY_N` photos and on N. ``steady = (N - n0) / (wall(N) - wall(n0))`` removes the
start-up. Every rate is reported against the raw backbone timed in the same run and against
the smallest size's steady rate (the issue's target: 12 MP at >= 0.6x of 500x375).
"""

from __future__ import annotations

import argparse
import csv
import io
import multiprocessing
import os
import shlex
import shutil
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from benchmarks import common, memory
from benchmarks.common import BenchmarkError

DEFAULT_MIX = "500x375:1000,2592x1944:300,4032x3024:240"
SOURCE_DATA = os.path.join(common.SHARED_DATA, "hymenoptera")
NOISE_SIGMA = 6.0
QUALITY = 90
TINY_N = 16  # photos in the start-up run of each size
TINY_REPEATS = 2  # start-up runs per size; the fastest is kept (load only ever slows)
STAGE_SAMPLE = 6  # photos per size for the per-image stage timings


def parse_mix(value: str) -> list[tuple[int, int, int]]:
    """An argparse type: ``WxH:N,...`` (N photos of W x H each) -> ``[(W, H, N), ...]``."""
    mix = []
    try:
        for item in value.split(","):
            size, _, count = item.partition(":")
            width, height = (int(x) for x in size.lower().split("x"))
            mix.append((width, height, int(count or 200)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WxH:N[,WxH:N...] (e.g. {DEFAULT_MIX}), got {value!r}"
        ) from None
    if not mix or min(min(m) for m in mix) <= 0 or min(m[2] for m in mix) <= TINY_N:
        raise argparse.ArgumentTypeError(f"sizes must be positive and N > {TINY_N}: {value!r}")
    return mix


def source_photos() -> list[tuple[str, str]]:
    """``(path, label)`` of the real JPEG photos the mix is made from, in a fixed order."""
    found = []
    for root, _, names in os.walk(SOURCE_DATA):
        for name in names:
            path = os.path.join(root, name)
            try:
                with Image.open(path) as image:
                    if image.format == "JPEG" and image.mode == "RGB":
                        found.append((path, os.path.basename(root)))
            except OSError:
                continue
    if not found:
        raise BenchmarkError(f"no JPEG photos under {SOURCE_DATA} to build the photo mix from")
    return sorted(found)


def write_mix_photo(task: tuple[str, str, int, int, int]) -> int:
    """Pool worker: writes one photo of the mix unless it exists; returns its size in bytes."""
    path, source, width, height, seed = task
    if os.path.exists(path):
        return os.path.getsize(path)
    with Image.open(source) as image:
        rgb = image.convert("RGB")
    if (rgb.width < rgb.height) != (width < height):
        width, height = height, width  # keep the source's orientation
    rng = np.random.default_rng(seed)
    pixels = np.asarray(rgb.resize((width, height), Image.Resampling.LANCZOS), np.float32)
    pixels = pixels + rng.normal(0.0, NOISE_SIGMA, pixels.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=QUALITY)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)
    return len(buffer.getvalue())


def generate(work_dir: str, width: int, height: int, count: int, processes: int) -> dict:
    """Makes sure ``count`` photos of this size exist; writes the label CSVs of the two runs."""
    sources = source_photos()
    folder = f"mix_{width}x{height}"
    rows, tasks = [], []
    for i in range(count):
        source, label = sources[i % len(sources)]
        rel = f"{folder}/{label}/photo_{i:05d}.jpg"
        rows.append((rel, label))
        tasks.append((os.path.join(work_dir, rel), source, width, height, width * 100_003 + i))
    for path in {os.path.dirname(t[0]) for t in tasks}:
        os.makedirs(path, exist_ok=True)
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        sizes = np.array(pool.map(write_mix_photo, tasks, chunksize=4), np.float64)
    csvs = {}
    for n in (TINY_N, count):
        csvs[n] = os.path.join(work_dir, f"{folder}_{n}.csv")
        with open(csvs[n], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image_uri", "label"])
            writer.writerows(rows[:n])
    return {
        "count": count,
        "paths": [t[0] for t in tasks],
        "labels": [r[1] for r in rows],
        "csvs": csvs,
        "seconds": round(time.perf_counter() - start, 1),
        "mean_mb": float(sizes.mean()) / 1e6,
        "min_mb": float(sizes.min()) / 1e6,
        "max_mb": float(sizes.max()) / 1e6,
    }


def stage_costs(photos: dict, image_size: int, job_flags: Sequence[str]) -> dict:
    """The job's per-image work on :data:`STAGE_SAMPLE` photos of one size, in this thread.

    Pass 2 is ``transforms.hash_and_validate`` (read, sha256, validation), pass 3 is
    ``EncodeFn.work`` with the job's image flags as ``job_flags`` set them (read, sha256, decode
    at size, JPEG re-encode, the backbone's pixels). Each is the fastest of 3 passes over the
    sample, in ms per photo.
    """
    from pipeline import images, preprocess, transforms
    from pipeline.records import Row

    flags, _ = preprocess.build_parser().parse_known_args(list(job_flags))

    rows = [
        Row("mix.csv", i + 2, path, path, label)
        for i, (path, label) in enumerate(zip(photos["paths"], photos["labels"], strict=True))
    ][:STAGE_SAMPLE]
    encode = transforms.EncodeFn(
        image_size, images.DEFAULT_MAX_PIXELS, flags.max_image_side, flags.jpeg_quality
    )
    hashes = [transforms.hash_and_validate(r, images.DEFAULT_MAX_PIXELS) for r in rows]
    accepted = [transforms.Accepted(h, r, "train") for h, r in zip(hashes, rows, strict=True)]
    stored: list = []

    def best_ms(fn) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best * 1000 / len(rows)

    def pass3() -> None:
        stored[:] = [encode.work(a)[0] for a in accepted]

    pass2_ms = best_ms(
        lambda: [transforms.hash_and_validate(r, images.DEFAULT_MAX_PIXELS) for r in rows]
    )
    pass3_ms = best_ms(pass3)
    return {
        "pass2_ms": pass2_ms,
        "pass3_ms": pass3_ms,
        "stored_mean_kb": float(np.mean([len(k.jpeg) for k in stored])) / 1000,
        "stored_max_kb": max(len(k.jpeg) for k in stored) / 1000,
        "stored_size": [stored[0].width, stored[0].height],
    }


def run_job(csv_path: str, n: int, out: str, backbone: str, batch: int, flags, log: str) -> dict:
    """One run of the job with default flags; fails unless every photo was written."""
    command = common.preprocess_command(
        f"--input_csv={csv_path}",
        f"--output_dir={out}",
        f"--backbone={backbone}",
        f"--batch_size={batch}",
        "--overwrite",
        *flags,
    )
    result = memory.run_measured(command, log)
    manifest = common.read_manifest(out)
    rows = manifest.get("rows", {})
    if rows.get("written") != n or rows.get("read") != n:
        raise BenchmarkError(f"job dropped rows: expected {n} written, manifest says {rows}")
    result.update(
        n=n,
        command=shlex.join(command),
        images_per_s=n / result["wall_s"],
        inference_runtime=manifest.get("inference_runtime", "tensorflow"),
        max_image_side=manifest.get("options", {}).get("max_image_side"),
    )
    shutil.rmtree(out, ignore_errors=True)
    return result


def run(
    work_dir: str,
    mix: Sequence[tuple[int, int, int]],
    backbone: str,
    image_size: int,
    batch: int,
    job_flags: Sequence[str],
    processes: int,
) -> list[dict]:
    """Generates, times and runs each size of the mix; returns one result dict per size."""
    results = []
    for width, height, count in mix:
        name = f"{width}x{height}"
        common.log(f"  photo mix {name}: making {count} photos")
        photos = generate(work_dir, width, height, count, processes)
        common.log(
            f"    {photos['mean_mb']:.2f} MB mean ({photos['min_mb']:.2f}-{photos['max_mb']:.2f})"
        )
        stages = stage_costs(photos, image_size, job_flags)
        common.log(f"    stages alone: {stages}")
        runs: dict[int, list[dict]] = {}
        for n in [TINY_N] * TINY_REPEATS + [count]:
            out = os.path.join(work_dir, f"out_mix_{name}_{n}")
            log = os.path.join(work_dir, "logs", f"job_mix_{name}_{n}.log")
            run_ = run_job(photos["csvs"][n], n, out, backbone, batch, job_flags, log)
            runs.setdefault(n, []).append(run_)
            common.log(
                f"    job N={n}: {run_['wall_s']:.1f} s, {run_['cpu_s']:.1f} CPU s "
                f"(load {run_['loadavg_1m_before']:.2f})"
            )
        startup = min(runs[TINY_N], key=lambda r: r["wall_s"])
        rate, cpu_ms = common.steady(runs[count][0], startup)
        results.append(
            {
                "size": name,
                "pixels": width * height,
                "photos": {k: v for k, v in photos.items() if k not in ("paths", "labels")},
                "stages": stages,
                "startup_run": startup,
                "startup_walls_s": [r["wall_s"] for r in runs[TINY_N]],
                "run": runs[count][0],
                "steady_images_per_s": rate,
                "steady_cpu_ms_per_image": cpu_ms,
            }
        )
    return results


def summarise(mix: list[dict], raw_best: float, raw_after: float, model_cpu_ms: float, cpus: int):
    """Adds each size's ratios: to raw best and after, to the first size, and the CPU bound."""
    first = mix[0]["steady_images_per_s"]
    first_cpu = mix[0]["steady_cpu_ms_per_image"]
    for size in mix:
        rate = size["steady_images_per_s"]
        # The rate ratio when the job keeps every core busy: far less sensitive to other load
        # on the machine than the wall-clock rates.
        size["cpu_ratio_to_first_size"] = common.ratio(first_cpu, size["steady_cpu_ms_per_image"])
        work = size["stages"]["pass2_ms"] + size["stages"]["pass3_ms"]
        size["steady_over_raw"] = common.ratio(rate, raw_best)
        size["steady_over_raw_after"] = common.ratio(rate, raw_after)
        size["steady_over_first_size"] = common.ratio(rate, first)
        # All cores busy on the model plus this size's image work: the most the job can reach.
        size["cpu_bound_images_per_s"] = cpus * 1000 / (model_cpu_ms + work)


def format_report(mix: list[dict], raw: dict, raw_after: float) -> list[str]:
    """The per-size table, as lines."""
    lines = [
        f"photo-size mix (real photos from {SOURCE_DATA} resized, noise sigma {NOISE_SIGMA}, "
        f"q{QUALITY}; the job with default flags and any --job_flag)",
        f"  {'size':>9} {'MB':>5} {'N':>5} {'pass2':>6} {'pass3':>6} {'stored':>7} "
        f"{'e2e':>6} {'steady':>6} {'bound':>6} {'stdy/raw':>8} {'/after':>6} "
        f"{'/first':>6} {'CPUms':>6} {'cpu/1st':>7} {'load':>5}",
    ]
    for size in mix:
        stages, run = size["stages"], size["run"]
        lines.append(
            f"  {size['size']:>9} {size['photos']['mean_mb']:5.2f} {run['n']:>5} "
            f"{stages['pass2_ms']:6.1f} {stages['pass3_ms']:6.1f} "
            f"{stages['stored_mean_kb']:5.0f}KB {run['images_per_s']:6.1f} "
            f"{common.cell(size['steady_images_per_s'], 6, 1)} "
            f"{size['cpu_bound_images_per_s']:6.1f} "
            f"{common.cell(size['steady_over_raw'], 8, 2)} "
            f"{common.cell(size['steady_over_raw_after'], 6, 2)} "
            f"{common.cell(size['steady_over_first_size'], 6, 2)} "
            f"{common.cell(size['steady_cpu_ms_per_image'], 6, 1)} "
            f"{common.cell(size['cpu_ratio_to_first_size'], 7, 2)} "
            f"{run['loadavg_1m_before']:5.2f}"
        )
    lines += [
        "  MB = mean file size; pass2 / pass3 = the job's per-image functions alone, one thread, "
        "ms/photo;",
        "  stored = mean re-encoded JPEG; e2e = N / wall; steady = (N - n0) / (wall(N) - wall(n0)) "
        f"with n0 = {TINY_N} photos of the same size",
        f"    (fastest of {TINY_REPEATS} runs); CPUms = (cpu(N) - cpu(n0)) / (N - n0), the job's "
        "CPU per photo; cpu/1st = the first size's CPUms over it;",
        f"  bound = CPUs x 1000 / (raw model CPU ms {raw['best_cpu_ms_per_image']:.1f} + pass2 + "
        "pass3): all cores busy, no other overhead;",
        f"  stdy/raw, /after: over raw best {raw['best_images_per_s']:.1f} and raw after "
        f"{raw_after:.1f} img/s; /first: over the first size's steady rate (target >= 0.6)",
    ]
    return lines
