"""The built-in backbone cache: what it verifies before an entry is loaded (issue 11, item 5).

A tiny stand-in SavedModel (built once) plays the built EfficientNet-Lite0, which would take
~20 s to build; the builder copies it to a temp dir and renames it into place, as the real one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from backbones import cache
from backbones.standin import STANDIN_DIM, STANDIN_SIZE, save_standin_backbone

HANDLE = "hubflow-builtin://efficientnet_lite0"


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return save_standin_backbone(str(tmp_path_factory.mktemp("standin") / "model"))


@pytest.fixture
def builds(tmp_path, monkeypatch, standin):
    """HUBFLOW_CACHE in tmp_path; every build copies the stand-in and is appended to the list."""
    monkeypatch.setenv("HUBFLOW_CACHE", str(tmp_path / "cache"))
    calls = []

    def build(name, path):
        calls.append(path)
        tmp = f"{path}.tmp-test"
        shutil.copytree(standin, tmp)
        os.replace(tmp, path)

    monkeypatch.setattr(cache, "build_builtin", build)
    return calls


def _entry(tmp_path) -> str:
    return str(tmp_path / "cache" / f"efficientnet_lite0-{cache.CACHE_VERSION}")


def _plant(standin: str, path: str, marker: str = "PLANTED") -> None:
    shutil.copytree(standin, path)
    with open(os.path.join(path, marker), "w") as f:
        f.write("not built by hubflow\n")


def _one_line_refusal(err: pytest.ExceptionInfo, *paths: str) -> None:
    message = str(err.value)
    assert "\n" not in message and message.startswith("--backbone:")
    assert "delete" in message or "HUBFLOW_CACHE" in message
    for path in paths:
        assert path in message


def test_first_use_builds_and_records_a_digest_then_loads_without_rebuilding(tmp_path, builds):
    from backbones import hub, registry

    path = cache.local_handle(HANDLE)
    assert builds == [path] and path == _entry(tmp_path)
    with open(cache.record_path(path)) as f:
        assert json.load(f)["sha256"] == cache.entry_digest(path)
    for _, full, st in cache._tree(path):
        assert not st.st_mode & 0o022, full

    assert cache.local_handle(HANDLE) == path
    spec = hub.probe(registry.resolve("efficientnet_lite0", STANDIN_SIZE))  # verifies, loads
    assert builds == [path]
    assert spec.embedding_dim == STANDIN_DIM


def test_a_build_under_a_group_writable_umask_is_sealed_and_then_trusted(
    tmp_path, builds, monkeypatch
):
    build = cache.build_builtin

    def umask_002_build(name, path):  # what TF writes when the user's umask is 002
        build(name, path)
        for root, dirs, files in os.walk(path):
            for name_ in dirs + files:
                os.chmod(os.path.join(root, name_), 0o775 if name_ in dirs else 0o664)

    monkeypatch.setattr(cache, "build_builtin", umask_002_build)
    path = cache.local_handle(HANDLE)
    assert cache.local_handle(HANDLE) == path
    assert builds == [path]
    assert not os.stat(os.path.join(path, "saved_model.pb")).st_mode & 0o022


def test_a_planted_entry_without_a_record_is_rebuilt_not_loaded(tmp_path, builds, standin, caplog):
    # What the issue planted, and what an older hubflow left: an entry with no digest record.
    path = _entry(tmp_path)
    os.makedirs(os.path.dirname(path), mode=0o700)
    _plant(standin, path)
    with caplog.at_level(logging.WARNING, logger="backbones.cache"):
        assert cache.local_handle(HANDLE) == path
    assert builds == [path]
    assert not os.path.exists(os.path.join(path, "PLANTED"))
    assert "no valid digest record" in caplog.text
    with open(cache.record_path(path)) as f:
        assert json.load(f)["sha256"] == cache.entry_digest(path)


@pytest.mark.parametrize("tamper", ["edit", "truncate", "delete", "add", "symlink"])
def test_a_changed_file_in_a_recorded_entry_is_detected_and_rebuilt(tmp_path, builds, tamper):
    path = cache.local_handle(HANDLE)
    variables = os.path.join(path, "variables", "variables.data-00000-of-00001")
    if tamper == "edit":
        with open(variables, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 1]))
    elif tamper == "truncate":  # a partial copy
        os.truncate(variables, os.path.getsize(variables) // 2)
    elif tamper == "delete":
        os.unlink(os.path.join(path, "fingerprint.pb"))
    elif tamper == "add":
        with open(os.path.join(path, "assets", "extra.txt"), "w") as f:
            f.write("x")
    else:
        os.unlink(variables)
        os.symlink(os.path.join(str(tmp_path), "elsewhere"), variables)
    assert cache.local_handle(HANDLE) == path
    assert builds == [path, path]  # rebuilt, not loaded
    assert cache.entry_digest(path) == json.load(open(cache.record_path(path)))["sha256"]
    assert os.path.isfile(variables) and not os.path.islink(variables)


@pytest.mark.parametrize("target", ["cache_dir", "entry", "file", "record"])
@pytest.mark.parametrize("bits", [0o020, 0o002])
def test_a_group_or_other_writable_entry_or_cache_dir_is_refused(tmp_path, builds, target, bits):
    path = cache.local_handle(HANDLE)
    chosen = {
        "cache_dir": lambda: os.path.dirname(path),
        "entry": lambda: path,
        "file": lambda: os.path.join(path, "variables", "variables.index"),
        "record": lambda: cache.record_path(path),
    }[target]()
    os.chmod(chosen, os.stat(chosen).st_mode | bits)
    with pytest.raises(ValueError) as err:
        cache.local_handle(HANDLE)
    _one_line_refusal(err, chosen)
    assert "writable by group or others" in str(err.value)
    assert builds == [path] and os.path.exists(chosen)  # nothing rebuilt or deleted


def test_a_planted_group_writable_cache_dir_is_refused_before_anything_is_built(
    tmp_path, builds, standin
):
    root = tmp_path / "cache"
    root.mkdir()
    os.chmod(root, 0o777)
    _plant(standin, _entry(tmp_path))
    with pytest.raises(ValueError) as err:
        cache.local_handle(HANDLE)
    _one_line_refusal(err, str(root))
    assert builds == []


def test_an_entry_file_owned_by_another_user_is_refused(tmp_path, builds, monkeypatch):
    path = cache.local_handle(HANDLE)
    foreign = os.path.join(path, "saved_model.pb")
    real_lstat = os.lstat

    def lstat(p, *args, **kwargs):
        st = real_lstat(p, *args, **kwargs)
        if os.fspath(p) != foreign:
            return st
        fields = list(st)
        fields[4] = os.geteuid() + 4242  # st_uid
        return os.stat_result(fields)

    monkeypatch.setattr(os, "lstat", lstat)
    with pytest.raises(ValueError) as err:
        cache.local_handle(HANDLE)
    _one_line_refusal(err, foreign, path)
    assert "owned by uid" in str(err.value)
    assert builds == [path]


def test_a_cache_dir_owned_by_another_user_is_refused(tmp_path, builds, monkeypatch):
    path = cache.local_handle(HANDLE)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 4242)
    with pytest.raises(ValueError) as err:
        cache.local_handle(HANDLE)
    _one_line_refusal(err, os.path.dirname(path))
    assert "owned by uid" in str(err.value)


def test_probe_reports_a_refused_entry_in_one_line(tmp_path, builds):
    from backbones import hub, registry

    path = cache.local_handle(HANDLE)
    os.chmod(path, 0o777)
    with pytest.raises(ValueError) as err:
        hub.probe(registry.resolve("efficientnet_lite0"))
    _one_line_refusal(err, path)
    assert str(err.value).count("--backbone") == 1


def test_a_builder_killed_before_its_record_leaves_an_entry_that_is_rebuilt(
    tmp_path, builds, monkeypatch
):
    def killed(entry, digest):
        raise KeyboardInterrupt  # the process dies between the rename and the record

    with monkeypatch.context() as m:
        m.setattr(cache, "_write_record", killed)
        with pytest.raises(KeyboardInterrupt):
            cache.local_handle(HANDLE)
    path = _entry(tmp_path)
    assert os.path.isdir(path) and not os.path.exists(cache.record_path(path))
    assert cache.local_handle(HANDLE) == path
    assert builds == [path, path]


def test_concurrent_first_uses_build_once_and_all_use_the_entry(tmp_path, builds, monkeypatch):
    build = cache.build_builtin

    def slow_build(name, path):
        time.sleep(0.3)  # long enough for the other thread to arrive while this one builds
        build(name, path)

    monkeypatch.setattr(cache, "build_builtin", slow_build)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.local_handle(HANDLE)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = _entry(tmp_path)
    assert results == [path] * 3
    assert builds == [path]


def test_handles_that_are_not_builtins_are_not_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBFLOW_CACHE", str(tmp_path / "cache"))
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    assert cache.local_handle(str(shared)) == str(shared)
    url = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
    assert cache.local_handle(url) == url
    assert not (tmp_path / "cache").exists()


def test_pruning_deletes_only_entries_of_local_backbones_that_are_gone(tmp_path):
    """A derived cache entry (probe record, TFLite conversion) of a deleted local SavedModel is
    removed with its digest record and lock; entries of live models, of handles, unreadable ones,
    other files in the cache, and the backbones themselves are never touched."""
    folder, live = tmp_path / "cache" / "derived", tmp_path / "models" / "live"
    folder.mkdir(parents=True)
    live.mkdir(parents=True)
    (live / "saved_model.pb").write_bytes(b"model")

    def entry(name, handle):
        path = folder / name
        path.mkdir()
        (path / "record.json").write_text(json.dumps({"backbone": {"handle": handle}}))
        (folder / f"{name}{cache.RECORD_SUFFIX}").write_text("digest")
        (folder / f".{name}.lock").write_text("")
        return path

    gone = entry("gone", str(tmp_path / "models" / "deleted"))
    kept = [
        entry("live", str(live)),
        entry("builtin", "hubflow-builtin://efficientnet_lite0"),
        entry("url", "https://tfhub.dev/x/1"),
    ]
    unreadable = folder / "unreadable"
    unreadable.mkdir()
    (unreadable / "record.json").write_text("{not json")
    (folder / "notes.txt").write_text("a user's file")

    assert cache.prune_orphans(str(folder), "record.json") == [str(gone)]
    assert not gone.exists()
    assert not (folder / f"gone{cache.RECORD_SUFFIX}").exists()
    assert not (folder / ".gone.lock").exists()
    for path in kept:
        assert (path / "record.json").exists()
        assert (folder / f"{path.name}{cache.RECORD_SUFFIX}").exists()
    assert (unreadable / "record.json").exists() and (folder / "notes.txt").exists()
    assert (live / "saved_model.pb").read_bytes() == b"model"


def test_a_failed_save_into_place_leaves_only_what_was_there(tmp_path, monkeypatch):
    import tensorflow as tf

    (tmp_path / "neighbour").write_text("kept")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "saved_model.pb").write_bytes(b"earlier")

    def crash(model, path):
        (Path(path) / "saved_model.pb").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.save_into_place(object(), str(tmp_path / "entry"), {"record.json": "{}"})
    # Its own temp dir is gone, nothing is at the target, and nothing else was touched.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "neighbour"]
    with pytest.raises(ValueError, match="already exists"):
        cache.save_into_place(object(), str(existing))
    assert (existing / "saved_model.pb").read_bytes() == b"earlier"
