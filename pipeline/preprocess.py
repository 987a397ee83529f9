"""Entry point of the preprocessing job: ``python -m pipeline.preprocess`` / ``hubflow-preprocess``.

App flags are parsed here; everything else goes to Beam's ``PipelineOptions`` (``--runner``,
``--project``, ``--direct_num_workers``, ``--setup_file`` …). Misuse is reported as one line
naming the flag before the pipeline starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import sys
import tempfile
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.runners.runner import PipelineResult

from backbones import cache, hub, registry, tflite_runtime
from backbones.tflite_runtime import EmbeddingRuntime
from pipeline import (
    analyze,
    containers,
    csv_rows,
    dataset,
    files,
    images,
    inference,
    remote,
    reuse,
    sinks,
    transforms,
    views,
)
from pipeline.cli import JobIncomplete, check_beam_flags, is_dry_run, run_staged
from pipeline.options import StagedJob, add_output_flags, check_inputs_outside, recorded_options
from pipeline.records import ERRORS, error_to_json
from schemas import csv_format
from schemas import manifest as manifest_lib
from schemas.backbones import (
    CROP_OPTION,
    DEFAULT_CROP_FRACTION,
    INFERENCE_RUNTIMES,
    RUNTIME_AUTO,
    BackboneSpec,
    is_builtin,
)
from schemas.cli import (
    Parser,
    UsageError,
    configure_logging,
    fraction,
    positive_int,
    positive_int_or_zero,
    report_usage_error,
    unit_fraction_or_zero,
)
from storage import staging
from storage.locks import DirLock

_LOGGER = logging.getLogger(__name__)
PROG = "hubflow-preprocess"


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
        default=registry.DEFAULT_BACKBONE,
        help="preset name, TF-Hub handle URL or SavedModel path, or several joined by commas "
        "(features concatenated) "
        f"(default {registry.DEFAULT_BACKBONE}: ImageNet weights, built offline)",
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
        type=positive_int_or_zero("--max_image_side"),
        default=images.DEFAULT_MAX_SIDE,
        help="downscale so the longer side is at most this "
        f"(default {images.DEFAULT_MAX_SIDE}; 0 keeps the original size)",
    )
    parser.add_argument(
        f"--{CROP_OPTION}",
        type=unit_fraction_or_zero(f"--{CROP_OPTION}", "the whole image squashed to a square"),
        default=DEFAULT_CROP_FRACTION,
        metavar="F",
        help="frame each image into the backbone's square input: scale it so its shorter side "
        "is the input size / F and take the centred square; 0 squashes the whole image "
        f"instead (default {DEFAULT_CROP_FRACTION}, the ImageNet framing; measured better "
        "than 0 on hymenoptera and cats-vs-dogs)",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=positive_int("--max_image_pixels"),
        default=images.DEFAULT_MAX_PIXELS,
        help="reject larger images without decoding them (decompression bombs)",
    )
    parser.add_argument(
        "--max_file_bytes",
        type=positive_int("--max_file_bytes"),
        default=images.DEFAULT_MAX_FILE_BYTES,
        help="reject larger image files unread (default 64 MiB)",
    )
    parser.add_argument(
        "--inference_runtime",
        choices=INFERENCE_RUNTIMES,
        default=RUNTIME_AUTO,
        help="run the backbone in TensorFlow or TFLite (XNNPACK); auto: TFLite on CPU when the "
        "backbone converts with the same embeddings, else TensorFlow (default auto)",
    )
    parser.add_argument(
        "--precision",
        choices=manifest_lib.PRECISIONS,
        default=manifest_lib.PRECISION_FLOAT32,
        help="bfloat16: embed in TensorFlow with oneDNN bfloat16 auto-mixed precision (CPUs with "
        "AVX512-BF16 or AMX-BF16 only; not with --inference_runtime tflite) (default float32)",
    )
    parser.add_argument(
        reuse.FLAG,
        default=None,
        metavar="DIR",
        help="an earlier output dir (local or gs://; may be --output_dir with --overwrite): "
        "images stored there, made with the same backbone, runtime and image options, keep "
        "their stored JPEG and embedding; only the others are embedded",
    )
    parser.add_argument(
        views.FLAG,
        type=views.view_count,
        default=views.DEFAULT_TRAIN_VIEWS,
        metavar="K",
        help="also embed K augmented views (random resized crop, flip) of each train image, "
        "stored with it for the trainer's head to sample from; eval and test keep the centre "
        f"view (default {views.DEFAULT_TRAIN_VIEWS})",
    )
    parser.add_argument(
        "--view_seed", type=int, default=0, help="with --train_views: the views' seed (default 0)"
    )
    for name in ("crop", "flip"):
        parser.add_argument(
            f"--view_{name}",
            action=argparse.BooleanOptionalAction,
            default=True,
            help=f"with --train_views: random {name} in each view (default on)",
        )
    # Recorded in the manifest's options (not a flag): what a view is, for the trainer and reuse.
    parser.set_defaults(view_recipe=manifest_lib.VIEW_RECIPE)
    add_output_flags(parser, "dataset")
    return parser


@dataclasses.dataclass(frozen=True)
class Config:
    """The parsed command line: flag values only, nothing read from disk yet."""

    input_csvs: list[str]
    image_dirs: list[str]
    output_dir: str
    backbone: str
    image_size: int | None
    label_dict: str | None
    batch_size: int
    eval_fraction: float
    test_fraction: float
    jpeg_quality: int
    max_image_side: int | None
    max_image_pixels: int
    max_file_bytes: int
    overwrite: bool
    break_lock: bool
    options: dict
    inference_runtime: str = RUNTIME_AUTO
    precision: str = manifest_lib.PRECISION_FLOAT32
    reuse_from: str | None = None
    train_views: manifest_lib.TrainViews = manifest_lib.TrainViews()
    crop_fraction: float = DEFAULT_CROP_FRACTION


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The listed inputs: CSV files, image folders, and the ``--label_dict`` labels."""

    csv_paths: list[str]
    image_dirs: list[str]
    label_dict: list[str] | None


