"""Command-line plumbing of the Beam jobs: typo'd flags and running the pipeline."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from pipeline import remote
from schemas.cli import UsageError
from storage import staging

_LOGGER = logging.getLogger(__name__)


def check_beam_flags(beam_args: Sequence[str]) -> None:
    """Raises :class:`UsageError` naming the first flag nobody knows (a typo, most likely), or
    a Dataflow location Beam would reject (:func:`~pipeline.remote.check_locations`)."""
    unknown = unknown_flags(beam_args)
    if unknown:
        raise UsageError(f"unrecognized flag {unknown[0]} (see --help)")
    remote.check_locations(beam_args)


class JobIncomplete(RuntimeError):
    """The runner returned, but the job's completion marker was not written."""


def is_dry_run(beam_args: Sequence[str]) -> bool:
    """``--dry_run True``: the runner builds (and translates) the job but does not run it."""
    from apache_beam.options.pipeline_options import TestOptions

    return bool(PipelineOptions(list(beam_args)).view_as(TestOptions).dry_run)


def run_pipeline(
    build: Callable[[beam.Pipeline], None], beam_args: Sequence[str], test_pipeline=None
) -> PipelineResult:
    """Builds the job into a pipeline made from ``beam_args`` (or ``test_pipeline``), runs it
    and waits for it to finish."""
    remote.warn_about_container_image(beam_args)
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(list(beam_args)))
    build(p)
    result = p.run()
    result.wait_until_finish()
    return result


def run_staged(
    job, build: Callable, beam_args: Sequence[str], test_pipeline, marker: str, names: Callable
) -> PipelineResult:
    """Runs a job into its staging folder and publishes its outputs when complete.

    Args:
      job: a resolved :class:`~pipeline.options.StagedJob` (with ``previous_outputs``).
      build: ``build(pipeline, job)`` adds the job to a pipeline.
      marker: the output whose presence says the job's outputs are complete.
      names: the job's output layout: the names of its outputs present in a dir.

    Raises:
      JobIncomplete: the runner returned without the job writing ``marker``.
    """
    if is_dry_run(beam_args):
        raise ValueError("a dry run builds the job without running it: use the job's dry_run()")
    staging.reset(job.output_dir)
    result = run_pipeline(lambda p: build(p, job), beam_args, test_pipeline)
    new = names(job.work_dir)
    if marker not in new:
        raise JobIncomplete(
            f"the job wrote no {marker}; {job.output_dir} was left as it was (see the runner's log)"
        )
    staging.publish(job.output_dir, new, job.previous_outputs, marker)
    return result


def unknown_flags(beam_args: Sequence[str]) -> list[str]:
    """Flags that neither hubflow nor any registered Beam options class knows (typos)."""
    from apache_beam.options import pipeline_options as po

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    classes = {str(c): c for c in po.PipelineOptions.__subclasses__()}
    try:
        for cls in classes.values():
            cls._add_argparse_args(parser)
    except (argparse.ArgumentError, AttributeError, TypeError):
        return []  # Beam's option classes changed shape: let Beam itself warn
    _, unknown = parser.parse_known_args(list(beam_args))
    return [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
