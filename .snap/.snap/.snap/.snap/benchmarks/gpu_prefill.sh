#!/usr/bin/env bash
# One device call for the prefill issue (#10): install, checks, quick tile comparison, ncu.
#   device run (repo root):  OUT=$OUT bash benchmarks/gpu_prefill.sh [iterate|ncu|full]
# iterate: prefill checks + the quick prefill comparison (Qwen3 NVFP4, 2048 / 8192 tokens)
#          + ncu of the GEMM kernels at 2048 tokens under the pinned config $NCU_CONFIG;
# ncu:     only the ncu step; full: gpu_check + prefill checks + the prefill sweep;
# fastdec: the inline-PTX MX decode checked bit for bit, timed, and the kernel tests on the GPU;
# swap: every prefill config checked, the swapped (register-operand) product timed, prefill and decode.
# Every step has its own limit; logs and JSON land in $OUT as each step ends (at most 8 files
# come back from the device: keep the list short).
set -u
cd "$(dirname "$0")/.."
what=${1:-iterate}
OUT="${OUT:-benchmarks/results}"
source benchmarks/gpu_common.sh
NCU_SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats"
ncu_step() {  # the GEMM kernels of PREFILL_CONFIGS ${NCU_CONFIGS} at ${NCU_TOKENS} tokens (Qwen3 NVFP4)
  step ncu ${NCU_LIMIT:-150} ncu --clock-control none --profile-from-start off --target-processes all $NCU_SECTIONS \
       -k "regex:gemm_act_kernel|gemm_out_kernel|prequant_kernel" --csv --page details \
       python3 benchmarks/bench_moe_kernels.py --ncu-target --prefill --configs ${NCU_CONFIGS:-1,6} --tokens ${NCU_TOKENS:-2048}
  mv "$OUT/ncu.log" "$OUT/ncu_prefill_qwen3_nvfp4_$slug.csv" 2>/dev/null
}
case $what in
  iterate)
    step checks 120 python3 benchmarks/gpu_prefill_checks.py "$OUT/gpu_prefill_checks_$slug.json"
    TAILN=40 step quick 240 python3 benchmarks/bench_moe_kernels.py --quick --prefill --out "$OUT"
    ncu_step
    TAILN=6 step decode 150 python3 benchmarks/bench_moe_kernels.py --quick --out "$OUT" ;;
  ncu) ncu_step ;;
  fastdec)  # the inline-PTX MX decode: bit-exact check, then its prefill timing, then kernel tests on the GPU
    step fastdec 60 python3 benchmarks/gpu_fastdec_check.py "$OUT/gpu_fastdec_check_$slug.json"
    TAILN=12 step quick_fastdec 80 python3 benchmarks/bench_moe_kernels.py --quick --prefill --schemes w_mxfp4_a_mxfp4 \
         --configs 1,6,7 --tokens 2048,8192 --tag prefill_quick_fastdec --out "$OUT"
    SKIP_VALUES=1 TEST_LIMIT=70 OUT=$OUT bash benchmarks/gpu_kernel_tests.sh tests/test_kernels_act_edges.py tests/test_kernels_log2_floor.py
    TAILN=8 step decode_fastdec 60 python3 benchmarks/bench_moe_kernels.py --quick --schemes w_mxfp4_a_mxfp4 \
         --configs 0,1,10 --tag quick_fastdec --out "$OUT" ;;
  swap)  # the swapped product with its wgmma pipelined: every prefill config checked, then timed
    step checks 160 python3 benchmarks/gpu_prefill_checks.py "$OUT/gpu_prefill_checks_$slug.json"
    TAILN=45 step quick 230 python3 benchmarks/bench_moe_kernels.py --quick --prefill --schemes nvfp4_w4a4,w_mxfp4_a_mxfp4 \
         --configs 7,8,14,15,16,17,18,19 --tokens 2048,8192 --tag prefill_quick_swap --out "$OUT"
    TAILN=25 step decode 110 python3 benchmarks/bench_moe_kernels.py --quick --schemes nvfp4_w4a4,w_mxfp4_a_mxfp4 \
         --configs 0,1,10,11,12,13,14 --tag quick_swap --out "$OUT" ;;
  regs)  # which change a swapped-product fault came with (this code and $OLD_CODE), then warps-per-SM configs
    step ab_new 90 python3 benchmarks/gpu_swap_ab.py w_mxfp4_a_mxfp4 nvfp4_w4a4
    [ -n "${OLD_CODE:-}" ] && PYTHONPATH=$OLD_CODE step ab_old 90 python3 benchmarks/gpu_swap_ab.py w_mxfp4_a_mxfp4
    TAILN=35 step quick 200 python3 benchmarks/bench_moe_kernels.py --quick --prefill --schemes nvfp4_w4a4,w_mxfp4_a_mxfp4 \
         --configs 7,15,20,21,22,23,24 --tokens 2048,8192 --tag prefill_quick_regs --out "$OUT" ;;
  probe)  # the dequantize-once (dq) prefill path checked and timed against the best fused tiles, the
          # activation-QDQ variants on the GPU, the design probe (tl.dot_scaled, its decode, gmm bars)
    CHECK_CONFIGS=7,15,25,26 step checks 150 python3 benchmarks/gpu_prefill_checks.py "$OUT/gpu_prefill_checks_dq_$slug.json"
    TAILN=24 step quick 170 python3 benchmarks/bench_moe_kernels.py --quick --prefill --schemes w_mxfp4_a_mxfp4,nvfp4_w4a4 \
         --configs 7,15,25,26 --tokens 2048,8192 --tag prefill_quick_dq --out "$OUT"
    step variants 80 python3 benchmarks/gpu_variant_check.py "$OUT/gpu_variant_check_$slug.json"
    TAILN=12 step probe 150 python3 benchmarks/prefill_probe.py --quick --out "$OUT" ;;
  final)  # the dq path's checks on the final dequant tile, the QDQ variants, then the prefill sweep (autotune incl. dq)
    CHECK_CONFIGS=7,25,26 step checks 70 python3 benchmarks/gpu_prefill_checks.py "$OUT/gpu_prefill_checks_dq_$slug.json"
    step variants 130 python3 benchmarks/gpu_variant_check.py "$OUT/gpu_variant_check_$slug.json"
    TAILN=70 step kernels ${SWEEP_LIMIT:-370} python3 benchmarks/bench_moe_kernels.py --skip-check --prefill \
         --budget $(( ${SWEEP_LIMIT:-370} - 30 )) --out "$OUT" ;;
  full)
    step check 100 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
    [ -n "${SKIP_PREFILL_CHECKS:-}" ] || step checks 100 python3 benchmarks/gpu_prefill_checks.py "$OUT/gpu_prefill_checks_$slug.json"
    TAILN=70 step kernels ${SWEEP_LIMIT:-400} python3 benchmarks/bench_moe_kernels.py --skip-check --prefill --ref \
         --budget $(( ${SWEEP_LIMIT:-400} - 30 )) --out "$OUT" ;;
esac
echo "=== done in ${SECONDS}s"
