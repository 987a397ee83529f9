"""Throughput and memory benchmark of the preprocessing job (``python -m pipeline.preprocess``).

Usage::

    python -m benchmarks.preprocess [--sizes 1000,4000] [--work_dir DIR]
                                    [--batch_sizes 8,16,32,64] [--backbone PATH]
                                    [--loop_n 1000] [--job_batch_size B]
    python -m benchmarks.preprocess --photo_mix [500x375:1000,2592x1944:300,4032x3024:240]

Method (one run prints every figure):

1. **Backbone.** Unless ``--backbone`` names another SavedModel / Hub handle, a realistic offline
   backbone is built once and cached in ``--work_dir``
   (:func:`benchmarks.common.build_mobilenet_backbone`): ``tf_keras.applications.MobileNetV2``
   (224x224, no top, average pooling; the architecture and compute of the
   ``mobilenet_v2_100_224`` preset) with random weights, since there is no network, wrapped in a
   tf_keras model that takes RGB in [0, 1] and scales it to [-1, 1] itself, saved with
   ``tf.saved_model.save``: a valid TF-Hub feature-vector module returning ``[N, 1280]``.
2. **Images.** Synthetic photo-sized JPEGs (about 500x375, sizes varying a little, a few
   portrait; smooth multi-scale colour textures plus sensor-like noise, so files are 30-60 KB like
   real photos; four classes) are generated in parallel for the largest N and cached. Each N gets
   its own label CSV naming the first N images.
3. **Raw backbone throughput.** The backbone is loaded with ``backbones.hub.load`` (the loader
   the job uses) and called inside a ``tf.function`` on pre-made float32 ``[B, S, S, 3]`` tensors
   in [0, 1], i.e. already decoded and resized: the model alone. After a warm-up, batches are
   timed for ``--seconds`` per batch size, split into 3 round-robin rounds of which each batch
   size keeps its best (so drifting load from other work does not pick the winner); the best
   batch size is the reference ("raw best") and, unless ``--job_batch_size`` says otherwise, the
   job's ``--batch_size``. Then the same for the backbone converted to TFLite at each batch size
   (the job's conversion and cache, :mod:`backbones.tflite_runtime`; XNNPACK, one thread per
   core) on uint8 pixels: "raw TFLite". The job's steady rate is reported against both, and the
   job and the Beam-free loop run the model in the runtime the job resolves (default ``auto``).
4. **Stage costs.** To explain the end-to-end figure, the job's per-image work is timed on its own
   in one thread on a sample of the images (fastest of 3 passes): pass 2's read + sha256 +
   Pillow validation, pass 3's read + sha256 + decode + JPEG re-encode (q95) + resize to the
   backbone's pixels, writing the finished records as the job's sink does (uncompressed; GZIP
   at zlib's default level, what older versions wrote, is timed beside it), and the job's model
   call on uint8 pixels. The job runs the Pillow work on a thread
   pool that overlaps the model, so on a machine the model already keeps busy the job's rate is
   bounded by CPUs / (model CPU + image-work CPU) per image.
5. **Beam-free loop.** The job's own per-image functions run on ``--loop_n`` images in this
   process with the job's thread pool, in-flight bound, batch size, model handler, example
   builder and TFRecord writer, but no Beam: pass 2 for every image, then pass 3 overlapped with the
   model (:func:`beam_free_loop`: scheduled by ``pipeline.parallel.ordered_map`` as the job's
   ``ThreadedDoFn`` schedules, written by ``pipeline.sinks.write_tfrecords``). Its rate over raw
   best is the most the job's steady ratio can reach on this machine; the job's steady rate over
   it is what Beam's per-element work keeps.
6. **End to end.** For a tiny N (``--startup_n``, default 20; run ``--startup_repeats`` times,
   fastest kept) and then each N, the real job runs in a subprocess
   (``python -m pipeline.preprocess ... --batch_size <B> --overwrite``, default DirectRunner)
   and is timed by wall clock. Memory is measured two ways: a sampler thread sums ``VmRSS`` over
   the job's whole process tree every 0.2 s (peak tree RSS), and GNU ``/usr/bin/time`` reports
   the kernel's peak RSS of the largest single process (``%M``; the largest sampled ``VmHWM``
   where GNU time is missing). The job's ``manifest.json`` must report ``rows.written == N``
   with nothing rejected, or the benchmark fails. Reported: images/s end to end (N / wall); the
   steady rate with the job's fixed start-up cost removed, estimated from the tiny run as
   ``(N - n0) / (wall(N) - wall(n0))``; both as a ratio of raw best (target >= 0.8), and the
   steady rate also against the raw best batch size timed again after the runs; peak RSS
   per N and ``RSS(largest N) / RSS(smallest N)`` (target: about 1, memory must not grow with N).

All figures are printed as a table and written to ``<work_dir>/preprocess_benchmark.json``.
Timings are wall-clock on whatever else the machine is doing; the load average is recorded
before each timed step so noisy runs can be spotted.

With ``--photo_mix`` the benchmark instead times the raw backbone (step 3, before and after) and
the job on real-photo-derived JPEGs of each size of the mix (:mod:`benchmarks.photo_mix`): per
size the job's per-image functions alone, and the job's steady rate with default flags, against
the raw backbone and the smallest size (``<work_dir>/preprocess_photo_mix.json``).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from benchmarks import common, memory, photo_mix
from benchmarks.common import CLASSES, BenchmarkError

RESULTS_FILE = "preprocess_benchmark.json"
PHOTO_MIX_RESULTS_FILE = "preprocess_photo_mix.json"
RAW_ROUNDS = 3


# ----------------------------------------------------------------------------------------------
# Inputs: backbone and images
# ----------------------------------------------------------------------------------------------


def image_relpath(index: int) -> str:
    """The path of image ``index`` relative to the work dir (and to the label CSVs)."""
    return f"images/{CLASSES[index % len(CLASSES)]}/img_{index:06d}.jpg"


def generate_images(work_dir: str, count: int, processes: int) -> dict:
    """Makes sure images ``0 .. count-1`` exist under ``work_dir/images``; returns size stats."""
    start = time.perf_counter()
    tasks = [(os.path.join(work_dir, image_relpath(i)), i) for i in range(count)]
    sizes = common.write_photos(tasks, processes, chunksize=32)
    return {
        "count": count,
        "seconds": round(time.perf_counter() - start, 1),
        **common.size_stats(sizes),
    }


def write_label_csv(work_dir: str, count: int) -> str:
    """Writes ``labels_<count>.csv`` (header + the first ``count`` images); returns its path."""
    path = os.path.join(work_dir, f"labels_{count}.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_uri", "label"])
        for i in range(count):
            writer.writerow([image_relpath(i), CLASSES[i % len(CLASSES)]])
    return path


# ----------------------------------------------------------------------------------------------
# In-process timings: the model alone and the job's per-image stages
# ----------------------------------------------------------------------------------------------


def load_backbone(handle: str):
    """Resolves and probes ``handle`` as the job does; returns (spec, embedder)."""
    from backbones import hub, registry

    spec = hub.probe(registry.resolve(handle))
    return spec, hub.load(spec)


def raw_backbone_throughput(
    spec,
    embedder,
    batch_sizes: Sequence[int],
    seconds: float,
    rounds: int = RAW_ROUNDS,
    tflite: dict | None = None,
) -> dict:
    """Images/s of the model alone on pre-made float32 ``[B, S, S, 3]`` inputs in [0, 1].

    The batch sizes are timed round-robin, ``rounds`` times for ``seconds / rounds`` each, and
    each keeps its best round: load from other work then hits every batch size alike instead of
    deciding which one looks best. With ``tflite`` (batch size -> converted model, see
    :func:`tflite_models`) those models are timed instead, on uint8 pixels (the model includes
    the scaling to [0, 1]: a cast and a multiply).
    """
    import tensorflow as tf

    size = spec.image_size
    name = "raw TFLite" if tflite is not None else "raw backbone"

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def embed(images):
        return embedder(images)

    if tflite is not None:
        batch_sizes = list(tflite)
        pixels = np.random.default_rng(1).integers(0, 256, [max(batch_sizes), size, size, 3])
        inputs = {batch: pixels[:batch].astype(np.uint8) for batch in batch_sizes}
        calls_of = {
            batch: (lambda x, m=model: tf.constant(m(x))) for batch, model in tflite.items()
        }
    else:
        inputs = {
            batch: tf.random.stateless_uniform([batch, size, size, 3], seed=[1, batch])
            for batch in batch_sizes
        }
        calls_of = dict.fromkeys(batch_sizes, embed)
    per_batch: dict[int, dict] = {}
    for round_ in range(rounds):
        for batch in batch_sizes:
            load = os.getloadavg()[0]
            calls, elapsed, cpu = common.time_calls(
                calls_of[batch], inputs[batch], seconds / rounds, warmup=3 if round_ == 0 else 1
            )
            rate = batch * calls / elapsed
            entry = per_batch.setdefault(batch, {"round_images_per_s": []})
            entry["round_images_per_s"].append(rate)
            if rate >= max(entry["round_images_per_s"]):
                entry.update(
                    images_per_s=rate,
                    cpu_ms_per_image=cpu * 1000 / (batch * calls),
                    batches=calls,
                    seconds=elapsed,
                    loadavg_1m_before=load,
                )
    for batch, entry in per_batch.items():
        rounds_text = ", ".join(f"{r:.1f}" for r in entry["round_images_per_s"])
        print(
            f"  {name}, batch {batch:>4}: {entry['images_per_s']:8.1f} images/s "
            f"(best of rounds: {rounds_text})",
            flush=True,
        )
    best = max(per_batch, key=lambda b: per_batch[b]["images_per_s"])
    return {
        "per_batch": per_batch,
        "best_batch": best,
        "best_images_per_s": per_batch[best]["images_per_s"],
        "best_cpu_ms_per_image": per_batch[best]["cpu_ms_per_image"],
    }


def tflite_models(spec, batch_sizes: Sequence[int]) -> dict:
    """Batch size -> the backbone converted to TFLite for it (the job's conversion and cache,
    :mod:`backbones.tflite_runtime`), for ``batch_sizes`` and the job's model batch size; a
    batch size whose conversion fails parity is left out.

    Raises:
      BenchmarkError: the backbone does not convert.
    """
    from backbones import tflite_runtime
    from schemas.backbones import RUNTIME_TFLITE

    models = {}
    for batch in sorted({tflite_runtime.MODEL_BATCH_SIZE, *batch_sizes}):
        runtime = tflite_runtime.resolve(spec, "auto", batch_size=batch)
        if runtime.name == RUNTIME_TFLITE:
            models[batch] = tflite_runtime.load(runtime)
    if not models:
        raise BenchmarkError(f"{spec.handle} does not convert to TFLite (see the warnings)")
    return models


def job_runtime(spec, job_flags: Sequence[str]):
    """The runtime the job resolves for its ``--inference_runtime`` (default auto)."""
    from backbones import tflite_runtime

    requested = "auto"
    for flag in job_flags:
        if flag.startswith("--inference_runtime="):
            requested = flag.split("=", 1)[1]
    return tflite_runtime.resolve(spec, requested)


def _best_pass_ms(fn, passes: int = 3) -> float:
    """Milliseconds of the fastest of ``passes`` calls of ``fn()`` (load only ever slows)."""
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def stage_costs(work_dir: str, count: int, spec, batch: int, seconds: float, runtime=None) -> dict:
    """Times the job's per-image stages on their own, on the first ``count`` images.

    Each stage runs in this one thread, so its time is CPU time of one core (the job runs the
    Pillow stages on a thread pool, overlapped with the model): pass 2's read + sha256 +
    validation, pass 3's read + sha256 + decode + JPEG re-encode + resize to the backbone's
    pixels (``EncodeFn.work``), writing the finished records as the job's sink does (framing
    only: :mod:`pipeline.sinks`) and, for comparison, their GZIP at zlib's default level (what
    earlier versions wrote), and the job's model call on uint8 pixels:
    its RunInference handler in the job's ``runtime`` (TFLite by default on CPU), all cores.
    """
    import zlib

    from pipeline import images, inference, sinks
    from schemas import features
    from schemas.backbones import DEFAULT_CROP_FRACTION

    paths = [os.path.join(work_dir, image_relpath(i)) for i in range(count)]
    size = spec.image_size

    def read_and_hash(path: str) -> bytes:
        with open(path, "rb") as f:
            data = f.read()
        images.sha256_hex(data)
        return data

    def read_hash_validate() -> None:
        for path in paths:
            images.validate(read_and_hash(path))

    reencoded: list[bytes] = []
    pixels: list[np.ndarray] = []

    def read_hash_reencode_resize() -> None:
        reencoded.clear()
        pixels.clear()
        for path in paths:
            data = read_and_hash(path)
            encoded = images.reencode(data, backbone_size=size, crop_fraction=DEFAULT_CROP_FRACTION)
            reencoded.append(encoded.jpeg)
            pixels.append(encoded.backbone_pixels)

    validate_ms = _best_pass_ms(read_hash_validate) / count
    encode_ms = _best_pass_ms(read_hash_reencode_resize) / count

    rng = np.random.default_rng(0)
    records = [
        features.make_example(
            jpeg=jpeg, height=1, width=1, source=path, sha256="0" * 64, label=0,
            label_text=CLASSES[0], embedding=rng.random(spec.embedding_dim, np.float32),
        ).SerializeToString()
        for jpeg, path in zip(reencoded, paths, strict=True)
    ]  # fmt: skip
    compressed = [0]

    def compress() -> None:
        compressor = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        compressed[0] = sum(len(compressor.compress(r)) for r in records)
        compressed[0] += len(compressor.flush())

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"stage{features.TFRECORD_SUFFIX}")
        write_ms = _best_pass_ms(lambda: sinks.write_tfrecords(path, records)) / count
    records_cost = {
        "write_ms_per_record": write_ms,
        "gzip_level_6_ms_per_record": _best_pass_ms(compress) / count,
        "gzip_size_ratio": compressed[0] / sum(len(r) for r in records),
    }

    handler = inference.ImageEmbeddingModelHandler(spec, batch, runtime)  # the job's runtime
    model = handler.load_model()
    stacked = list(np.stack((pixels * (batch // len(pixels) + 1))[:batch]))
    for _ in range(3):  # traced and warm, as the job's is by then
        handler.run_inference(stacked, model)
    calls, start = 0, time.perf_counter()
    while True:
        handler.run_inference(stacked, model)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            break
    embed_rate = batch * calls / elapsed
    image_work_ms = validate_ms + encode_ms + write_ms
    return {
        "sample_images": count,
        "reencoded_mean_kib": float(np.mean([len(x) for x in reencoded])) / 1024,
        "read_hash_validate_ms": validate_ms,
        "read_hash_reencode_resize_ms": encode_ms,
        "records": records_cost,
        "image_work_ms": image_work_ms,
        "job_embed_images_per_s": embed_rate,
        "job_embed_runtime": runtime.name if runtime is not None else "tensorflow",
        "batch": batch,
    }


def beam_free_loop(
    work_dir: str, count: int, spec, batch: int, out_prefix: str, runtime=None
) -> dict:
    """The job's per-image work with perfect overlap and no framework: this machine's ceiling.

    Runs, in this process and without Beam, exactly the functions the job runs per image, in the
    job's order and with the job's threading: pass 2 (``transforms.hash_and_validate``) for every
    image on a pool of ``parallel.default_threads()`` threads, then (after that barrier, as the
    job's GroupByKey is one) pass 3 (``EncodeFn.work``) on the pool with the job's in-flight
    bound (``parallel.ordered_map``: the scheduling of the job's ``ThreadedDoFn``), while this
    thread runs the job's model handler on batches of ``batch``, builds each TFExample with
    ``schemas.features.make_example`` and writes it as the job's sink does
    (``sinks.write_tfrecords``: Beam's TFRecord framing, uncompressed). What the job
    does beyond this is Beam's per-element work and the start-up; so ``loop / raw`` is the most
    the job's steady ratio can reach on this machine, and ``job steady / loop`` is what Beam
    keeps of it.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import images, inference, parallel, sinks, transforms
    from pipeline.records import Row
    from schemas import features
    from schemas.backbones import DEFAULT_CROP_FRACTION

    out_path = out_prefix + features.TFRECORD_SUFFIX
    rows = [
        Row("bench.csv", i + 2, image_relpath(i), os.path.join(work_dir, image_relpath(i)),
            CLASSES[i % len(CLASSES)])
        for i in range(count)
    ]  # fmt: skip
    threads = parallel.default_threads()
    handler = inference.ImageEmbeddingModelHandler(spec, batch, runtime)  # the job's runtime
    model = handler.load_model()
    encode = transforms.EncodeFn(
        spec.image_size,
        images.DEFAULT_MAX_PIXELS,
        None,
        images.DEFAULT_JPEG_QUALITY,
        crop_fraction=DEFAULT_CROP_FRACTION,  # the job's default framing
    )
    index = {label: i for i, label in enumerate(CLASSES)}
    warm = transforms.hash_and_validate(rows[0], images.DEFAULT_MAX_PIXELS)
    _, pixels = encode.work(transforms.Accepted(warm, rows[0], "train"))
    handler.run_inference([pixels] * batch, model)  # traced and warm, as the job's is by then
    limit = transforms.encode_in_flight(batch)  # EncodeAndEmbed's bound

    def embed(encoded_batch: list) -> list[bytes]:
        """One model call on a batch of ``(Encoded, pixels)``; the serialized TFExamples."""
        results = handler.run_inference([p for _, p in encoded_batch], model)
        examples = []
        for (key, _), result in zip(encoded_batch, results, strict=True):
            row = key.accepted.row
            example = features.make_example(
                jpeg=key.jpeg, height=key.height, width=key.width, source=row.uri,
                sha256=key.accepted.sha256, label=index[row.label], label_text=row.label,
                embedding=np.asarray(result.inference, dtype=np.float32),
            )  # fmt: skip
            examples.append(example.SerializeToString())
        return examples

    def examples(pool, accepted):
        """Pass 3 on the pool (in order, at most ``limit`` pending), embedded in batches."""
        ready: list = []
        for encoded in parallel.ordered_map(encode.work, accepted, pool, limit):
            ready.append(encoded)
            if len(ready) == batch:
                yield from embed(ready)
                ready = []
        if ready:
            yield from embed(ready)

    load = os.getloadavg()[0]
    cpu_start, start = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        hashes = list(
            pool.map(lambda r: transforms.hash_and_validate(r, images.DEFAULT_MAX_PIXELS), rows)
        )
        pass2_s = time.perf_counter() - start
        accepted = [transforms.Accepted(h, r, "train") for h, r in zip(hashes, rows, strict=True)]
        written = sinks.write_tfrecords(out_path, examples(pool, accepted))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    if written != count:
        raise BenchmarkError(f"Beam-free loop wrote {written} of {count} records")
    os.remove(out_path)
    return {
        "n": count,
        "threads": threads,
        "batch": batch,
        "wall_s": wall,
        "pass2_s": pass2_s,
        "images_per_s": count / wall,
        "cpu_ms_per_image": cpu * 1000 / count,
        "loadavg_1m_before": load,
    }


# ----------------------------------------------------------------------------------------------
# The job in a subprocess: wall time, peak memory (:mod:`benchmarks.memory`), manifest check
# ----------------------------------------------------------------------------------------------


def job_command(
    csv_path: str, output_dir: str, backbone: str, batch: int, job_flags: Sequence[str]
) -> list[str]:
    """The command line of one preprocessing run."""
    return common.preprocess_command(
        f"--input_csv={csv_path}",
        f"--output_dir={output_dir}",
        f"--backbone={backbone}",
        f"--batch_size={batch}",
        "--overwrite",
        *job_flags,
    )


def check_manifest(output_dir: str, expected: int) -> dict:
    """Reads the job's manifest; fails unless every one of ``expected`` rows was written.

    Raises:
      BenchmarkError: rows missing, rejected or duplicated, or no manifest.
    """
    rows = common.read_manifest(output_dir).get("rows", {})
    if rows.get("written") != expected or rows.get("read") != expected:
        raise BenchmarkError(f"job dropped rows: expected {expected} written, manifest says {rows}")
    return rows


def run_pipeline_size(
    work_dir: str, n: int, backbone: str, batch: int, job_flags: Sequence[str], keep_outputs: bool
) -> dict:
    """One end-to-end run on the first ``n`` images: timings, memory and the manifest check."""
    csv_path = write_label_csv(work_dir, n)
    output_dir = os.path.join(work_dir, f"out_{n}")
    command = job_command(csv_path, output_dir, backbone, batch, job_flags)
    print(f"  job N={n}: {shlex.join(command)}", flush=True)
    result = memory.run_measured(command, os.path.join(work_dir, "logs", f"job_{n}.log"))
    result["rows"] = check_manifest(output_dir, n)
    result["inference_runtime"] = common.read_manifest(output_dir).get("inference_runtime")
    result["n"] = n
    result["images_per_s"] = n / result["wall_s"]
    result["command"] = shlex.join(command)
    print(
        f"  job N={n}: {result['wall_s']:.1f} s, {result['images_per_s']:.1f} images/s, "
        f"peak tree RSS {result['peak_tree_rss_mib']:.0f} MiB",
        flush=True,
    )
    if not keep_outputs:
        shutil.rmtree(output_dir, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def summarise(results: dict) -> None:
    """Adds the derived figures (steady rate, ratios to raw best, RSS growth) to ``results``."""
    raw_best = results["raw"]["best_images_per_s"]
    startup = results["startup_run"]
    raw_cpu_ms = results["raw"]["best_cpu_ms_per_image"]
    raw_after = results["raw_after"]["best_images_per_s"]
    loop = results["loop"]
    loop["over_raw"] = loop["images_per_s"] / raw_best
    loop["over_raw_after"] = loop["images_per_s"] / raw_after
    tflite_best = results["raw_tflite"]["best_images_per_s"]
    tflite_after = results["raw_tflite_after"]["best_images_per_s"]
    for run in results["runs"]:
        rate, cpu_ms = common.steady(run, startup)
        run["steady_over_raw_after"] = rate / raw_after if rate is not None else None
        run["steady_over_raw_tflite"] = common.ratio(rate, tflite_best)
        run["steady_over_raw_tflite_after"] = common.ratio(rate, tflite_after)
        run["e2e_over_raw"] = run["images_per_s"] / raw_best
        run["steady_over_loop"] = rate / loop["images_per_s"] if rate is not None else None
        run["steady_images_per_s"] = rate
        run["steady_over_raw"] = common.ratio(rate, raw_best)
        run["cpu_utilisation"] = run["cpu_s"] / run["wall_s"] / results["machine"]["cpus"]
        run["steady_cpu_ms_per_image"] = cpu_ms
        run["raw_cpu_over_steady_cpu"] = raw_cpu_ms / cpu_ms if cpu_ms is not None else None
    first, last = results["runs"][0], results["runs"][-1]
    results["rss_growth"] = {
        "from_n": first["n"],
        "to_n": last["n"],
        "tree_ratio": last["peak_tree_rss_mib"] / first["peak_tree_rss_mib"],
        "max_process_ratio": last["max_process_rss_mib"] / first["max_process_rss_mib"],
    }


def _raw_rows(timed: dict) -> list[str]:
    """The per-batch rows of a raw throughput table."""
    rows = []
    for batch, r in timed["per_batch"].items():
        mark = "  <- best" if int(batch) == int(timed["best_batch"]) else ""
        rows.append(
            f"  {batch:>5} {r['images_per_s']:9.1f} {r['cpu_ms_per_image']:11.1f} "
            f"{r['loadavg_1m_before']:5.2f}{mark}"
        )
    return rows


def format_report(results: dict) -> str:
    """The final table of every figure, as text."""
    m, raw, stages = results["machine"], results["raw"], results["stages"]
    spec = results["backbone"]
    lines = [
        *common.report_header("hubflow preprocess benchmark", results),
        f"backbone: {spec['handle']} ({spec['image_size']}px -> {spec['embedding_dim']}-d)",
        f"images  : {results['images']['count']} synthetic JPEGs, "
        f"{results['images']['mean_kib']:.0f} KiB mean "
        f"({results['images']['min_kib']:.0f}-{results['images']['max_kib']:.0f})",
        "",
        f"raw backbone (model alone, float32 [B,S,S,3] in [0,1], tf.function; best of "
        f"{RAW_ROUNDS} rounds)",
        f"  {'batch':>5} {'images/s':>9} {'CPU ms/img':>11} {'load':>5}",
    ]
    tflite = results["raw_tflite"]
    lines += [
        *_raw_rows(raw),
        f"raw TFLite (the job's conversion, XNNPACK, {m['cpus']} threads; uint8 pixels; best of "
        f"{RAW_ROUNDS} rounds)",
        f"  {'batch':>5} {'images/s':>9} {'CPU ms/img':>11} {'load':>5}",
        *_raw_rows(tflite),
    ]
    lines += [
        "",
        f"job stages alone (mean over {stages['sample_images']} images; one thread each, "
        f"model on all cores at batch {stages['batch']})",
        f"  pass 2: read + sha256 + Pillow validate          "
        f"{stages['read_hash_validate_ms']:6.2f} ms/img",
        f"  pass 3: read + sha256 + re-encode q95 + resize    "
        f"{stages['read_hash_reencode_resize_ms']:6.2f} ms/img"
        f"   (output {stages['reencoded_mean_kib']:.0f} KiB)",
        f"  write the records (the job's sink, uncompressed)  "
        f"{stages['records']['write_ms_per_record']:6.2f} ms/img",
        f"  (not done) GZIP of the records at level 6         "
        f"{stages['records']['gzip_level_6_ms_per_record']:6.2f} ms/img"
        f"   (size x{stages['records']['gzip_size_ratio']:.3f})",
        f"  image work per image (sum of the job's rows)     "
        f"{stages['image_work_ms']:6.2f} CPU ms/img (raw best: "
        f"{raw['best_cpu_ms_per_image']:.1f} CPU ms/img for the model)",
        f"  model on uint8 pixels (the job's embed call, {stages.get('job_embed_runtime')}) "
        f"{stages['job_embed_images_per_s']:6.1f} img/s",
        "",
        f"Beam-free loop (the job's functions, pool and batch, no Beam; N={results['loop']['n']}, "
        f"{results['loop']['threads']} threads, batch {results['loop']['batch']})",
        f"  {results['loop']['images_per_s']:6.1f} images/s, "
        f"{results['loop']['cpu_ms_per_image']:.1f} CPU ms/img, pass 2 "
        f"{results['loop']['pass2_s']:.1f} of {results['loop']['wall_s']:.1f} s: "
        f"x{results['loop']['over_raw']:.2f} of raw best, x{results['loop']['over_raw_after']:.2f} "
        "of raw after",
        "  the most the job's steady ratio can reach on this machine: the rest of the job is "
        "Beam's",
        "  per-element work and its start-up",
        "",
        f"pipeline end to end (subprocess, DirectRunner default, --batch_size "
        f"{results['job_batch_size']}, inference runtime "
        f"{', '.join(sorted({str(r['inference_runtime']) for r in results['runs']}))})",
        f"  {'N':>5} {'wall s':>7} {'img/s':>6} {'steady':>6} {'e2e/raw':>7} {'stdy/raw':>8} "
        f"{'CPUms/im':>8} {'cpu/raw':>7} {'treeRSS':>7} {'procRSS':>7} {'CPU%':>4} {'load':>5}",
    ]
    for run in [results["startup_run"], *results["runs"]]:
        lines.append(
            f"  {run['n']:>5} {run['wall_s']:7.1f} {run['images_per_s']:6.1f} "
            f"{common.cell(run.get('steady_images_per_s'), 6, 1)} "
            f"{common.cell(run.get('e2e_over_raw'), 7, 2)} "
            f"{common.cell(run.get('steady_over_raw'), 8, 2)} "
            f"{common.cell(run.get('steady_cpu_ms_per_image'), 8, 1)} "
            f"{common.cell(run.get('raw_cpu_over_steady_cpu'), 7, 2)} "
            f"{run['peak_tree_rss_mib']:7.0f} {run['max_process_rss_mib']:7.0f} "
            f"{100 * run['cpu_s'] / run['wall_s'] / m['cpus']:4.0f} {run['loadavg_1m_before']:5.2f}"
        )
    growth = results["rss_growth"]
    best = max(results["runs"], key=lambda r: r["images_per_s"])
    startup = results["startup_run"]
    lines += [
        f"  first row: the start-up run (N={startup['n']}, fastest of "
        f"{', '.join(f'{w:.1f}' for w in results['startup_walls_s'])} s); n0, wall(n0), cpu(n0)",
        "  steady = (N - n0) / (wall(N) - wall(n0)): images/s with the job's fixed start-up "
        "cost removed",
        "  CPUms/im = (cpu(N) - cpu(n0)) / (N - n0): the job's steady CPU time per image; "
        "cpu/raw = raw",
        "    best's CPU ms/img divided by it: the model's share of the job's CPU, which "
        "depends far less",
        "    on other load on the machine than the wall-clock ratios do",
        "  RSS in MiB: tree = peak of summed VmRSS of the job's process tree (sampled every "
        f"{memory.SAMPLE_INTERVAL_S} s);",
        f"    proc = kernel peak RSS of its largest process ({best['max_process_rss_source']})",
        "  CPU% = (user + sys) / wall / CPUs; load = 1-minute load average before the run",
        "  tree RSS peak reached at: "
        + ", ".join(
            f"N={r['n']} {r['peak_tree_rss_at_s']:.0f} s of {r['wall_s']:.0f} s"
            for r in [startup, *results["runs"]]
        )
        + " (timeline in the JSON)",
        "",
        f"raw best        : {raw['best_images_per_s']:.1f} images/s (batch {raw['best_batch']}), "
        f"{raw['best_cpu_ms_per_image']:.1f} CPU ms/img",
        f"raw after jobs  : {results['raw_after']['best_images_per_s']:.1f} images/s "
        f"(batch {raw['best_batch']}, timed again after the end-to-end runs)",
        f"e2e / raw best  : {best['e2e_over_raw']:.2f} at N={best['n']}; steady / raw best "
        f"{common.cell(best.get('steady_over_raw'), 0, 2)}, steady / raw after "
        f"{common.cell(best.get('steady_over_raw_after'), 0, 2)} (target >= 0.8)",
        f"raw TFLite best : {tflite['best_images_per_s']:.1f} images/s (batch "
        f"{tflite['best_batch']}), {results['raw_tflite_after']['best_images_per_s']:.1f} after "
        f"the jobs; job steady / raw TFLite best "
        f"{common.cell(best.get('steady_over_raw_tflite'), 0, 2)}, / after "
        f"{common.cell(best.get('steady_over_raw_tflite_after'), 0, 2)}",
        f"loop / raw best : {results['loop']['over_raw']:.2f} (Beam-free ceiling); job steady / "
        f"loop {common.cell(best.get('steady_over_loop'), 0, 2)} (what Beam keeps of it)",
        f"RSS({growth['to_n']}) / RSS({growth['from_n']}): tree {growth['tree_ratio']:.2f}, "
        f"largest process {growth['max_process_ratio']:.2f} (target ~1.0, not growing with N)",
        "timings are wall clock on a shared machine: compare the load columns between steps",
        f"json            : {results['json']}",
        common.REPORT_RULE,
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=common.int_list,
        default=[1000, 4000],
        help="dataset sizes N for end-to-end runs (default 1000,4000)",
    )
    parser.add_argument(
        "--work_dir",
        default="/tmp/hubflow-benchmark",
        help="cache for backbone and images, job outputs, logs and the JSON",
    )
    parser.add_argument(
        "--batch_sizes",
        type=common.int_list,
        default=[8, 16, 32, 64],
        help="batch sizes for the raw backbone timing (default 8,16,32,64)",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="SavedModel path or Hub handle to use instead of the built random-weight MobileNetV2",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="timed seconds per raw batch size and per stage (default 10)",
    )
    parser.add_argument(
        "--startup_n",
        type=int,
        default=20,
        help="size of the tiny run that estimates the fixed start-up cost",
    )
    parser.add_argument(
        "--startup_repeats",
        type=int,
        default=2,
        help="runs of the tiny job; the fastest is the start-up estimate (default 2)",
    )
    parser.add_argument(
        "--stage_sample",
        type=int,
        default=200,
        help="images used to time the job's stages alone (default 200)",
    )
    parser.add_argument(
        "--loop_n",
        type=int,
        default=1000,
        help="images for the Beam-free loop of the job's per-image work (default 1000)",
    )
    parser.add_argument(
        "--job_batch_size",
        type=int,
        default=None,
        help="the job's --batch_size (default: the raw backbone's best batch size)",
    )
    common.add_job_flag(parser)
    parser.add_argument(
        "--keep_outputs",
        action="store_true",
        help="keep the job outputs (out_<N>/) instead of deleting them",
    )
    parser.add_argument(
        "--photo_mix",
        nargs="?",
        const=photo_mix.parse_mix(photo_mix.DEFAULT_MIX),
        type=photo_mix.parse_mix,
        default=None,
        metavar="WxH:N,...",
        help="instead of the 500x375 runs: the job per photo size, on N real-photo-derived JPEGs "
        f"of each (default mix {photo_mix.DEFAULT_MIX})",
    )
    return parser


def run_photo_mix(args: argparse.Namespace, results: dict, work_dir: str) -> int:
    """``--photo_mix``: the raw backbone before and after the job's runs per photo size."""
    results["json"] = os.path.join(work_dir, PHOTO_MIX_RESULTS_FILE)
    results["git"] = common.git_revision()
    try:
        backbone = args.backbone or os.path.join(work_dir, common.MOBILENET_DIR)
        if not args.backbone:
            common.build_mobilenet_backbone(backbone)
        spec, embedder = load_backbone(backbone)
        results["backbone"] = spec.to_json()
        print("[1/3] raw backbone throughput", flush=True)
        raw = raw_backbone_throughput(spec, embedder, args.batch_sizes, args.seconds)
        results["raw"] = raw
        results["job_batch_size"] = args.job_batch_size or raw["best_batch"]
        print("[2/3] the job per photo size", flush=True)
        mix = photo_mix.run(
            work_dir, args.photo_mix, backbone, spec.image_size, results["job_batch_size"],
            args.job_flag, results["machine"]["cpus"],
        )  # fmt: skip
        results["photo_mix"] = mix
        print("[3/3] raw backbone again, after the job runs", flush=True)
        after = raw_backbone_throughput(spec, embedder, [raw["best_batch"]], args.seconds)
        results["raw_after"] = after
    except BenchmarkError as e:
        return common.fail(results, e)
    photo_mix.summarise(
        mix, raw["best_images_per_s"], after["best_images_per_s"],
        raw["best_cpu_ms_per_image"], results["machine"]["cpus"],
    )  # fmt: skip
    common.write_json(results["json"], results)
    lines = [
        *common.report_header("hubflow preprocess benchmark: photo-size mix", results),
        f"backbone: {spec.handle} ({spec.image_size}px), raw best {raw['best_images_per_s']:.1f} "
        f"img/s (batch {raw['best_batch']}), after {after['best_images_per_s']:.1f}; job "
        f"--batch_size {results['job_batch_size']}, runtime {mix[0]['run']['inference_runtime']}, "
        f"max_image_side {mix[0]['run']['max_image_side']}, code {results['git']}",
        *photo_mix.format_report(mix, raw, after["best_images_per_s"]),
        f"json    : {results['json']}",
        common.REPORT_RULE,
    ]
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs every step, prints the table, writes the JSON; returns the exit code."""
    args = build_parser().parse_args(argv)
    sizes = sorted(set(args.sizes))
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    results: dict = {
        "command": common.command_line(),
        "machine": common.machine_info(),
        "json": os.path.join(work_dir, RESULTS_FILE),
    }
    cpus = results["machine"]["cpus"]
    if args.photo_mix:
        return run_photo_mix(args, results, work_dir)
    try:
        count = max(sizes + [args.startup_n, args.stage_sample, args.loop_n])
        print(f"[1/6] generating {count} images in {work_dir}/images", flush=True)
        results["images"] = generate_images(work_dir, count, processes=cpus)
        print(f"      {results['images']}", flush=True)

        backbone = args.backbone or os.path.join(work_dir, common.MOBILENET_DIR)
        if not args.backbone:
            print(f"[2/6] building random-weight MobileNetV2 backbone at {backbone}", flush=True)
            common.build_mobilenet_backbone(backbone)
        else:
            print(f"[2/6] using backbone {backbone}", flush=True)
        spec, embedder = load_backbone(backbone)
        results["backbone"] = spec.to_json()

        print("[3/6] raw backbone throughput: TensorFlow, then TFLite", flush=True)
        results["raw"] = raw_backbone_throughput(spec, embedder, args.batch_sizes, args.seconds)
        tflite = tflite_models(spec, args.batch_sizes)
        results["raw_tflite"] = raw_backbone_throughput(
            spec, embedder, args.batch_sizes, args.seconds, tflite=tflite
        )
        best_batch = results["raw"]["best_batch"]
        job_batch = args.job_batch_size or best_batch
        results["job_batch_size"] = job_batch
        runtime = job_runtime(spec, args.job_flag)
        results["job_runtime"] = runtime.name

        print("[4/6] job stages alone", flush=True)
        results["stages"] = stage_costs(
            work_dir, args.stage_sample, spec, job_batch, args.seconds, runtime
        )
        print(f"      {results['stages']}", flush=True)

        print(f"[5/6] Beam-free loop of the job's per-image work, N={args.loop_n}", flush=True)
        results["loop"] = beam_free_loop(
            work_dir, args.loop_n, spec, job_batch, os.path.join(work_dir, "loop"),
            runtime,
        )  # fmt: skip
        print(
            f"      {results['loop']['images_per_s']:.1f} images/s "
            f"({results['loop']['cpu_ms_per_image']:.1f} CPU ms/img)",
            flush=True,
        )

        print("[6/6] end-to-end runs of the job", flush=True)
        startup_runs = [
            run_pipeline_size(
                work_dir, args.startup_n, backbone, job_batch, args.job_flag, args.keep_outputs
            )
            for _ in range(max(1, args.startup_repeats))
        ]
        results["startup_walls_s"] = [r["wall_s"] for r in startup_runs]
        results["startup_run"] = min(startup_runs, key=lambda r: r["wall_s"])
        results["runs"] = [
            run_pipeline_size(work_dir, n, backbone, job_batch, args.job_flag, args.keep_outputs)
            for n in sizes
        ]
        # Load from other work drifts over minutes: time the raw best batch size again after
        # the job runs, so a ratio can be read against the raw rate on either side of them.
        print("      raw backbone again, after the job runs", flush=True)
        results["raw_after"] = raw_backbone_throughput(spec, embedder, [best_batch], args.seconds)
        best_tflite = results["raw_tflite"]["best_batch"]
        results["raw_tflite_after"] = raw_backbone_throughput(
            spec, embedder, [best_tflite], args.seconds, tflite={best_tflite: tflite[best_tflite]}
        )
    except BenchmarkError as e:
        return common.fail(results, e)
    summarise(results)
    common.write_json(results["json"], results)
    print(format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
