"""A RunInference model handler that embeds prepared images with a frozen backbone.

The handler takes images already resized to the backbone's input size, uint8 ``[S, S, 3]``
arrays made by :func:`pipeline.images.backbone_pixels` (within about 1/255 of what the exported
serving model computes from the same image), stacks a batch and runs the model, which scales it
(:func:`backbones.tflite_runtime.pixels_model`): nothing but the model runs while the batch
waits, so the per-image decoding in ``EncodeFn`` can overlap it. RunInference loads the model
once per worker process (``shared.Shared``) and batches with ``BatchElements``.

The model runs in the runtime the launcher resolved (:func:`resolve_runtime`,
``--inference_runtime``): TensorFlow, or the backbone converted to TensorFlow Lite and run with
XNNPACK on every core the worker may use (:mod:`backbones.tflite_runtime`). The launcher converts
and checks the model once (cached) and remote workers get a staged copy of the file, so every
worker runs the same checked model and the manifest can name the runtime.

``--precision bfloat16`` runs the backbone in TensorFlow with oneDNN's bfloat16 auto-mixed
precision, switched on in the process that loads the model (:meth:`load_model`) before its
function is traced. It needs a CPU with AVX512-BF16 or AMX-BF16 (:func:`cpu_supports_bfloat16`)
and is TensorFlow only: ``auto`` then means TensorFlow, ``tflite`` is refused. It is refused for
GPU workers (GPU mixed precision is another mechanism, untested here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, PipelineOptions

from backbones import hub, tflite_runtime
from backbones.tflite_runtime import EmbeddingRuntime
from pipeline import remote
from schemas.backbones import RUNTIME_AUTO, RUNTIME_TFLITE, BackboneSpec
from schemas.manifest import PRECISION_BFLOAT16, PRECISION_FLOAT32

# /proc/cpuinfo flags of the CPUs oneDNN runs bfloat16 on natively.
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_CPUINFO = "/proc/cpuinfo"

# A Dataflow service option or experiment that attaches GPUs to the workers.
_ACCELERATOR_OPTION = "worker_accelerator"


class _Embedder:
    """The loaded backbone behind one compiled ``pixels -> embeddings`` TensorFlow function."""

    def __init__(self, spec: BackboneSpec):
        self._model = hub.load(spec)  # keeps the module's variables alive
        self._embed = tflite_runtime.pixels_model(self._model, spec.image_size)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self._embed(pixels).numpy()


class Embedded(NamedTuple):
    """An element RunInference passes through: its inference, already computed (the stored
    embedding of an image an earlier dataset holds, :mod:`pipeline.reuse`)."""

    inference: np.ndarray


class PassEmbeddedModelHandler(ModelHandler[Any, PredictionResult, Any]):
    """Wraps an image-embedding handler: an :class:`Embedded` element's result is its own
    inference; the other elements of a batch go through the wrapped handler, in one call.

    So images embedded earlier and images embedded now flow through one ``RunInference`` to
    one writer. Joining them after RunInference would take a multi-input ``Flatten``, which the
    DirectRunner (FnApiRunner) always materializes: every stored JPEG would be held in memory
    until the whole flatten is written (5.6 GB peak RSS for 10,000 photos).
    """

    def __init__(self, handler: ModelHandler):
        super().__init__()
        self._handler = handler

    def load_model(self):
        return self._handler.load_model()

    def run_inference(
        self, batch: Sequence[Any], model, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        todo = [i for i, x in enumerate(batch) if not isinstance(x, Embedded)]
        out = [
            PredictionResult(None, x.inference) if isinstance(x, Embedded) else None for x in batch
        ]
        if todo:
            results = self._handler.run_inference([batch[i] for i in todo], model, inference_args)
            for i, result in zip(todo, results, strict=True):
                out[i] = result
        return out

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(x.inference.nbytes if isinstance(x, Embedded) else x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return self._handler.get_metrics_namespace()

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return self._handler.batch_elements_kwargs()


class ImageEmbeddingModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """Embeds uint8 ``[S, S, 3]`` images; one :class:`PredictionResult` (float32 ``[D]``) per image.

    The result's ``example`` is None: the input pixels are not kept past the model call.
    """

    def __init__(
        self, spec: BackboneSpec, max_batch_size: int = 32, runtime: EmbeddingRuntime | None = None
    ):
        super().__init__()
        self._spec = spec
        self._max_batch_size = max_batch_size
        self._runtime = runtime or tflite_runtime.TENSORFLOW

    def load_model(self):
        if self._runtime.name == RUNTIME_TFLITE:
            return tflite_runtime.load(self._runtime)
        if self._runtime.precision == PRECISION_BFLOAT16:
            enable_bfloat16()
        return _Embedder(self._spec)

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        embeddings = np.asarray(model(np.stack(batch)), dtype=np.float32)
        return [PredictionResult(None, e) for e in embeddings]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return "hubflow_embed"

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Fixed-size batches: the adaptive estimator settles on tiny batches when per-image
        # CPU work (decode, re-encode) competes with the model, and the model is fastest batched.
        return {"min_batch_size": self._max_batch_size, "max_batch_size": self._max_batch_size}


def cpu_supports_bfloat16(cpuinfo: str = _CPUINFO) -> bool:
    """Whether this machine's CPU runs bfloat16 natively (Linux ``/proc/cpuinfo`` flags)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:  # not Linux: no way to tell, so no
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in _BF16_CPU_FLAGS)


