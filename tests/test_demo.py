"""The README's main command: the offline demo runs end to end, twice."""

from __future__ import annotations

import json
import os

import pytest

from backbones import cache, registry
from demo import run as demo

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HUBFLOW_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "demo"
    for _ in range(2):
        assert demo.main([f"--work_dir={work}", "--per_class=12"]) == 0
    out = capsys.readouterr().out
    assert out.count("[4/4] classifying") == 2
    assert "test accuracy:" in out and "(as PNG)" in out
    manifest = json.loads((work / "dataset" / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == registry.DEFAULT_BACKBONE
    assert manifest["backbone"]["embedding_dim"] == 1280
    assert manifest["rows"]["written"] == 36
    assert os.listdir(work / "model" / "export") == ["1"]  # --overwrite: a fresh model each run
    for name in ("confusion_matrix.png", "training_curves.png", "metrics.json"):
        assert (work / "model" / name).stat().st_size > 0


def test_builtin_cache_never_exposes_a_half_written_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBFLOW_CACHE", str(tmp_path))
    calls = []

    def crashing_build(name, path):
        calls.append(path)
        os.makedirs(f"{path}.tmp-crashed")  # what a killed builder leaves behind
        raise OSError("disk full")

    monkeypatch.setattr(cache, "build_builtin", crashing_build)
    with pytest.raises(OSError):
        cache.local_handle("hubflow-builtin://efficientnet_lite0")
    assert not os.path.exists(calls[0])  # nothing at the real path for others to load

    def racing_build(name, path):  # another process renamed and recorded its copy first
        os.makedirs(path)
        cache.record(path)
        raise OSError("Directory not empty")

    monkeypatch.setattr(cache, "build_builtin", racing_build)
    assert cache.local_handle("hubflow-builtin://efficientnet_lite0") == calls[0]
