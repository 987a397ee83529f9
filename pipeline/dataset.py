"""The preprocess job's output dataset: its file layout, the manifest written last, the summary.

The layout is the one in :mod:`schemas.manifest` and :mod:`schemas.features`: per-split TFRecord
shards (the unlabeled split's too), ``errors-*.jsonl``, the tf.Transform outputs, ``labels.txt``
and ``manifest.json``.
:func:`existing_outputs` names exactly those files (and the temp files the job's writers leave),
so a rerun with ``--overwrite`` replaces only what this job writes. The job writes into a
staging folder and publishes with the manifest last (:mod:`storage.staging`), so a dataset with
a manifest is complete.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline import analyze, files
from schemas import csv_format, features
from schemas import manifest as manifest_lib
from schemas.backbones import RUNTIME_TENSORFLOW, BackboneSpec
from storage.fileops import basename
from storage.staging import temp_folders

# Row events counted into the manifest's row accounting: (kind, *details).
EVENT_READ = "read"  # ()
EVENT_DUPLICATE = "duplicate"  # ()
EVENT_REJECTED = "rejected"  # (category,)
EVENT_WRITTEN = "written"  # (split, label); label "" in the unlabeled split
EVENT_REUSED = "reused"  # (); a written record whose JPEG and embedding came from --reuse_from

VERSIONED_PACKAGES = (
    "hubflow",
    "apache-beam",
    "tensorflow",
    "tf-keras",
    "tensorflow-hub",
    "tensorflow-transform",
    "pillow",
)


def shard_patterns(directory: str) -> list[str]:
    """Globs of the TFRecord shards of every split (the unlabeled one too) in ``directory``,
    the GZIP shards an older version wrote included: ``--overwrite`` replaces them too."""
    return [
        FileSystems.join(directory, pattern)
        for split in csv_format.ALL_SPLITS
        for pattern in features.tfrecord_patterns(split)
    ]


def shard_paths(directory: str) -> list[str]:
    """The TFRecord shards of every split present in ``directory``."""
    return files.match_paths(shard_patterns(directory))


def output_paths(directory: str) -> list[str]:
    """The dataset files and folders present in ``directory`` (manifest, labels, shards,
    errors, tf.Transform output): exactly what this job writes, nothing else."""
    names = [manifest_lib.MANIFEST_FILE, manifest_lib.LABELS_FILE]
    patterns = [FileSystems.join(directory, n) for n in names]
    patterns += shard_patterns(directory)
    patterns.append(FileSystems.join(directory, f"{manifest_lib.ERRORS_PREFIX}-*"))
    found = files.match_paths(patterns)
    for name in (manifest_lib.TRANSFORM_FN_DIR, manifest_lib.TRANSFORMED_METADATA_DIR):
        if FileSystems.exists(FileSystems.join(directory, name)):
            found.append(FileSystems.join(directory, name))
    return found


def output_names(directory: str) -> list[str]:
    """:func:`output_paths` relative to ``directory``."""
    return [basename(path) for path in output_paths(directory)]


def existing_outputs(output_dir: str) -> list[str]:
    """An earlier run's dataset in ``output_dir``, with the temp files its writers left.

    This is everything ``--overwrite`` may delete; a user's other files in the dir are not in it.
    """
    found = output_paths(output_dir)
    found += temp_folders(output_dir)
    if FileSystems.exists(analyze.tft_temp_dir(output_dir)):
        found.append(analyze.tft_temp_dir(output_dir))
    return found


def format_summary(manifest: manifest_lib.Manifest, output_dir: str) -> str:
    """A short human summary: examples per split and label, the unlabeled split's count,
    rejections by reason, each part's slice of the embedding for a composite backbone, and
    what an incremental run reused."""
    unlabeled = manifest.split_count(csv_format.UNLABELED)
    no_label = "(no label)"
    width = max([len(label) for label in manifest.labels] + [len(no_label)])
    split_width = max(len(split) for split in csv_format.ALL_SPLITS)
    lines = [f"{'split':<{split_width}} {'label':<{width}} {'count':>7}"]
    for split in csv_format.SPLITS:
        for label in manifest.labels:
            count = manifest.splits[split]["labels"].get(label, 0)
            lines.append(f"{split:<{split_width}} {label:<{width}} {count:>7}")
        lines.append(f"{split:<{split_width}} {'(all)':<{width}} {manifest.split_count(split):>7}")
    lines.append(f"{csv_format.UNLABELED:<{split_width}} {no_label:<{width}} {unlabeled:>7}")
    r = manifest.rows
    of_them = f" ({unlabeled} of them unlabeled)" if unlabeled else ""
    lines.append(
        f"rows: read {r.read} = written {r.written}{of_them} "
        f"+ duplicates {r.duplicates} + rejected {r.rejected}"
    )
    if manifest.backbone.parts:
        slices = " + ".join(f"{n} [{a}:{b}]" for n, a, b in manifest.backbone.feature_ranges())
        lines.append(f"embedding: {slices}")
    if manifest.reuse is not None:
        reuse = manifest.reuse
        why = f": {reuse.source}: {reuse.skipped}" if reuse.skipped else f" from {reuse.source}"
        lines.append(
            f"reused {reuse.reused} of {r.written} images "
            f"(embedded {r.written - reuse.reused}){why}"
        )
    for reason, n in sorted(manifest.rejected_by_reason.items(), key=lambda kv: -kv[1]):
        lines.append(f"  rejected {reason}: {n}")
    if r.rejected:
        lines.append(
            f"  details: {FileSystems.join(output_dir, manifest_lib.ERRORS_PREFIX)}-*.jsonl"
        )
    lines.append(f"output: {output_dir}")
    return "\n".join(lines)


def package_versions() -> dict[str, str]:
    """Python's and the stack's versions, recorded in the manifest."""
    versions = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class WriteManifestFn(beam.DoFn):
    """Checks the row accounting and writes ``manifest.json`` and ``labels.txt`` last.

    ``reuse``: for a run with ``--reuse_from``, its source and why nothing was reused (if so);
    the reused records are counted from the ``EVENT_REUSED`` events.
    """

    def __init__(
        self,
        output_dir: str,
        backbone: BackboneSpec,
        options: dict[str, Any],
        created: str,
        versions: dict[str, str],
        inference_runtime: str = RUNTIME_TENSORFLOW,
        backbone_sha256: str = "",
        reuse: manifest_lib.Reuse | None = None,
        precision: str = manifest_lib.PRECISION_FLOAT32,
    ):
        self._output_dir = output_dir
        self._backbone = backbone
        self._options = options
        self._created = created
        self._versions = versions
        self._inference_runtime = inference_runtime
        self._backbone_sha256 = backbone_sha256
        self._reuse = reuse
        self._precision = precision

    def process(self, event_counts, labels, written_files):
        counts: dict[tuple, int] = {tuple(event): n for event, n in event_counts}
        splits = manifest_lib.empty_splits(labels)
        rejected_by_reason: dict[str, int] = {}
        rows = manifest_lib.RowCounts()
        reused = 0
        for event, n in sorted(counts.items()):
            kind = event[0]
            if kind == EVENT_REUSED:
                reused += n
            elif kind == EVENT_READ:
                rows.read += n
            elif kind == EVENT_DUPLICATE:
                rows.duplicates += n
            elif kind == EVENT_REJECTED:
                rows.rejected += n
                rejected_by_reason[event[1]] = rejected_by_reason.get(event[1], 0) + n
            elif kind == EVENT_WRITTEN:
                split, label = event[1], event[2]
                rows.written += n
                splits[split]["count"] += n
                if split != csv_format.UNLABELED:  # its records have no label to count
                    splits[split]["labels"][label] = splits[split]["labels"].get(label, 0) + n
        if not rows.balanced():
            raise RuntimeError(
                f"row accounting broken: read {rows.read} != written {rows.written} + "
                f"duplicates {rows.duplicates} + rejected {rows.rejected}"
            )
        if reused > rows.written or (reused and self._reuse is None):
            raise RuntimeError(f"reuse accounting broken: {reused} reused of {rows.written}")
        reuse = None
        if self._reuse is not None:
            reuse = manifest_lib.Reuse(self._reuse.source, reused, self._reuse.skipped)
        manifest = manifest_lib.Manifest(
            labels=list(labels),
            backbone=self._backbone,
            splits=splits,
            rows=rows,
            rejected_by_reason=rejected_by_reason,
            options=self._options,
            versions=self._versions,
            created=self._created,
            inference_runtime=self._inference_runtime,
            precision=self._precision,
            backbone_sha256=self._backbone_sha256,
            reuse=reuse,
        )
        out = self._output_dir
        with FileSystems.create(FileSystems.join(out, manifest_lib.LABELS_FILE)) as f:
            f.write(manifest_lib.labels_text(labels).encode("utf-8"))
        with FileSystems.create(FileSystems.join(out, manifest_lib.MANIFEST_FILE)) as f:
            f.write(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False).encode("utf-8"))
        yield manifest.to_json()
