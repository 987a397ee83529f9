"""Options both Beam jobs share: the flags of their output dir, what the manifest may record,
and the rule that an output dir never holds the job's own inputs."""

from __future__ import annotations

import argparse
import os
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline import files
from schemas.cli import UsageError
from storage import staging

# Beam flags recorded with their values in the manifest: how and where the job ran. Any other
# Beam flag is recorded by name only, since it may carry a credential (--s3_secret_access_key,
# --hdfs_user, --azure_connection_string, …) and the manifest is meant to be shared.
RECORDED_BEAM_FLAGS = frozenset(
    {
        "runner",
        "direct_num_workers",
        "direct_running_mode",
        "project",
        "region",
        "zone",
        "worker_zone",
        "job_name",
        "num_workers",
        "max_num_workers",
        "autoscaling_algorithm",
        "machine_type",
        "worker_machine_type",
        "disk_size_gb",
        "experiments",
        "dataflow_service_options",
        "sdk_container_image",
        "setup_file",
        "requirements_file",
        "save_main_session",
        "number_of_worker_harness_threads",
        "temp_location",
        "staging_location",
    }
)


class StagedJob:
    """Mixin of a resolved job (a dataclass with ``config.output_dir``): where it writes."""

    @property
    def output_dir(self) -> str:
        return self.config.output_dir

    @property
    def work_dir(self) -> str:
        """Where the pipeline writes; published to ``output_dir`` when complete."""
        return staging.staging_dir(self.config.output_dir)


def add_output_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite`` and ``--break_lock``, whose meaning both jobs share."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace the {what} of an earlier run in --output_dir (only those files)",
    )
    parser.add_argument(
        "--break_lock",
        action="store_true",
        help="take over a gs:// --output_dir whose lock a killed run left behind",
    )


def recorded_options(args: argparse.Namespace, beam_args: Sequence[str]) -> dict[str, Any]:
    """The options written to the manifest: hubflow's own flags and the allow-listed Beam
    flags with their values; other Beam flags by name only (never their values)."""
    options: dict[str, Any] = dict(vars(args))
    kept, withheld = [], []
    flags = list(beam_args)
    i = 0
    while i < len(flags):
        arg = flags[i]
        takes_next = (
            arg.startswith("--")
            and "=" not in arg
            and i + 1 < len(flags)
            and not flags[i + 1].startswith("--")
        )
        name = arg.lstrip("-").split("=", 1)[0]
        if not arg.startswith("-"):
            i += 1  # a stray value; never recorded
            continue
        span = flags[i : i + 2] if takes_next else [arg]
        if name in RECORDED_BEAM_FLAGS:
            kept += span
        else:
            withheld.append(f"--{name}")
        i += len(span)
    options["beam_args"] = kept
    if withheld:
        options["beam_args_withheld"] = sorted(set(withheld))
    return options


def _inside(path: str, directory: str) -> bool:
    if "://" in path or "://" in directory:
        return (path.rstrip("/") + "/").startswith(directory.rstrip("/") + "/")
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _pattern_root(pattern: str) -> str:
    """The folder a glob lists: its path up to the first component with a wildcard."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if files.has_glob(part):
            return "/".join(parts[:i]) or "/"
    return posixpath.dirname(pattern)


def check_inputs_outside(
    output_dir: str,
    input_files: Iterable[str] = (),
    input_dirs: Iterable[str] = (),
    input_patterns: Iterable[str] = (),
) -> None:
    """Refuses an output dir that holds an input (or lies inside an input folder).

    A job deletes only its own outputs, but an input in its output dir could share a name with
    one (``labels.txt``, ``errors-*``), and an output dir inside an ``--image_dir`` would be
    listed as a class on the next run.

    Raises:
      UsageError: naming ``--output_dir`` and the input.
    """
    for path in input_files:
        if _inside(path, output_dir):
            raise UsageError(f"--output_dir: {output_dir} holds the input {path}; choose another")
    for pattern in input_patterns:
        root = _pattern_root(pattern)  # `*` stays in one folder; `**` goes down the tree
        if _inside(root, output_dir) or ("**" in pattern and _inside(output_dir, root)):
            raise UsageError(
                f"--output_dir: {output_dir} overlaps the input pattern {pattern!r}; "
                "choose a directory outside it"
            )
    for directory in input_dirs:
        if _inside(output_dir, directory) or _inside(directory, output_dir):
            raise UsageError(
                f"--output_dir: {output_dir} overlaps the input folder {directory}; "
                "choose a directory outside it"
            )
