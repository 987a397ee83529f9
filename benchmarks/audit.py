"""Audit benchmark: hubflow-audit's defaults and targets, measured on real photos.

Usage::

    python -m benchmarks.audit [--work_dir DIR] [--part PART ...] [--reuse_data] [--trainer]
                               [--job_flag=--runner=FnApiRunner ...]

``PART`` is one of (all by default, in this order):

``calibrate``
    The near-duplicate threshold. From ``--copies_per_dataset`` originals of hymenoptera and of
    cats-vs-dogs-2k each (seeded), writes copies a person would call "the same photo": resized
    to 0.5x and 0.75x, recompressed at JPEG quality 30, 50 and 70, cropped by 5 % on every side,
    and resized to 0.5x then saved at quality 50 (EXIF orientation applied first, as the job
    does). The real preprocessing job embeds all originals of both datasets and the copies (one
    run, default flags, ``efficientnet_lite0``). Reported: the cosine of each copy to its
    original, per kind of copy, and for every original the highest cosine to any *other* file
    of its dataset (different photos), and the share of copies and the number of pairs of
    different files at or above each candidate threshold; for raw, centred and z-scored
    embeddings (``training.audit_duplicates`` compares z-scored ones). The same for the MNIST
    digits of ``choices``, whose different images often look alike.
``choices``
    The light classifier and the label-issue settings, on clean cats-vs-dogs-2k, hymenoptera
    and 4,000 MNIST digits (``--mnist_per_class`` per class), all embedded with
    ``efficientnet_lite0``. For each logistic-regression ``C``: 5-fold out-of-fold log loss and
    accuracy on train+eval, test accuracy. Then, flipping 5 % of the train labels at random
    (``--flip_draws`` seeded draws; the embeddings do not depend on the labels, so flipping the
    loaded labels is what flipping the CSV would give): the share of flips in the top N and 2N
    of the flagged rows (N = flips), the flagged count and its precision, per ``C``, per number
    of folds and for cleanlab's two rankings. With ``--trainer``, also the test accuracy of
    ``hubflow-train`` with default flags on the same data dirs.
``curve``
    Learning-curve draws: the spread of test accuracy per point over 10 seeded draws (and the
    standard error 5 draws would leave), the cost per draw, on the three clean sets.
``select``
    What to label next, simulated: from 2 or 10 labels per class, 20 or 50 more train images
    are "labeled" (their true labels), picked at random, by uncertainty alone (smallest margin)
    or by the audit (uncertainty-weighted k-means); test accuracy after refitting, 5 seeds.
``targets``
    The issue's targets on cats-vs-dogs-2k: 5 % of the rows of its train folder (hashed into
    train and eval) get the other label in the CSV (seeded), and 10 test photos, resized (0.5x, 0.75x) or recompressed (q 40, 60), are
    added as train rows. Preprocessed by the real job; then ``python -m training.audit`` in a
    subprocess, timed. Checked: >= 2/3 of the flipped rows in the top 2x(flips) of
    ``label_issues.csv``; >= 8 of the 10 copies among the leakage pairs of
    ``near_duplicates.csv``; and, on the clean data set, the pairs and flagged rows (false
    alarms, reported).
``scale``
    The audit's wall time on 4,000 real images (``--mnist_per_class`` x 10 MNIST digits,
    ``efficientnet_lite0`` embeddings; preprocessing excluded) against the 3-minute target:
    all labeled, and with ``--unlabeled_per_class`` digits per class given a blank label (the
    unlabeled split, ranked into ``to_label.csv``).

Every figure goes to ``<work_dir>/audit_benchmark.json``, rewritten after each part. The
machine is shared: each timed step records the 1-minute load before it and its CPU seconds.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import sys
import time

import numpy as np
from PIL import Image, ImageOps

from benchmarks import common
from benchmarks.common import SHARED_DATA, BenchmarkError

RESULTS_FILE = "audit_benchmark.json"
PARTS = ("calibrate", "choices", "curve", "select", "targets", "scale")
HYMENOPTERA = os.path.join(SHARED_DATA, "hymenoptera")
CATSDOGS = os.path.join(SHARED_DATA, "cats-vs-dogs-2k")
MNIST_CSV = os.path.join(SHARED_DATA, "mnist-10k", "labels.csv")
# Copies for the threshold: name -> (scale, JPEG quality, crop fraction per side).
COPY_KINDS = {
    "resize_0.5": (0.5, 90, 0.0),
    "resize_0.75": (0.75, 90, 0.0),
    "jpeg_q30": (1.0, 30, 0.0),
    "jpeg_q50": (1.0, 50, 0.0),
    "jpeg_q70": (1.0, 70, 0.0),
    "crop_5pct": (1.0, 90, 0.05),
    "resize_0.5_q50": (0.5, 50, 0.0),
}
# The planted leakage of the targets: 10 copies of test photos, in these kinds, round-robin.
PLANTED_KINDS = {
    "resize_0.5": (0.5, 90, 0.0),
    "resize_0.75": (0.75, 90, 0.0),
    "jpeg_q40": (1.0, 40, 0.0),
    "jpeg_q60": (1.0, 60, 0.0),
}
FLIP_FRACTION = 0.05
PLANTED_COPIES = 10
AUDIT_SECONDS_TARGET = 180.0
CALIBRATION_THRESHOLDS = (0.70, 0.75, 0.78, 0.80, 0.82, 0.85, 0.90, 0.95)
CALIBRATION_TOP_PAIRS = 5
CLASSIFIER_C = (0.01, 0.03, 0.1, 0.3, 1.0)
CURVE_DRAWS = 10
SELECT_STARTS = (2, 10)
SELECT_BUDGETS = (20, 50)
SELECT_SEEDS = 5


# ----------------------------------------------------------------------------------------------
# Inputs: label CSVs, copies of photos, the real preprocessing job
# ----------------------------------------------------------------------------------------------


def dataset_rows(root: str, folders: dict[str, str]) -> list[list[str]]:
    """``[uri, label, split]`` of ``root/<folder>/<label>/*`` (folder -> split, '' = hashed)."""
    rows = []
    for folder, split in folders.items():
        base = os.path.join(root, folder)
        for label in sorted(d for d in os.listdir(base) if not d.startswith(".")):
            for name in sorted(os.listdir(os.path.join(base, label))):
                if not name.startswith("."):
                    rows.append([os.path.join(base, label, name), label, split])
    return rows


def write_csv(path: str, rows: list[list[str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_uri", "label", "split"])
        writer.writerows(rows)
    return path


def make_copy(source: str, target: str, scale: float, quality: int, crop: float) -> None:
    """Writes a resized / recompressed / cropped JPEG copy of the photo ``source``."""
    with Image.open(source) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    if crop:
        w, h = image.size
        dx, dy = round(w * crop), round(h * crop)
        image = image.crop((dx, dy, w - dx, h - dy))
    if scale != 1.0:
        w, h = image.size
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    with open(target, "wb") as f:
        f.write(buffer.getvalue())


def preprocess(name: str, csv_path: str, work_dir: str, args, *flags: str) -> dict:
    """Runs the real job on ``csv_path`` into ``work_dir/name`` (unless reused); its figures."""
    output_dir = os.path.join(work_dir, name)
    info: dict = {"output_dir": output_dir, "csv": csv_path}
    if args.reuse_data and os.path.exists(os.path.join(output_dir, common.MANIFEST_FILE)):
        common.log(f"  reusing {output_dir} (--reuse_data)")
        info["reused"] = True
    else:
        command = common.preprocess_command(
            f"--input_csv={csv_path}",
            f"--output_dir={output_dir}",
            "--overwrite",
            *flags,
            *args.job_flag,
        )
        info.update(run_step(command, os.path.join(work_dir, f"{name}_preprocess.log")))
    manifest = common.read_manifest(output_dir)
    info["rows"] = manifest["rows"]
    info["splits"] = {split: v["count"] for split, v in manifest["splits"].items()}
    common.log(f"  {name}: rows {info['rows']}, splits {info['splits']}")
    return info


def run_step(command: list[str], log_path: str) -> dict:
    load = common.loadavg()
    common.log(f"  $ {shlex.join(command)}")
    run = common.run_logged(command, log_path)
    common.log(f"    {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU (load before {load})")
    return {
        "command": shlex.join(command),
        "load_1m_before": load,
        "wall_s": round(run["wall_s"], 1),
        "cpu_s": round(run["cpu_s"], 1),
    }


def load_records(data_dir: str):
    """The data dir's records, as the audit reads them (``training.audit_data.load``)."""
    from training import audit_data

    return audit_data.load(data_dir)


def stats(values) -> dict:
    values = np.asarray(values, np.float64)
    if not len(values):
        return {"n": 0}
    q = np.percentile(values, [1, 5, 50, 95, 99])
    return {
        "n": int(len(values)),
        "min": round(float(values.min()), 4),
        "p1": round(float(q[0]), 4),
        "p5": round(float(q[1]), 4),
        "median": round(float(q[2]), 4),
        "p95": round(float(q[3]), 4),
        "p99": round(float(q[4]), 4),
        "max": round(float(values.max()), 4),
    }


# ----------------------------------------------------------------------------------------------
# Part: calibrate
# ----------------------------------------------------------------------------------------------


def calibrate(args, work_dir: str) -> dict:
    """Copy-to-original cosines per kind; each original's best cosine to another photo."""
    from training import audit_classifier, audit_duplicates

    rng = np.random.default_rng(args.seed)
    copies_dir = os.path.join(work_dir, "calibration_copies")
    os.makedirs(copies_dir, exist_ok=True)
    rows: list[list[str]] = []
    originals_of: dict[str, str] = {}  # copy uri -> original uri
    kind_of: dict[str, str] = {}
    dataset_of: dict[str, str] = {}
    for name, root, folders in (
        ("hymenoptera", HYMENOPTERA, {"train": "", "val": ""}),
        ("cats-vs-dogs", CATSDOGS, {"train": "", "test": ""}),
    ):
        originals = dataset_rows(root, folders)
        rows += originals
        for uri, _, _ in originals:
            dataset_of[uri] = name
        chosen = rng.choice(len(originals), args.copies_per_dataset, replace=False)
        for i in sorted(chosen):
            uri, label, _ = originals[i]
            stem = f"{name}_{os.path.splitext(os.path.basename(uri))[0]}"
            for kind, (scale, quality, crop) in COPY_KINDS.items():
                target = os.path.join(copies_dir, f"{stem}_{kind}.jpg")
                if not os.path.exists(target):
                    make_copy(uri, target, scale, quality, crop)
                rows.append([target, label, ""])
                originals_of[target], kind_of[target] = uri, kind
                dataset_of[target] = name
    csv_path = write_csv(os.path.join(work_dir, "calibration.csv"), rows)
    info = {"preprocess": preprocess("calibration", csv_path, work_dir, args)}
    data = load_records(info["preprocess"]["output_dir"])
    index = {uri: i for i, uri in enumerate(data.uris)}
    labeled = data.embeddings[data.labels >= 0]
    spaces = {
        "raw": audit_duplicates.unit_rows(data.embeddings, None),
        "centred": audit_duplicates.unit_rows(data.embeddings, labeled.mean(axis=0)),
        "zscored": audit_duplicates.unit_rows(
            audit_classifier.Standardizer.fit(labeled)(data.embeddings), None
        ),
    }
    result: dict = {"copies_per_dataset": args.copies_per_dataset, "spaces": {}}
    for space, unit in spaces.items():
        per_kind: dict[str, list[float]] = {}
        for copy_uri, original in originals_of.items():
            cosine = float(unit[index[copy_uri]] @ unit[index[original]])
            per_kind.setdefault(kind_of[copy_uri], []).append(cosine)
        copies = np.asarray([c for values in per_kind.values() for c in values])
        distinct, pair_cosines = {}, []
        for name in ("hymenoptera", "cats-vs-dogs"):
            members = np.asarray(
                [index[u] for u, d in dataset_of.items() if d == name and u not in originals_of]
            )
            sims = unit[members] @ unit[members].T
            pair_cosines.append(sims[np.triu_indices(len(members), k=1)])
            np.fill_diagonal(sims, -1.0)
            best = sims.max(axis=1)
            top = np.argsort(-best)[: 2 * CALIBRATION_TOP_PAIRS : 2]  # each pair shows twice
            distinct[name] = {
                "best_other": stats(best),
                "top_pairs": [
                    [
                        data.uris[members[i]],
                        data.uris[members[int(sims[i].argmax())]],
                        round(float(best[i]), 4),
                    ]
                    for i in top
                ],  # fmt: skip
            }
        pair_cosines = np.concatenate(pair_cosines)
        table = [
            {
                "threshold": t,
                "copies_caught": round(float(np.mean(copies >= t)), 3),
                "by_kind": {
                    k: round(float(np.mean(np.asarray(v) >= t)), 3) for k, v in per_kind.items()
                },
                "distinct_pairs_at_or_above": int(np.sum(pair_cosines >= t)),
            }
            for t in CALIBRATION_THRESHOLDS
        ]
        result["spaces"][space] = {
            "copies": stats(copies),
            "copies_by_kind": {kind: stats(v) for kind, v in per_kind.items()},
            "distinct": distinct,
            "thresholds": table,
        }
        common.log(f"  [{space}] copy vs its original: {stats(copies)}")
        for kind, values in per_kind.items():
            common.log(f"    {kind:>15}: {stats(values)}")
        for name, d in distinct.items():
            common.log(f"    {name}, each photo's most similar other photo: {d['best_other']}")
            for a, b, cos in d["top_pairs"]:
                common.log(f"      {cos:.4f} {a} ~ {b}")
        for row in table:
            common.log(
                f"    t={row['threshold']:.2f}: copies caught {row['copies_caught']:.3f} "
                f"{row['by_kind']}; pairs of different files >= t: "
                f"{row['distinct_pairs_at_or_above']}"
            )
    result["mnist"] = distinct_digits(args, work_dir)
    return {**info, **result}


def distinct_digits(args, work_dir: str) -> dict:
    """Each MNIST digit's most similar other digit, and the pairs at or above each threshold,
    per space: a domain where different images look alike."""
    from training import audit_classifier, audit_duplicates

    data = load_records(
        preprocess("mnist", mnist_csv(args, work_dir), work_dir, args)["output_dir"]
    )
    labeled = data.embeddings[data.labels >= 0]
    spaces = {
        "raw": audit_duplicates.unit_rows(data.embeddings, None),
        "zscored": audit_duplicates.unit_rows(
            audit_classifier.Standardizer.fit(labeled)(data.embeddings), None
        ),
    }
    result = {}
    for space, unit in spaces.items():
        sims = unit @ unit.T
        pairs = sims[np.triu_indices(len(unit), k=1)]
        np.fill_diagonal(sims, -1.0)
        result[space] = {
            "best_other": stats(sims.max(axis=1)),
            "pairs_at_or_above": {str(t): int(np.sum(pairs >= t)) for t in CALIBRATION_THRESHOLDS},
        }
        common.log(f"  [{space}] MNIST, each digit's most similar other: {result[space]}")
    return result


# ----------------------------------------------------------------------------------------------
# The clean real data sets (efficientnet_lite0, default job flags but the splits)
# ----------------------------------------------------------------------------------------------


def clean_datasets(args, work_dir: str) -> dict[str, str]:
    """name -> data dir of cats-vs-dogs-2k, hymenoptera and MNIST, preprocessed (or reused).

    cats-vs-dogs and hymenoptera: their train folders hashed into train/eval (0.2 eval), their
    test/val folders pinned as test. MNIST: ``--mnist_per_class`` digits per class, hashed with
    the job's default fractions.
    """
    sets = {
        "cats-vs-dogs": dataset_rows(CATSDOGS, {"train": "", "test": "test"}),
        "hymenoptera": dataset_rows(HYMENOPTERA, {"train": "", "val": "test"}),
    }
    dirs = {}
    for name, rows in sets.items():
        csv_path = write_csv(os.path.join(work_dir, f"{name}.csv"), rows)
        flags = ("--eval_fraction=0.2", "--test_fraction=0")
        dirs[name] = preprocess(name, csv_path, work_dir, args, *flags)["output_dir"]
    dirs["mnist"] = preprocess("mnist", mnist_csv(args, work_dir), work_dir, args)["output_dir"]
    return dirs


def mnist_csv(args, work_dir: str) -> str:
    """The first ``--mnist_per_class`` digits of each class of mnist-10k."""
    per_class: dict[str, int] = {}
    rows = []
    with open(MNIST_CSV, newline="", encoding="utf-8") as f:
        for uri, label in csv.reader(f):
            if uri == "image_uri" or per_class.get(label, 0) >= args.mnist_per_class:
                continue
            per_class[label] = per_class.get(label, 0) + 1
            rows.append([os.path.join(os.path.dirname(MNIST_CSV), uri), label, ""])
    return write_csv(os.path.join(work_dir, "mnist.csv"), rows)


def arrays(data_dir: str):
    """(records, z-scored embeddings) as the audit computes them."""
    from training import audit_classifier

    data = load_records(data_dir)
    labeled = data.labels >= 0
    x = audit_classifier.Standardizer.fit(data.embeddings[labeled])(data.embeddings)
    return data, x


# ----------------------------------------------------------------------------------------------
# Part: choices (classifier C, folds, ranking)
# ----------------------------------------------------------------------------------------------


def flip(labels: np.ndarray, candidates: np.ndarray, num_classes: int, rng) -> tuple:
    """Gives ``FLIP_FRACTION`` of ``candidates`` another label at random; (labels, flipped)."""
    n = int(round(FLIP_FRACTION * len(candidates)))
    flipped = rng.choice(candidates, n, replace=False)
    labels = labels.copy()
    labels[flipped] = (labels[flipped] + rng.integers(1, num_classes, n)) % num_classes
    return labels, flipped


def flip_scores(x, y, is_train, num_classes, draws, c, folds, ranked_by) -> dict:
    """Planted-flip detection, averaged over ``draws`` seeded draws of flips."""
    from cleanlab.filter import find_label_issues

    from training import audit_classifier

    found: dict[str, list[float]] = {"top_n": [], "top_2n": [], "flagged": [], "precision": []}
    seconds = []
    for draw in range(draws):
        rng = np.random.default_rng(1000 + draw)
        noisy, flipped = flip(y, np.flatnonzero(is_train), num_classes, rng)
        started = time.perf_counter()
        probs = audit_classifier.out_of_fold_probabilities(x, noisy, num_classes, folds, draw, c)
        seconds.append(time.perf_counter() - started)
        issues = find_label_issues(noisy, probs, return_indices_ranked_by=ranked_by)
        planted, n = set(flipped.tolist()), len(flipped)
        found["top_n"].append(len(planted & set(issues[:n].tolist())) / n)
        found["top_2n"].append(len(planted & set(issues[: 2 * n].tolist())) / n)
        found["flagged"].append(len(issues))
        found["precision"].append(len(planted & set(issues.tolist())) / max(1, len(issues)))
    out = {key: round(float(np.mean(v)), 3) for key, v in found.items()}
    out["top_2n_min"] = round(float(np.min(found["top_2n"])), 3)
    out["flips"] = len(flipped)
    out["oof_seconds"] = round(float(np.mean(seconds)), 2)
    return out


def choices(args, work_dir: str) -> dict:
    """C of the logistic regression, k of the k-fold, cleanlab's ranking (see the docstring)."""
    from sklearn.metrics import log_loss

    from training import audit_classifier, audit_labels

    results: dict = {}
    for name, data_dir in clean_datasets(args, work_dir).items():
        data, x = arrays(data_dir)
        checked, test = data.rows("train", "eval"), data.rows("test")
        y, num_classes = data.labels[checked], len(data.label_names)
        is_train = data.splits[checked] == "train"
        info: dict = {"counts": {s: data.count(s) for s in ("train", "eval", "test")}}
        info["c"] = {}
        for c in CLASSIFIER_C:
            probs = audit_classifier.out_of_fold_probabilities(
                x[checked], y, num_classes, audit_labels.DEFAULT_FOLDS, args.seed, c
            )
            started = time.perf_counter()
            model = audit_classifier.Classifier(num_classes, c).fit(x[checked], y)
            fit_s = time.perf_counter() - started
            test_accuracy = np.mean(model.predict_proba(x[test]).argmax(1) == data.labels[test])
            row = {
                "oof_log_loss": round(float(log_loss(y, probs, labels=range(num_classes))), 4),
                "oof_accuracy": round(float(np.mean(probs.argmax(1) == y)), 4),
                "test_accuracy": round(float(test_accuracy), 4),
                "fit_seconds": round(fit_s, 2),
                "flips": flip_scores(
                    x[checked],
                    y,
                    is_train,
                    num_classes,
                    args.flip_draws,
                    c,
                    audit_labels.DEFAULT_FOLDS,
                    audit_labels.RANKED_BY,
                ),  # fmt: skip
            }
            info["c"][str(c)] = row
            common.log(f"  {name} C={c}: {row}")
        info["folds"] = {}
        for folds in (3, 5, 10):
            info["folds"][str(folds)] = flip_scores(
                x[checked], y, is_train, num_classes, args.flip_draws,
                audit_classifier.DEFAULT_C, folds, audit_labels.RANKED_BY,
            )  # fmt: skip
            common.log(f"  {name} folds={folds}: {info['folds'][str(folds)]}")
        info["ranked_by"] = {}
        for ranked_by in ("self_confidence", "normalized_margin"):
            info["ranked_by"][ranked_by] = flip_scores(
                x[checked], y, is_train, num_classes, args.flip_draws,
                audit_classifier.DEFAULT_C, audit_labels.DEFAULT_FOLDS, ranked_by,
            )  # fmt: skip
            common.log(f"  {name} ranked by {ranked_by}: {info['ranked_by'][ranked_by]}")
        if args.trainer:
            model_dir = os.path.join(work_dir, f"model_{name}")
            command = common.trainer_command(
                f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--overwrite"
            )
            info["trainer"] = run_step(command, os.path.join(work_dir, f"{name}_train.log"))
            metrics = common.read_json(os.path.join(model_dir, "metrics.json"), "metrics")
            info["trainer"]["test_accuracy"] = round(metrics["test"]["accuracy"], 4)
            common.log(f"  {name} hubflow-train defaults: {info['trainer']}")
        results[name] = info
    return results


# ----------------------------------------------------------------------------------------------
# Part: curve (draws per point)
# ----------------------------------------------------------------------------------------------


def curve(args, work_dir: str) -> dict:
    """Per point, the spread of ``CURVE_DRAWS`` draws and the seconds per draw."""
    from training import audit_curve

    results = {}
    for name, data_dir in clean_datasets(args, work_dir).items():
        data, x = arrays(data_dir)
        train, test = data.rows("train"), data.rows("test")
        started = time.perf_counter()
        points = audit_curve.learning_curve(
            x[train], data.labels[train], x[test], data.labels[test], len(data.label_names),
            CURVE_DRAWS, args.seed,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        draws = sum(len(p["accuracies"]) for p in points)
        summary = [
            {
                "k": p["k"],
                "mean": p["mean"],
                "std": p["std"],
                "se_of_mean_5_draws": round(p["std"] / np.sqrt(5), 4),
                "range": [p["min"], p["max"]],
            }
            for p in points
        ]
        results[name] = {
            "draws": CURVE_DRAWS,
            "points": summary,
            "seconds": round(seconds, 1),
            "seconds_per_draw": round(seconds / draws, 3),
            "reading_10_draws": audit_curve.reading(points),
        }
        common.log(
            f"  {name}: {seconds:.1f} s for {draws} fits; {results[name]['reading_10_draws']}"
        )
        for row in summary:
            common.log(f"    {row}")
    return results


# ----------------------------------------------------------------------------------------------
# Part: select (what to label next, simulated)
# ----------------------------------------------------------------------------------------------


def select(args, work_dir: str) -> dict:
    """Start from 2 or 10 labels per class, "label" a budget from the rest of train, refit,
    score on test.

    Strategies: random, uncertainty alone (smallest margin first) and the audit's
    (``training.audit_select``). The pool's true labels play the person who labels them.
    """
    from training import audit_classifier, audit_select, sampling

    results = {}
    for name, data_dir in clean_datasets(args, work_dir).items():
        data, x = arrays(data_dir)
        train, test = data.rows("train"), data.rows("test")
        y, num_classes = data.labels, len(data.label_names)
        info = {}
        for start in SELECT_STARTS:
            for budget in SELECT_BUDGETS:
                scores: dict[str, list[float]] = {"random": [], "uncertainty": [], "audit": []}
                for seed in range(SELECT_SEEDS):
                    seed_rows = train[sampling.per_class_indices(y[train], start, seed)]
                    pool = np.setdiff1d(train, seed_rows)
                    model = audit_classifier.Classifier(num_classes, seed=seed)
                    probs = model.fit(x[seed_rows], y[seed_rows]).predict_proba(x[pool])
                    uncertain_first = np.argsort(audit_select.margins(probs), kind="stable")
                    picks = {
                        "random": np.random.default_rng(seed).permutation(len(pool))[:budget],
                        "uncertainty": uncertain_first[:budget],
                        "audit": audit_select.select(probs, x[pool], budget, seed).rows,
                    }
                    for strategy, chosen in picks.items():
                        rows = np.concatenate([seed_rows, pool[chosen]])
                        fitted = audit_classifier.Classifier(num_classes, seed=seed)
                        fitted.fit(x[rows], y[rows])
                        accuracy = np.mean(fitted.predict_proba(x[test]).argmax(1) == y[test])
                        scores[strategy].append(float(accuracy))
                key = f"start {start}/class, budget {budget}"
                info[key] = {k: round(float(np.mean(v)), 4) for k, v in scores.items()}
                common.log(f"  {name} {key}: {info[key]}")
        results[name] = info
    return results


# ----------------------------------------------------------------------------------------------
# Parts: targets, scale
# ----------------------------------------------------------------------------------------------


def run_audit(name: str, data_dir: str, work_dir: str) -> dict:
    """``python -m training.audit`` on ``data_dir`` into ``work_dir/audit_<name>``, timed."""
    output_dir = os.path.join(work_dir, f"audit_{name}")
    command = [
        sys.executable, "-m", "training.audit",
        f"--data_dir={data_dir}", f"--output_dir={output_dir}",
    ]  # fmt: skip
    info = run_step(command, os.path.join(work_dir, f"audit_{name}.log"))
    result = common.read_json(os.path.join(output_dir, "audit.json"), "audit.json")
    info.update(
        output_dir=output_dir,
        records=sum(v["count"] for v in result["counts"].values()),
        steps_seconds=result["seconds"],
        flagged=result["label_issues"]["flagged"],
        checked=result["label_issues"]["checked"],
        pairs=result["near_duplicates"]["pairs"],
        leakage=result["near_duplicates"]["leakage"],
        reading=result["learning_curve"]["reading"],
        held_out_accuracy=(result["confusion"] or {}).get("accuracy"),
        within_target=info["wall_s"] <= AUDIT_SECONDS_TARGET,
    )
    return info


def read_rows(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def targets(args, work_dir: str) -> dict:
    """Planted flips and leaked copies on cats-vs-dogs-2k; false alarms on the clean set."""
    rng = np.random.default_rng(args.seed)
    rows = dataset_rows(CATSDOGS, {"train": "", "test": "test"})
    labels = sorted({label for _, label, _ in rows})
    train = [i for i, row in enumerate(rows) if row[2] == ""]
    flipped = rng.choice(train, int(round(FLIP_FRACTION * len(train))), replace=False)
    planted = [list(row) for row in rows]
    for i in flipped:
        others = [label for label in labels if label != rows[i][1]]
        planted[i][1] = others[int(rng.integers(len(others)))]
    copies_dir = os.path.join(work_dir, "planted_copies")
    os.makedirs(copies_dir, exist_ok=True)
    test = [i for i, row in enumerate(rows) if row[2] == "test"]
    copies = []
    for n, i in enumerate(rng.choice(test, PLANTED_COPIES, replace=False)):
        kind = list(PLANTED_KINDS)[n % len(PLANTED_KINDS)]
        target = os.path.join(copies_dir, f"{kind}_{os.path.basename(rows[i][0])}")
        if not os.path.exists(target):
            make_copy(rows[i][0], target, *PLANTED_KINDS[kind])
        planted.append([target, rows[i][1], "train"])
        copies.append((target, rows[i][0], kind))
    csv_path = write_csv(os.path.join(work_dir, "planted.csv"), planted)
    split_flags = ("--eval_fraction=0.2", "--test_fraction=0")
    data_dir = preprocess("planted", csv_path, work_dir, args, *split_flags)["output_dir"]
    result: dict = {"planted_audit": run_audit("planted", data_dir, work_dir)}
    out = result["planted_audit"]["output_dir"]

    issues = [row["uri"] for row in read_rows(os.path.join(out, "label_issues.csv"))]
    flipped_uris = {rows[i][0] for i in flipped}
    top = set(issues[: 2 * len(flipped)])
    result["flips"] = {
        "planted": len(flipped),
        "flagged": len(issues),
        "in_top_2x": len(flipped_uris & top),
        "flagged_planted": len(flipped_uris & set(issues)),
        "share_in_top_2x": round(len(flipped_uris & top) / len(flipped), 3),
        "target_share": 2 / 3,
    }
    result["flips"]["pass"] = result["flips"]["share_in_top_2x"] >= 2 / 3
    pairs = read_rows(os.path.join(out, "near_duplicates.csv"))
    leakage = {
        frozenset((row["uri_a"], row["uri_b"]))
        for row in pairs
        if row["split_a"] != row["split_b"] and row["split_a"] != "unlabeled"
        and row["split_b"] != "unlabeled"
    }  # fmt: skip
    caught = [copy for copy in copies if frozenset(copy[:2]) in leakage]
    cosine = {frozenset((r["uri_a"], r["uri_b"])): float(r["cosine"]) for r in pairs}
    result["copies"] = {
        "planted": len(copies),
        "reported_as_leakage": len(caught),
        "missed": [[c[0], c[2]] for c in copies if c not in caught],
        "cosines": {c[0]: cosine.get(frozenset(c[:2])) for c in copies},
        "pairs": len(pairs),
        "leakage_pairs": len(leakage),
        "target": 8,
        "pass": len(caught) >= 8,
    }
    common.log(f"  flips: {result['flips']}")
    common.log(f"  copies: {result['copies']}")
    clean_csv = write_csv(os.path.join(work_dir, "cats-vs-dogs.csv"), rows)
    clean_dir = preprocess("cats-vs-dogs", clean_csv, work_dir, args, *split_flags)["output_dir"]
    result["clean_audit"] = run_audit("clean", clean_dir, work_dir)
    clean = result["clean_audit"]
    result["false_alarms"] = {
        "flagged_rows": clean["flagged"],
        "checked": clean["checked"],
        "near_duplicate_pairs": clean["pairs"],
        "leakage_pairs": clean["leakage"],
        "pairs": read_rows(os.path.join(clean["output_dir"], "near_duplicates.csv")),
        "flagged": read_rows(os.path.join(clean["output_dir"], "label_issues.csv")),
    }
    common.log(f"  clean data: {clean['flagged']} flagged of {clean['checked']}, {clean['pairs']} "
               f"pairs ({clean['leakage']} leakage); audit {clean['wall_s']} s")  # fmt: skip
    return result


def scale(args, work_dir: str) -> dict:
    """The audit of 4,000 real images (MNIST, efficientnet_lite0) against the 3-minute target:
    all labeled, then with ``--unlabeled_per_class`` of each class's digits given a blank label
    (preprocessing writes those to the unlabeled split, and the audit ranks them to label)."""
    results = {}
    csv_path = mnist_csv(args, work_dir)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    seen: dict[str, int] = {}
    for row in rows:  # the last --unlabeled_per_class digits of each class lose their label
        seen[row[1]] = seen.get(row[1], 0) + 1
        if seen[row[1]] > args.mnist_per_class - args.unlabeled_per_class:
            row[1] = ""
    blank_csv = write_csv(os.path.join(work_dir, "mnist_unlabeled.csv"), rows)
    for name, path in (("mnist", csv_path), ("mnist_unlabeled", blank_csv)):
        data_dir = preprocess(name, path, work_dir, args)["output_dir"]
        info = run_audit(name, data_dir, work_dir)
        common.log(
            f"  {name}: {info['records']} records: audit {info['wall_s']} s wall "
            f"({info['cpu_s']} s CPU; target <= {AUDIT_SECONDS_TARGET:.0f} s); "
            f"steps {info['steps_seconds']}"
        )
        results[name] = info
    return results


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", default="/tmp/hubflow-audit-benchmark")
    p.add_argument("--part", action="append", choices=PARTS, help="default: all, in order")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice here")
    p.add_argument("--copies_per_dataset", type=int, default=60)
    p.add_argument("--mnist_per_class", type=int, default=400)
    p.add_argument("--unlabeled_per_class", type=int, default=100, help="scale: blank labels")
    p.add_argument("--flip_draws", type=int, default=10)
    p.add_argument("--trainer", action="store_true", help="also time hubflow-train (choices)")
    p.add_argument("--reuse_data", action="store_true", help="keep existing preprocessed data")
    common.add_job_flag(p, "the preprocessing jobs")
    return p.parse_args(argv)


PART_FUNCTIONS = {
    "calibrate": calibrate,
    "choices": choices,
    "curve": curve,
    "select": select,
    "targets": targets,
    "scale": scale,
}


def main(argv=None) -> int:
    args = parse_args(argv)
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    results: dict = {
        "command": common.command_line(),
        "json": os.path.join(work_dir, RESULTS_FILE),
        "machine": common.machine_info(),
        "git_revision": common.git_revision(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if os.path.exists(results["json"]):
        with open(results["json"], encoding="utf-8") as f:
            previous = json.load(f)
        results.update({k: v for k, v in previous.items() if k in PARTS})
    common.log(f"command: {results['command']}")
    for part in args.part or PARTS:
        common.log(f"\n== {part} ==")
        started = time.perf_counter()
        try:
            results[part] = PART_FUNCTIONS[part](args, work_dir)
        except BenchmarkError as e:
            return common.fail(results, e)
        results[part]["part_wall_s"] = round(time.perf_counter() - started, 1)
        common.write_json(results["json"], results)
    common.log(f"\nresults: {results['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
