"""``--precision float32|bfloat16``: where it is refused, what it runs, what the manifest says."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from backbones import hub, registry
from backbones.tflite_runtime import TENSORFLOW
from pipeline import dataset, inference, preprocess, reuse
from schemas import manifest as manifest_lib
from schemas.backbones import RUNTIME_TENSORFLOW
from schemas.manifest import PRECISION_BFLOAT16, PRECISION_FLOAT32
from tests.conftest import TINY_SIZE, write_dataset

BF16_CPU = inference.cpu_supports_bfloat16()


def _cpuinfo(tmp_path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    return str(path)


def test_cpu_support_is_read_from_the_cpuinfo_flags(tmp_path):
    assert inference.cpu_supports_bfloat16(_cpuinfo(tmp_path, "avx512f avx512_bf16"))
    assert inference.cpu_supports_bfloat16(_cpuinfo(tmp_path, "amx_tile amx_bf16"))
    assert not inference.cpu_supports_bfloat16(_cpuinfo(tmp_path, "avx512f avx512_vnni"))
    assert not inference.cpu_supports_bfloat16(str(tmp_path / "missing"))


def test_float32_is_never_refused(monkeypatch):
    monkeypatch.setattr(inference, "cpu_supports_bfloat16", lambda: False)
    for runtime in ("auto", "tensorflow", "tflite"):
        assert inference.check_precision(PRECISION_FLOAT32, runtime) is None


@pytest.mark.parametrize(
    "runtime, cpu, gpu, expected",
    [
        ("tflite", True, False, "TFLite is float32 only"),
        ("auto", True, True, "not supported on GPU workers"),
        ("auto", False, False, "neither avx512_bf16 nor amx_bf16"),
        ("tensorflow", False, False, "neither avx512_bf16 nor amx_bf16"),
    ],
)
def test_bfloat16_is_refused_in_one_line(monkeypatch, runtime, cpu, gpu, expected):
    monkeypatch.setattr(inference, "cpu_supports_bfloat16", lambda: cpu)
    monkeypatch.setattr(inference, "workers_have_gpu", lambda beam_args: gpu)
    problem = inference.check_precision(PRECISION_BFLOAT16, runtime)
    assert problem.startswith("--precision bfloat16: ")
    assert expected in problem and "\n" not in problem


def test_bfloat16_under_auto_runs_in_tensorflow(monkeypatch, tiny_backbone):
    monkeypatch.setattr(inference, "cpu_supports_bfloat16", lambda: True)
    spec = hub.probe(registry.resolve(tiny_backbone))
    runtime, notes = inference.resolve_runtime(spec, "auto", precision=PRECISION_BFLOAT16)
    assert (runtime.name, runtime.precision) == (RUNTIME_TENSORFLOW, PRECISION_BFLOAT16)
    assert "tensorflow" in notes[0]
    hub.release(spec)


@pytest.fixture
def csv_file(tmp_path):
    write_dataset(tmp_path, per_class=1)
    path = tmp_path / "labels.csv"
    path.write_text("daisy/daisy_0.jpg,daisy\n")
    return path


@pytest.mark.parametrize("runtime, cpu", [("tflite", True), ("auto", False)])
def test_the_cli_refuses_bfloat16_with_one_line_and_exit_2(
    capsys, monkeypatch, csv_file, tmp_path, tiny_backbone, runtime, cpu
):
    monkeypatch.setattr(inference, "cpu_supports_bfloat16", lambda: cpu)
    argv = [
        f"--input_csv={csv_file}",
        f"--output_dir={tmp_path}/o",
        f"--backbone={tiny_backbone}",
        "--precision=bfloat16",
        f"--inference_runtime={runtime}",
    ]
    assert preprocess.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("hubflow-preprocess: error: --precision bfloat16: ")


def test_an_unknown_precision_is_refused_naming_the_flag(capsys, csv_file, tmp_path):
    argv = [f"--input_csv={csv_file}", f"--output_dir={tmp_path}/o", "--precision=float16"]
    assert preprocess.main(argv) == 2
    assert "--precision" in capsys.readouterr().err


def test_the_manifest_records_the_precision_and_old_ones_read_as_float32(tmp_path):
    write = dataset.WriteManifestFn(
        str(tmp_path),
        registry.resolve("efficientnet_lite0"),
        {},
        "2026-01-01T00:00:00+00:00",
        {},
        RUNTIME_TENSORFLOW,
        "ab" * 32,
        None,
        PRECISION_BFLOAT16,
    )
    events = [((dataset.EVENT_READ,), 1), ((dataset.EVENT_WRITTEN, "train", "a"), 1)]
    (data,) = list(write.process(events, ["a"], []))
    assert data["precision"] == PRECISION_BFLOAT16
    assert manifest_lib.read_manifest(str(tmp_path)).precision == PRECISION_BFLOAT16
    del data["precision"]
    assert manifest_lib.Manifest.from_json(data).precision == PRECISION_FLOAT32


def test_reuse_from_another_precision_matches_nothing(tmp_path):
    spec = registry.resolve("efficientnet_lite0")
    previous = manifest_lib.Manifest(
        labels=["a"],
        backbone=spec,
        splits=manifest_lib.empty_splits(["a"]),
        rows=manifest_lib.RowCounts(),
        rejected_by_reason={},
        options={"max_image_side": 512, "jpeg_quality": 95},
        versions={},
        created="",
        backbone_sha256="ab" * 32,
    )
    now = dict(
        backbone=spec,
        backbone_sha256="ab" * 32,
        runtime=RUNTIME_TENSORFLOW,
        max_image_side=512,
        jpeg_quality=95,
    )
    assert reuse.mismatch(previous, **now) is None
    reason = reuse.mismatch(previous, **now, precision=PRECISION_BFLOAT16)
    assert reason == (
        "its embeddings were computed in float32, this run embeds in bfloat16 (see --precision)"
    )


# The oneDNN option is process-wide, so bfloat16 embeds in a child process.
_BF16_CHILD = """
import sys, dataclasses, numpy as np
from backbones import hub, registry
from backbones.tflite_runtime import TENSORFLOW
from pipeline import inference
spec = hub.probe(registry.resolve(sys.argv[1]))
runtime = dataclasses.replace(TENSORFLOW, precision="bfloat16")
handler = inference.ImageEmbeddingModelHandler(spec, 16, runtime)
pixels = np.load(sys.argv[2])
results = handler.run_inference(list(pixels), handler.load_model())
np.save(sys.argv[3], np.stack([r.inference for r in results]))
"""


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has neither avx512_bf16 nor amx_bf16")
def test_bfloat16_embeddings_differ_from_float32_but_stay_within_0_999_cosine(
    tmp_path, tiny_backbone
):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, [16, TINY_SIZE, TINY_SIZE, 3], dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    spec = hub.probe(registry.resolve(tiny_backbone))
    handler = inference.ImageEmbeddingModelHandler(spec, 16, TENSORFLOW)
    f32 = np.stack([r.inference for r in handler.run_inference(list(pixels), handler.load_model())])
    subprocess.run(
        [sys.executable, "-c", _BF16_CHILD, tiny_backbone]
        + [str(tmp_path / "pixels.npy"), str(tmp_path / "bf16.npy")],
        check=True,
        capture_output=True,
    )
    bf16 = np.load(tmp_path / "bf16.npy")
    cosine = (f32 * bf16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert not np.array_equal(f32, bf16), "identical: bfloat16 did not run"
    assert cosine.min() >= 0.999, json.dumps(cosine.tolist())
