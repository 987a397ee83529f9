"""Running the Beam jobs on a remote runner (Dataflow): what the workers can read, and the
offline ``--dry_run`` that builds and translates a job without submitting it.

A worker cannot read the launcher's disk, so a local backbone or export is staged under
``--temp_location`` (:mod:`storage.artifacts`) and the workers load the copy. A dry run needs no
network and no credentials: it lists no ``gs://`` input, takes no lock, checks no output and
stages nothing, and says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)
from apache_beam.portability.api import beam_runner_api_pb2

from pipeline import containers
from schemas.cli import UsageError
from storage import artifacts

_LOGGER = logging.getLogger(__name__)

# Runners that run in the launcher's process and read its files. Any other runner (Dataflow,
# Flink, Spark, a portable job server) is treated as remote.
LOCAL_RUNNERS = frozenset(
    {
        "DirectRunner",
        "SwitchingDirectRunner",
        "BundleBasedDirectRunner",
        "FnApiRunner",
        "PrismRunner",
        "InteractiveRunner",
    }
)
DATAFLOW_RUNNERS = frozenset({"DataflowRunner", "TestDataflowRunner"})
_STAGING_ROLE = "beam:artifact:role:staging_to:v1"
_FILE_TYPE = "beam:artifact:type:file:v1"
_RUN_INFERENCE_STEP = "BeamML_RunInference"


def runner_name(beam_args: Sequence[str]) -> str:
    """The runner's class name (``DataflowRunner``), also for a dotted ``--runner`` path."""
    runner = PipelineOptions(list(beam_args)).view_as(StandardOptions).runner or "DirectRunner"
    return str(runner).rsplit(".", 1)[-1]


def is_remote(beam_args: Sequence[str]) -> bool:
    return runner_name(beam_args) not in LOCAL_RUNNERS


