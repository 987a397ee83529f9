"""Entry point of the data audit: ``python -m training.audit`` / ``hubflow-audit``.

Reads a preprocess output dir (``--data_dir``, never written) and writes to ``--output_dir``:

* ``label_issues.csv``: labeled train/eval rows whose given label is likely wrong, most
  suspect first (:mod:`training.audit_labels`);
* ``near_duplicates.csv``: pairs of different files with nearly identical embeddings, leakage
  across splits first (:mod:`training.audit_duplicates`);
* ``learning_curve.json`` and ``learning_curve.png``: held-out accuracy against labels per
  class, with a one-line reading (:mod:`training.audit_curve`);
* ``to_label.csv`` and ``to_label_rows.csv``, when the data dir has unlabeled images: the ones
  to label next (:mod:`training.audit_select`);
* ``report.html`` (:func:`evaluation.html_report.audit_page`), the page a person opens, with
  thumbnails in ``thumbs/``;
* ``audit.json``: everything the page shows, for other tools.

Every analysis fits the same light classifier (:mod:`training.audit_classifier`). The run holds
the output dir's lock, writes into a staging folder and publishes only when complete, with
``audit.json`` (the completion marker) last; it deletes only the names in :data:`OUTPUTS`, so a
rerun replaces an earlier audit and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from evaluation import html_report, plots
from schemas import csv_format
from schemas import manifest as manifest_lib
from schemas.cli import Parser, UsageError, configure_logging, positive_int, report_usage_error
from storage import staging
from storage.fileops import join
from storage.locks import DirLock
from training import (
    audit_classifier,
    audit_curve,
    audit_data,
    audit_duplicates,
    audit_labels,
    audit_report,
    audit_select,
    layout,
)
from training.audit_data import AuditData

_LOGGER = logging.getLogger("training.audit")
PROG = "hubflow-audit"

# The output layout: the only names a run deletes or replaces in --output_dir.
LABEL_ISSUES_CSV = "label_issues.csv"
NEAR_DUPLICATES_CSV = "near_duplicates.csv"
CURVE_JSON = "learning_curve.json"
CURVE_PNG = "learning_curve.png"
TO_LABEL_CSV = "to_label.csv"
TO_LABEL_ROWS_CSV = "to_label_rows.csv"  # the same images as label-CSV rows: image_uri,label
REPORT_HTML = html_report.REPORT_FILE  # the page (evaluation.html_report.audit_page)
THUMBS_DIR = audit_report.THUMBS_DIR
AUDIT_JSON = "audit.json"  # written last: its presence says the audit is complete
OUTPUTS = (
    LABEL_ISSUES_CSV,
    NEAR_DUPLICATES_CSV,
    CURVE_JSON,
    CURVE_PNG,
    TO_LABEL_CSV,
    TO_LABEL_ROWS_CSV,
    REPORT_HTML,
    THUMBS_DIR,
    AUDIT_JSON,
)
LABELED = (csv_format.TRAIN, csv_format.EVAL)  # the rows the classifiers learn from


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """The parsed command line."""

    data_dir: str
    output_dir: str
    seed: int = 42
    folds: int = audit_labels.DEFAULT_FOLDS
    draws: int = audit_curve.DEFAULT_DRAWS
    budget: int = audit_select.DEFAULT_BUDGET
    duplicate_threshold: float | None = None  # None: calibrated for the data dir's backbone
    break_lock: bool = False


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", help="a hubflow-preprocess output dir (required; only read)")
    p.add_argument("--output_dir", help="where the audit's files go (required)")
    p.add_argument(
        "--folds",
        type=positive_int("--folds"),
        default=audit_labels.DEFAULT_FOLDS,
        help=f"k of the k-fold behind the label issues (default {audit_labels.DEFAULT_FOLDS})",
    )
    p.add_argument(
        "--draws",
        type=positive_int("--draws"),
        default=audit_curve.DEFAULT_DRAWS,
        help=f"seeded draws per learning-curve point (default {audit_curve.DEFAULT_DRAWS})",
    )
    p.add_argument(
        "--budget",
        type=positive_int("--budget"),
        default=audit_select.DEFAULT_BUDGET,
        help=f"unlabeled images to propose for labeling (default {audit_select.DEFAULT_BUDGET})",
    )
    p.add_argument(
        "--duplicate_threshold",
        type=float,
        default=None,
        help="cosine of z-scored embeddings from which two images are near-duplicates "
        "(default: calibrated for the dataset's backbone, "
        + ", ".join(f"{name} {t}" for name, t in audit_duplicates.CALIBRATED_THRESHOLDS.items())
        + f"; {audit_duplicates.DEFAULT_THRESHOLD} for others, with a warning)",
    )
    p.add_argument("--seed", type=int, default=42, help="folds, draws (default 42)")
    p.add_argument(
        "--break_lock",
        action="store_true",
        help="take over a gs:// --output_dir whose lock a killed run left behind",
    )
    return p


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _same_or_inside(path: str, folder: str) -> bool:
    if "://" in path or "://" in folder:
        path, folder = path.rstrip("/"), folder.rstrip("/")
    else:
        path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def parse_config(argv: Sequence[str] | None = None) -> AuditConfig:
    """Parses the command line; reads nothing.

    Raises:
      UsageError: a missing or unusable flag, or an output dir that is (or is inside) the data
        dir.
    """
    args = build_parser().parse_args(argv)
    for flag in ("data_dir", "output_dir"):
        if not getattr(args, flag):
            raise UsageError(f"--{flag} is required")
    if args.folds < 2:
        raise UsageError(f"--folds must be at least 2, got {args.folds}")
    if args.duplicate_threshold is not None and not 0.0 < args.duplicate_threshold <= 1.0:
        raise UsageError(f"--duplicate_threshold must be in (0, 1], got {args.duplicate_threshold}")
    if _same_or_inside(args.output_dir, args.data_dir):
        raise UsageError(
            f"--output_dir {args.output_dir} is inside --data_dir {args.data_dir}: write the "
            "audit outside the dataset"
        )
    return AuditConfig(
        data_dir=_absolute(args.data_dir),
        output_dir=_absolute(args.output_dir),
        seed=args.seed,
        folds=args.folds,
        draws=args.draws,
        budget=args.budget,
        duplicate_threshold=args.duplicate_threshold,
        break_lock=args.break_lock,
    )


def existing_outputs(output_dir: str) -> list[str]:
    """The paths of :data:`OUTPUTS` present in ``output_dir``."""
    return [join(output_dir, n) for n in OUTPUTS if tf.io.gfile.exists(join(output_dir, n))]


def _refuse_other_programs_dir(output_dir: str) -> None:
    """An output dir holding a dataset or a model belongs to another program."""
    for name, what in (
        (manifest_lib.MANIFEST_FILE, "a hubflow dataset"),
        (layout.CONFIG_FILE, "a hubflow model"),
    ):
        if tf.io.gfile.exists(join(output_dir, name)):
            raise UsageError(
                f"--output_dir: {output_dir} holds {what} ({name}); write the audit to a "
                "directory of its own"
            )


def run(config: AuditConfig) -> dict:
    """Reads the data dir, runs every analysis and publishes the outputs; returns audit.json.

    Raises:
      UsageError: on a data dir or output dir that cannot be used, before anything is written.
    """
    data = audit_data.load(config.data_dir)
    with DirLock(config.output_dir, PROG, "--output_dir", config.break_lock):
        _refuse_other_programs_dir(config.output_dir)  # before touching its staging folder
        staging.recover(config.output_dir, AUDIT_JSON, existing_outputs)
        work = staging.reset(config.output_dir)
        audit = audit_dataset(config, data, work)
        new = [name for name in OUTPUTS if tf.io.gfile.exists(join(work, name))]
        staging.publish(config.output_dir, new, existing_outputs(config.output_dir), AUDIT_JSON)
    return audit


class _Timer:
    """Seconds per named step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str):
        _LOGGER.info("%s ...", step)
        started = time.perf_counter()
        yield
        self.seconds[step] = round(time.perf_counter() - started, 2)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The record indices and z-scored embeddings every step works on."""

    x: np.ndarray  # z-scored embeddings, every record
    unit: np.ndarray  # x scaled to unit length (cosines)
    checked: np.ndarray  # train + eval: label issues, the to-label classifier
    train: np.ndarray
    held_out: str | None  # test, else eval: the curve and the confusion matrix
    learn: np.ndarray  # what the confusion matrix's classifier is fitted on
    test: np.ndarray  # the held-out split's records
    unlabeled: np.ndarray

    @classmethod
    def of(cls, data: AuditData) -> _Rows:
        labeled = data.rows(*csv_format.SPLITS)
        x = audit_classifier.Standardizer.fit(data.embeddings[labeled])(data.embeddings)
        held_out = next((s for s in (csv_format.TEST, csv_format.EVAL) if data.count(s)), None)
        return cls(
            x=x,
            unit=audit_duplicates.unit_rows(x, None),
            checked=data.rows(*LABELED),
            train=data.rows(csv_format.TRAIN),
            held_out=held_out,
            learn=data.rows(*_learned_on(held_out)),
            test=data.rows(held_out) if held_out else np.zeros(0, np.int64),
            unlabeled=data.rows(csv_format.UNLABELED),
        )


def audit_dataset(config: AuditConfig, data: AuditData, work: str) -> dict:
    """The steps of an audit, writing every output into ``work``; returns audit.json."""
    timer = _Timer()
    rows = _Rows.of(data)
    with timer("label_issues"):
        issues = _label_issues(config, data, rows)
    with timer("near_duplicates"):
        duplicates = _near_duplicates(config, data, rows)
    with timer("learning_curve"):
        curve = _learning_curve(config, data, rows)
    with timer("confusion"):
        confusion = _confusion(config, data, rows)
    with timer("to_label"):
        to_label = _to_label(config, data, rows)
    audit = {
        "data_dir": config.data_dir,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backbone": data.manifest.backbone.name,
        "labels": data.label_names,
        "counts": audit_report.counts(data),
        "rows": dataclasses.asdict(data.manifest.rows),
        "rejected_by_reason": dict(data.manifest.rejected_by_reason),
        "label_issues": _page_section(issues, data, [("row", "thumb")]),
        "near_duplicates": _page_section(
            duplicates, data, [("row_a", "thumb_a"), ("row_b", "thumb_b")]
        ),
        "learning_curve": {**curve, "png": CURVE_PNG},
        "confusion": confusion,
        "to_label": _page_section(to_label, data, [("row", "thumb")]),
        "files": {},
        "seconds": timer.seconds,
    }
    with timer("write"):
        audit["files"] = _write_tables(work, issues, duplicates, curve, to_label)
    with timer("thumbnails"):
        _write_thumbnails(work, data, audit)
    with timer("report"):
        audit["files"]["report"] = REPORT_HTML
        _write_text(work, REPORT_HTML, html_report.audit_page(audit))
    _write_text(work, AUDIT_JSON, json.dumps(audit, indent=1))  # last: the marker
    return audit


def _label_issues(config: AuditConfig, data: AuditData, rows: _Rows) -> dict:
    found, _ = audit_labels.find(
        rows.x[rows.checked], data.labels[rows.checked], len(data.label_names), config.folds,
        config.seed,
    )  # fmt: skip
    table = audit_report.label_issue_rows(data, rows.checked, found)
    return {
        "flagged": len(table),
        "checked": found.checked,
        "method": found.method,
        "score": "1 - out-of-fold probability of the given label (higher = more suspect)",
        "rows": table,
    }


def _near_duplicates(config: AuditConfig, data: AuditData, rows: _Rows) -> dict:
    backbone = data.manifest.backbone.name
    if config.duplicate_threshold is not None:
        threshold, source = config.duplicate_threshold, "--duplicate_threshold"
    else:
        threshold, source = audit_duplicates.threshold_for(backbone)
        if source != audit_duplicates.CALIBRATED:
            _LOGGER.warning(
                "near-duplicates: no threshold was calibrated for %s embeddings; using %s "
                "(efficientnet_lite0's), which may miss copies or pair different photos: pass "
                "--duplicate_threshold",
                backbone,
                threshold,
            )
    pairs = audit_duplicates.find(rows.unit, threshold)
    order, leakage = audit_duplicates.ordered(pairs, data.splits, csv_format.SPLITS)
    return {
        "threshold": threshold,
        "threshold_source": source,
        "pairs": len(order),
        "leakage": int(np.sum(leakage)),
        "rows": audit_report.duplicate_rows(data, pairs, order, leakage),
    }


def _learning_curve(config: AuditConfig, data: AuditData, rows: _Rows) -> dict:
    """learning_curve.json: the points, the reading, and how they were drawn."""
    points, reading = [], "no test or eval split to measure on"
    if len(rows.test):
        points = audit_curve.learning_curve(
            rows.x[rows.train], data.labels[rows.train], rows.x[rows.test],
            data.labels[rows.test], len(data.label_names), config.draws, config.seed,
        )  # fmt: skip
        reading = (
            f"{audit_curve.reading(points)} (measured on {len(rows.test)} {rows.held_out} images)"
        )
    return {
        "points": points,
        "reading": reading,
        "split": rows.held_out,
        "draws": config.draws,
        "seed": config.seed,
        "classifier": _classifier([csv_format.TRAIN]),
        "sampler": "training.sampling.per_class_indices(train labels, k, seed + draw, "
        "strict=False); the last point is all train rows",
    }


def _confusion(config: AuditConfig, data: AuditData, rows: _Rows) -> dict | None:
    if not len(rows.test):
        return None
    model = audit_classifier.Classifier(len(data.label_names), seed=config.seed)
    model.fit(rows.x[rows.learn], data.labels[rows.learn])
    probabilities = model.predict_proba(rows.x[rows.test])
    method = _classifier(_learned_on(rows.held_out))
    return audit_report.confusion(data, rows.held_out, rows.test, probabilities, method)


def _to_label(config: AuditConfig, data: AuditData, rows: _Rows) -> dict:
    probabilities = np.zeros((0, len(data.label_names)))
    if len(rows.unlabeled):
        model = audit_classifier.Classifier(len(data.label_names), seed=config.seed)
        model.fit(rows.x[rows.checked], data.labels[rows.checked])
        probabilities = model.predict_proba(rows.x[rows.unlabeled])
    selection = audit_select.select(
        probabilities, rows.x[rows.unlabeled], config.budget, config.seed
    )
    return {
        "budget": config.budget,
        "unlabeled": len(rows.unlabeled),
        "score": "uncertainty, 1 - (p1 - p2), highest first; chosen by uncertainty-weighted "
        "k-means (one image per cluster)",
        "rows": audit_report.to_label_rows(data, rows.unlabeled, selection),
    }


def _page_section(section: dict, data: AuditData, thumbs) -> dict:
    """``section`` for audit.json: its first rows only, with their thumbnails."""
    return {**section, "rows": audit_report.with_thumbs(section["rows"], data, thumbs)}


def _write_tables(work: str, issues, duplicates, curve, to_label) -> dict[str, str]:
    """The CSV files, learning_curve.json and .png; returns what was written, by role."""
    csv_text = audit_report.csv_text
    files = {
        "label_issues": LABEL_ISSUES_CSV,
        "near_duplicates": NEAR_DUPLICATES_CSV,
        "learning_curve": CURVE_JSON,
        "learning_curve_png": CURVE_PNG,
    }
    _write_text(work, LABEL_ISSUES_CSV, csv_text(audit_report.LABEL_ISSUE_COLUMNS, issues["rows"]))
    _write_text(
        work, NEAR_DUPLICATES_CSV, csv_text(audit_report.DUPLICATE_COLUMNS, duplicates["rows"])
    )
    _write_text(work, CURVE_JSON, json.dumps(curve, indent=2))
    ylabel = f"{curve['split']} accuracy" if curve["split"] else "accuracy"
    png = plots.learning_curve_png(curve["points"], curve["reading"], ylabel)
    _write_bytes(work, CURVE_PNG, png)
    if to_label["unlabeled"]:
        files.update(to_label=TO_LABEL_CSV, to_label_rows=TO_LABEL_ROWS_CSV)
        table = to_label["rows"]
        _write_text(work, TO_LABEL_CSV, csv_text(audit_report.TO_LABEL_COLUMNS, table))
        label_csv_rows = csv_text(("uri", "predicted_label"), table, header=False)
        _write_text(work, TO_LABEL_ROWS_CSV, label_csv_rows)
    return files


def _learned_on(held_out: str | None) -> list[str]:
    """The labeled splits a classifier measured on ``held_out`` learns from."""
    return [split for split in LABELED if split != held_out]


def _classifier(splits: Sequence[str]) -> str:
    return (
        f"logistic regression (C={audit_classifier.DEFAULT_C}) on z-scored embeddings, fitted "
        f"on {' + '.join(splits)}"
    )


def _write_text(folder: str, name: str, text: str) -> None:
    with tf.io.gfile.GFile(join(folder, name), "w") as f:
        f.write(text)


def _write_bytes(folder: str, name: str, content: bytes) -> None:
    with tf.io.gfile.GFile(join(folder, name), "wb") as f:
        f.write(content)


def _thumb_rows(data: AuditData, audit: dict) -> np.ndarray:
    """The records audit.json shows: the rows of every table, every held-out record."""
    index = {audit_report.thumb_path(sha): i for i, sha in enumerate(data.sha256)}
    wanted = set()
    for section, keys in (
        ("label_issues", ("thumb",)),
        ("near_duplicates", ("thumb_a", "thumb_b")),
        ("to_label", ("thumb",)),
    ):
        for row in audit[section]["rows"]:
            wanted.update(index[row[k]] for k in keys)
    if audit["confusion"] is not None:
        for cell in audit["confusion"]["cells"].values():
            wanted.update(index[item["thumb"]] for item in cell)
    return np.asarray(sorted(wanted), np.int64)


def _write_thumbnails(work: str, data: AuditData, audit: dict) -> None:
    rows = _thumb_rows(data, audit)
    tf.io.gfile.makedirs(join(work, THUMBS_DIR))
    for row, jpeg in audit_data.read_images(data, rows).items():
        _write_bytes(work, audit_report.thumb_path(data.sha256[row]), audit_data.thumbnail(jpeg))


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging("training")
    try:
        config = parse_config(argv)
        audit = run(config)
    except UsageError as e:
        return report_usage_error(PROG, e)
    print(audit_report.summary(audit, config.output_dir, PROG))
    return 0


if __name__ == "__main__":
    sys.exit(main())