@dataclasses.dataclass(frozen=True)
class Job(StagedJob):
    """A resolved run: its inputs, the probed backbone and what an earlier run left."""

    config: Config
    inputs: Inputs
    backbone: BackboneSpec  # as the manifest records it
    previous_outputs: list[str]
    worker_backbone: BackboneSpec  # where the workers load it (a staged copy on Dataflow)
    notes: tuple[str, ...] = ()
    scratch_dir: str = ""  # tf.Transform's (it writes while the job is built); default: in out
    runtime: EmbeddingRuntime = tflite_runtime.TENSORFLOW  # how the workers run the backbone
    backbone_sha256: str = ""  # over the backbone's files, as the manifest records it
    reuse_plan: reuse.ReusePlan | None = None  # what --reuse_from gives this run

    @property
    def tft_temp_dir(self) -> str:
        return self.scratch_dir or analyze.tft_temp_dir(self.work_dir)


def parse_config(argv: Sequence[str] | None = None) -> tuple[Config, list[str]]:
    """Parses and checks the app flags; returns the config and the remaining Beam flags.

    Only parses: nothing is listed, read, loaded or deleted here (see :func:`run_config`).

    Raises:
      UsageError: naming the offending flag.
    """
    args, beam_args = build_parser().parse_known_args(argv)
    check_beam_flags(beam_args)
    if not args.output_dir:
        raise UsageError("--output_dir is required")
    if bool(args.input_csv) == bool(args.image_dir):
        raise UsageError("give exactly one of --input_csv or --image_dir")
    if args.eval_fraction + args.test_fraction >= 1.0:
        raise UsageError("--eval_fraction + --test_fraction must leave some data for training")
    if args.jpeg_quality > 100:
        raise UsageError(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    if args.view_seed < 0:
        raise UsageError(f"--view_seed must be 0 or more, got {args.view_seed}")
    if args.train_views and not (args.view_crop or args.view_flip):
        raise UsageError(
            f"{views.FLAG} {args.train_views}: with --no-view_crop and --no-view_flip every view "
            "is the centre image; allow one of them or pass --train_views 0"
        )
    config = Config(
        input_csvs=list(args.input_csv),
        image_dirs=list(args.image_dir),
        output_dir=files.absolute(args.output_dir),
        backbone=args.backbone,
        image_size=args.image_size,
        label_dict=args.label_dict,
        batch_size=args.batch_size,
        eval_fraction=args.eval_fraction,
        test_fraction=args.test_fraction,
        jpeg_quality=args.jpeg_quality,
        max_image_side=args.max_image_side,
        max_image_pixels=args.max_image_pixels,
        max_file_bytes=args.max_file_bytes,
        overwrite=args.overwrite,
        break_lock=args.break_lock,
        inference_runtime=args.inference_runtime,
        precision=args.precision,
        reuse_from=files.absolute(args.reuse_from) if args.reuse_from else None,
        crop_fraction=getattr(args, CROP_OPTION),
        train_views=manifest_lib.TrainViews(
            args.train_views, args.view_seed, args.view_crop, args.view_flip
        ),
        options=recorded_options(args, beam_args),
    )
    return config, beam_args


def resolve_inputs(config: Config, dry_run: bool = False) -> Inputs:
    """Lists the inputs and reads ``--label_dict``; refuses an output dir that holds an input.

    A dry run lists only local inputs: other patterns go into the job as given.

    Raises:
      UsageError: naming the flag whose value cannot be used.
    """
    listed = [c for c in config.input_csvs if not dry_run or remote.is_local_path(c)]
    try:
        csv_paths = files.resolve_csv_patterns(listed) if listed else []
        for image_dir in config.image_dirs:
            if not dry_run or remote.is_local_path(image_dir):
                next(iter(files.list_image_dir(image_dir)), None)  # raises on a missing dir
    except ValueError as e:
        raise UsageError(str(e)) from e
    csv_paths += [c for c in config.input_csvs if c not in listed]
    image_dirs = [files.absolute(d) for d in config.image_dirs]
    if dry_run and config.label_dict and not remote.is_local_path(config.label_dict):
        raise UsageError(f"--label_dict: a dry run reads {config.label_dict} offline; copy it here")
    try:
        label_dict = csv_rows.read_label_dict(config.label_dict) if config.label_dict else None
    except ValueError as e:
        raise UsageError(str(e)) from e
    check_inputs_outside(
        config.output_dir,
        input_files=csv_paths + ([files.absolute(config.label_dict)] if config.label_dict else []),
        input_dirs=image_dirs,
    )
    return Inputs(csv_paths, image_dirs, label_dict)


def resolve(config: Config, inputs: Inputs, beam_args: Sequence[str] = (), dry_run=False) -> Job:
    """Finds an earlier run's dataset (not on a dry run), sizes the backbone (recorded by an
    earlier probe of the same files, else probed: :func:`hub.describe`), picks the runtime
    that embeds (``--inference_runtime``: a TFLite conversion is made once and cached, see
    :func:`inference.resolve_runtime`), digests the backbone's files, decides what
    ``--reuse_from`` gives (:func:`reuse.plan`) and, for a remote runner, stages a local or
    built-in backbone and the TFLite model for the workers (:func:`remote.for_workers`).

    Raises:
      UsageError: a dataset is there and ``--overwrite`` was not given, the backbone
        cannot be used, or ``--reuse_from`` is not a hubflow dataset.
    """
    previous = [] if dry_run else dataset.existing_outputs(config.output_dir)
    if previous and not config.overwrite:
        complete = FileSystems.exists(manifest_lib.manifest_path(config.output_dir))
        what = (
            "a dataset" if complete else f"an incomplete dataset (no {manifest_lib.MANIFEST_FILE})"
        )
        raise UsageError(
            f"--output_dir: {config.output_dir} already holds {what} ({len(previous)} files); "
            "pass --overwrite to replace it or choose another directory"
        )
    try:
        spec = registry.resolve(config.backbone, config.image_size)
        online = [
            h
            for h in ([p.handle for p in spec.parts] or [spec.handle])
            if not (is_builtin(h) or remote.is_local_path(h))
        ]
        if dry_run and online:
            raise UsageError(
                f"--backbone: a dry run loads the backbone offline to size the job; "
                f"{online[0]} needs the network (give a local copy or a built-in preset)"
            )
        # The sizes recorded by an earlier probe of the same files, else a probe (seconds).
        spec, digest = hub.describe(spec)
        local = cache.local_handle(spec.handle)
        runtime, launch_notes = inference.resolve_runtime(
            spec, config.inference_runtime, beam_args, dry_run, config.precision, digest=digest
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    plan = None
    if config.reuse_from:
        plan = reuse.plan(
            config.reuse_from,
            backbone=spec,
            backbone_sha256=digest,
            runtime=runtime.name,
            precision=runtime.precision,
            max_image_side=config.max_image_side,
            jpeg_quality=config.jpeg_quality,
            crop_fraction=config.crop_fraction,
            dry_run=dry_run,
        )
        if plan.skipped:
            _LOGGER.warning("%s", plan.note)
        else:
            _LOGGER.info("%s", plan.note)
        launch_notes = (*launch_notes, plan.note)
    decided = {"backbone_sha256": digest, "reuse_plan": plan, "runtime": runtime}
    image = containers.container_image(beam_args)
    if is_builtin(spec.handle) and image and remote.is_remote(beam_args):
        # hubflow's image holds the built backbone (containers/Dockerfile); another image's
        # workers build it from the weights package, as the launcher did.
        note = (
            f"--backbone {config.backbone}: not staged; the workers load it from the cache of "
            f"{image[1]} (hubflow's image holds it; another builds it on first use)"
        )
        return Job(config, inputs, spec, previous, spec, (note, *launch_notes), **decided)
    staged, note = remote.for_workers(
        local, beam_args, kind="backbone", flag="--backbone", value=config.backbone, dry_run=dry_run
    )
    worker = spec if staged == local else dataclasses.replace(spec, handle=staged)
    if worker is not spec:
        hub.release(spec)  # the workers load the staged copy, not the probed module
    notes = ((note,) if note else ()) + launch_notes
    return Job(config, inputs, spec, previous, worker, notes, **decided)


def build_pipeline(p: beam.Pipeline, job: Job) -> None:
    """Adds the whole job to ``p``."""
    config, inputs = job.config, job.inputs
    out = job.work_dir
    rows, parse_errors = p | "ReadRows" >> transforms.ReadRows(
        inputs.csv_paths, inputs.image_dirs, inputs.label_dict
    )
    total_rows = rows | "CountRows" >> beam.combiners.Count.Globally()
    plan = job.reuse_plan if job.reuse_plan is not None and job.reuse_plan.active else None
    # An incremental run checks headers here and decodes only the new images (pipeline.reuse).
    hashed = rows | "HashAndValidate" >> beam.ParDo(
        transforms.HashAndValidateFn(
            config.max_image_pixels, max_file_bytes=config.max_file_bytes, decode=plan is None
        ),
        total=beam.pvalue.AsSingleton(total_rows),
    ).with_outputs(ERRORS, main="ok")
    if plan is None:
        resolved = (
            hashed.ok
            | "GroupByContent" >> beam.GroupByKey()
            | "ResolveDuplicates"
            >> beam.ParDo(
                transforms.ResolveDuplicatesFn(config.eval_fraction, config.test_fraction)
            ).with_outputs(ERRORS, transforms.DUPLICATES, main="accepted")
        )
        accepted = to_encode = resolved["accepted"]
        read_stored = None
    else:
        resolved = hashed.ok | "MatchPrevious" >> reuse.MatchPrevious(
            plan.shards,
            config.eval_fraction,
            config.test_fraction,
            config.max_image_pixels,
            config.max_file_bytes,
        )
        known = resolved[reuse.KNOWN]
        accepted = (
            resolved["accepted"],
            known | "KnownRows" >> beam.Values(),
        ) | "Accepted" >> beam.Flatten()
        # Only rows cross this flatten: the stored images are read inside EncodeAndEmbed.
        shard_rows = known | "GroupByShard" >> reuse.GroupByShard()
        to_encode = (resolved["accepted"], shard_rows) | "ToEncode" >> beam.Flatten()
        read_stored = reuse.StoredReader(job.backbone.embedding_dim, config.train_views, plan.views)
    if inputs.label_dict is not None:
        labels = p | "LabelDict" >> beam.Create([list(inputs.label_dict)])
    else:
        labels = (
            accepted
            | "Labels" >> beam.FlatMap(lambda a: [] if a.row.unlabeled else [a.row.label])
            | "LabelVocabulary" >> analyze.LabelVocabulary()
        )
    total_accepted = accepted | "CountAccepted" >> beam.combiners.Count.Globally()
    embedded, embed_errors = to_encode | "EncodeAndEmbed" >> transforms.EncodeAndEmbed(
        job.worker_backbone,
        config.batch_size,
        config.max_image_pixels,
        config.max_image_side,
        config.jpeg_quality,
        labels,
        total_accepted,
        max_file_bytes=config.max_file_bytes,
        runtime=job.runtime,
        views=config.train_views,
        crop_fraction=config.crop_fraction,
        read_stored=read_stored,
    )

    written_files = []
    for split in csv_format.ALL_SPLITS:
        # A dataset without unlabeled rows has no unlabeled shard (the labeled splits keep
        # Beam's one empty shard, as before).
        written_files.append(
            embedded[split]
            | f"Write[{split}]"
            >> sinks.WriteToTFRecord(
                FileSystems.join(out, split), skip_if_empty=split == csv_format.UNLABELED
            )
        )

    errors = (
        parse_errors,
        hashed[ERRORS],
        resolved[ERRORS],
        embed_errors,
    ) | "AllErrors" >> beam.Flatten()
    written_files.append(
        errors
        | "ErrorsToJson" >> beam.Map(error_to_json)
        | "WriteErrors"
        >> beam.io.WriteToText(
            FileSystems.join(out, manifest_lib.ERRORS_PREFIX),
            file_name_suffix=manifest_lib.ERRORS_SUFFIX,
        )
    )

    written_files.append(
        embedded[transforms.EMBEDDINGS]
        | "EmbeddingStatistics"
        >> analyze.AnalyzeAndWriteTransformFn(
            out, job.backbone.embedding_dim, temp_dir=job.tft_temp_dir
        )
    )

    events = (
        rows | "ReadEvents" >> beam.Map(lambda _: (dataset.EVENT_READ,)),
        parse_errors | "ParseErrorReadEvents" >> beam.Map(lambda _: (dataset.EVENT_READ,)),
        errors | "RejectEvents" >> beam.Map(lambda e: (dataset.EVENT_REJECTED, e.category)),
        resolved[transforms.DUPLICATES]
        | "DuplicateEvents" >> beam.Map(lambda _: (dataset.EVENT_DUPLICATE,)),
        embedded[transforms.WRITTEN]
        | "WrittenEvents" >> beam.Map(lambda sl: (dataset.EVENT_WRITTEN, *sl)),
    )
    if plan is not None:
        events += (
            embedded[transforms.REUSED]
            | "ReusedEvents" >> beam.Map(lambda _: (dataset.EVENT_REUSED,)),
        )
    events = events | "Events" >> beam.Flatten()
    done = tuple(written_files) | "AllWritten" >> beam.Flatten()
    (
        events
        | "CountEvents" >> beam.combiners.Count.PerElement()
        | "CollectCounts" >> beam.combiners.ToList()
        | "WriteManifest"
        >> beam.ParDo(
            dataset.WriteManifestFn(
                out,
                job.backbone,
                config.options,
                datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                dataset.package_versions(),
                job.runtime.name,
                job.backbone_sha256,
                job.reuse_plan.record() if job.reuse_plan is not None else None,
                job.runtime.precision,
            ),
            labels=beam.pvalue.AsSingleton(labels),
            written_files=beam.pvalue.AsList(done),
        )
    )


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> PipelineResult:
    """Parses the flags, then runs the job to completion (see :func:`run_config`).

    Raises:
      UsageError: on misuse, before the pipeline starts.
    """
    config, beam_args = parse_config(argv)
    return run_config(config, beam_args, test_pipeline)


def run_config(config: Config, beam_args: Sequence[str], test_pipeline=None) -> PipelineResult:
    """Runs the job for a parsed config, holding the output dir's lock throughout.

    The pipeline writes into a staging folder; the earlier dataset (``--overwrite``) is
    replaced only once the new one is complete, so a failed run leaves it as it was.

    Raises:
      UsageError: on misuse, before the pipeline starts.
    """
    inputs = resolve_inputs(config)
    with DirLock(config.output_dir, PROG, "--output_dir", config.break_lock):
        staging.recover(
            config.output_dir,
            manifest_lib.MANIFEST_FILE,
            dataset.existing_outputs,
        )
        job = resolve(config, inputs, beam_args)
        return run_staged(
            job,
            build_pipeline,
            beam_args,
            test_pipeline,
            manifest_lib.MANIFEST_FILE,
            dataset.output_names,
        )


def dry_run(config: Config, beam_args: Sequence[str]) -> remote.DryRun:
    """Builds and translates the job offline (``--dry_run True``); runs and writes nothing.

    Raises:
      UsageError: on misuse, before the pipeline is built.
    """
    job = resolve(config, resolve_inputs(config, dry_run=True), beam_args, dry_run=True)
    with tempfile.TemporaryDirectory(prefix="hubflow-dry-run-") as scratch:
        job = dataclasses.replace(job, scratch_dir=scratch)
        report = remote.dry_run(lambda p: build_pipeline(p, job), beam_args)
    report.notes += [*job.notes, *remote.DRY_RUN_SKIPS]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging("pipeline", "backbones")  # progress lines; Beam's INFO is noise
    try:
        config, beam_args = parse_config(argv)  # fail fast, before Beam starts anything
        if is_dry_run(beam_args):
            print(dry_run(config, beam_args).format(PROG))
            return 0
        run_config(config, beam_args)
    except UsageError as e:
        return report_usage_error(PROG, e)
    except JobIncomplete as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    manifest = manifest_lib.read_manifest(config.output_dir)
    print(dataset.format_summary(manifest, config.output_dir))
    if manifest.rows.written == 0:
        print(f"{PROG}: error: no row was usable; see the errors file", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