def is_local_path(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def check_locations(beam_args: Sequence[str]) -> None:
    """Refuses a Dataflow ``--temp_location`` that Beam would reject, before Beam does.

    Beam's own check replaces an invalid ``gs://`` path by a default bucket it creates over the
    network, which hangs for minutes without network or credentials.

    Raises:
      UsageError: naming ``--temp_location``.
    """
    if runner_name(beam_args) not in DATAFLOW_RUNNERS:
        return
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

    options = PipelineOptions(list(beam_args)).view_as(GoogleCloudOptions)
    validator = PipelineOptionsValidator(options, None)
    for flag in ("temp_location", "staging_location"):
        if getattr(options, flag) is not None:
            errors = validator.validate_gcs_path(options, flag)
            if errors:
                raise UsageError(f"--{flag}: {' '.join(errors[0].split())}")
    if not options.temp_location:
        raise UsageError("--temp_location is required on Dataflow (a gs://BUCKET/PATH)")


def for_workers(
    local_dir: str, beam_args: Sequence[str], *, kind: str, flag: str, value: str, dry_run: bool
) -> tuple[str, str | None]:
    """The path remote workers should load ``local_dir`` from.

    On a local runner, or for a folder already on a remote filesystem, that is the folder
    itself. On a remote runner a local folder is staged under ``--temp_location`` (not on a dry
    run, which only names where it would go).

    Args:
      local_dir: the folder the launcher loads; ``value``: the flag's value as given.

    Returns:
      The path for the workers and a line saying what was staged (None if nothing was).

    Raises:
      UsageError: naming ``flag`` or ``--temp_location``.
    """
    if not is_remote(beam_args) or not is_local_path(local_dir):
        return local_dir, None
    temp = PipelineOptions(list(beam_args)).view_as(GoogleCloudOptions).temp_location
    if not temp:
        raise UsageError(
            f"--temp_location is required: {flag} {local_dir} is a local folder, which the "
            f"{runner_name(beam_args)} workers cannot read, so it is staged there for them"
        )
    if not os.path.isdir(local_dir):
        raise UsageError(f"{flag}: {local_dir} is not a folder")
    what = f"{flag} {value}" + ("" if value == local_dir else f" ({local_dir})")
    if dry_run:
        target = artifacts.staged_path(local_dir, temp, kind)
        return target, f"{what} would be staged for the workers as {target}"
    target, copied = artifacts.stage(local_dir, temp, kind)
    return target, f"{what} {'staged' if copied else 'already staged'} as {target}"


def warn_about_container_image(beam_args: Sequence[str]) -> None:
    """One warning line when ``--sdk_container_image`` was built for other hubflow/Beam
    versions than the launcher's (:func:`pipeline.containers.check_sdk_container_image`)."""
    warning = containers.check_sdk_container_image(beam_args)
    if warning:
        _LOGGER.warning("%s", warning)


@dataclass
class DryRun:
    """What a dry run built: the runner, the translated steps, the files it would stage, and
    notes on what it skipped or would stage besides."""

    runner: str
    steps: list[str]
    run_inference: list[str]
    staged_files: list[str]
    notes: list[str] = field(default_factory=list)

    def format(self, prog: str) -> str:
        lines = [
            f"{prog}: dry run on {self.runner}: the job was built and translated; nothing was "
            "run, staged or written",
            f"  steps ({len(self.steps)}): {', '.join(self.steps)}",
            f"  RunInference: {', '.join(self.run_inference) or 'none'}",
        ]
        if self.staged_files:
            lines.append(f"  files the runner would stage: {', '.join(self.staged_files)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def dry_run(build: Callable[[beam.Pipeline], None], beam_args: Sequence[str]) -> DryRun:
    """Builds the job and translates it as its runner would, without running it.

    Dataflow honours ``--dry_run``: it applies its overrides, builds the ``--setup_file`` sdist
    and stops before submitting. Other runners would run the job, so for them the pipeline is
    only translated to its portable proto.

    Raises:
      UsageError: the runner rejected the options (one line).
    """
    warn_about_container_image(beam_args)
    try:
        pipeline = beam.Pipeline(options=PipelineOptions(list(beam_args)))
    except ValueError as e:  # Beam's option validation: "Pipeline has validations errors: …"
        raise UsageError(" ".join(str(e).split(":", 1)[-1].split())) from None
    build(pipeline)
    runner = runner_name(beam_args)
    if runner in DATAFLOW_RUNNERS:
        proto = pipeline.run().job.proto_pipeline
    else:
        proto = pipeline.to_runner_api()
    return DryRun(runner, _top_level_steps(proto), _run_inference_steps(proto), _staged(proto))


def _top_level_steps(proto: beam_runner_api_pb2.Pipeline) -> list[str]:
    transforms = proto.components.transforms
    steps = []
    for root in proto.root_transform_ids:  # one root wrapping the job's top-level steps
        children = transforms[root].subtransforms or [root]
        steps += [transforms[c].unique_name for c in children]
    return steps


def _run_inference_steps(proto: beam_runner_api_pb2.Pipeline) -> list[str]:
    return sorted(
        t.unique_name.rsplit("/", 1)[0]
        for t in proto.components.transforms.values()
        if t.unique_name.rsplit("/", 1)[-1] == _RUN_INFERENCE_STEP
    )


def _staged(proto: beam_runner_api_pb2.Pipeline) -> list[str]:
    """``staged name (local file)`` for each file the environments stage for the workers."""
    staged = []
    for env in proto.components.environments.values():
        for dep in env.dependencies:
            if dep.role_urn != _STAGING_ROLE or dep.type_urn != _FILE_TYPE:
                continue
            role = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload)
            source = beam_runner_api_pb2.ArtifactFilePayload.FromString(dep.type_payload)
            staged.append(f"{role.staged_name} ({os.path.basename(source.path)})")
    return sorted(set(staged))


DRY_RUN_SKIPS = (
    "skipped in a dry run: the output dir's lock and its check for an earlier run, listing "
    "non-local inputs (their patterns go into the job as given), staging",
)
