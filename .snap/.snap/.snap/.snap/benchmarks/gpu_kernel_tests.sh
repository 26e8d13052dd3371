#!/usr/bin/env bash
# One device call: the interpreter-verified kernel tests, run against the GPU code generator.
#   device run (repo root):  OUT=$OUT bash benchmarks/gpu_kernel_tests.sh [test files...]
# EMU_INDUCTOR_TEST_ON_GPU=1 makes tests/conftest.py move the Triton ops' arguments to the GPU
# (compiled kernels, no interpreter) and their results back, so each test's CPU reference
# check -- bit for bit where it asks -- verifies the GPU variant of the rendered kernels.
# pytest is not installed on the device: a _pydeps/ folder next to the repo (pure-Python
# pytest, pluggy, iniconfig, packaging copied from a CPU machine) is put on PYTHONPATH.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/_pydeps EMU_INDUCTOR_AUTOTUNE=0 EMU_INDUCTOR_TEST_ON_GPU=1
unset TRITON_INTERPRET
files=${*:-tests/test_kernels_weight_readers.py tests/test_kernels_act_edges.py tests/test_kernels_log2_floor.py \
tests/test_kernels_recipes.py tests/test_kernels_prefill.py tests/test_kernels_moe_bias.py}
timeout --signal=INT --kill-after=10 ${TEST_LIMIT:-300} python3 -m pytest -q -rf -p no:cacheprovider \
  --junitxml="$OUT/gpu_kernel_tests_junit.xml" $files >"$OUT/gpu_kernel_tests.log" 2>&1
echo "=== pytest rc=$?"; tail -n 40 "$OUT/gpu_kernel_tests.log"
unset EMU_INDUCTOR_TEST_ON_GPU
[ -n "${SKIP_VALUES:-}" ] || { timeout --signal=INT --kill-after=10 ${VALUES_LIMIT:-90} python3 benchmarks/gpu_value_checks.py >"$OUT/values.log" 2>&1
  echo "=== values rc=$?"; tail -n 15 "$OUT/values.log"; }
