"""Framing benchmark: which ``--crop_fraction`` gives the most accuracy per label.

    python -m benchmarks.framing [--work_dir DIR] [--fractions 0,0.875,1] [--backbone NAME]

Every photo of the real datasets (``../shared/data``: hymenoptera, cats-vs-dogs-2k) is decoded
once as the job stores it (``pipeline.images.decode_rgb`` at ``--max_image_side`` 512), framed
with each fraction by the job's own ``pipeline.images.backbone_pixels`` (0: squashed whole, the
baseline) and embedded with the TFLite model the job runs (``backbones.tflite_runtime``).

The choice is made on the ``train/`` photos alone, never on a test split:
- all labels: repeated stratified k-fold cross-validation (``--repeats`` x ``--folds``, the
  same folds for every fraction);
- few labels: ``--few_label_draws`` draws of ``--few_label_k`` photos per class (the trainer's
  ``--examples_per_class`` sampler, ``training.sampling``; the same draws for every fraction),
  scored on the rest of ``train/``.
Two classifiers on the embeddings: a logistic regression on standardised features (C = 0.1,
``sklearn``) and the nearest class mean by cosine (what the trainer's cosine head starts from).

Then, for the record and not for the choice: train on all of ``train/``, score on the test
folder (hymenoptera ``val/``, cats-vs-dogs ``test/``).

Also reported: the CPU milliseconds per image of the framing itself (Pillow), per fraction.
Results go to ``<work_dir>/framing_benchmark.json``.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from benchmarks import common
from benchmarks.common import SHARED_DATA

RESULTS_FILE = "framing_benchmark.json"
# name -> (data dir, train folder, test folder); each holds one sub-folder per class.
DATASETS = {
    "hymenoptera": (os.path.join(SHARED_DATA, "hymenoptera"), "train", "val"),
    "catsdogs": (os.path.join(SHARED_DATA, "cats-vs-dogs-2k"), "train", "test"),
}


def list_photos(root: str, folder: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Paths, label indices and label names of ``root/folder/<label>/*``."""
    labels = sorted(os.listdir(os.path.join(root, folder)))
    paths, targets = [], []
    for index, label in enumerate(labels):
        found = sorted(glob.glob(os.path.join(root, folder, label, "*")))
        paths += found
        targets += [index] * len(found)
    return paths, np.array(targets), labels


def embed_framings(
    paths: Sequence[str], fractions: Sequence[float], embedder, size: int
) -> tuple[dict[float, np.ndarray], dict[float, float]]:
    """Embeddings ``[N, D]`` per fraction, and the CPU ms per image of framing at each."""
    from pipeline import images

    pixels: dict[float, list[np.ndarray]] = {f: [] for f in fractions}
    cpu = dict.fromkeys(fractions, 0.0)
    for path in paths:
        with open(path, "rb") as f:
            image = images.decode_rgb(f.read(), max_side=images.DEFAULT_MAX_SIDE)
        for fraction in fractions:
            started = time.process_time()
            pixels[fraction].append(images.backbone_pixels(image, size, fraction))
            cpu[fraction] += time.process_time() - started
    embedded = {f: embedder(np.stack(p)) for f, p in pixels.items()}
    return embedded, {f: 1000 * s / len(paths) for f, s in cpu.items()}


def logistic(train_x, train_y, test_x) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    return model.fit(train_x, train_y).predict(test_x)


def class_mean(train_x, train_y, test_x) -> np.ndarray:
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    classes = np.unique(train_y)
    means = unit(np.stack([unit(train_x[train_y == c]).mean(0) for c in classes]))
    return classes[np.argmax(unit(test_x) @ means.T, axis=1)]


CLASSIFIERS = {"logistic": logistic, "class_mean": class_mean}


