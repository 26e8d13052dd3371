#!/usr/bin/env bash
# Every GPU measurement the open issues still need, in ONE device call (device time is
# scarce: a machine start costs minutes, so build, checks and timings go together).
#
#   device run (repo root):  OUT=$OUT bash benchmarks/gpu_session.sh
#
# Steps, each under its own time limit so one slow step cannot eat the others (total
# ~560 s, under the device's 600 s per call); logs and JSON land in $OUT (8 files max
# come back: 4 logs + gpu_check / compiled_layer / compiled_model JSON):
#   1. gpu_check      fast GPU kernels vs the reference, every scheme (issue 3 numerics)
#   2. layer          compiled EmulatedMoE layer, eager / inductor / mxemu / +CUDA graphs (issue 4)
#   3. demo           `python -m emu_inductor demo` on the GPU (issue 4)
#   4. model          Qwen3-width model slice, prefill + decode tokens/s (issue 5)
# The device has torch 2.11 and the package is not pip-installed there: PYTHONPATH=. and
# the backend function (the demo and benchmarks fall back to it when the entry point is
# absent).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  tail -n 8 "$OUT/$name.log"
}

step gpu_check 120 python3 benchmarks/gpu_check.py "$OUT/gpu_check_h100.json"
step layer 200 python3 benchmarks/bench_compiled.py --skip-model
step demo 90 python3 -m emu_inductor demo
step model 150 python3 benchmarks/bench_compiled.py --skip-layer
echo "=== done in ${SECONDS}s"
