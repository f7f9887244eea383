#!/usr/bin/env bash
# The GPU half of the README's Performance section in one run, on one CUDA device:
#
#     bash benchmarks/gpu_figures.sh [OUTDIR]        (default OUTDIR: gpu-figures)
#
# First the test suite's device checks (tests/test_devices.py and the fine-tuning device test: the
# engine on CUDA gives the CPU's results, and half-precision pruned attention runs the fused kernel
# its padding is for), then the decomposition, slider and decoding benchmarks with --device cuda.
# Each step's output is shown and kept in OUTDIR/<step>.log; the run stops at the first failure.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-figures}
py=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "error: CUDA is not available to this torch; the GPU figures need a CUDA device")'
mkdir -p "$out"

step() {
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: $((SECONDS - start)) s"
}

step devices "$py" -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_finetune.py -k device
# Engine vs full-SVD reference, svd_lowrank loop and GEMM floor; decompose() of GPT-2 XL and Whisper.
step decompose "$py" benchmarks/decompose_speed.py --device cuda
step slider "$py" benchmarks/slider_latency.py --device cuda --repeats-decompose 3
# GPT-2 XL shapes in bfloat16: batch 1, 8, 32 and a long context; the widths SDPA sees and whether
# padding them to multiples of 8 pays (--padding-baseline), prefill and decode.
step decode "$py" benchmarks/decode_speed.py --device cuda --model gpt2-xl --dtype bfloat16 --repeats 2 \
  --padding-baseline --step-repeats 10
echo "all steps done; logs in $out/"
