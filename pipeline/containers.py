"""Which hubflow and Beam an SDK container image holds, and the launcher's warning when they are
not the ones this launcher runs.

With ``--sdk_container_image`` the workers run the image's hubflow and Beam, while the launcher
builds and pickles the job with its own: DoFns are pickled by reference to hubflow's modules, and
Dataflow expects the launcher's Beam to be the image's. A mismatch fails late on the workers, or
silently runs other code, so the launcher says so in one line before the job starts.

What the image holds is read, in order, from:

1. its labels (:data:`LABEL_HUBFLOW`, :data:`LABEL_BEAM`, set by ``containers/Dockerfile*``),
   with ``docker image inspect`` when a docker CLI is on ``PATH`` and the image is present
   locally. It never pulls or touches a registry, and is cut off after ``timeout_s`` seconds;
2. its tag, by the convention ``<hubflow version>-beam<Beam version>[-gpu]`` (:func:`image_tag`),
   e.g. ``REGION-docker.pkg.dev/PROJECT/REPO/hubflow:0.1.0-beam2.77.0``.

When neither tells (a digest reference, another tag, an image made elsewhere), one INFO line
says the image was not checked, and there is no warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from importlib import metadata

from packaging.version import InvalidVersion, Version

_LOGGER = logging.getLogger(__name__)

LABEL_HUBFLOW = "hubflow.version"
LABEL_BEAM = "hubflow.beam-version"
LABEL_TENSORFLOW = "hubflow.tensorflow-version"
LABEL_VARIANT = "hubflow.variant"
VARIANTS = ("cpu", "gpu")

DOCKER_TIMEOUT_S = 5.0

# <hubflow>-beam<beam>[-gpu|-cpu]: versions are PEP 440 public versions, which have no '-'.
_TAG = re.compile(
    r"^(?P<hubflow>[0-9][0-9A-Za-z._]*)"
    r"-beam(?P<beam>[0-9][0-9A-Za-z._]*)"
    r"(?:-(?P<variant>cpu|gpu))?$"
)
# Tag characters Docker allows, and its length limit.
_TAG_CHARS = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class ImageVersions:
    """The hubflow and Beam versions an image holds, and where they were read (labels or tag)."""

    hubflow: str
    beam: str
    source: str


def image_tag(hubflow_version: str, beam_version: str, variant: str = "cpu") -> str:
    """The tag the launcher can read versions from: ``0.1.0-beam2.77.0``, ``…-gpu``.

    Raises:
      ValueError: a version that cannot appear in a Docker tag, or an unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    tag = f"{hubflow_version}-beam{beam_version}" + ("-gpu" if variant == "gpu" else "")
    if not _TAG_CHARS.match(tag) or not _TAG.match(tag):
        raise ValueError(f"{tag!r} is not a valid image tag")
    return tag


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``(repository, tag, digest)`` of an image reference such as ``host:5000/a/b:tag@sha256:…``."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest or None
    return rest, None, digest or None


def versions_from_tag(image: str) -> ImageVersions | None:
    """The versions in the image's tag, or None when its tag does not follow the convention."""
    _, tag, _ = split_image(image)
    match = _TAG.match(tag or "")
    if not match:
        return None
    return ImageVersions(match["hubflow"], match["beam"], "tag")


def versions_from_labels(labels: dict[str, str] | None) -> ImageVersions | None:
    """The versions in an image's labels, or None when it has no hubflow labels."""
    labels = labels or {}
    hubflow, beam = labels.get(LABEL_HUBFLOW), labels.get(LABEL_BEAM)
    if not isinstance(hubflow, str) or not isinstance(beam, str) or not hubflow or not beam:
        return None
    return ImageVersions(hubflow, beam, "labels")


def local_image_labels(image: str, timeout_s: float = DOCKER_TIMEOUT_S) -> dict[str, str] | None:
    """The labels of ``image`` as the local docker knows it, or None.

    None when there is no docker CLI, no daemon, no such image locally, or no answer within
    ``timeout_s`` (the CLI and anything it started are killed). Never pulls.
    """
    docker = shutil.which("docker")
    if docker is None:
        return None
    out = _run(
        [docker, "image", "inspect", "--format", "{{json .Config.Labels}}", image], timeout_s
    )
    if out is None:
        return None
    try:
        labels = json.loads(out.strip() or "null")
    except ValueError:
        return None
    return labels if isinstance(labels, dict) else {}


def container_image(beam_args: Sequence[str]) -> tuple[str, str] | None:
    """``(flag, image)`` of the SDK container the Beam flags ask for, or None.

    ``--sdk_container_image``, the deprecated ``--worker_harness_container_image``, or
    ``--environment_config`` with ``--environment_type DOCKER`` (the portable runners).
    """
    from apache_beam.options.pipeline_options import (
        PipelineOptions,
        PortableOptions,
        WorkerOptions,
    )

    options = PipelineOptions(list(beam_args))
    worker = options.view_as(WorkerOptions)
    if worker.sdk_container_image:
        return "--sdk_container_image", worker.sdk_container_image
    if worker.worker_harness_container_image:
        return "--worker_harness_container_image", worker.worker_harness_container_image
    portable = options.view_as(PortableOptions)
    if (portable.environment_type or "").upper() == "DOCKER" and portable.environment_config:
        return "--environment_config", portable.environment_config
    return None


def local_versions() -> dict[str, str | None]:
    """This launcher's hubflow and Beam versions (None when not installed as distributions)."""
    versions: dict[str, str | None] = {}
    for key, distribution in (("hubflow", "hubflow"), ("beam", "apache-beam")):
        try:
            versions[key] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def check_sdk_container_image(
    beam_args: Sequence[str], timeout_s: float = DOCKER_TIMEOUT_S
) -> str | None:
    """One warning line when the SDK container's hubflow or Beam differs from this launcher's.

    Returns None when no container image is given, when the versions match, or when the image
    does not say which versions it holds (then it logs one INFO line).
    """
    found = container_image(beam_args)
    if found is None:
        return None
    flag, image = found
    held = versions_from_labels(local_image_labels(image, timeout_s)) or versions_from_tag(image)
    if held is None:
        _LOGGER.info(
            "%s %s: not checked against this launcher's hubflow and Beam: the image is not "
            "present locally with hubflow labels, and its tag is not <hubflow>-beam<beam>",
            flag,
            image,
        )
        return None
    local = local_versions()
    differs = [
        (name, theirs, ours)
        for name, theirs, ours in (
            ("hubflow", held.hubflow, local["hubflow"]),
            ("Beam", held.beam, local["beam"]),
        )
        if ours is not None and not _same_version(theirs, ours)
    ]
    if not differs:
        return None
    theirs = " and ".join(f"{name} {version}" for name, version, _ in differs)
    ours = " and ".join(f"{name} {version}" for name, _, version in differs)
    return (
        f"{flag} {image} holds {theirs} (from its {held.source}), but this launcher runs {ours}: "
        "the workers would run other code than the job was built with; rebuild and push the "
        "image from this checkout (containers/Dockerfile), or launch from the matching release"
    )


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def _run(command: list[str], timeout_s: float) -> str | None:
    """stdout of ``command`` when it exits 0 within ``timeout_s``; else None, having killed its
    whole process group (so a stuck child holding the pipe cannot keep us waiting)."""
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
    except OSError:
        return None
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=1.0)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
        return None
    return out if proc.returncode == 0 else None
