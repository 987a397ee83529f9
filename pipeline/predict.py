"""Batch prediction on Beam: ``python -m pipeline.predict`` / ``hubflow-predict``.

Scores images with an exported hubflow model (``export/<n>/``) through Beam RunInference over
its serving signature (:mod:`pipeline.scoring`), on the raw image bytes. Runs unchanged on the DirectRunner and on Dataflow.
Every input image ends as a prediction or as an error record; when the input CSV has labels the
job also writes ``metrics.json`` and ``confusion_matrix.png`` (:mod:`pipeline.prediction_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.runners.runner import PipelineResult

from pipeline import files, images, inference, prediction_report, remote, scoring
from pipeline.cli import JobIncomplete, check_beam_flags, is_dry_run, run_staged
from pipeline.options import StagedJob, add_output_flags, check_inputs_outside
from pipeline.records import ERRORS, SOURCE_CSV, SOURCE_PATTERN, error_to_json
from schemas import manifest as manifest_lib
from schemas import serving
from schemas.backbones import RUNTIME_TENSORFLOW
from schemas.cli import Parser, UsageError, configure_logging, positive_int, report_usage_error
from storage import staging
from storage.locks import DirLock

_LOGGER = logging.getLogger(__name__)
PROG = "hubflow-predict"
VARIABLES_INDEX = "variables/variables.index"  # a SavedModel's weights; absent = unusable


# ---------------------------------------------------------------------------------------------
# Command line and pipeline


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """The parsed command line: flag values only, nothing read from disk yet."""

    model: str
    input_csvs: list[str]
    input_patterns: list[str]
    output_dir: str
    batch_size: int
    max_image_pixels: int
    max_file_bytes: int
    csv_output: bool
    overwrite: bool
    break_lock: bool
    precision: str = manifest_lib.PRECISION_FLOAT32  # what the export computes in


@dataclasses.dataclass(frozen=True)
class PredictJob(StagedJob):
    """What :func:`resolve` found for a config: the export, its labels, the input sources."""

    config: PredictConfig
    model_dir: str
    labels: list[str]
    sources: list[tuple[str, str]]
    previous_outputs: list[str]
    normalisation: dict = dataclasses.field(default_factory=dict)
    worker_model_dir: str = ""  # where the workers load the export (a staged copy on Dataflow)
    notes: tuple[str, ...] = ()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an export/<n>/ dir, or its parent (highest n) (required)")
    p.add_argument(
        "--input_csv",
        action="append",
        default=[],
        metavar="PATTERN",
        help="CSV(s) of image_uri[,label]; same rules as preprocessing",
    )
    p.add_argument(
        "--input_pattern",
        action="append",
        default=[],
        metavar="GLOB",
        help="image glob on any Beam filesystem, e.g. gs://bucket/new/*.jpg",
    )
    p.add_argument("--output_dir", help="where predictions, errors and metrics go (required)")
    p.add_argument("--batch_size", type=positive_int("--batch_size"), default=32)
    p.add_argument(
        "--format",
        choices=("jsonl", "csv"),
        default="jsonl",
        help="csv also writes predictions.csv (predictions-*.jsonl always)",
    )
    p.add_argument(
        "--max_image_pixels",
        type=positive_int("--max_image_pixels"),
        default=images.DEFAULT_MAX_PIXELS,
    )
    p.add_argument(
        "--max_file_bytes",
        type=positive_int("--max_file_bytes"),
        default=images.DEFAULT_MAX_FILE_BYTES,
    )
    p.add_argument(
        "--precision",
        choices=manifest_lib.PRECISIONS,
        default=manifest_lib.PRECISION_FLOAT32,
        help="bfloat16: run the export with oneDNN bfloat16 auto-mixed precision (CPUs with "
        "avx512_bf16 or amx_bf16; scores move by up to ~0.05, see the README)",
    )
    add_output_flags(p, "predictions")
    return p


def resolve_model_dir(path: str) -> str:
    """``export/<n>`` itself, or the highest numbered version under it, or under the
    ``export/`` of a trainer's model dir."""
    if FileSystems.exists(FileSystems.join(path, "saved_model.pb")):
        return path
    versions = []
    for folder in (path, FileSystems.join(path, serving.EXPORT_DIR)):
        for result in FileSystems.match([FileSystems.join(folder, "*", "saved_model.pb")]):
            for m in result.metadata_list:
                version = os.path.basename(os.path.dirname(m.path))
                if version.isdigit():
                    versions.append((int(version), os.path.dirname(m.path)))
        if versions:
            return max(versions)[1]
    raise UsageError(
        f"--model: no SavedModel in {path}, its numbered sub-folders or its {serving.EXPORT_DIR}/"
    )


