"""Production containers (issue 15, item 3): the Dockerfiles, their pins against setup.py, the
labels, the pre-built backbone, and the launcher's warning when an SDK container holds another
hubflow or Beam than the launcher.

No image is built here (no registry is reachable); the Dockerfiles are parsed with
``dockerfile-parse``, setup.py is read with ``ast`` (never run), and docker is faked by a script
on ``PATH``.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from pipeline import containers

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
VARIANTS = {"cpu": CONTAINERS / "Dockerfile", "gpu": CONTAINERS / "Dockerfile.gpu"}
BASE_IMAGE = re.compile(r"^apache/beam_python(?P<python>\d+\.\d+)_sdk:(?P<beam>\S+)$")


# ---------------------------------------------------------------------------------------------
# What the repo declares: setup.py (read, not run), constraints.txt, the Dockerfiles


def _setup_py() -> dict:
    """``REQUIRED`` and the literal keywords of ``setuptools.setup(...)``, plus the top-level
    package names of its ``find_packages(include=...)``."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    found: dict = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "REQUIRED" for t in node.targets
        ):
            found["REQUIRED"] = ast.literal_eval(node.value)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "setuptools.setup":
            for kw in node.keywords:
                if kw.arg == "install_requires":
                    found["install_requires"] = ast.unparse(kw.value)
                elif kw.arg == "packages":
                    found["packages"] = {
                        elt.value
                        for comp in ast.walk(kw.value)
                        if isinstance(comp, ast.comprehension) and isinstance(comp.iter, ast.Tuple)
                        for elt in comp.iter.elts
                        if isinstance(elt, ast.Constant) and str(elt.value).isidentifier()
                    }
                elif kw.arg in ("version", "python_requires", "extras_require", "entry_points"):
                    found[kw.arg] = ast.literal_eval(kw.value)
    assert found["install_requires"] == "REQUIRED", "setup.py installs something else"
    return found


SETUP = _setup_py()
REQUIRED = {canonicalize_name(Requirement(r).name): Requirement(r) for r in SETUP["REQUIRED"]}