def enable_bfloat16() -> None:
    """Switches on oneDNN bfloat16 auto-mixed precision for this process's TensorFlow functions
    traced from now on (process-wide: a worker process runs one job's model).

    Raises:
      RuntimeError: the CPU lacks bfloat16 support (a worker unlike the launcher's machine).
    """
    if not cpu_supports_bfloat16():
        raise RuntimeError(
            "--precision bfloat16: this worker's CPU has neither avx512_bf16 nor amx_bf16"
        )
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})


def check_precision(precision: str, requested: str, beam_args: Sequence[str] = ()) -> str | None:
    """Why ``--precision`` cannot be used with ``--inference_runtime requested`` on these
    workers (one line), or None. A remote runner's worker CPU is checked when it loads the model.
    """
    if precision == PRECISION_FLOAT32:
        return None
    if requested == RUNTIME_TFLITE:
        return (
            f"--precision {precision}: runs in TensorFlow, and TFLite is float32 only; use "
            "--inference_runtime auto or tensorflow, or --precision float32"
        )
    if workers_have_gpu(beam_args):
        return f"--precision {precision}: not supported on GPU workers; use --precision float32"
    if not remote.is_remote(beam_args) and not cpu_supports_bfloat16():
        return (
            f"--precision {precision}: this CPU has neither avx512_bf16 nor amx_bf16; "
            "use --precision float32"
        )
    return None


def workers_have_gpu(beam_args: Sequence[str]) -> bool:
    """Whether the job's workers have a GPU: a remote runner's accelerator option (Dataflow's
    ``worker_accelerator``), or, for a local runner, a GPU TensorFlow sees here."""
    if remote.is_remote(beam_args):
        options = PipelineOptions(list(beam_args))
        values = (options.view_as(GoogleCloudOptions).dataflow_service_options or []) + (
            options.view_as(DebugOptions).experiments or []
        )
        return any(_ACCELERATOR_OPTION in value for value in values)
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_runtime(
    spec: BackboneSpec,
    requested: str,
    beam_args: Sequence[str] = (),
    dry_run: bool = False,
    precision: str = PRECISION_FLOAT32,
    digest: str | None = None,
) -> tuple[EmbeddingRuntime, tuple[str, ...]]:
    """The runtime the job embeds with (:func:`backbones.tflite_runtime.resolve`), its TFLite
    model staged for remote workers, and lines saying so (for a dry run's report). ``digest``:
    the backbone's content digest, when the caller has it.

    Raises:
      ValueError: one line naming ``--inference_runtime`` (``tflite`` on a backbone that does
        not convert) or ``--precision`` (see :func:`check_precision`), or ``UsageError``
        naming ``--temp_location`` (nowhere to stage).
    """
    if precision != PRECISION_FLOAT32:
        problem = check_precision(precision, requested, beam_args)
        if problem:
            raise ValueError(problem)
        reason = f"--precision {precision} runs in TensorFlow (oneDNN auto-mixed precision)"
        runtime = dataclasses.replace(tflite_runtime.TENSORFLOW, reason=reason, precision=precision)
        return runtime, (f"--inference_runtime {requested}: tensorflow ({reason})",)
    gpu = requested == RUNTIME_AUTO and workers_have_gpu(beam_args)
    runtime = tflite_runtime.resolve(spec, requested, gpu=gpu, digest=digest)
    notes = [f"--inference_runtime {requested}: {runtime.name} ({runtime.reason})"]
    if runtime.model_dir:
        staged, note = remote.for_workers(
            runtime.model_dir,
            beam_args,
            kind="tflite",
            flag="--inference_runtime",
            value=requested,
            dry_run=dry_run,
        )
        runtime = dataclasses.replace(runtime, model_dir=staged)
        notes += [note] if note else []
    return runtime, tuple(notes)
