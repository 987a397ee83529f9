"""Entry point of the preprocessing job: ``python -m pipeline.preprocess`` / ``hubflow-preprocess``.

App flags are parsed here; everything else goes to Beam's ``PipelineOptions`` (``--runner``,
``--project``, ``--direct_num_workers``, ``--setup_file`` …). Misuse is reported as one line
naming the flag before the pipeline starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
from collections.abc import Sequence
from importlib import metadata

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from pipeline import analyze, csv_rows, images, sinks, transforms
from pipeline import backbone as backbone_lib
from pipeline.cli import Parser, UsageError, fraction, positive_int, unknown_flags
from schemas import backbones, csv_format, features
from schemas import manifest as manifest_lib
from schemas.backbones import BackboneSpec

_LOGGER = logging.getLogger(__name__)
PROG = "hubflow-preprocess"
_VERSIONED_PACKAGES = (
    "hubflow",
    "apache-beam",
    "tensorflow",
    "tf-keras",
    "tensorflow-hub",
    "tensorflow-transform",
    "pillow",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0])
    src = parser.add_argument_group("input (one of)")
    src.add_argument(
        "--input_csv",
        action="append",
        default=[],
        metavar="PATTERN",
        help="label CSV (image_uri,label[,split]); repeatable; globs and gs:// work",
    )
    src.add_argument(
        "--image_dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder with one sub-folder of images per class; repeatable",
    )
    parser.add_argument("--output_dir", help="where TFRecords, manifest and errors go (required)")
    parser.add_argument(
        "--backbone",
        default=backbones.DEFAULT_BACKBONE,
        help="preset name, TF-Hub handle URL or SavedModel path "
        f"(default {backbones.DEFAULT_BACKBONE}: ImageNet weights, built offline)",
    )
    parser.add_argument(
        "--image_size",
        type=positive_int("--image_size"),
        default=None,
        help="backbone input size when the model does not fix it",
    )
    parser.add_argument(
        "--label_dict",
        default=None,
        help="file with one label per line, in index order; other labels rejected",
    )
    parser.add_argument(
        "--batch_size",
        type=positive_int("--batch_size"),
        default=32,
        help="largest embedding batch (default 32)",
    )
    parser.add_argument("--eval_fraction", type=fraction("--eval_fraction"), default=0.1)
    parser.add_argument("--test_fraction", type=fraction("--test_fraction"), default=0.1)
    parser.add_argument(
        "--jpeg_quality", type=positive_int("--jpeg_quality"), default=images.DEFAULT_JPEG_QUALITY
    )
    parser.add_argument(
        "--max_image_side",
        type=positive_int("--max_image_side"),
        default=None,
        help="downscale so the longer side is at most this (default: keep size)",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=positive_int("--max_image_pixels"),
        default=images.DEFAULT_MAX_PIXELS,
        help="reject larger images without decoding them (decompression bombs)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of an earlier run in --output_dir",
    )
    return parser


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated job configuration."""

    csv_paths: list[str]
    image_dirs: list[str]
    output_dir: str
    backbone: BackboneSpec
    label_dict: list[str] | None
    batch_size: int
    eval_fraction: float
    test_fraction: float
    jpeg_quality: int
    max_image_side: int | None
    max_image_pixels: int
    options: dict


def _read_label_dict(path: str) -> list[str]:
    try:
        with FileSystems.open(path) as f:
            text = f.read().decode("utf-8-sig")
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--label_dict: cannot read {path!r}: {e}") from e
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise UsageError(f"--label_dict: {path!r} holds no labels")
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise UsageError(f"--label_dict: {path!r} lists {duplicates} more than once")
    return labels


def _existing_outputs(output_dir: str) -> list[str]:
    names = [manifest_lib.MANIFEST_FILE, manifest_lib.LABELS_FILE]
    patterns = [FileSystems.join(output_dir, n) for n in names]
    patterns += [
        FileSystems.join(output_dir, features.tfrecord_pattern(s)) for s in csv_format.SPLITS
    ]
    patterns.append(FileSystems.join(output_dir, f"{manifest_lib.ERRORS_PREFIX}-*"))
    found = []
    for result in FileSystems.match(patterns):
        found += [m.path for m in result.metadata_list]
    for path in (
        FileSystems.join(output_dir, manifest_lib.TRANSFORM_FN_DIR),
        FileSystems.join(output_dir, manifest_lib.TRANSFORMED_METADATA_DIR),
        analyze.tft_temp_dir(output_dir),
    ):
        if FileSystems.exists(path):
            found.append(path)
    return found


