"""Training benchmark of the trainer (``python -m training.task`` / ``hubflow-train``).

Usage::

    python -m benchmarks.train [--work_dir DIR] [--data_dir DIR]
                               [--skip head|image|scratch|tuning|fine_tune]
                               [--models linear,dnn,cnn] [--image_subset 512]
                               [--few_label_k 10] [--draws 5] [--timing_k 300]
                               [--fine_tune_run "FLAGS" ...]

Method (one run prints every figure; all inputs are built offline and cached in ``--work_dir``):

0. **Datasets.** Each is made by the real preprocessing job (``python -m pipeline.preprocess``,
   DirectRunner, in a subprocess whose wall time is recorded; reused when its ``manifest.json``
   exists, ``--rebuild`` remakes it):

   * *MNIST*: the real ``mnist-10k`` label CSV (10,000 28x28 digits) embedded with the small
     random stand-in backbone of ``backbones.standin`` (64 px -> 32-d). Used by parts 1 and 3.
   * *cats-vs-dogs subset*: the first ``--image_subset`` / 2 files (sorted by name) of each class
     of ``cats-vs-dogs-2k/train`` copied into ``work_dir`` and fed with ``--image_dir``, embedded
     with a random-weight MobileNetV2 at 224 px (``benchmarks.common.build_mobilenet_backbone``:
     the architecture and compute of the ``mobilenet_v2_100_224`` preset, 1280-d; random weights
     because there is no network). Used by parts 1 and 2.

1. **Head throughput on embeddings.** The trainer's own building blocks (``data.make_dataset`` with
   ``training=True``, ``data.embedding_normalization``, ``models.embedding_head``,
   ``models.compile_model``, default embedding-mode config: batch 128, Adam, dropout 0.2) are
   fitted with ``model.fit`` and a timing callback (wall and process-CPU time from
   ``on_epoch_begin`` to ``on_epoch_end``), without validation, checkpoints or TensorBoard: the
   training loop alone. The first epoch (tracing, shuffle-buffer fill) is dropped; the rest give
   examples/s = examples / seconds summed over the steady epochs. Done on ``--data_dir`` (default:
   the MNIST stand-in dataset, 32-d) and on the 1280-d cats-vs-dogs embeddings; the latter split is
   tiny, so its dataset is repeated (``.repeat()`` after batching, whole passes per epoch) to get
   about 8,000 examples per timed epoch. For reference, the same input pipeline is iterated alone
   (no model): when its rate is close to the fit rate, reading the records (TFRecords that
   also hold the JPEG bytes) is the bottleneck, not the head.
2. **Image-mode throughput.** Same approach with ``--features image`` (batch 32, frozen MobileNetV2
   via ``hub.KerasLayer`` + head, images decoded from the stored JPEGs every epoch), without and
   with ``--augment`` (``augment.trainer_augmenter``, as ``task.train`` builds it). Both models are
   built first and then fitted one epoch per ``model.fit`` call, alternating between the two (one
   warm-up epoch each, dropped, then ``--image_rounds`` rounds in ABBA order), so that background
   load hits both alike. Reported per mode: images/s over the steady epochs and of the fastest
   epoch, and process CPU ms per image (less sensitive to other load than wall time). Overhead
   ratio = plain images/s / augmented images/s (1.00 = free), by each measure. Reference figures on
   the same machine: the input pipeline alone (iterating the training dataset, no model) and the
   backbone + head forward pass alone (``model(x, training=False)`` in a ``tf.function`` on a
   pre-made batch).
3. **Time to accuracy.** ``training.task.train(parse_config([...]))`` -- the whole job behind
   the CLI, with default epochs, batch size and early stopping (``--patience`` 5 on eval loss,
   best weights restored) -- for ``--model linear|dnn|cnn --image_size 28 --channels 1`` on the
   MNIST dataset (hash split about 80/10/10). A callback cannot be passed through the CLI, so
   per-epoch times come from the TensorBoard event files the trainer writes
   (``model_dir/logs/stage1/train``): the ``epoch_loss`` scalar of epoch k is written in
   ``on_epoch_end`` (after that epoch's validation and checkpoint), and its event ``wall_time``
   is the end of epoch k. "Final" eval accuracy is the eval accuracy of the model ``train``
   returns (``metrics['eval']``; best-val-loss weights). The time to final accuracy is the end
   of the first epoch whose ``val_accuracy`` (``history.json``) is within 0.5 points of it,
   measured from the ``train()`` call (so it includes data checks and model building). Also
   reported: test accuracy against the product targets (linear >= 0.90, dnn >= 0.95,
   cnn >= 0.98), epochs run, best epoch, ``train()`` wall time (incl. evaluation and export).
   Where the event files cannot be read, epoch ends are estimated as ``(k + 1) * train_seconds
   / epochs`` (marked ``est``).

4. **Head tuning on real photos** (issue 13 items 3 and 5). Datasets made by the real job with
   the default ``efficientnet_lite0`` backbone from a label CSV ``image_uri,label,split``:
   *hymenoptera* (``shared/data/hymenoptera``: the 245 ``train/`` photos hashed into train/eval
   with ``--eval_fraction 0.2 --test_fraction 0``, the 153 ``val/`` photos pinned to test) and
   *cats-vs-dogs-2k* (the same with ``train/`` and ``test/``), and, for timing, *MNIST-10k*
   embedded with Lite0 (``--eval_fraction 0.1 --test_fraction 0.2``). Every run is
   ``task.train(parse_config([...]))`` in this process: default flags (the head tuned on eval)
   against ``--no_tune`` (one head with the default flags: the trainer before tuning), on all
   train examples and with ``--examples_per_class --few_label_k`` over ``--draws`` subsample
   seeds 0, 1, ... (mean, spread). Reported per run: test accuracy and loss, eval loss, the
   chosen settings, the tuning's wall and CPU seconds and ``train_seconds`` (tuning + the chosen
   head's training). The timing run trains the tuned head on ``--timing_k`` MNIST digits per
   class (3,000 at the default 300).
5. **Fine-tuning recipes** on hymenoptera: ``--features image --fine_tune`` plus each
   ``--fine_tune_run`` flag string (default: the trainer's default recipe), reporting the eval
   loss of each stage, the stage exported, test accuracy and the wall time.

All figures are printed as a table and written to ``<work_dir>/train_benchmark.json``.
Timings are wall clock on whatever else the machine is doing (other benchmarks, tests): the
1-minute load average before each step and this process's CPU utilisation are recorded so noisy
figures can be spotted.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence

from benchmarks import common
from benchmarks.common import SHARED_DATA, BenchmarkError

RESULTS_FILE = "train_benchmark.json"
PARTS = ("head", "image", "scratch", "tuning", "fine_tune")
SCRATCH_TARGETS = {"linear": 0.90, "dnn": 0.95, "cnn": 0.98}
WITHIN = 0.005  # "within 0.5 points" of the final eval accuracy
HEAD_EXAMPLES_PER_EPOCH = 8000  # for the repeated 1280-d embedding set


# ----------------------------------------------------------------------------------------------
# Datasets (built with the real preprocessing job, cached)
# ----------------------------------------------------------------------------------------------


def ensure_dataset(
    name: str, output_dir: str, job_args: list[str], work_dir: str, rebuild: bool
) -> dict:
    """Builds ``output_dir`` with the job (in a subprocess, timed) unless a manifest is already
    there."""
    info: dict = {"dir": output_dir}
    if rebuild or not os.path.exists(os.path.join(output_dir, common.MANIFEST_FILE)):
        log_path = os.path.join(work_dir, "logs", f"preprocess_{name}.log")
        command = common.preprocess_command(*job_args, f"--output_dir={output_dir}", "--overwrite")
        common.log(f"  job: {shlex.join(command)}")
        info["job_wall_s"] = common.run_logged(command, log_path)["wall_s"]
        info["job_log"] = log_path
    else:
        common.log(f"  reusing {output_dir}")
    manifest = common.read_manifest(output_dir)
    info["rows"] = manifest["rows"]
    info["splits"] = common.split_counts(manifest, output_dir)
    info["backbone"] = manifest["backbone"]
    return info


def build_mnist(args, work_dir: str) -> dict:
    from backbones.standin import save_standin_backbone

    backbone = os.path.join(work_dir, "standin_backbone")
    if not os.path.isdir(backbone):
        save_standin_backbone(backbone)
    job = [f"--input_csv={args.mnist_csv}", f"--backbone={backbone}", *args.job_flag]
    return ensure_dataset("mnist", os.path.join(work_dir, "mnist"), job, work_dir, args.rebuild)


def build_catsdogs(args, work_dir: str) -> dict:
    images = os.path.join(work_dir, f"catsdogs_{args.image_subset}_images")
    if args.rebuild or not os.path.isdir(images):
        shutil.rmtree(images, ignore_errors=True)
        classes = sorted(
            d for d in os.listdir(args.catsdogs_dir) if not d.startswith(".")
        )  # cats, dogs
        per_class = args.image_subset // len(classes)
        for label in classes:
            folder = os.path.join(args.catsdogs_dir, label)
            names = sorted(n for n in os.listdir(folder) if not n.startswith("."))[:per_class]
            os.makedirs(os.path.join(images, label), exist_ok=True)
            for n in names:
                shutil.copyfile(os.path.join(folder, n), os.path.join(images, label, n))
    backbone = common.build_mobilenet_backbone(os.path.join(work_dir, common.MOBILENET_DIR))
    job = [f"--image_dir={images}", f"--backbone={backbone}", *args.job_flag]
    return ensure_dataset(
        f"catsdogs_{args.image_subset}",
        os.path.join(work_dir, f"catsdogs_{args.image_subset}"),
        job,
        work_dir,
        args.rebuild,
    )


# ----------------------------------------------------------------------------------------------
# Throughput of model.fit (parts 1 and 2)
# ----------------------------------------------------------------------------------------------


def _epoch_timer():
    import tf_keras

    class EpochTimer(tf_keras.callbacks.Callback):
        """Wall and process-CPU seconds of each epoch (on_epoch_begin -> on_epoch_end)."""

        def __init__(self):
            super().__init__()
            self.wall: list[float] = []
            self.cpu: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.wall.append(time.perf_counter() - self._wall)
            self.cpu.append(time.process_time() - self._cpu)

    return EpochTimer()


def _steady(timer, examples_per_epoch: int, unit: str) -> dict:
    """Throughput over all epochs but the first."""
    wall, cpu = timer.wall[1:], timer.cpu[1:]
    cpus = os.cpu_count() or 1
    total = sum(wall)
    rate = examples_per_epoch * len(wall) / total
    return {
        f"{unit}_per_s": rate,
        "epoch_s": [round(w, 3) for w in timer.wall],
        "first_epoch_s": timer.wall[0],
        "steady_epochs": len(wall),
        "steady_epoch_s_min_max": [min(wall), max(wall)],
        "examples_per_epoch": examples_per_epoch,
        "cpu_utilisation": sum(cpu) / total / cpus,
        "cpu_ms_per_example": 1000 * sum(cpu) / (examples_per_epoch * len(wall)),
    }


def _setup(data_dir: str, flags: list[str]):
    """(config, manifest, train files, train count) as ``task.train`` derives them."""
    from training import data
    from training.config import parse_config

    config = parse_config(["--data_dir", data_dir, "--model_dir", "/nonexistent", *flags])
    dataset = data.load(config)
    return config, dataset.manifest, dataset.files["train"], dataset.counts["train"]


def _head_model(config, manifest):
    """The embedding head exactly as ``task.train`` builds it (tf.Transform statistics)."""
    from training import data, models

    dim = manifest.backbone.embedding_dim
    mean, std = data.embedding_normalization(config.data_dir, dim)
    return models.embedding_head(dim, len(manifest.labels), mean, std, config)


def head_throughput(data_dir: str, epochs: int, repeat_to: int = 0) -> dict:
    """examples/s of ``model.fit`` of the embedding head (steady epochs)."""
    import tf_keras

    from training import data, models

    config, manifest, files, count = _setup(data_dir, [])
    tf_keras.utils.set_random_seed(config.seed)
    steps = math.ceil(count / config.batch_size)
    passes = max(1, math.ceil(repeat_to / count)) if repeat_to else 1
    model = _head_model(config, manifest)
    models.compile_model(model, config, len(manifest.labels), config.learning_rate, steps * epochs)
    dataset = data.make_dataset(files, manifest, config, training=True)
    fit_kwargs = {}
    if passes > 1:
        dataset = dataset.repeat()
        fit_kwargs["steps_per_epoch"] = steps * passes
    pipeline_rate = _input_pipeline_rate(
        dataset.take(steps * passes) if passes > 1 else dataset, count * passes
    )
    timer = _epoch_timer()
    load = common.loadavg()
    model.fit(dataset, epochs=epochs, callbacks=[timer], verbose=0, **fit_kwargs)
    result = _steady(timer, count * passes, "examples")
    result["input_pipeline_examples_per_s"] = pipeline_rate
    result.update(
        data_dir=data_dir,
        embedding_dim=manifest.backbone.embedding_dim,
        batch_size=config.batch_size,
        train_examples=count,
        passes_per_epoch=passes,
        loadavg_before=load,
        loadavg_after=common.loadavg(),
    )
    return result


def _input_pipeline_rate(dataset, examples_per_pass: int, seconds: float = 5.0) -> float:
    """Examples/s of iterating ``dataset`` alone (no model): one warm-up pass, then timed ones."""
    for _ in dataset:
        pass
    start, passes = time.perf_counter(), 0
    while passes < 2 or time.perf_counter() - start < seconds:
        for _ in dataset:
            pass
        passes += 1
    return examples_per_pass * passes / (time.perf_counter() - start)


def _image_setup(data_dir: str, augment: bool) -> dict:
    """Model (frozen backbone + head, compiled) and training dataset, as ``task.train`` builds
    them for ``--features image [--augment]``."""
    import tf_keras

    from training import augment as augment_lib
    from training import data, models

    config, manifest, files, count = _setup(
        data_dir, ["--features", "image", *(["--augment"] if augment else [])]
    )
    tf_keras.utils.set_random_seed(config.seed)
    augmenter = augment_lib.trainer_augmenter(config)  # None without --augment, as task.train
    steps = math.ceil(count / config.batch_size)
    model = models.image_classifier(manifest.backbone, _head_model(config, manifest))
    models.compile_model(model, config, len(manifest.labels), config.learning_rate, steps)
    dataset = data.make_dataset(files, manifest, config, training=True, augmenter=augmenter)
    return {
        "model": model,
        "dataset": dataset,
        "count": count,
        "config": config,
        "manifest": manifest,
        "timer": _epoch_timer(),
    }


def image_throughput(data_dir: str, rounds: int) -> dict:
    """images/s of ``model.fit`` with ``--features image``, without and with ``--augment``.

    Both models are built first, then fitted one epoch at a time, alternating (round 0 = one
    warm-up epoch each, dropped; then ``rounds`` rounds in ABBA order), so that both modes see
    the same background load as far as possible.
    """
    import tensorflow as tf

    runs = {"plain": _image_setup(data_dir, False), "augment": _image_setup(data_dir, True)}
    results: dict = {}
    for key, run in runs.items():
        results[key] = {
            "augment": key == "augment",
            "batch_size": run["config"].batch_size,
            "train_examples": run["count"],
            "input_pipeline_images_per_s": _input_pipeline_rate(run["dataset"], run["count"]),
        }
    load = common.loadavg()
    order = list(runs)
    for r in range(rounds + 1):
        for key in order if r % 2 == 0 else order[::-1]:
            run = runs[key]
            run["model"].fit(run["dataset"], epochs=1, callbacks=[run["timer"]], verbose=0)
        common.log(
            f"  round {r}{' (warm-up)' if r == 0 else ''}: "
            + ", ".join(f"{k} {runs[k]['timer'].wall[-1]:.1f} s" for k in order)
        )
    for key, run in runs.items():
        results[key].update(_steady(run["timer"], run["count"], "images"))
        results[key]["best_epoch_images_per_s"] = run["count"] / min(run["timer"].wall[1:])
        results[key]["loadavg_before"] = load
        results[key]["loadavg_after"] = common.loadavg()

    # The frozen backbone + head forward pass alone, on a pre-made batch.
    run = runs["plain"]
    model, batch_size = run["model"], run["config"].batch_size
    size = run["manifest"].backbone.image_size
    batch = tf.random.stateless_uniform([batch_size, size, size, 3], seed=[1, 2])
    forward = tf.function(lambda x: model(x, training=False))
    calls, elapsed, _ = common.time_calls(forward, batch, seconds=10, warmup=3, min_calls=5)
    results["forward_only_images_per_s"] = batch_size * calls / elapsed
    plain, aug = results["plain"], results["augment"]
    results["overhead"] = {
        "wall": plain["images_per_s"] / aug["images_per_s"],
        "best_epoch": plain["best_epoch_images_per_s"] / aug["best_epoch_images_per_s"],
        "cpu": aug["cpu_ms_per_example"] / plain["cpu_ms_per_example"],
    }
    return results


# ----------------------------------------------------------------------------------------------
# Time to accuracy (part 3)
# ----------------------------------------------------------------------------------------------


def tensorboard_epoch_ends(log_dir: str) -> dict[int, float]:
    """``{epoch: wall_time}`` of the ``epoch_loss`` events under ``log_dir`` (train writer)."""
    import tensorflow as tf

    ends: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == "epoch_loss":
                    ends[int(event.step)] = event.wall_time
    return ends


def time_to_accuracy(mnist_dir: str, model_name: str, work_dir: str) -> dict:
    """Runs ``task.train`` on MNIST from scratch; epochs, times and accuracy."""
    from training import checkpoints, task
    from training.config import parse_config

    model_dir = os.path.join(work_dir, "models", model_name)
    flags = [
        "--data_dir", mnist_dir,
        "--model_dir", model_dir,
        "--model", model_name,
        "--image_size", "28",
        "--channels", "1",
        "--overwrite",
    ]  # fmt: skip
    config = parse_config(flags)
    load = common.loadavg()
    cpu0, wall_start, start = time.process_time(), time.time(), time.perf_counter()
    result = task.train(config)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    history = result.history
    val_acc = history["val_accuracy"]
    epochs = len(val_acc)
    final_eval = result.metrics["eval"]["accuracy"]
    test = result.metrics["test"]["accuracy"]
    reached = next(k for k, acc in enumerate(val_acc) if abs(acc - final_eval) <= WITHIN)
    train_s = result.metrics["train_seconds"]
    ends = tensorboard_epoch_ends(os.path.join(model_dir, "logs", checkpoints.STAGE_HEAD, "train"))
    if len(ends) == epochs:
        source = "tensorboard"
        epoch_end_s = [ends[k] - wall_start for k in range(epochs)]
    else:  # evenly spread over the measured training time
        source = "est"
        epoch_end_s = [(k + 1) * train_s / epochs for k in range(epochs)]
    durations = [b - a for a, b in zip(epoch_end_s, epoch_end_s[1:], strict=False)]
    return {
        "model": model_name,
        "command": shlex.join(["hubflow-train", *flags]),
        "test_accuracy": test,
        "test_examples": result.metrics["test"]["examples"],
        "target": SCRATCH_TARGETS.get(model_name),
        "meets_target": test >= SCRATCH_TARGETS.get(model_name, 0.0),
        "final_eval_accuracy": final_eval,
        "epochs": epochs,
        "max_epochs": config.epochs,
        "best_epoch": 1 + min(range(epochs), key=lambda k: history["val_loss"][k]),
        "val_accuracy": [round(a, 4) for a in val_acc],
        "reached_epoch": reached + 1,
        "reached_s": epoch_end_s[reached],
        "epoch_end_s": [round(t, 2) for t in epoch_end_s],
        "epoch_time_source": source,
        "steady_epoch_s": (sorted(durations)[len(durations) // 2] if durations else None),
        "fit_s": train_s,
        "train_call_s": wall,
        "cpu_utilisation": cpu / wall / (os.cpu_count() or 1),
        "loadavg_before": load,
        "loadavg_after": common.loadavg(),
    }


# ----------------------------------------------------------------------------------------------
# Head tuning, few labels and fine-tuning on real photos (parts 4 and 5)
# ----------------------------------------------------------------------------------------------


def build_photo_datasets(args, work_dir: str) -> dict[str, dict]:
    """hymenoptera and cats-vs-dogs-2k (and MNIST for timing), embedded with Lite0."""
    built = {}
    photo_sets = {
        "hymenoptera": (os.path.join(SHARED_DATA, "hymenoptera"), {"train": "", "val": "test"}),
        "cats-vs-dogs-2k": (
            os.path.join(SHARED_DATA, "cats-vs-dogs-2k"),
            {"train": "", "test": "test"},
        ),
    }
    for name, (root, folders) in photo_sets.items():
        csv_path = os.path.join(work_dir, f"{name}.csv")
        common.write_folder_csv(root, folders, csv_path)
        job = [f"--input_csv={csv_path}", "--backbone=efficientnet_lite0"]
        job += ["--eval_fraction=0.2", "--test_fraction=0", *args.job_flag]
        built[name] = ensure_dataset(
            f"{name}_lite0", os.path.join(work_dir, f"{name}_lite0"), job, work_dir, args.rebuild
        )
    if args.timing_k:
        job = [f"--input_csv={args.mnist_csv}", "--backbone=efficientnet_lite0"]
        job += ["--eval_fraction=0.1", "--test_fraction=0.2", *args.job_flag]
        built["mnist-10k"] = ensure_dataset(
            "mnist_lite0", os.path.join(work_dir, "mnist_lite0"), job, work_dir, args.rebuild
        )
    return built


def train_run(data_dir: str, model_dir: str, flags: list[str]) -> dict:
    """``task.train`` with ``flags`` (and ``--overwrite``); what the trainer chose and scored."""
    from training import task
    from training.config import parse_config

    argv = ["--data_dir", data_dir, "--model_dir", model_dir, "--overwrite", *flags]
    load = common.loadavg()
    cpu, start = time.process_time(), time.perf_counter()
    result = task.train(parse_config(argv))
    metrics = result.metrics
    run = {
        "command": shlex.join(["hubflow-train", *argv]),
        "flags": flags,
        "test_accuracy": metrics["test"]["accuracy"],
        "test_loss": metrics["test"]["loss"],
        "test_examples": metrics["test"]["examples"],
        "eval_accuracy": metrics["eval"]["accuracy"],
        "eval_loss": metrics["eval"]["loss"],
        "train_seconds": metrics["train_seconds"],
        "train_call_s": round(time.perf_counter() - start, 1),
        "train_call_cpu_s": round(time.process_time() - cpu, 1),
        "loadavg_before": load,
    }
    tuning = metrics.get("tuning")
    if tuning:
        run["tuning"] = {
            key: tuning[key]
            for key in ("chosen", "eval_loss", "seconds", "cpu_seconds", "train_examples")
        }
        run["tuning"]["candidates"] = [
            {**c["params"], **{k: c[k] for k in ("eval_loss", "epochs", "seconds")}}
            for c in tuning["candidates"]
        ]
    for key in ("subsample", "fine_tune"):
        if key in metrics:
            run[key] = metrics[key]
    return run


def tuning_runs(datasets: dict[str, dict], args, work_dir: str, results: dict) -> None:
    """Part 4: tuned vs --no_tune, on all train examples and K per class over seeds."""
    out = results.setdefault("tuning", {})
    for name in ("hymenoptera", "cats-vs-dogs-2k"):
        data_dir = datasets[name]["dir"]
        models_dir = os.path.join(work_dir, "models", "tuning", name)
        for mode, flags in (("tuned", []), ("no_tune", ["--no_tune"])):
            key = f"{name} all {mode}"
            out[key] = train_run(data_dir, os.path.join(models_dir, f"all_{mode}"), flags)
            common.log(f"  {key}: {_run_line(out[key])}")
            common.write_json(results["json"], results)
            for seed in range(args.draws):
                k_flags = [f"--examples_per_class={args.few_label_k}", f"--subsample_seed={seed}"]
                key = f"{name} {args.few_label_k}/class seed {seed} {mode}"
                model_dir = os.path.join(models_dir, f"k{args.few_label_k}_s{seed}_{mode}")
                out[key] = train_run(data_dir, model_dir, [*flags, *k_flags])
                common.log(f"  {key}: {_run_line(out[key])}")
                common.write_json(results["json"], results)
    if args.timing_k:
        key = f"mnist-10k {args.timing_k}/class tuned (timing)"
        model_dir = os.path.join(work_dir, "models", "tuning", "mnist_timing")
        flags = [f"--examples_per_class={args.timing_k}"]
        out[key] = train_run(datasets["mnist-10k"]["dir"], model_dir, flags)
        common.log(f"  {key}: {_run_line(out[key])}")


def fine_tune_runs(datasets: dict[str, dict], args, work_dir: str, results: dict) -> None:
    """Part 5: --features image --fine_tune recipes on hymenoptera."""
    out = results.setdefault("fine_tune", {})
    data_dir = datasets["hymenoptera"]["dir"]
    for i, extra in enumerate(args.fine_tune_run or [""]):
        flags = ["--features=image", "--fine_tune", *shlex.split(extra)]
        key = f"hymenoptera {' '.join(flags)}"
        model_dir = os.path.join(work_dir, "models", "fine_tune", f"run{i}")
        out[key] = train_run(data_dir, model_dir, flags)
        common.log(f"  {key}: {_run_line(out[key])}")
        common.write_json(results["json"], results)


def _params(params: dict) -> str:
    return ", ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()
    )


def _run_line(run: dict) -> str:
    line = (
        f"test {run['test_accuracy']:.4f} (loss {run['test_loss']:.4f}), eval loss "
        f"{run['eval_loss']:.4f}, train {run['train_seconds']:.1f} s"
    )
    if "tuning" in run:
        t = run["tuning"]
        line += f"; tuned {_params(t['chosen'])} in {t['seconds']:.1f} s"
        line += f" ({t['cpu_seconds']:.1f} s CPU)"
    if "fine_tune" in run:
        f = run["fine_tune"]
        tuned = f["fine_tune_eval_loss"]
        line += f"; exported {f['exported_stage']} (head {f['head_eval_loss']:.4f}, fine-tuned "
        line += "not finite)" if tuned is None else f"{tuned:.4f})"
    return line


def few_label_summary(tuning: dict, k: int) -> list[dict]:
    """Mean and spread of test accuracy over the K-per-class draws, per dataset and mode."""
    rows = []
    for name in ("hymenoptera", "cats-vs-dogs-2k"):
        for mode in ("no_tune", "tuned"):
            prefix, suffix = f"{name} {k}/class seed ", f" {mode}"
            accs = [
                run["test_accuracy"]
                for key, run in tuning.items()
                if key.startswith(prefix) and key.endswith(suffix)
            ]
            if accs:
                rows.append(
                    {
                        "dataset": name,
                        "mode": mode,
                        "draws": len(accs),
                        "mean": float(sum(accs) / len(accs)),
                        "min": min(accs),
                        "max": max(accs),
                        "std": float(statistics.pstdev(accs)),
                    }
                )
    return rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _fmt(value, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def format_report(results: dict) -> str:
    lines = common.report_header("hubflow training benchmark", results)
    for name, info in results.get("datasets", {}).items():
        job = f", job {info['job_wall_s']:.0f} s" if "job_wall_s" in info else " (cached)"
        lines.append(
            f"dataset : {name}: {info['rows']['written']} written / {info['rows']['read']} read, "
            f"splits {info['splits']}, backbone {os.path.basename(info['backbone']['handle'])} "
            f"{info['backbone']['image_size']}px -> {info['backbone']['embedding_dim']}-d{job}"
        )
    head = results.get("head")
    if head:
        lines += [
            "",
            "1. head training on stored embeddings (model.fit, no validation; first epoch dropped)",
            f"  {'dataset':<34} {'dim':>5} {'batch':>5} {'ex/epoch':>8} {'examples/s':>10} "
            f"{'1st ep s':>8} {'steady s':>13} {'CPU%':>5} {'load':>5} {'pipeline':>8}",
        ]
        for name, r in head.items():
            lo, hi = r["steady_epoch_s_min_max"]
            lines.append(
                f"  {name:<34} {r['embedding_dim']:>5} {r['batch_size']:>5} "
                f"{r['examples_per_epoch']:>8} {r['examples_per_s']:10.0f} "
                f"{r['first_epoch_s']:8.2f} {lo:6.2f}-{hi:<6.2f} "
                f"{100 * r['cpu_utilisation']:5.0f} {r['loadavg_before']:5.2f} "
                f"{r['input_pipeline_examples_per_s']:8.0f}"
            )
        lines.append(
            "  pipeline = examples/s of the training input pipeline alone (TFRecord read + "
            "parse; no model)"
        )
    image = results.get("image")
    if image:
        plain, aug = image["plain"], image["augment"]
        lines += [
            "",
            "2. image mode, frozen random-weight MobileNetV2 224 + head (model.fit, batch "
            f"{plain['batch_size']}, {plain['train_examples']} train images/epoch; epochs of both "
            "modes interleaved, warm-up epoch dropped)",
            f"  {'mode':<28} {'images/s':>8} {'best ep':>7} {'1st ep s':>8} {'steady s':>11} "
            f"{'CPU ms/img':>10} {'CPU%':>5} {'pipeline':>8}",
        ]
        for name, r in (("--features image", plain), ("--features image --augment", aug)):
            lo, hi = r["steady_epoch_s_min_max"]
            lines.append(
                f"  {name:<28} {r['images_per_s']:8.1f} {r['best_epoch_images_per_s']:7.1f} "
                f"{r['first_epoch_s']:8.1f} {lo:5.1f}-{hi:<5.1f} {r['cpu_ms_per_example']:10.1f} "
                f"{100 * r['cpu_utilisation']:5.0f} {r['input_pipeline_images_per_s']:8.0f}"
            )
        o = image["overhead"]
        lines += [
            f"  augmentation overhead (plain / augmented rate): {o['wall']:.2f}x over all steady "
            f"epochs, {o['best_epoch']:.2f}x best epochs, {o['cpu']:.2f}x CPU time per image",
            f"  backbone + head forward alone: {image['forward_only_images_per_s']:.1f} images/s "
            "(pre-made batch, no input pipeline, no gradients)",
            "  best ep = images/s of the fastest steady epoch; pipeline = images/s of the input "
            "pipeline alone",
            "    (TFRecord read + JPEG decode + resize [+ augment]; no model)",
        ]
    scratch = results.get("scratch")
    if scratch:
        lines += [
            "",
            "3. MNIST-10k from scratch: task.train(parse_config([...])), default epochs/batch/"
            "early stopping",
            f"  {'model':<7} {'test acc':>8} {'n':>5} {'target':>6} {'ok':>3} {'final eval':>10} "
            f"{'epochs':>6} {'best':>4} {'reach ep':>8} {'reach s':>7} {'s/epoch':>7} "
            f"{'fit s':>6} {'total s':>7} {'CPU%':>5} {'load':>5}",
        ]
        for r in scratch:
            mark = "*" if r["epoch_time_source"] == "est" else ""
            lines.append(
                f"  {r['model']:<7} {r['test_accuracy']:8.4f} {r['test_examples']:>5} "
                f"{_fmt(r['target'], '.2f', 6)} "
                f"{'yes' if r['meets_target'] else 'NO':>3} {r['final_eval_accuracy']:10.4f} "
                f"{r['epochs']:>3}/{r['max_epochs']:<2} {r['best_epoch']:>4} "
                f"{r['reached_epoch']:>8} {r['reached_s']:6.1f}{mark or ' '} "
                f"{_fmt(r['steady_epoch_s'], '.2f', 7)} {r['fit_s']:6.1f} "
                f"{r['train_call_s']:7.1f} {100 * r['cpu_utilisation']:5.0f} "
                f"{r['loadavg_before']:5.2f}"
            )
        lines += [
            "  reach = first epoch whose eval accuracy is within 0.5 points of the final eval",
            "    accuracy; reach s = end of that epoch (TensorBoard epoch_loss event wall time)",
            "    counted from the train() call; s/epoch = median epoch incl. validation and",
            "    checkpoint; fit s = train_seconds of metrics.json; total s = the whole train()",
            "    call incl. evaluation and export"
            + ("; * = estimated" if any(r["epoch_time_source"] == "est" for r in scratch) else ""),
        ]
    tuning = results.get("tuning")
    if tuning:
        lines += [
            "",
            "4. head tuning on Lite0 embeddings: task.train, default flags (tuned) vs --no_tune",
            f"  {'run':<48} {'test acc':>8} {'test loss':>9} {'eval loss':>9} {'train s':>7} "
            f"{'tune s':>6} {'tune CPU s':>10} {'load':>5}  chosen",
        ]
        for key, r in tuning.items():
            t = r.get("tuning") or {}
            lines.append(
                f"  {key:<48} {r['test_accuracy']:8.4f} {r['test_loss']:9.4f} "
                f"{r['eval_loss']:9.4f} {r['train_seconds']:7.1f} {_fmt(t.get('seconds'), '.1f', 6)} "
                f"{_fmt(t.get('cpu_seconds'), '.1f', 10)} {r['loadavg_before']:5.2f}  "
                f"{_params(t.get('chosen') or {})}"
            )
        for row in results.get("few_label", []):
            lines.append(
                f"  {row['dataset']}, {results['options']['few_label_k']}/class, {row['mode']}: "
                f"mean {row['mean']:.4f} over {row['draws']} draws (min {row['min']:.4f}, max "
                f"{row['max']:.4f}, std {row['std']:.4f})"
            )
        lines.append(
            "  train s = tuning + the chosen head's training (metrics.json train_seconds); "
            "tune s / CPU s = the candidates alone"
        )
    fine = results.get("fine_tune")
    if fine:
        lines += ["", "5. fine-tuning recipes on hymenoptera (--features image --fine_tune ...)"]
        for key, r in fine.items():
            lines.append(f"  {key}: {_run_line(r)}; whole call {r['train_call_s']:.0f} s")
    lines += [
        "",
        "CPU% = this process's (user + sys) / wall / CPUs; load = 1-minute load average before",
        "timings are wall clock on a shared machine (other jobs may have been running): compare",
        "the load and CPU% columns between rows before comparing rates",
        f"json    : {results['json']}",
        common.REPORT_RULE,
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work_dir",
        default="/tmp/hubflow-train-benchmark",
        help="cache for backbones, datasets, models, logs and the JSON",
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        help="a preprocessed dataset for part 1 (default: the MNIST stand-in dataset built here)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        choices=PARTS,
        default=[],
        help="skip a part (repeatable): head (1), image (2), scratch (3), tuning (4), "
        "fine_tune (5)",
    )
    parser.add_argument("--mnist_csv", default=os.path.join(SHARED_DATA, "mnist-10k", "labels.csv"))
    parser.add_argument(
        "--catsdogs_dir", default=os.path.join(SHARED_DATA, "cats-vs-dogs-2k", "train")
    )
    parser.add_argument(
        "--image_subset", type=int, default=512, help="cats-vs-dogs images to preprocess"
    )
    parser.add_argument("--head_epochs", type=int, default=10, help="epochs per head timing")
    parser.add_argument(
        "--image_rounds",
        type=int,
        default=4,
        help="timed image-mode epochs per mode, after one warm-up epoch each (default 4)",
    )
    parser.add_argument(
        "--models",
        default="linear,dnn,cnn",
        help="from-scratch models for part 3 (comma-separated)",
    )
    parser.add_argument(
        "--few_label_k", type=int, default=10, help="part 4: --examples_per_class of the draws"
    )
    parser.add_argument("--draws", type=int, default=5, help="part 4: subsample seeds 0..N-1")
    parser.add_argument(
        "--timing_k",
        type=int,
        default=300,
        help="part 4: MNIST digits per class of the tuning-time run (0 skips it)",
    )
    parser.add_argument(
        "--fine_tune_run",
        action="append",
        default=None,
        help='part 5: extra trainer flags of one fine-tuning run, e.g. "--fine_tune_layers=20" '
        "(repeatable; default: one run with the trainer's defaults)",
    )
    common.add_job_flag(parser, "the preprocessing job")
    parser.add_argument(
        "--rebuild", action="store_true", help="remake the cached datasets and image subset"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.image_rounds < 1 or args.head_epochs < 2:
        raise SystemExit("--image_rounds must be at least 1 and --head_epochs at least 2")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in SCRATCH_TARGETS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(SCRATCH_TARGETS)}")
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    skip = set(args.skip)

    import tensorflow as tf

    results: dict = {
        "command": common.command_line(),
        "machine": common.machine_info(tensorflow=tf.__version__),
        "json": os.path.join(work_dir, RESULTS_FILE),
        "datasets": {},
    }
    try:
        common.log("[0/5] datasets")
        need_mnist = "scratch" not in skip or ("head" not in skip and not args.data_dir)
        if need_mnist:
            results["datasets"]["mnist"] = build_mnist(args, work_dir)
        if "image" not in skip or "head" not in skip:
            results["datasets"]["catsdogs"] = build_catsdogs(args, work_dir)
        common.write_json(results["json"], results)

        if "head" not in skip:
            common.log("[1/5] head training throughput on embeddings")
            results["head"] = {}
            data_dir = args.data_dir or results["datasets"]["mnist"]["dir"]
            name = os.path.basename(os.path.normpath(data_dir))
            results["head"][name] = head_throughput(data_dir, args.head_epochs)
            common.log(f"  {name}: {results['head'][name]['examples_per_s']:.0f} examples/s")
            cd = results["datasets"]["catsdogs"]["dir"]
            name = f"{os.path.basename(cd)} (x repeat)"
            results["head"][name] = head_throughput(cd, args.head_epochs, HEAD_EXAMPLES_PER_EPOCH)
            common.log(f"  {name}: {results['head'][name]['examples_per_s']:.0f} examples/s")
            common.write_json(results["json"], results)

        if "image" not in skip:
            common.log("[2/5] image-mode throughput")
            cd = results["datasets"]["catsdogs"]["dir"]
            results["image"] = image_throughput(cd, args.image_rounds)
            for key in ("plain", "augment"):
                r = results["image"][key]
                common.log(f"  {key}: {r['images_per_s']:.1f} images/s, epochs {r['epoch_s']}")
            common.write_json(results["json"], results)

        if "scratch" not in skip:
            common.log("[3/5] time to accuracy, MNIST-10k from scratch")
            results["scratch"] = []
            for model_name in models:
                r = time_to_accuracy(results["datasets"]["mnist"]["dir"], model_name, work_dir)
                results["scratch"].append(r)
                common.log(
                    f"  {model_name}: test {r['test_accuracy']:.4f}, {r['epochs']} epochs, "
                    f"reached final eval accuracy at epoch {r['reached_epoch']} "
                    f"({r['reached_s']:.1f} s), train() {r['train_call_s']:.1f} s"
                )
                common.write_json(results["json"], results)

        if "tuning" not in skip or "fine_tune" not in skip:
            common.log("[4/5] head tuning on real photos (Lite0 embeddings)")
            results["options"] = {"few_label_k": args.few_label_k, "draws": args.draws}
            photos = build_photo_datasets(args, work_dir)
            results["datasets"].update(photos)
            if "tuning" not in skip:
                tuning_runs(photos, args, work_dir, results)
                results["few_label"] = few_label_summary(results["tuning"], args.few_label_k)
            common.write_json(results["json"], results)
            if "fine_tune" not in skip:
                common.log("[5/5] fine-tuning recipes on hymenoptera")
                fine_tune_runs(photos, args, work_dir, results)
    except BenchmarkError as e:
        return common.fail(results, e)
    common.write_json(results["json"], results)
    print(format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
