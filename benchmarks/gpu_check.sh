#!/usr/bin/env bash
# GPU check: the raw backbone and the preprocessing job on a GPU, and their ratio, in < 8 minutes.
#
# Usage (from the repository root, in an environment where `pip install -e .` has run):
#
#   bash benchmarks/gpu_check.sh [WORK_DIR]            # needs a GPU TensorFlow can see
#   HUBFLOW_GPU_CHECK_ALLOW_CPU=1 bash benchmarks/gpu_check.sh /tmp/x   # try the script on CPU
#
# What it runs, with no download (the default backbone is built from its pip weights package
# into $HUBFLOW_CACHE; the images are synthetic photos generated here):
#   1. what the machine has: `nvidia-smi -L`, TensorFlow's GPUs, CPU count;
#   2. `python -m benchmarks.preprocess` on the built-in default backbone, efficientnet_lite2:
#      the raw backbone in TensorFlow at batch sizes 32/64/128 on pre-made tensors (the
#      reference; `auto` picks TensorFlow, not TFLite, on GPU), then the real job on GPU_CHECK_N
#      (default 2000) images plus a 20-image start-up run, with the raw best batch size. Its
#      summary prints the job's steady rate as a ratio of the raw backbone's best, both
#      measured in this run.
# Every step runs under `timeout`, so the whole check ends within GPU_CHECK_BUDGET_S (default
# 460) seconds; a step that runs out is reported as such, with what it had printed.
set -uo pipefail

WORK_DIR="${1:-/tmp/hubflow-gpu-check}"
N="${GPU_CHECK_N:-2000}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"
PYTHON="${PYTHON:-python}"
START=$(date +%s)
mkdir -p "$WORK_DIR"

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

echo "== gpu_check: $(date -u +%FT%TZ), work dir $WORK_DIR, N=$N, budget ${BUDGET_S}s"
echo "-- machine"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi -L || true
else
  echo "nvidia-smi: not found"
fi
echo "CPUs: $(nproc)"
GPUS=$(timeout 120 "$PYTHON" -c \
  "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))" 2>/dev/null \
  | tail -1)
echo "GPUs TensorFlow sees: ${GPUS:-unknown}"
if [[ "${GPUS:-0}" == "0" || -z "${GPUS:-}" ]]; then
  if [[ "${HUBFLOW_GPU_CHECK_ALLOW_CPU:-0}" != "1" ]]; then
    echo "gpu_check: TensorFlow sees no GPU here, so there is nothing to check (set" \
      "HUBFLOW_GPU_CHECK_ALLOW_CPU=1 to run the same steps on CPU)" >&2
    exit 2
  fi
  echo "(no GPU: running on CPU because HUBFLOW_GPU_CHECK_ALLOW_CPU=1; these are CPU figures)"
fi

echo "-- raw backbone and the job ($(left) s left)"
timeout --kill-after=10 "$(left)" "$PYTHON" -m benchmarks.preprocess \
  --work_dir "$WORK_DIR" \
  --backbone efficientnet_lite2 \
  --sizes "$N" \
  --batch_sizes 32,64,128 \
  --seconds 6 \
  --startup_n 20 \
  --startup_repeats 1 \
  --stage_sample 50 \
  --loop_n 500
rc=$?
if [[ $rc == 124 || $rc == 137 ]]; then
  echo "gpu_check: ran out of the ${BUDGET_S}s budget; the figures above are partial" >&2
elif [[ $rc != 0 ]]; then
  echo "gpu_check: benchmarks.preprocess failed with exit status $rc" >&2
fi
echo "== gpu_check: done in $(($(date +%s) - START)) s; results: $WORK_DIR/preprocess_benchmark.json"
exit $rc