def parse_config(argv: Sequence[str] | None = None) -> tuple[PredictConfig, list[str]]:
    """Parses and checks the flags; returns the config and the remaining Beam flags.

    Only parses: nothing is listed, read or deleted here (see :func:`resolve`).

    Raises:
      UsageError: naming the offending flag.
    """
    args, beam_args = build_parser().parse_known_args(argv)
    check_beam_flags(beam_args)
    if not args.model:
        raise UsageError("--model is required")
    if not args.output_dir:
        raise UsageError("--output_dir is required")
    if not args.input_csv and not args.input_pattern:
        raise UsageError("give --input_csv or --input_pattern")
    config = PredictConfig(
        model=files.absolute(args.model),
        input_csvs=list(args.input_csv),
        input_patterns=[files.absolute(p) for p in args.input_pattern],
        output_dir=files.absolute(args.output_dir),
        batch_size=args.batch_size,
        max_image_pixels=args.max_image_pixels,
        max_file_bytes=args.max_file_bytes,
        csv_output=args.format == "csv",
        overwrite=args.overwrite,
        break_lock=args.break_lock,
        precision=args.precision,
    )
    return config, beam_args


def resolve(
    config: PredictConfig, beam_args: Sequence[str] = (), dry_run: bool = False
) -> PredictJob:
    """Finds the export and its labels, lists the inputs, refuses an output dir that holds an
    input (:func:`~pipeline.options.check_inputs_outside`) and, for a remote runner, stages a
    local export for the workers (:func:`remote.for_workers`). A dry run reads only local
    files: other inputs go into the job as given.

    Raises:
      UsageError: naming the flag whose value cannot be used.
    """
    if dry_run and not remote.is_local_path(config.model):
        raise UsageError(
            f"--model: a dry run reads the export's labels offline; {config.model} needs the "
            "network (give a local copy)"
        )
    # The export runs in TensorFlow (its serving signature), never TFLite.
    reason = inference.check_precision(config.precision, RUNTIME_TENSORFLOW, beam_args)
    if reason:
        raise UsageError(reason)
    model_dir = resolve_model_dir(config.model)
    for required in (serving.LABELS_ASSET, VARIABLES_INDEX):
        if not FileSystems.exists(FileSystems.join(model_dir, required)):
            raise UsageError(
                f"--model: {model_dir} is not a complete hubflow export ({required} missing)"
            )
    with FileSystems.open(FileSystems.join(model_dir, serving.LABELS_ASSET)) as f:
        labels = manifest_lib.parse_labels(f.read().decode("utf-8"))
    normalisation = _read_normalisation(model_dir)
    listed = [c for c in config.input_csvs if not dry_run or remote.is_local_path(c)]
    try:
        csvs = files.resolve_csv_patterns(listed) if listed else []
    except ValueError as e:
        raise UsageError(str(e)) from None
    csvs += [c for c in config.input_csvs if c not in listed]
    sources = [(SOURCE_CSV, c) for c in csvs]
    for pattern in config.input_patterns:
        listable = not dry_run or remote.is_local_path(pattern)
        if listable and not any(r.metadata_list for r in FileSystems.match([pattern])):
            raise UsageError(f"--input_pattern: no file matches {pattern!r}")
        sources.append((SOURCE_PATTERN, pattern))
    check_inputs_outside(
        config.output_dir,
        input_files=csvs,
        input_dirs=[model_dir],
        input_patterns=config.input_patterns,
    )
    worker_dir, note = remote.for_workers(
        model_dir, beam_args, kind="model", flag="--model", value=config.model, dry_run=dry_run
    )
    notes = (note,) if note else ()
    return PredictJob(config, model_dir, labels, sources, [], normalisation, worker_dir, notes)


def _read_normalisation(model_dir: str) -> dict:
    """How the training images were stored (``serving.PREPROCESSING_ASSET``); defaults for an
    export written before hubflow recorded it."""
    path = FileSystems.join(model_dir, serving.PREPROCESSING_ASSET)
    if not FileSystems.exists(path):
        _LOGGER.warning(
            "%s has no %s: images are re-encoded at their own size, as preprocessing stored them "
            "before it recorded how",
            model_dir,
            serving.PREPROCESSING_ASSET,
        )
        return {}
    with FileSystems.open(path) as f:
        try:
            recorded = json.loads(f.read().decode("utf-8"))
        except ValueError as e:
            raise UsageError(f"--model: {path} is not valid JSON ({e})") from None
    return {k: recorded[k] for k in serving.PREPROCESSING_KEYS if k in recorded}


def find_previous_outputs(job: PredictJob) -> PredictJob:
    """The job with the earlier predictions in its output dir (call it holding the dir's lock).

    Raises:
      UsageError: predictions are there and ``--overwrite`` was not given.
    """
    previous = prediction_report.existing_outputs(job.output_dir)
    if previous and not job.config.overwrite:
        raise UsageError(
            f"--output_dir: {job.output_dir} already holds predictions; pass --overwrite "
            "to replace them (only them) or choose another directory"
        )
    return dataclasses.replace(job, previous_outputs=previous)


