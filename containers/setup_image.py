"""The last build step of hubflow's images (containers/Dockerfile, Dockerfile.gpu).

Fails the build, naming what is wrong, when:

* an installed version differs from the one the image is labelled with (``--hubflow``,
  ``--beam``, ``--tensorflow``: the Dockerfile passes its label values), so the labels the
  launcher reads (pipeline/containers.py) are true of every image that builds;
* one of hubflow's console scripts (``hubflow-train`` for Vertex AI, …) is not on ``PATH``;
* with ``--cuda``, a CUDA wheel of ``tensorflow[and-cuda]`` is missing or outside the range
  TensorFlow declares (checked from metadata, so without a GPU: the plain ``tensorflow`` wheel
  is also built with CUDA, it only lacks the libraries).

Then it builds the default built-in backbone into ``$HUBFLOW_CACHE`` through the cache's own
entry point (:func:`backbones.cache.local_handle`: built, sealed go-w, digest recorded,
verified) and loads and calls it once, as a worker will. A worker running as the same user
finds the entry verified and loads it without building.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

DISTRIBUTION = "hubflow"


def _same(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def version_mismatches(expected: Mapping[str, str]) -> list[str]:
    """``distribution: installed X, labelled Y`` for each distribution that differs."""
    problems = []
    for name, want in expected.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if not _same(have, want):
            problems.append(f"{name}: installed {have}, labelled {want}")
    return problems


def missing_console_scripts() -> list[str]:
    """hubflow's console scripts (from its installed metadata) that are not on PATH."""
    scripts = metadata.distribution(DISTRIBUTION).entry_points.select(group="console_scripts")
    return sorted(ep.name for ep in scripts if shutil.which(ep.name) is None)


def cuda_wheel_problems() -> list[str]:
    """What ``tensorflow[and-cuda]`` requires and is missing or out of range."""
    problems = []
    for line in metadata.requires("tensorflow") or []:
        req = Requirement(line)
        if req.marker is None or not req.marker.evaluate({"extra": "and-cuda"}):
            continue
        if req.marker.evaluate({"extra": ""}):
            continue  # a requirement of every tensorflow install, not of the extra
        need = f"{req.name}{req.specifier}"
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name}: not installed (tensorflow[and-cuda] needs {need})")
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name}: installed {have}, tensorflow[and-cuda] needs {need}")
    return problems


def prebuild_backbone(name: str | None = None) -> str:
    """Builds (or verifies) a built-in backbone in ``$HUBFLOW_CACHE``, then loads it and calls it
    once through :func:`backbones.hub.load`, as a worker does.

    Returns:
      The cache entry's path.

    Raises:
      ValueError: the model's output is not ``[1, the preset's feature size]``.
    """
    import tensorflow as tf

    from backbones import cache, hub, registry

    spec = registry.get(name or registry.DEFAULT_BACKBONE).spec
    path = cache.local_handle(spec.handle)
    size = spec.image_size
    features = hub.load(spec)(tf.zeros([1, size, size, 3], tf.float32))
    if tuple(features.shape) != (1, spec.embedding_dim):
        raise ValueError(
            f"{spec.name} in {path} returns shape {tuple(features.shape)} for one image, "
            f"its preset declares {spec.embedding_dim} features"
        )
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hubflow", required=True, help="the image's hubflow.version label")
    parser.add_argument("--beam", required=True, help="its hubflow.beam-version label")
    parser.add_argument("--tensorflow", required=True, help="its hubflow.tensorflow-version")
    parser.add_argument("--cuda", action="store_true", help="require tensorflow[and-cuda]'s wheels")
    args = parser.parse_args(argv)

    expected = {DISTRIBUTION: args.hubflow, "apache-beam": args.beam, "tensorflow": args.tensorflow}
    problems = version_mismatches(expected)
    problems += [f"{script}: not on PATH" for script in missing_console_scripts()]
    if args.cuda:
        problems += cuda_wheel_problems()
    for problem in problems:
        print(f"setup_image: error: {problem}", file=sys.stderr)
    if problems:
        return 1
    path = prebuild_backbone()
    versions = ", ".join(f"{canonicalize_name(k)} {v}" for k, v in expected.items())
    print(f"setup_image: {versions}; backbone cache entry {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
