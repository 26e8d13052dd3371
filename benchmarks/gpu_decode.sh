#!/usr/bin/env bash
# One device call for the decode issue (#9): install, checks, profile, ncu, quick kernel bench.
#   device run (repo root):  OUT=$OUT bash benchmarks/gpu_decode.sh [profile|quick|iterate|full]
# profile: profile + ncu; quick: checks + quick bench + profile; iterate: quick bench + profile;
# full: checks + profile + the decode sweep of bench_moe_kernels; nvfast: inline-decode GPU
# checks, routing tests, quick benches (decode and prefill) and the profile; checks: gpu_check,
# the fused-epilogue stress check, quick benches (fused / separate epilogues), profile; sweep:
# the decode sweep and the gpt-oss corpus entries; pdl: PDL checks, profile A/B, corpus at 1 token
# Each step has its own limit; logs and JSON land in $OUT as each step ends.
set -u
cd "$(dirname "$0")/.."
what=${1:-quick}
OUT="${OUT:-benchmarks/results}"
source benchmarks/gpu_common.sh
NCU_SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
case $what in
  profile)
    step profile 200 python3 benchmarks/profile_decode.py --tokens 1,32 --out "$OUT"
    step ncu 150 ncu --clock-control none --profile-from-start off --target-processes all $NCU_SECTIONS \
         --csv --page details --log-file "$OUT/ncu_decode_qwen3_nvfp4_$slug.csv" python3 benchmarks/profile_decode.py --ncu-target --tokens 1,32
    ;;  # --log-file receives ncu's CSV report (the step's own log keeps the program's output)
