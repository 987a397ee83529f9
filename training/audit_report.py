"""The audit's results as rows: the CSV files, the sections of ``audit.json``, the summary.

Pure functions from the analyses' arrays to lists of dicts and text; nothing here reads or
writes files (:mod:`training.audit` does). Thumbnails are named by content,
``thumbs/<sha256>.jpg``, relative to the output dir.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import numpy as np

from schemas import csv_format
from training.audit_data import AuditData
from training.audit_duplicates import Pairs
from training.audit_labels import LabelIssues
from training.audit_select import Selection

THUMBS_DIR = "thumbs"
# Rows of each table that audit.json carries (with thumbnails) for the page; the CSVs hold all.
PAGE_ROWS = 48
SPLIT_ORDER = {split: i for i, split in enumerate(csv_format.ALL_SPLITS)}

LABEL_ISSUE_COLUMNS = ("uri", "split", "given_label", "suggested_label", "score")
DUPLICATE_COLUMNS = ("uri_a", "uri_b", "split_a", "split_b", "cosine")
TO_LABEL_COLUMNS = ("uri", "predicted_label", "score", "margin")


def thumb_path(sha256: str) -> str:
    """Where a record's thumbnail goes, relative to the output dir."""
    return f"{THUMBS_DIR}/{sha256}.jpg"


def csv_text(columns: Sequence[str], rows: Sequence[dict], header: bool = True) -> str:
    """``rows`` as CSV text (``columns`` only, in that order)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([row[c] for c in columns])
    return buffer.getvalue()


def _score(value: float) -> float:
    return round(float(value), 4)


def label_issue_rows(data: AuditData, checked: np.ndarray, issues: LabelIssues) -> list[dict]:
    """One row per flagged record, most suspect first (``checked``: the records looked at)."""
    names = data.label_names
    rows = []
    for local, score, suggested in zip(issues.rows, issues.score, issues.suggested, strict=True):
        i = int(checked[local])
        rows.append(
            {
                "uri": data.uris[i],
                "split": data.splits[i],
                "given_label": names[data.labels[i]],
                "suggested_label": names[int(suggested)],
                "score": _score(score),
                "row": i,
            }
        )
    return rows


def duplicate_rows(
    data: AuditData, pairs: Pairs, order: np.ndarray, leakage: np.ndarray
) -> list[dict]:
    """One row per pair in ``order``; within a pair, the earlier split (train first) is ``a``."""

    def key(i: int) -> tuple[int, str]:
        return SPLIT_ORDER.get(data.splits[i], len(SPLIT_ORDER)), data.uris[i]

    rows = []
    for index, leak in zip(order, leakage, strict=True):
        a, b = int(pairs.a[index]), int(pairs.b[index])
        if key(b) < key(a):
            a, b = b, a
        rows.append(
            {
                "uri_a": data.uris[a],
                "uri_b": data.uris[b],
                "split_a": data.splits[a],
                "split_b": data.splits[b],
                "cosine": _score(pairs.cosine[index]),
                "leakage": bool(leak),
                "row_a": a,
                "row_b": b,
            }
        )
    return rows


def to_label_rows(data: AuditData, candidates: np.ndarray, selection: Selection) -> list[dict]:
    """One row per picked unlabeled record, in picking order; ``score`` is its uncertainty."""
    names = data.label_names
    return [
        {
            "uri": data.uris[int(candidates[local])],
            "predicted_label": names[int(predicted)],
            "score": _score(uncertainty),
            "margin": _score(margin),
            "row": int(candidates[local]),
        }
        for local, predicted, uncertainty, margin in zip(
            selection.rows,
            selection.predicted,
            selection.uncertainty,
            selection.margin,
            strict=True,
        )
    ]


def confusion(
    data: AuditData, split: str, rows: np.ndarray, probabilities: np.ndarray, method: str
) -> dict:
    """The held-out split's confusion matrix, with every record in its cell.

    ``method`` says which model predicted. Cells are keyed ``"<true>,<predicted>"``; each
    entry's ``score`` is the probability of the predicted label. Off-diagonal cells list the
    most confident mistakes first, diagonal cells the least confident right answers first.
    """
    names = data.label_names
    truth = data.labels[rows]
    predicted = probabilities.argmax(axis=1)
    matrix = np.zeros((len(names), len(names)), np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    cells: dict[str, list[dict]] = {}
    for t, p in zip(*np.nonzero(matrix), strict=True):
        members = np.flatnonzero((truth == t) & (predicted == p))
        scores = probabilities[members, p]
        members = members[np.argsort(scores if t == p else -scores, kind="stable")]
        cells[f"{names[t]},{names[p]}"] = [
            {
                "uri": data.uris[rows[m]],
                "thumb": thumb_path(data.sha256[rows[m]]),
                "score": _score(probabilities[m, p]),
            }
            for m in members
        ]
    return {
        "split": split,
        "method": method,
        "labels": names,
        "matrix": matrix.tolist(),
        "accuracy": _score(np.mean(truth == predicted)) if len(rows) else None,
        "cells": cells,
    }


def counts(data: AuditData) -> dict:
    """Per split (the unlabeled one too), the manifest's record count and per-label counts."""
    splits = data.manifest.splits
    return {
        split: {
            "count": int(splits.get(split, {}).get("count", 0)),
            "labels": dict(splits.get(split, {}).get("labels", {})),
        }
        for split in csv_format.ALL_SPLITS
    }


def with_thumbs(rows: list[dict], data: AuditData, pairs: Sequence[tuple[str, str]]) -> list[dict]:
    """The first :data:`PAGE_ROWS` of ``rows`` for the page: each ``(row key, thumb key)`` of
    ``pairs`` adds the record's thumbnail path; the row indices are dropped."""
    out = []
    for row in rows[:PAGE_ROWS]:
        item = {k: v for k, v in row.items() if not k.startswith("row")}
        for row_key, thumb_key in pairs:
            item[thumb_key] = thumb_path(data.sha256[row[row_key]])
        out.append(item)
    return out


def summary(audit: dict, output_dir: str, prog: str) -> str:
    """The lines the command prints at the end."""
    issues, dups = audit["label_issues"], audit["near_duplicates"]
    curve, to_label, files = audit["learning_curve"], audit["to_label"], audit["files"]
    lines = [
        f"{prog}: {audit['data_dir']}",
        f"  label issues:    {issues['flagged']} of {issues['checked']} train/eval rows "
        f"flagged ({files['label_issues']})",
        f"  near-duplicates: {dups['pairs']} pair(s) at cosine >= {dups['threshold']}, "
        f"{dups['leakage']} of them leakage across splits ({files['near_duplicates']})",
        f"  learning curve:  {curve['reading']} ({files['learning_curve_png']})",
    ]
    held_out = audit["confusion"]
    if held_out is not None and held_out["accuracy"] is not None:
        lines.append(
            f"  {held_out['split']} accuracy: {held_out['accuracy']:.4f} (light classifier on "
            "the labeled rows of the other splits)"
        )
    if to_label["unlabeled"]:
        lines.append(
            f"  to label next:   {len(to_label['rows'])} of {to_label['unlabeled']} unlabeled "
            f"images ({files['to_label']}; as label-CSV rows: {files['to_label_rows']})"
        )
    else:
        lines.append("  to label next:   no unlabeled images in the data dir")
    if "report" in files:
        lines.append(f"  report:          {files['report']}")
    lines.append(f"  output:          {output_dir}  ({sum(audit['seconds'].values()):.1f} s)")
    return "\n".join(lines)