def parse_config(argv: Sequence[str] | None = None) -> tuple[Config, list[str]]:
    """Parses and validates the app flags; returns the config and the remaining Beam flags.

    Raises:
      UsageError: naming the offending flag.
    """
    args, beam_args = build_parser().parse_known_args(argv)
    unknown = unknown_flags(beam_args)
    if unknown:
        raise UsageError(f"unrecognized flag {unknown[0]} (see --help)")
    if not args.output_dir:
        raise UsageError("--output_dir is required")
    if bool(args.input_csv) == bool(args.image_dir):
        raise UsageError("give exactly one of --input_csv or --image_dir")
    if args.eval_fraction + args.test_fraction >= 1.0:
        raise UsageError("--eval_fraction + --test_fraction must leave some data for training")
    if args.jpeg_quality > 100:
        raise UsageError(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    try:
        csv_paths = csv_rows.resolve_csv_patterns(args.input_csv) if args.input_csv else []
        for image_dir in args.image_dir:
            next(iter(csv_rows.list_image_dir(image_dir)), None)  # raises on a missing dir
    except ValueError as e:
        raise UsageError(str(e)) from e
    image_dirs = [d if "://" in d else _abspath(d) for d in args.image_dir]
    label_dict = _read_label_dict(args.label_dict) if args.label_dict else None

    output_dir = args.output_dir if "://" in args.output_dir else _abspath(args.output_dir)
    existing = _existing_outputs(output_dir)
    if existing and not args.overwrite:
        raise UsageError(
            f"--output_dir: {output_dir} already holds a dataset ({len(existing)} files); "
            "pass --overwrite to replace it or choose another directory"
        )
    try:
        spec = backbone_lib.probe(backbone_lib.resolve(args.backbone, args.image_size))
    except ValueError as e:
        raise UsageError(str(e)) from e
    if existing:
        _LOGGER.info("--overwrite: deleting %d outputs of an earlier run", len(existing))
        FileSystems.delete(existing)
    options = {k: v for k, v in vars(args).items()}
    options["beam_args"] = list(beam_args)
    config = Config(
        csv_paths=csv_paths,
        image_dirs=image_dirs,
        output_dir=output_dir,
        backbone=spec,
        label_dict=label_dict,
        batch_size=args.batch_size,
        eval_fraction=args.eval_fraction,
        test_fraction=args.test_fraction,
        jpeg_quality=args.jpeg_quality,
        max_image_side=args.max_image_side,
        max_image_pixels=args.max_image_pixels,
        options=options,
    )
    return config, beam_args


def _abspath(path: str) -> str:
    import os

    return os.path.abspath(path)


def _versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class WriteManifestFn(beam.DoFn):
    """Checks the row accounting and writes ``manifest.json`` and ``labels.txt`` last."""

    def __init__(self, config: Config, created: str, versions: dict[str, str]):
        self._config = config
        self._created = created
        self._versions = versions

    def process(self, event_counts, labels, written_files):
        counts: dict[tuple, int] = {tuple(event): n for event, n in event_counts}
        splits = manifest_lib.empty_splits(labels)
        rejected_by_reason: dict[str, int] = {}
        rows = manifest_lib.RowCounts()
        for event, n in sorted(counts.items()):
            kind = event[0]
            if kind == "read":
                rows.read += n
            elif kind == "duplicate":
                rows.duplicates += n
            elif kind == "rejected":
                rows.rejected += n
                rejected_by_reason[event[1]] = rejected_by_reason.get(event[1], 0) + n
            elif kind == "written":
                split, label = event[1], event[2]
                rows.written += n
                splits[split]["count"] += n
                splits[split]["labels"][label] = splits[split]["labels"].get(label, 0) + n
        if not rows.balanced():
            raise RuntimeError(
                f"row accounting broken: read {rows.read} != written {rows.written} + "
                f"duplicates {rows.duplicates} + rejected {rows.rejected}"
            )
        manifest = manifest_lib.Manifest(
            labels=list(labels),
            backbone=self._config.backbone,
            splits=splits,
            rows=rows,
            rejected_by_reason=rejected_by_reason,
            options=self._config.options,
            versions=self._versions,
            created=self._created,
        )
        out = self._config.output_dir
        with FileSystems.create(FileSystems.join(out, manifest_lib.LABELS_FILE)) as f:
            f.write("".join(f"{label}\n" for label in labels).encode("utf-8"))
        with FileSystems.create(FileSystems.join(out, manifest_lib.MANIFEST_FILE)) as f:
            f.write(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False).encode("utf-8"))
        yield manifest.to_json()