def build_pipeline(p: beam.Pipeline, job: PredictJob) -> None:
    """Adds the whole job to ``p``."""
    config = job.config
    out = job.work_dir
    rows = (
        p
        | "Sources" >> beam.Create(job.sources)
        | "ReadSources" >> beam.ParDo(scoring.ReadSourcesFn()).with_outputs(ERRORS, main="rows")
    )
    read = (
        rows.rows
        | "Reshuffle" >> beam.Reshuffle()
        | "ReadImages"
        >> beam.ParDo(
            scoring.ReadImageFn(
                config.max_image_pixels,
                max_file_bytes=config.max_file_bytes,
                **job.normalisation,
            )
        ).with_outputs(ERRORS, main="ok")
    )
    handler = KeyedModelHandler(
        scoring.ServingSignatureModelHandler(
            job.worker_model_dir or job.model_dir, config.batch_size, config.precision
        )
    )
    scored = (
        read.ok
        | "Predict" >> RunInference(handler)
        | "ToPrediction"
        >> beam.ParDo(scoring.ToPredictionFn()).with_outputs(ERRORS, main="predictions")
    )
    predictions = scored.predictions
    errors = (rows[ERRORS], read[ERRORS], scored[ERRORS]) | ("AllErrors" >> beam.Flatten())
    files = [
        predictions
        | "PredictionsToJson" >> beam.Map(lambda x: json.dumps(x, ensure_ascii=False))
        | "WritePredictions"
        >> beam.io.WriteToText(
            FileSystems.join(out, prediction_report.PREDICTIONS_PREFIX),
            file_name_suffix=prediction_report.PREDICTIONS_SUFFIX,
        ),
        errors
        | "ErrorsToJson" >> beam.Map(error_to_json)
        | "WriteErrors"
        >> beam.io.WriteToText(
            FileSystems.join(out, manifest_lib.ERRORS_PREFIX),
            file_name_suffix=manifest_lib.ERRORS_SUFFIX,
        ),
    ]
    if config.csv_output:
        files.append(
            predictions
            | "ToCsv" >> beam.Map(scoring.prediction_csv_line)
            | "WriteCsv"
            >> beam.io.WriteToText(
                FileSystems.join(out, prediction_report.PREDICTIONS_CSV),
                num_shards=1,
                shard_name_template="",
                header=scoring.PREDICTIONS_CSV_HEADER,
            )
        )
    count = predictions | "CountPredictions" >> beam.combiners.Count.Globally()
    by_reason = (
        errors
        | "ErrorReasons" >> beam.Map(lambda e: e.category)
        | "CountReasons" >> beam.combiners.Count.PerElement()
        | "CollectReasons" >> beam.combiners.ToList()
    )
    pairs = (
        predictions
        | "Labeled" >> beam.Filter(lambda x: "true_label" in x)
        | "Pairs" >> beam.Map(lambda x: (x["true_label"], x["label"]))
        | "CountPairs" >> beam.combiners.Count.PerElement()
        | "CollectPairs" >> beam.combiners.ToList()
    )
    done = tuple(files) | "AllWritten" >> beam.Flatten()
    (
        count
        | "WriteSummary"
        >> beam.ParDo(
            prediction_report.WriteSummaryFn(out, job.labels, job.model_dir, config.precision),
            errors_by_reason=beam.pvalue.AsSingleton(by_reason),
            pairs=beam.pvalue.AsSingleton(pairs),
            written_files=beam.pvalue.AsList(done),
        )
    )


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> PipelineResult:
    """Parses the flags, then runs the job to completion (see :func:`run_config`)."""
    config, beam_args = parse_config(argv)
    return run_config(config, beam_args, test_pipeline)


def run_config(config: PredictConfig, beam_args, test_pipeline=None) -> PipelineResult:
    """Runs the job for a parsed config, holding the output dir's lock throughout.

    The pipeline writes into a staging folder; earlier predictions (``--overwrite``) are
    replaced only once the new ones are complete.

    Raises:
      UsageError: on misuse, before the pipeline starts.
    """
    job = resolve(config, beam_args)
    with DirLock(config.output_dir, PROG, "--output_dir", config.break_lock):
        staging.recover(
            config.output_dir,
            prediction_report.SUMMARY_FILE,
            prediction_report.existing_outputs,
        )
        job = find_previous_outputs(job)
        return run_staged(
            job,
            build_pipeline,
            beam_args,
            test_pipeline,
            prediction_report.SUMMARY_FILE,
            prediction_report.output_names,
        )


def dry_run(config: PredictConfig, beam_args: Sequence[str]) -> remote.DryRun:
    """Builds and translates the job offline (``--dry_run True``); runs and writes nothing.

    Raises:
      UsageError: on misuse, before the pipeline is built.
    """
    job = resolve(config, beam_args, dry_run=True)
    report = remote.dry_run(lambda p: build_pipeline(p, job), beam_args)
    report.notes += [*job.notes, *remote.DRY_RUN_SKIPS]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging("pipeline")
    try:
        config, beam_args = parse_config(argv)
        if is_dry_run(beam_args):
            print(dry_run(config, beam_args).format(PROG))
            return 0
        run_config(config, beam_args)
    except UsageError as e:
        return report_usage_error(PROG, e)
    except JobIncomplete as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    summary = prediction_report.read_summary(config.output_dir)
    print(prediction_report.format_summary(summary))
    print(f"output: {config.output_dir}")
    return 0 if summary["predictions"] else 1


if __name__ == "__main__":
    sys.exit(main())