esac
case $what in
  quick) step check 120 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
         step values 90 python3 benchmarks/gpu_value_checks.py
         step quick 150 python3 benchmarks/bench_moe_kernels.py --quick --out "$OUT"
         step profile 150 python3 benchmarks/profile_decode.py --tokens 1,32 --out "$OUT" ;;
  iterate) step quick 150 python3 benchmarks/bench_moe_kernels.py --quick --out "$OUT"
         step profile 150 python3 benchmarks/profile_decode.py --tokens 1,32 --out "$OUT" ;;
  nvfast)  # the inline decodes and the sort routing on the GPU, then their timings
         step fastdec 150 python3 benchmarks/gpu_fastdec_check.py "$OUT/gpu_fastdec_check_$slug.json"
         PYTHONPATH=$PWD:$PWD/_pydeps step routing 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_routing.py
         step quick 240 python3 benchmarks/bench_moe_kernels.py --quick --schemes nvfp4_w4a4,w_mxfp4_a_mxfp4 --tag quick_nvfast --out "$OUT"
         step profile 120 python3 benchmarks/profile_decode.py --tokens 1,32 --out "$OUT"
         step prefill 150 python3 benchmarks/bench_moe_kernels.py --quick --prefill --configs 6,7,8,10 --tokens 2048,8192 --tag prefill_quick_nvfast --out "$OUT" ;;
  redteam2)  # issue 8: kernel checks after the unit-stride copy in GemmWeights, then the red-team round 2
         # entries that fuse since the eighth session (K-major leaves, one-hot decode, one-hot counts) at Qwen3 widths
         step check 100 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
         TAILN=40 step corpus 330 python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 1 32 --iters 10 --tag rt2 \
              --entries rt2_A_take_kmajor_mx_wonly rt2_E_kmajor_gather1d_nvfp4_wonly rt2_D_onehot_int_rne_nvfp4 \
              rt2_F2_onehot_count_bmm_moe rt2_A6_nmajor_take_repeat_mx_wonly rt2_F3_indexadd_count_bmm_moe --out "$OUT" ;;
  dynamic)  # issue 8: MoE layers compiled again for new token counts (automatic dynamic shapes) at Qwen3 widths
         TAILN=60 step dynamic 300 python3 benchmarks/gpu_dynamic.py --shape qwen3 rt2_F3_indexadd_count_bmm_moe \
              resp_moe_chunk rt2_F2_onehot_count_bmm_moe ;;
  dynamic2)  # issue 8: after the "fp32" combine variant (bmm over the slots): the recompiles, then the corpus rows
         TAILN=12 step dynamic 150 python3 benchmarks/gpu_dynamic.py --shape qwen3 --no-explain \
              rt2_F3_indexadd_count_bmm_moe rt2_F2_onehot_count_bmm_moe
         TAILN=12 step corpus 300 python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 1 32 2048 --iters 10 \
              --tag rt2_dyn --entries rt2_F2_onehot_count_bmm_moe rt2_F3_indexadd_count_bmm_moe --out "$OUT" ;;
  moecorpus)  # issue 8: every corpus MoE expected to fuse whole, at Qwen3 widths, 1 and 32 tokens
         TAILN=20 step corpus 500 python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 1 32 --iters 10 \
              --tag moe --entries redteam_sort_searchsorted_moe redteam_bucketize_scatter_reduce_moe \
              redteam_interleaved_index_copy_moe resp_moe_titan transformers_batched_mm_mxfp4_moe \
              redteam_gather_codes_bmm_moe gptoss_mxfp4_moe --out "$OUT" ;;
  iota)  # the gathered-codes bmm MoE after the prims.iota group ends (it fell back to stock compile on torch 2.11)
         TAILN=6 step corpus 140 python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 1 --iters 10 \
              --tag iota --entries redteam_gather_codes_bmm_moe --out "$OUT" ;;
  checks)  # correctness of this session's kernel changes, then the quick bench and the layer profile
         step check 100 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
         FUSED_REPS=10 step fused 75 python3 benchmarks/gpu_fused_check.py "$OUT/gpu_fused_check_$slug.json"
         step profile 100 python3 benchmarks/profile_decode.py --tokens 1,32 --out "$OUT"
         step quick 90 python3 benchmarks/bench_moe_kernels.py --quick --schemes nvfp4_w4a4,w_mxfp4_a_mxfp4 --configs 0,1,5,6,10,11,14 --out "$OUT" ;;
  pdl)     # PDL on the MoE chain: checks (eager + graph replays), layer profile with and without, corpus at 1 token
         step check 100 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
         FUSED_REPS=5 step fused 70 python3 benchmarks/gpu_fused_check.py "$OUT/gpu_fused_check_$slug.json"
         step profile 90 python3 benchmarks/profile_decode.py --tokens 1,32 --out "$OUT"
         mkdir -p "$OUT/nopdl"; EMU_INDUCTOR_PDL=0 step profile_nopdl 90 python3 benchmarks/profile_decode.py --tokens 1,32 --out "$OUT/nopdl"
         TAILN=20 step corpus ${CORPUS_LIMIT:-220} python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 1 --iters 10 --out "$OUT" ;;
  final)   # checks, GPU explain() of the corpus layers that fused on the CPU only, host overhead, corpus at both shapes at 1 token
         step check 90 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
         step explain 70 python3 benchmarks/gpu_explain.py vllm_nvfp4_linear resp_moe_chunk
         TAILN=4 step overhead 60 python3 benchmarks/profile_overhead.py vllm_mxfp4_linear resp_moe_chunk
         TAILN=16 step corpus ${CORPUS_LIMIT:-170} python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 1 --iters 10 --out "$OUT"
         TAILN=16 step corpus_gptoss ${CORPUS_GPTOSS_LIMIT:-150} python3 benchmarks/bench_corpus.py --shape gpt_oss --tokens 1 --iters 10 --out "$OUT" ;;
  final2)  # after the host-path caches: checks, host overhead one layer down at a time, the corpus rows the
           # first final run did not reach (gpt-oss widths) and the Qwen3-width linears again
         step check 150 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
         TAILN=40 step overhead 90 python3 benchmarks/profile_overhead.py --calls 100 vllm_mxfp4_linear gptoss_mxfp4_moe
         TAILN=12 step corpus_gptoss 170 python3 benchmarks/bench_corpus.py --shape gpt_oss --tokens 1 --iters 10 --tag rest \
              --entries vllm_mxfp4_linear microxcaling_mx_linear resp_vllm_nvfp4_where resp_e8m0_frexp resp_round_bucketize gptoss_mxfp4_moe --out "$OUT"
         TAILN=8 step corpus 80 python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 1 --iters 10 --tag cached_ids \
              --entries vllm_nvfp4_linear gptoss_mxfp4_linear quark_mxfp4_linear --out "$OUT" ;;
  corpus_tokens)  # issue 8 item 9's other token counts (1 token: the final / final2 runs), both shapes
         TAILN=16 step corpus 280 python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 32 2048 --iters 10 --tag t32_2048 --out "$OUT"
         TAILN=16 step corpus_gptoss 280 python3 benchmarks/bench_corpus.py --shape gpt_oss --tokens 32 2048 --iters 10 --tag t32_2048 --out "$OUT" ;;
  sweeps)  # the committed sweeps, decode then prefill (each stops at its budget, rows kept), gpt-oss corpus at 1 token
         TAILN=30 step kernels 230 python3 benchmarks/bench_moe_kernels.py --skip-check --decode --budget 200 --out "$OUT"
         TAILN=40 step prefill 250 python3 benchmarks/bench_moe_kernels.py --skip-check --prefill --budget 215 --out "$OUT"
         TAILN=12 step corpus_gptoss 100 python3 benchmarks/bench_corpus.py --shape gpt_oss --entries gptoss_mxfp4_moe \
              gptoss_mxfp4_linear --tokens 1 --iters 10 --out "$OUT" ;;
  sweep)   # the committed decode sweep (all shapes) and the corpus at a real shape
         TAILN=30 step kernels 240 python3 benchmarks/bench_moe_kernels.py --skip-check --decode --budget 210 --out "$OUT"
         step corpus 200 python3 benchmarks/bench_corpus.py --shape gpt_oss --entries gptoss_mxfp4_moe gptoss_mxfp4_linear --tokens 1 32 --out "$OUT" ;;
  host)    # host time per call layer by layer (no CUDA graphs); the linear dq path at 2048 tokens (corpus, Qwen3 widths)
         TAILN=80 step host 150 python3 benchmarks/host_breakdown.py --out "$OUT" ${HOST_TAG:+--tag $HOST_TAG}
         TAILN=12 step corpus_dq ${CORPUS_LIMIT:-200} python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 2048 --iters 10 --tag t2048_dq \
              --entries vllm_mxfp4_linear quark_mxfp4_linear resp_all_slots gptoss_mxfp4_linear vllm_nvfp4_linear --out "$OUT" ;;
  hostfix) # after the fast launch path and the value-check memo: checks, host time per call, corpus at 1 token, layer profile
         step check 120 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
         step values 130 python3 benchmarks/gpu_value_checks.py
         TAILN=60 step host 150 python3 benchmarks/host_breakdown.py --out "$OUT" --tag _after
         TAILN=12 step corpus 170 python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 1 --iters 10 --tag t1_fastlaunch \
              --entries vllm_mxfp4_linear quark_mxfp4_linear resp_moe_chunk gptoss_mxfp4_moe --out "$OUT"
         step profile 110 python3 benchmarks/profile_decode.py --tokens 1,32 --out "$OUT" ;;
  hostfix2) # the fast launch path keyed by call pattern: checks, host time per call, corpus at 1 token
         step check 120 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
         step values 130 python3 benchmarks/gpu_value_checks.py
         TAILN=60 step host 150 python3 benchmarks/host_breakdown.py --out "$OUT" --tag _after2
         TAILN=12 step corpus 170 python3 benchmarks/bench_corpus.py --shape qwen3 --tokens 1 --iters 10 --tag t1_fastlaunch2 \
              --entries vllm_mxfp4_linear quark_mxfp4_linear resp_moe_chunk gptoss_mxfp4_moe --out "$OUT" ;;
  full)  step check 110 python3 benchmarks/gpu_check.py "$OUT/gpu_check_$slug.json"
         [ -n "${SKIP_VALUES:-}" ] || step values 75 python3 benchmarks/gpu_value_checks.py
         step quick 100 python3 benchmarks/bench_moe_kernels.py --quick --out "$OUT"
         step profile 100 python3 benchmarks/profile_decode.py --tokens 1,32 --out "$OUT"
         TAILN=40 step kernels 200 python3 benchmarks/bench_moe_kernels.py --skip-check --decode --budget 170 --out "$OUT" ;;
esac
echo "=== done in ${SECONDS}s"