def _constraints() -> dict[str, str]:
    """``{canonical name: pinned version}`` of containers/constraints.txt; every line a pin."""
    pins: dict[str, str] = {}
    for line in (CONTAINERS / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and not req.extras and req.marker is None, line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{req.name} pinned twice"
        pins[name] = spec.version
    return pins


PINS = _constraints()


def _dockerfile(variant: str) -> DockerfileParser:
    # From bytes: given a path that does not end in "Dockerfile", the parser takes it for a dir.
    return DockerfileParser(fileobj=io.BytesIO(VARIANTS[variant].read_bytes()))


def _instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def _substituted(parser: DockerfileParser, text: str) -> str:
    """``${ARG}`` / ``$ARG`` replaced by the ARG defaults (what a plain build uses)."""
    args = parser.args
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def _pip_installs(parser: DockerfileParser) -> list[str]:
    """Every ``pip install …`` command in the RUN instructions, ARGs substituted."""
    commands = []
    for run in _instructions(parser, "RUN"):
        for part in re.split(r"&&|;", _substituted(parser, run)):
            if re.search(r"\bpip install\b", part):
                commands.append(" ".join(part.split()))
    return commands


# ---------------------------------------------------------------------------------------------
# Pins: setup.py's ranges, constraints.txt, the Dockerfiles, the base image


def test_constraints_pin_every_requirement_of_setup_py_within_its_range():
    for name, req in REQUIRED.items():
        assert name in PINS, f"containers/constraints.txt does not pin {req.name}"
        assert req.specifier.contains(PINS[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={PINS[name]}, setup.py requires {req}"
        )
    # The images carry what hubflow needs to run: not hubflow itself, not the dev tools.
    dev_only = {canonicalize_name(Requirement(r).name) for r in SETUP["extras_require"]["dev"]}
    assert not (dev_only | {"hubflow"}) & set(PINS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_image_builds_on_the_beam_sdk_image_of_the_pinned_beam_and_python(variant):
    parser = _dockerfile(variant)
    assert not parser.is_multistage
    match = BASE_IMAGE.match(parser.baseimage)
    assert match, f"base {parser.baseimage} is not an Apache Beam Python SDK image"
    assert match["beam"] == PINS["apache-beam"]
    assert REQUIRED["apache-beam"].specifier.contains(match["beam"])
    assert SpecifierSet(SETUP["python_requires"]).contains(match["python"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pip_install_is_pinned_and_its_pins_agree_with_setup_py(variant):
    parser = _dockerfile(variant)
    installs = _pip_installs(parser)
    assert installs
    pinned: dict[str, str] = {}
    for command in installs:
        # Either everything comes from the constraints, or nothing but hubflow (--no-deps).
        assert "containers/constraints.txt" in command or "--no-deps" in command, command
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s\"']+)", command):
            pinned[canonicalize_name(name)] = version
    for name, version in pinned.items():
        assert PINS.get(name) == version, (
            f"{variant}: {name}=={version}, constraints: {PINS.get(name)}"
        )
        if name in REQUIRED:
            assert REQUIRED[name].specifier.contains(version)
    if variant == "gpu":
        # The CUDA build of TensorFlow is the one setup.py and the constraints pin.
        assert f'"tensorflow[and-cuda]=={PINS["tensorflow"]}"' in " ".join(installs)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_labels_name_this_hubflow_and_the_pinned_beam_and_tensorflow(variant):
    parser = _dockerfile(variant)
    labels = parser.labels
    assert labels[containers.LABEL_HUBFLOW] == SETUP["version"]
    assert labels["org.opencontainers.image.version"] == SETUP["version"]
    assert labels[containers.LABEL_BEAM] == PINS["apache-beam"]
    assert labels[containers.LABEL_TENSORFLOW] == PINS["tensorflow"]
    assert labels[containers.LABEL_VARIANT] == variant
    # The build step checks what got installed against the same values the labels carry.
    (setup_run,) = [r for r in _instructions(parser, "RUN") if "setup_image.py" in r]
    command = " ".join(_substituted(parser, setup_run).split())
    assert f'--hubflow "{labels[containers.LABEL_HUBFLOW]}"' in command
    assert f'--beam "{labels[containers.LABEL_BEAM]}"' in command
    assert f'--tensorflow "{labels[containers.LABEL_TENSORFLOW]}"' in command
    assert ("--cuda" in command) == (variant == "gpu")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_beam_entrypoint_stays_and_the_cache_is_built_by_the_user_that_runs(variant):
    parser = _dockerfile(variant)
    # Dataflow starts workers through the Beam image's ENTRYPOINT (/opt/apache/beam/boot);
    # Vertex AI overrides the command instead.
    assert not _instructions(parser, "ENTRYPOINT") and not _instructions(parser, "CMD")
    # The cache refuses entries another user owns: the build step that fills it and the
    # workers must run as the same user, so no USER switch anywhere.
    assert not _instructions(parser, "USER")
    cache = parser.envs.get("HUBFLOW_CACHE", "")
    assert cache.startswith("/") and not cache.startswith("/tmp")
    steps = [(i["instruction"], i["value"]) for i in parser.structure]
    env_at = next(n for n, (ins, v) in enumerate(steps) if ins == "ENV" and "HUBFLOW_CACHE" in v)
    build_at = next(n for n, (ins, v) in enumerate(steps) if ins == "RUN" and "setup_image" in v)
    assert env_at < build_at


def _dockerignore_included(patterns: list[str], path: str) -> bool:
    """Whether ``path`` (relative, '/'-separated) reaches the build context (Docker's rules:
    the last matching pattern wins; a pattern matching a parent dir matches the path)."""
    included = True
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            included = negate
    return included


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_build_context_ships_the_packages_and_never_the_venv_git_or_tests(variant):
    dockerfile = VARIANTS[variant]
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    shipped = ["setup.py", "pyproject.toml"] + [
        str(p.relative_to(ROOT))
        for package in sorted(SETUP["packages"])
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    parser = _dockerfile(variant)
    shipped += [
        value.split()[0] for value in _instructions(parser, "COPY") if value.split()[0] != "."
    ]
    shipped.append("containers/setup_image.py")  # run from the copied context
    for path in shipped:
        assert _dockerignore_included(patterns, path), f"{path} is left out of the build"
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_containers.py",
        "pipeline/__pycache__/containers.cpython-311.pyc",
        "hubflow.egg-info/PKG-INFO",
        "out/flowers/manifest.json",
    ):
        assert not _dockerignore_included(patterns, path), f"{path} would be shipped"


# ---------------------------------------------------------------------------------------------
# The build step: containers/setup_image.py


def _load_setup_image():
    spec = importlib.util.spec_from_file_location("setup_image", CONTAINERS / "setup_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_fails_when_an_installed_version_is_not_the_labelled_one(monkeypatch, capsys):
    setup_image = _load_setup_image()
    monkeypatch.setattr(
        setup_image, "prebuild_backbone", lambda: pytest.fail("built despite a mismatch")
    )
    local = containers.local_versions()
    status = setup_image.main(
        ["--hubflow", "0.0.1", "--beam", local["beam"], "--tensorflow", "0.0.1"]
    )
    err = capsys.readouterr().err
    assert status == 1
    assert f"hubflow: installed {local['hubflow']}, labelled 0.0.1" in err
    assert "tensorflow: installed" in err and "apache-beam" not in err


def test_the_build_fails_when_a_console_script_is_not_on_path(monkeypatch, tmp_path):
    setup_image = _load_setup_image()
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "hubflow-train" in setup_image.missing_console_scripts()
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # where pip put them
    assert setup_image.missing_console_scripts() == []


def test_the_gpu_build_fails_without_tensorflows_cuda_wheels(monkeypatch):
    from importlib import metadata

    setup_image = _load_setup_image()
    cuda = [
        Requirement(r)
        for r in metadata.requires("tensorflow") or []
        if Requirement(r).marker is not None and "and-cuda" in str(Requirement(r).marker)
    ]
    assert any(r.name == "nvidia-cudnn-cu12" for r in cuda)
    installed = {r.name: None for r in cuda}
    real_version = metadata.version

    def version(name):
        if name in installed:
            if installed[name] is None:
                raise metadata.PackageNotFoundError(name)
            return installed[name]
        return real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    assert {p.split(":")[0] for p in setup_image.cuda_wheel_problems()} == set(installed)
    # In range: nothing to report; one out of range: named with the range it must be in.
    for r in cuda:
        installed[r.name] = next(s.version for s in r.specifier if s.operator in (">=", "=="))
        assert r.specifier.contains(installed[r.name])
    assert setup_image.cuda_wheel_problems() == []
    installed["nvidia-cudnn-cu12"] = "8.9.7"
    (problem,) = setup_image.cuda_wheel_problems()
    assert problem.startswith("nvidia-cudnn-cu12: installed 8.9.7") and "<10.0" in problem


def test_the_prebuilt_backbone_is_loaded_at_run_time_without_a_rebuild(tmp_path, monkeypatch):
    """The build fills $HUBFLOW_CACHE; the image layer keeps files, modes and owner (the same
    user runs the workers); a worker then loads the entry as built, and never rebuilds it."""
    from backbones import cache, registry
    from backbones.standin import save_standin_backbone

    setup_image = _load_setup_image()
    spec = registry.get(registry.DEFAULT_BACKBONE).spec
    standin = save_standin_backbone(str(tmp_path / "standin"), spec.image_size, spec.embedding_dim)
    builds = []

    def build(name, path):  # the real builder takes ~20 s; this one writes as it does
        builds.append(path)
        shutil.copytree(standin, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)

    monkeypatch.setattr(cache, "build_builtin", build)
    monkeypatch.setenv("HUBFLOW_CACHE", str(tmp_path / "build" / "cache"))
    built = setup_image.prebuild_backbone()
    assert len(builds) == 1

    # The image as a worker sees it: the same tree, at another place.
    shutil.copytree(tmp_path / "build", tmp_path / "image", symlinks=True)
    monkeypatch.setenv("HUBFLOW_CACHE", str(tmp_path / "image" / "cache"))
    entry = setup_image.prebuild_backbone()
    assert entry == str(tmp_path / "image" / "cache" / os.path.basename(built))
    assert builds == [built]  # loaded as built: verified, not rebuilt
    assert cache.local_handle(spec.handle) == entry

    # Run as another user than the one that built it, the entry is refused, not loaded.
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    with pytest.raises(cache.UntrustedCacheError, match="HUBFLOW_CACHE"):
        cache.local_handle(spec.handle)
    assert builds == [built]


# ---------------------------------------------------------------------------------------------
# The launcher's warning: pipeline/containers.py


def _fake_docker(bin_dir: pathlib.Path, body: str) -> pathlib.Path:
    """A ``docker`` on PATH that logs its arguments to ``bin_dir/calls`` then runs ``body``."""
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(f'#!/bin/sh\necho "$@" >> "{bin_dir}/calls"\n{body}\n')
    docker.chmod(0o755)
    return bin_dir / "calls"


def _labels_output(labels: dict) -> str:
    return f"cat <<'EOF'\n{json.dumps(labels)}\nEOF"


@pytest.fixture
def no_docker(monkeypatch, tmp_path):
    empty = tmp_path / "no-docker"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def docker_bin(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return bin_dir


IMAGE = "us-docker.pkg.dev/p/r/hubflow"


def test_without_a_container_image_nothing_is_checked(docker_bin):
    calls = _fake_docker(docker_bin, "exit 1")
    assert containers.check_sdk_container_image(["--runner", "DataflowRunner"]) is None
    assert not calls.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--sdk_container_image", f"{IMAGE}:x"],
        [f"--sdk_container_image={IMAGE}:x"],
        ["--worker_harness_container_image", f"{IMAGE}:x"],
        ["--environment_type", "DOCKER", "--environment_config", f"{IMAGE}:x"],
    ],
)
def test_every_spelling_of_the_container_flag_is_checked(args):
    flag, image = containers.container_image(["--project", "p", *args])
    assert image == f"{IMAGE}:x" and flag.lstrip("-") in " ".join(args)


def test_an_image_labelled_with_this_launchers_versions_gives_no_warning(docker_bin):
    local = containers.local_versions()
    labels = {containers.LABEL_HUBFLOW: local["hubflow"], containers.LABEL_BEAM: local["beam"]}
    calls = _fake_docker(docker_bin, _labels_output(labels))
    image = f"{IMAGE}:latest"
    assert containers.check_sdk_container_image([f"--sdk_container_image={image}"]) is None
    # Read from the local image only: `docker image inspect`, never a pull.
    assert calls.read_text().split() == [
        "image",
        "inspect",
        "--format",
        "{{json",
        ".Config.Labels}}",
        image,
    ]


@pytest.mark.parametrize("differs", ["hubflow", "beam", "both"])
def test_an_image_labelled_with_other_versions_warns_in_one_line(docker_bin, differs):
    local = containers.local_versions()
    labels = {
        containers.LABEL_HUBFLOW: "0.0.9" if differs in ("hubflow", "both") else local["hubflow"],
        containers.LABEL_BEAM: "2.70.0" if differs in ("beam", "both") else local["beam"],
    }
    _fake_docker(docker_bin, _labels_output(labels))
    # The tag says the launcher's versions: the labels, read first, decide.
    image = f"{IMAGE}:{containers.image_tag(local['hubflow'], local['beam'])}"
    warning = containers.check_sdk_container_image(["--sdk_container_image", image])
    assert warning is not None and "\n" not in warning
    assert warning.startswith(f"--sdk_container_image {image} ") and "from its labels" in warning
    assert ("hubflow 0.0.9" in warning) == (differs != "beam")
    assert (f"hubflow {local['hubflow']}" in warning) == (differs != "beam")
    assert ("Beam 2.70.0" in warning) == (differs != "hubflow")
    assert (f"Beam {local['beam']}" in warning) == (differs != "hubflow")


def test_the_labels_the_dockerfiles_write_are_the_ones_the_launcher_reads(docker_bin, monkeypatch):
    """An image built from this checkout, launched by hubflow installed from it (with the
    pinned Beam), gives no warning; launched by another hubflow release, it does."""
    for variant in VARIANTS:
        _fake_docker(docker_bin, _labels_output(_dockerfile(variant).labels))
        args = ["--sdk_container_image", f"{IMAGE}:{variant}"]
        same = {"hubflow": SETUP["version"], "beam": PINS["apache-beam"]}
        monkeypatch.setattr(containers, "local_versions", lambda v=same: v)
        assert containers.check_sdk_container_image(args) is None
        other = {"hubflow": "99.0.0", "beam": PINS["apache-beam"]}
        monkeypatch.setattr(containers, "local_versions", lambda v=other: v)
        warning = containers.check_sdk_container_image(args)
        assert f"hubflow {SETUP['version']} (from its labels)" in warning
        assert "Beam" not in warning.split(" but ")[0]


@pytest.mark.parametrize(
    "docker",
    [
        None,  # no docker CLI at all
        "echo 'Error: No such image' >&2; exit 1",  # not present locally (or no daemon)
        _labels_output({"maintainer": "someone"}),  # present, but not a hubflow image
        "echo 'not json'",
    ],
)
def test_when_docker_cannot_tell_the_tag_convention_decides(docker, docker_bin, monkeypatch):
    if docker is not None:
        _fake_docker(docker_bin, docker)
    monkeypatch.setattr(
        containers, "local_versions", lambda: {"hubflow": "0.1.0", "beam": "2.77.0"}
    )
    same = f"{IMAGE}:0.1.0-beam2.77.0"
    assert containers.check_sdk_container_image([f"--sdk_container_image={same}"]) is None
    other = f"{IMAGE}:0.1.0-beam2.76.0-gpu"
    warning = containers.check_sdk_container_image([f"--sdk_container_image={other}"])
    assert "Beam 2.76.0 (from its tag)" in warning and "Beam 2.77.0" in warning
    assert "hubflow" not in warning.split(" but ")[0].split(other)[1]


def test_when_nothing_tells_there_is_no_warning_and_one_info_line(no_docker, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.containers")
    for image in (f"{IMAGE}:latest", f"{IMAGE}@sha256:{'0' * 64}"):
        caplog.clear()
        assert containers.check_sdk_container_image(["--sdk_container_image", image]) is None
        (record,) = caplog.records
        assert record.levelno == logging.INFO and image in record.getMessage()


def test_a_docker_that_hangs_is_cut_off_with_its_children(docker_bin, monkeypatch, tmp_path):
    pids = tmp_path / "pids"
    # The CLI hangs, and a child of it holds the output pipe open as well.
    _fake_docker(docker_bin, f"sleep 60 & echo $! > {pids}; echo $$ >> {pids}; wait")
    monkeypatch.setattr(
        containers, "local_versions", lambda: {"hubflow": "0.1.0", "beam": "2.77.0"}
    )
    start = time.monotonic()
    warning = containers.check_sdk_container_image(
        ["--sdk_container_image", f"{IMAGE}:0.0.9-beam2.77.0"], timeout_s=0.5
    )
    assert time.monotonic() - start < 5
    assert "hubflow 0.0.9 (from its tag)" in warning  # fell back to the tag
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"process {pid} started by the fake docker is still running"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_the_tag_convention_round_trips_and_rejects_what_it_cannot_hold():
    tag = containers.image_tag("0.1.0", "2.77.0", "gpu")
    assert tag == "0.1.0-beam2.77.0-gpu"
    held = containers.versions_from_tag(f"localhost:5000/team/hubflow:{tag}")
    assert (held.hubflow, held.beam, held.source) == ("0.1.0", "2.77.0", "tag")
    assert containers.versions_from_tag("localhost:5000/team/hubflow") is None
    assert containers.versions_from_tag(f"hubflow@sha256:{'0' * 64}") is None
    assert containers.versions_from_tag("hubflow:0.1.0") is None
    with pytest.raises(ValueError):
        containers.image_tag("0.1.0+local", "2.77.0")
    with pytest.raises(ValueError):
        containers.image_tag("0.1.0", "2.77.0", "tpu")
