#!/usr/bin/env bash
# One device call: checks first, then timings (device time is scarce: a machine start costs
# minutes, so build, checks and timings go together). Each step has its own time limit so one
# slow step cannot eat the others; logs and JSON land in $OUT as each step ends.
#
#   device run (repo root):  OUT=$OUT bash benchmarks/gpu_session.sh [corpus|kernels|all]
#
# Steps:
#   check     gpu_check: every scheme's fused GPU kernels vs the eager reference
#   recipes   the NVFP4 recipe kernels vs emu_inductor.formats bit for bit (tests/test_kernels_recipes.py)
#   corpus    other people's emulation layers at Qwen3-30B-A3B / gpt-oss-20b widths:
#             eager / stock / mxemu / CUDA graphs (benchmarks/bench_corpus.py; issue 8 item 9)
#   kernels   benchmarks/bench_moe_kernels.py, a 120 s slice of the sweep (decode / prefill issues)
# The device has torch 2.11 and no network: the package is installed editable without deps or
# build isolation, so backend="mxemu" resolves through its entry point as on a user's machine.
set -u
cd "$(dirname "$0")/.."
what=${1:-corpus}
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || echo "editable install failed (see install.log)"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"
slug=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  tail -n 12 "$OUT/$name.log"
}

step check 100 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
step recipes 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_recipes.py
case $what in
  corpus|all)
    step corpus_qwen3 240 python3 benchmarks/bench_corpus.py --shape qwen3 --out "$OUT"
    step corpus_gpt_oss 120 python3 benchmarks/bench_corpus.py --shape gpt_oss --quick --out "$OUT" ;;
esac
case $what in
  kernels|all) step kernels 150 python3 benchmarks/bench_moe_kernels.py --skip-check --budget 120 ;;
esac
echo "=== done in ${SECONDS}s"