def build_pipeline(p: beam.Pipeline, config: Config) -> None:
    """Adds the whole job to ``p``."""
    out = config.output_dir
    rows, parse_errors = p | "ReadRows" >> transforms.ReadRows(
        config.csv_paths, config.image_dirs, config.label_dict
    )
    total_rows = rows | "CountRows" >> beam.combiners.Count.Globally()
    hashed = rows | "HashAndValidate" >> beam.ParDo(
        transforms.HashAndValidateFn(config.max_image_pixels),
        total=beam.pvalue.AsSingleton(total_rows),
    ).with_outputs(transforms.ERRORS, main="ok")
    resolved = (
        hashed.ok
        | "GroupByContent" >> beam.GroupByKey()
        | "ResolveDuplicates"
        >> beam.ParDo(
            transforms.ResolveDuplicatesFn(config.eval_fraction, config.test_fraction)
        ).with_outputs(transforms.ERRORS, transforms.DUPLICATES, main="accepted")
    )
    accepted = resolved.accepted
    if config.label_dict is not None:
        labels = p | "LabelDict" >> beam.Create([list(config.label_dict)])
    else:
        labels = (
            accepted
            | "Labels" >> beam.Map(lambda a: a.row.label)
            | "LabelVocabulary" >> analyze.LabelVocabulary(analyze.tft_temp_dir(out))
        )
    total_accepted = accepted | "CountAccepted" >> beam.combiners.Count.Globally()
    embedded, embed_errors = accepted | "EncodeAndEmbed" >> transforms.EncodeAndEmbed(
        config.backbone,
        config.batch_size,
        config.max_image_pixels,
        config.max_image_side,
        config.jpeg_quality,
        labels,
        total_accepted,
    )

    written_files = []
    for split in csv_format.SPLITS:
        written_files.append(
            embedded[split]
            | f"Write[{split}]" >> sinks.WriteToTFRecord(FileSystems.join(out, split))
        )

    errors = (
        parse_errors,
        hashed[transforms.ERRORS],
        resolved[transforms.ERRORS],
        embed_errors,
    ) | "AllErrors" >> beam.Flatten()
    written_files.append(
        errors
        | "ErrorsToJson" >> beam.Map(transforms.error_to_json)
        | "WriteErrors"
        >> beam.io.WriteToText(
            FileSystems.join(out, manifest_lib.ERRORS_PREFIX),
            file_name_suffix=manifest_lib.ERRORS_SUFFIX,
        )
    )

    written_files.append(
        embedded[transforms.EMBEDDINGS]
        | "EmbeddingStatistics"
        >> analyze.AnalyzeAndWriteTransformFn(out, config.backbone.embedding_dim)
    )

    events = (
        rows | "ReadEvents" >> beam.Map(lambda _: ("read",)),
        parse_errors | "ParseErrorReadEvents" >> beam.Map(lambda _: ("read",)),
        errors | "RejectEvents" >> beam.Map(lambda e: ("rejected", e.category)),
        resolved[transforms.DUPLICATES] | "DuplicateEvents" >> beam.Map(lambda _: ("duplicate",)),
        embedded[transforms.WRITTEN] | "WrittenEvents" >> beam.Map(lambda sl: ("written", *sl)),
    ) | "Events" >> beam.Flatten()
    done = tuple(written_files) | "AllWritten" >> beam.Flatten()
    (
        events
        | "CountEvents" >> beam.combiners.Count.PerElement()
        | "CollectCounts" >> beam.combiners.ToList()
        | "WriteManifest"
        >> beam.ParDo(
            WriteManifestFn(
                config,
                datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                _versions(),
            ),
            labels=beam.pvalue.AsSingleton(labels),
            written_files=beam.pvalue.AsList(done),
        )
    )


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> PipelineResult:
    """Validates the flags, builds the job and runs it to completion.

    Raises:
      UsageError: on misuse, before the pipeline starts.
    """
    config, beam_args = parse_config(argv)
    return run_config(config, beam_args, test_pipeline)


def run_config(config: Config, beam_args: Sequence[str], test_pipeline=None) -> PipelineResult:
    """Runs the job for an already validated config."""
    options = PipelineOptions(list(beam_args))
    p = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(p, config)
    result = p.run()
    result.wait_until_finish()
    _cleanup(config.output_dir)
    return result


def _cleanup(output_dir: str) -> None:
    temp = analyze.tft_temp_dir(output_dir)
    if FileSystems.exists(temp):
        FileSystems.delete([temp])


def format_summary(manifest: manifest_lib.Manifest, output_dir: str) -> str:
    """A short human summary: examples per split and label, and rejections by reason."""
    width = max([len(label) for label in manifest.labels] + [5])
    lines = [f"{'split':<6} {'label':<{width}} {'count':>7}"]
    for split in csv_format.SPLITS:
        for label in manifest.labels:
            count = manifest.splits[split]["labels"].get(label, 0)
            lines.append(f"{split:<6} {label:<{width}} {count:>7}")
        lines.append(f"{split:<6} {'(all)':<{width}} {manifest.split_count(split):>7}")
    r = manifest.rows
    lines.append(
        f"rows: read {r.read} = written {r.written} + duplicates {r.duplicates} "
        f"+ rejected {r.rejected}"
    )
    for reason, n in sorted(manifest.rejected_by_reason.items(), key=lambda kv: -kv[1]):
        lines.append(f"  rejected {reason}: {n}")
    if r.rejected:
        lines.append(
            f"  details: {FileSystems.join(output_dir, manifest_lib.ERRORS_PREFIX)}-*.jsonl"
        )
    lines.append(f"output: {output_dir}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("pipeline").setLevel(logging.INFO)  # progress lines; Beam's INFO is noise
    try:
        config, beam_args = parse_config(argv)  # fail fast, before Beam starts anything
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    run_config(config, beam_args)
    try:
        manifest = manifest_lib.read_manifest(config.output_dir)
    except ValueError:
        print(f"{PROG}: the job finished but wrote no manifest (runner still running?)")
        return 0
    print(format_summary(manifest, config.output_dir))
    if manifest.rows.written == 0:
        print(f"{PROG}: error: no row was usable; see the errors file", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
