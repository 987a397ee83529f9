"""Head-grid benchmark: which heads the trainer should tune over, chosen without any test split.

    python -m benchmarks.head_grid [--work_dir DIR] [--data NAME=DATA_DIR ...] [--repeats 5]
                                   [--few_label_k 10]

The trainer tunes its embedding head by eval loss over :data:`training.config.TUNING_CANDIDATES`
(:mod:`training.tuning`). That grid was first picked from test-split figures; this benchmark
checks the choice on data no test split is part of.

Inputs: datasets made by the preprocessing job with default flags. By default the two real photo
datasets of ``../shared/data`` are built as ``benchmarks.real_data`` builds them (the ``train/``
photos hashed into train and eval, hymenoptera's ``val/`` and cats-vs-dogs' ``test/`` pinned to
test); ``--data NAME=DIR`` uses an existing output dir instead. Only the train and eval records are
read: the test split is never opened.

Method, per dataset and repeat ``r`` (the same partitions for every candidate):
- the train + eval records are split, stratified by label, into *fit* (60 %), *select* (20 %) and
  *holdout* (20 %), seeded by ``r``. Fit plays the train split, select the eval split the
  trainer tunes and stops on, holdout the test split;
- all labels: every candidate is fitted on fit with early stopping on select, as the trainer's
  tuning fits it (:func:`training.tuning.fit_head`, the trainer's seed, batches and defaults),
  and scored on holdout (accuracy, cross-entropy);
- few labels: the same on ``--few_label_k`` fit examples per class (the trainer's
  ``--examples_per_class`` sampler, seed ``r``), select and holdout unchanged;
- the z-score normalisation uses the mean and standard deviation of the fit part (with K per
  class too, as the trainer's tf.Transform statistics cover the whole train split, not only
  the K drawn).
Then, for each grid (a set of candidates), the candidate with the lowest select loss is the
grid's choice, and its holdout figures are what that grid would give. Grids compared: the
z-scored head alone (``--no_tune``), the current grid, and the current grid plus two more
candidates (z-scored with L2 0.1, cosine with L2 0.01).

Results go to ``<work_dir>/head_grid_benchmark.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from benchmarks import common
from benchmarks.common import SHARED_DATA

RESULTS_FILE = "head_grid_benchmark.json"
# name -> (data dir, {top folder: pinned split, "" = hashed into train/eval})
PHOTO_DATASETS = {
    "hymenoptera": (os.path.join(SHARED_DATA, "hymenoptera"), {"train": "", "val": "test"}),
    "catsdogs": (os.path.join(SHARED_DATA, "cats-vs-dogs-2k"), {"train": "", "test": "test"}),
}
FIT, SELECT = 0.6, 0.2  # the rest is holdout


def build_dataset(name: str, work_dir: str) -> str:
    """The preprocessing job's output for a photo dataset, default flags (built once)."""
    output_dir = os.path.join(work_dir, name)
    if os.path.exists(os.path.join(output_dir, common.MANIFEST_FILE)):
        return output_dir
    root, folders = PHOTO_DATASETS[name]
    csv_path = os.path.join(work_dir, f"{name}_labels.csv")
    common.write_folder_csv(root, folders, csv_path)
    command = common.preprocess_command(
        f"--input_csv={csv_path}",
        f"--output_dir={output_dir}",
        "--eval_fraction=0.2",
        "--test_fraction=0",
    )
    common.run_logged(command, os.path.join(work_dir, f"{name}_preprocess.log"))
    return output_dir