def run_dataset(name: str, args, embedder, size: int) -> dict:
    from sklearn.model_selection import RepeatedStratifiedKFold

    from training import sampling

    root, train_folder, test_folder = DATASETS[name]
    train_paths, train_y, labels = list_photos(root, train_folder)
    test_paths, test_y, test_labels = list_photos(root, test_folder)
    if test_labels != labels:
        raise common.BenchmarkError(f"{name}: test classes {test_labels} differ from {labels}")
    common.log(f"== {name}: {len(train_paths)} train/ photos, {len(test_paths)} test photos ==")
    started = time.perf_counter()
    train_x, framing_ms = embed_framings(train_paths, args.fractions, embedder, size)
    test_x, _ = embed_framings(test_paths, args.fractions, embedder, size)
    common.log(
        f"  embedded under {len(args.fractions)} framings in {time.perf_counter() - started:.0f} s"
    )

    splitter = RepeatedStratifiedKFold(
        n_splits=args.folds, n_repeats=args.repeats, random_state=args.seed
    )
    folds = list(splitter.split(train_y, train_y))
    # The trainer's own --examples_per_class draw, subsample seeds seed .. seed + draws - 1.
    everyone = np.arange(len(train_y))
    draws = []
    for draw in range(args.few_label_draws):
        picked = sampling.per_class_indices(train_y, args.few_label_k, args.seed + draw)
        draws.append((picked, np.setdiff1d(everyone, picked)))

    result = {"train_photos": len(train_y), "test_photos": len(test_y), "fractions": {}}
    for fraction in args.fractions:
        x = train_x[fraction]
        scores = {}
        for clf_name, classify in CLASSIFIERS.items():
            correct = sum(
                int(np.sum(classify(x[tr], train_y[tr], x[te]) == train_y[te])) for tr, te in folds
            )
            few = [float(np.mean(classify(x[p], train_y[p], x[r]) == train_y[r])) for p, r in draws]
            test = float(np.mean(classify(x, train_y, test_x[fraction]) == test_y))
            scores[clf_name] = {
                "cv_accuracy": correct / (args.repeats * len(train_y)),
                "few_label_mean": float(np.mean(few)),
                "few_label_std": float(np.std(few)),
                "test_accuracy": test,
            }
        result["fractions"][str(fraction)] = {"framing_cpu_ms": framing_ms[fraction], **scores}
    return result


def format_report(results: dict) -> str:
    lines = [*common.report_header("Framing benchmark (--crop_fraction)", results)]
    k, draws = results["args"]["few_label_k"], results["args"]["few_label_draws"]
    cv = f"{results['args']['repeats']}x{results['args']['folds']}-fold CV"
    head = (
        f"{'dataset':12} {'fraction':>8} {'classifier':>10} {cv + ' (train/)':>24} "
        f"{f'{k}/class, {draws} draws (train/)':>28} {'test, not for choosing':>23} {'frame ms':>9}"
    )
    lines += [head, "-" * len(head)]
    for name, data in results["datasets"].items():
        for fraction, scores in data["fractions"].items():
            for clf in CLASSIFIERS:
                s = scores[clf]
                few = f"{s['few_label_mean']:.4f} +- {s['few_label_std']:.3f}"
                lines.append(
                    f"{name:12} {fraction:>8} {clf:>10} {s['cv_accuracy']:>24.4f} {few:>28} "
                    f"{s['test_accuracy']:>23.4f} {scores['framing_cpu_ms']:>9.2f}"
                )
    lines.append("fraction 0 = squashed whole (the baseline); frame ms = Pillow CPU per image")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from backbones import registry

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", default="/tmp/hubflow-framing")
    p.add_argument("--backbone", default=registry.DEFAULT_BACKBONE)
    p.add_argument(
        "--fractions",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[0.0, 0.875, 1.0],
        help="crop fractions to compare, 0 = squash (default 0,0.875,1)",
    )
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--few_label_k", type=int, default=10)
    p.add_argument("--few_label_draws", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from backbones import hub, registry, tflite_runtime

    os.makedirs(args.work_dir, exist_ok=True)
    import tensorflow as tf

    results = {
        "command": common.command_line(),
        "machine": common.machine_info(tf.__version__),
        "git": common.git_revision(),
        "args": vars(args),
        "datasets": {},
    }
    spec = hub.probe(registry.resolve(args.backbone))
    runtime = tflite_runtime.resolve(spec, "auto")
    embedder = tflite_runtime.load(runtime) if runtime.name == "tflite" else None
    if embedder is None:
        raise common.BenchmarkError(f"{spec.name} does not run in TFLite: {runtime.reason}")
    results["backbone"] = spec.to_json()
    for name in args.datasets.split(","):
        results["datasets"][name] = run_dataset(name, args, embedder, spec.image_size)
        common.write_json(os.path.join(args.work_dir, RESULTS_FILE), results)
    report = format_report(results)
    common.log(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