def partition(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified fit / select / holdout indices of ``labels``, seeded."""
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_fit, n_select = round(len(members) * FIT), round(len(members) * SELECT)
        parts[0].append(members[:n_fit])
        parts[1].append(members[n_fit : n_fit + n_select])
        parts[2].append(members[n_fit + n_select :])
    fit, select, holdout = (np.sort(np.concatenate(p)) for p in parts)
    return fit, select, holdout


def holdout_scores(head, x: np.ndarray, y: np.ndarray, labels) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the head on ``(x, y)``, as the trainer reports them."""
    from evaluation.metrics import classification_report

    report = classification_report(y, head.predict(x, batch_size=4096, verbose=0), labels)
    return report["accuracy"], report["loss"]


def candidate_list():
    from training.config import CLASSIFIER_COSINE, CLASSIFIER_ZSCORE, TUNING_CANDIDATES

    extra = (
        {"classifier": CLASSIFIER_ZSCORE, "l2": 0.1},
        {"classifier": CLASSIFIER_COSINE, "l2": 0.01},
    )
    current = list(TUNING_CANDIDATES)
    everything = current + [c for c in extra if c not in current]
    grids = {
        "zscore alone (--no_tune)": [0],
        "current grid": list(range(len(current))),
        "current + 2": list(range(len(everything))),
    }
    return everything, grids


def run_dataset(name: str, data_dir: str, args) -> dict:
    from training import config as config_lib
    from training import data, sampling, tuning

    with tempfile.TemporaryDirectory() as model_dir:
        config = config_lib.parse_config(["--data_dir", data_dir, "--model_dir", model_dir])
        dataset = data.load(config)
        train_x, train_y = data.embedding_arrays(config, dataset, "train")
        eval_x, eval_y = data.embedding_arrays(config, dataset, "eval")
    x, y = np.concatenate([train_x, eval_x]), np.concatenate([train_y, eval_y])
    candidates, _ = candidate_list()
    common.log(f"  {name}: {len(y)} train + eval examples, labels {np.bincount(y).tolist()}")
    rows = []
    for regime, k in (("all", None), (f"{args.few_label_k}/class", args.few_label_k)):
        for repeat in range(args.repeats):
            fit, select, holdout = partition(y, repeat)
            # As the trainer's tf.Transform statistics: over the whole train pool, also with K
            # per class (they use no label).
            mean, std = x[fit].mean(0), x[fit].std(0)
            std = np.where(std > 0, std, 1.0)
            if k is not None:
                fit = fit[sampling.per_class_indices(y[fit], k, repeat)]
            fitted = dataclasses.replace(dataset, normalization=(mean, std))
            for index, params in enumerate(candidates):
                head, result = tuning.fit_head(
                    dataclasses.replace(config, **params),
                    fitted,
                    (x[fit], y[fit]),
                    (x[select], y[select]),
                )
                accuracy, loss = holdout_scores(
                    head, x[holdout], y[holdout], dataset.manifest.labels
                )
                rows.append(
                    {
                        "regime": regime,
                        "repeat": repeat,
                        "candidate": index,
                        "params": params,
                        "fit": len(fit),
                        "select_loss": result["eval_loss"],
                        "holdout_accuracy": accuracy,
                        "holdout_loss": loss,
                        "epochs": result["epochs"],
                        "seconds": result["seconds"],
                    }
                )
            common.log(
                f"    {regime} repeat {repeat}: "
                + ", ".join(
                    f"#{r['candidate']} {r['holdout_accuracy']:.3f}/{r['holdout_loss']:.3f}"
                    for r in rows[-len(candidates) :]
                )
            )
    return {"data_dir": data_dir, "examples": len(y), "rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    """Mean holdout accuracy and loss per regime: each candidate alone and each grid's choice."""
    candidates, grids = candidate_list()
    out: dict = {}
    for regime in dict.fromkeys(r["regime"] for r in rows):
        mine = [r for r in rows if r["regime"] == regime]
        repeats = sorted({r["repeat"] for r in mine})
        by = {(r["repeat"], r["candidate"]): r for r in mine}
        table = {}
        for index, params in enumerate(candidates):
            picked = [by[(rep, index)] for rep in repeats]
            table[f"#{index} {params['classifier']} l2 {params['l2']:g}"] = _mean(picked)
        for grid, members in grids.items():
            picked = [
                min((by[(rep, i)] for i in members), key=lambda r: r["select_loss"])
                for rep in repeats
            ]
            table[f"grid: {grid}"] = {
                **_mean(picked),
                "chosen": [p["candidate"] for p in picked],
            }
        out[regime] = table
    return out


def _mean(rows: list[dict]) -> dict:
    return {
        "holdout_accuracy": round(float(np.mean([r["holdout_accuracy"] for r in rows])), 4),
        "holdout_loss": round(float(np.mean([r["holdout_loss"] for r in rows])), 4),
        "accuracy_std": round(float(np.std([r["holdout_accuracy"] for r in rows])), 4),
    }


def format_report(results: dict) -> str:
    lines = common.report_header("Head grid, chosen without the test split", results)
    for name, result in results["datasets"].items():
        for regime, table in result["summary"].items():
            lines.append(f"{name}, {regime} ({result['examples']} train + eval examples):")
            lines.append(f"  {'head':<34} {'holdout acc':>11} {'(std)':>7} {'loss':>7}  chosen")
            for label, m in table.items():
                chosen = " ".join(str(c) for c in m.get("chosen", []))
                lines.append(
                    f"  {label:<34} {m['holdout_accuracy']:>11.4f} {m['accuracy_std']:>7.4f} "
                    f"{m['holdout_loss']:>7.4f}  {chosen}"
                )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="/tmp/hubflow-head-grid")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=DATA_DIR",
        help="an existing preprocessing output dir (default: build hymenoptera and catsdogs)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="partitions per regime")
    parser.add_argument("--few_label_k", type=int, default=10, help="fit examples per class")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    if args.data:
        pairs = [item.split("=", 1) for item in args.data]
        if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
            print("--data: expected NAME=DATA_DIR", file=sys.stderr)
            return 2
        data_dirs = dict(pairs)
    else:
        data_dirs = {name: build_dataset(name, work_dir) for name in PHOTO_DATASETS}
    results: dict = {
        "command": common.command_line(),
        "git_revision": common.git_revision(),
        "machine": common.machine_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "options": {"repeats": args.repeats, "few_label_k": args.few_label_k},
        "candidates": candidate_list()[0],
        "datasets": {},
    }
    for name, data_dir in data_dirs.items():
        results["datasets"][name] = run_dataset(name, data_dir, args)
        common.write_json(os.path.join(work_dir, RESULTS_FILE), results)
    report = format_report(results)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
