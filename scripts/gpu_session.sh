#!/usr/bin/env bash
# One call on a lent GPU machine: GPU tests, then the benchmarks. Usage (from the repo root, on the device):
#   bash scripts/gpu_session.sh [tests|tests-engine|tests-kernels|bench|bench-fa3|bench-tp2|profile|profile-latency|profile-prefill|cprofile|
#                                cprofile-latency|sweep|probe|decode-step|fa3|latency|pytest|ab|env-ab|arg-ab|all]
# `tests` runs every GPU test file (9.3 minutes in one process on an H200 in 2026-12-02's session 9; 116 s under
# pytest-xdist with 8 workers in session 10); `tests-engine` (tests/test_gpu.py) and `tests-kernels` (the kernel
# files) split it over two calls where pytest-xdist is missing.
# BENCH_ARGS (e.g. "--attention-backend triton") go to bench.py and bench_latency.py; SWEEP_ARGS to kernel_sweep.py....
# Writes logs and JSON under $OUT (or ./gpu_out). `profile` runs bench.py with the worker's torch-profiler
# window (steps 300-330, NANOVLLM_PROFILE_DIR) and prints the device busy/idle share of that window and its
# largest idle gaps (by the device events around them);
# `profile-latency` does the same over batch-1 decode steps of bench_latency.py (PROFILE_BATCH, PROFILE_STEPS),
# `profile-prefill` over bench.py's first prefill steps. `probe` runs scripts/probe.py (PROBE_ARGS), `pytest`
# pytest with PYTEST_ARGS (default tests/test_gpu.py; shell quoting in it is kept, e.g. -k 'a or b').
# `fa3` (not in `all`) runs the flash-attn tests and scripts/attention_yardstick.py (Triton vs FlashAttention-3).
# `ab` (not in `all`) times this tree against an older one in the same call, interleaved: make it first on
# the CPU machine with `bash scripts/gpu_session.sh ab-tree COMMIT` (writes ./ab_dir, untracked, so the device
# copy carries it; delete it afterwards), then AB_CMD (default: bench_latency.py --batch-sizes 1,64
# --repeats 3) runs AB_ROUNDS times (default 2) on each side, new then old. `env-ab` (not in `all`): this tree's
# AB_CMD once under each NAME=VALUE of AB_ENVS (e.g. "NANOVLLM_PDL=1 NANOVLLM_PDL=-gemm"), AB_ROUNDS times.
# `arg-ab` (not in `all`): this tree's AB_CMD once with each ';'-separated set of extra flags in AB_ARGS
# (e.g. "--block-size 16;--block-size 64"), AB_ROUNDS times, interleaved.
set -uo pipefail
if [ "${1:-}" = ab-tree ]; then  # on the CPU machine, not the device: the older tree for `ab`
  [ -n "${2:-}" ] || { echo "usage: bash scripts/gpu_session.sh ab-tree COMMIT" >&2; exit 2; }
  rm -rf ab_dir && mkdir ab_dir && git archive "$2" | tar -x -C ab_dir && echo "ab_dir: $(git rev-parse --short "$2")"
  exit $?
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
# .whl/ holds pyzmq (../shared/wheels) and, for the GPU tests in parallel, pytest-xdist and execnet (`pip download
# --no-deps -d .whl pytest-xdist execnet` on the CPU machine); the device has no package index
if ! python3 -c "import zmq, xdist" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:${PYTHONPATH:-}
fi
# FlashAttention-3: the tokenspeed-fa3 wheel's files unpacked in .fa3/ (git-ignored; no package index here),
# its 300 MB extension xz-compressed. Unpacked once into .fa3_site/, which goes on PYTHONPATH
# (flash_attn_interface imports flash_attn_3._C and reads flash_attn_config). With it, "auto" picks flash_attn.
if [ -f .fa3/flash_attn_3/_C.abi3.so.xz ]; then
  if [ ! -f .fa3_site/flash_attn_3/_C.abi3.so ]; then
    mkdir -p .fa3_site/flash_attn_3 && cp .fa3/flash_attn_interface.py .fa3/flash_attn_config.py .fa3_site/
    if command -v xz >/dev/null; then xz -dc .fa3/flash_attn_3/_C.abi3.so.xz
    else python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)" \
      .fa3/flash_attn_3/_C.abi3.so.xz; fi > .fa3_site/flash_attn_3/_C.abi3.so.part &&
      mv .fa3_site/flash_attn_3/_C.abi3.so.part .fa3_site/flash_attn_3/_C.abi3.so
  fi
  export PYTHONPATH=$PWD/.fa3_site:${PYTHONPATH:-}
fi
SITE_PATH=${PYTHONPATH:-}
# the GPU tests in TEST_WORKERS processes (default 8, as measured; 0: one) when pytest-xdist is there: they
# are bound by Triton compiles and engine start-ups on the host's cores, and each test's engine takes little
# GPU memory (its KV blocks are capped at what max_num_seqs x max_model_len can use)
TEST_WORKERS=${TEST_WORKERS:-8}
PARALLEL=""
if [ "$TEST_WORKERS" != 0 ] && python3 -c "import xdist" 2>/dev/null; then PARALLEL="-n $TEST_WORKERS"; fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# whether CUDA C++ could be built here (torch.utils.cpp_extension): for kernels Triton cannot express
python3 -c "from torch.utils.cpp_extension import CUDA_HOME; import shutil; print('CUDA_HOME', CUDA_HOME, 'nvcc', shutil.which('nvcc'))" 2>&1 | tee -a "$OUT/gpu.txt"
# env-ab / arg-ab: AB_CMD once per variant (an environment setting NAME=VALUE, or extra flags), AB_ROUNDS
# rounds, the variants interleaved within each round
ab_variants() {
  local kind=$1 round variant; shift
  for round in $(seq "${AB_ROUNDS:-2}"); do
    for variant in "$@"; do
      echo "== $variant (round $round)"
      if [ "$kind" = env ]; then env "$variant" python3 ${AB_CMD:-bench_latency.py --batch-sizes 1,64 --repeats 3}
      else python3 ${AB_CMD:-bench_latency.py --batch-sizes 1,64 --repeats 3} $variant; fi 2>&1 | tail -${AB_TAIL:-4}
    done
  done
}
for what in "${@:-all}"; do
  case $what in
    tests|all) python3 -m pytest -q -x --durations=12 $PARALLEL tests/test_gpu.py tests/test_sampler.py tests/test_fused_kernels.py tests/test_triton_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -16 ;;&
    tests-engine) python3 -m pytest -q -x --durations=12 $PARALLEL tests/test_gpu.py 2>&1 | tee "$OUT/tests_engine.log" | tail -16 ;;&
    tests-kernels) python3 -m pytest -q -x --durations=12 $PARALLEL tests/test_sampler.py tests/test_fused_kernels.py tests/test_triton_kernels.py 2>&1 | tee "$OUT/tests_kernels.log" | tail -16 ;;&
    pytest) eval python3 -m pytest -q -rs "${PYTEST_ARGS:-tests/test_gpu.py}" 2>&1 | tee "$OUT/pytest.log" | tail -8 ;;&
    bench|all) NANOVLLM_STEP_TIMING=1 python3 bench.py --runs 2 ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 | grep -v "^W1122" | tee "$OUT/bench.log" ;;&
    bench-fa3) NANOVLLM_STEP_TIMING=1 python3 bench.py --runs 2 --attention-backend flash_attn --json "$OUT/bench_fa3.json" 2>&1 | grep -v "^W1122" | tee "$OUT/bench_fa3.log" ;;&
    bench-tp2|all) NANOVLLM_STEP_TIMING=1 python3 bench.py --tp 2 --runs 2 --json "$OUT/bench_tp2.json" 2>&1 | grep -v "^W1122" | tee "$OUT/bench_tp2.log" ;;&
    profile|all) mkdir -p "$OUT/prof" && NANOVLLM_PROFILE_DIR="$OUT/prof" python3 bench.py ${BENCH_ARGS:-} 2>&1 | grep -E "tok/s|roofline:" && head -14 "$OUT/prof/worker0.torch.txt" ;;&
    cprofile) mkdir -p "$OUT/cprof" && NANOVLLM_CPROFILE_DIR="$OUT/cprof" python3 bench.py 2>&1 | grep -E "tok/s|roofline:" && head -60 "$OUT/cprof/worker0.cprofile.txt" ;;&
    cprofile-latency) mkdir -p "$OUT/cprof" && NANOVLLM_CPROFILE_DIR="$OUT/cprof" python3 bench_latency.py --batch-sizes 1 --repeats 5 ${BENCH_ARGS:-} 2>&1 | tail -2 && head -45 "$OUT/cprof/worker0.cprofile.txt" ;;&
    profile-latency) mkdir -p "$OUT/prof_lat" && NANOVLLM_PROFILE_STEPS=${PROFILE_STEPS:-60,100} NANOVLLM_PROFILE_DIR="$OUT/prof_lat" python3 bench_latency.py --batch-sizes ${PROFILE_BATCH:-1} --repeats 1 ${BENCH_ARGS:-} 2>&1 | tail -2 && head -14 "$OUT/prof_lat/worker0.torch.txt" ;;&
    profile-prefill) mkdir -p "$OUT/prof_pre" && NANOVLLM_PROFILE_STEPS=${PROFILE_STEPS:-20,24} NANOVLLM_PROFILE_DIR="$OUT/prof_pre" NANOVLLM_STEP_TIMING=1 python3 bench.py ${BENCH_ARGS:-} 2>&1 | grep -E "tok/s|roofline:|prefill" && head -14 "$OUT/prof_pre/worker0.torch.txt" ;;&
    probe) python3 scripts/probe.py ${PROBE_ARGS:-} --json "$OUT/probe.json" 2>&1 | tee "$OUT/probe.log" ;;&
    sweep) python3 scripts/kernel_sweep.py ${SWEEP_ARGS:-} --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" ;;&
    decode-step) python3 scripts/decode_step.py --json "$OUT/decode_step.json" 2>&1 | grep -v "^W1122" | tee "$OUT/decode_step.log" ;;&
    fa3) python3 -c "from workers.flash_attention import flash_attn_version as v; print('flash-attn version:', v())"
      python3 -m pytest -q -rs tests/test_gpu.py -k flash 2>&1 | tee "$OUT/fa3_tests.log" | tail -5
      python3 scripts/attention_yardstick.py --json "$OUT/attention_yardstick.json" 2>&1 | tee "$OUT/attention_yardstick.log" ;;&
    ab) if [ ! -d ab_dir ]; then echo "ab: no ./ab_dir (bash scripts/gpu_session.sh ab-tree COMMIT, on the CPU machine)"
        else
          for round in $(seq "${AB_ROUNDS:-2}"); do
            echo "== new (round $round)"; python3 ${AB_CMD:-bench_latency.py --batch-sizes 1,64 --repeats 3} 2>&1 | tail -${AB_TAIL:-4}
            echo "== old (round $round)"; (cd ab_dir && PYTHONPATH=$PWD:$SITE_PATH python3 ${AB_CMD:-bench_latency.py --batch-sizes 1,64 --repeats 3} 2>&1 | tail -${AB_TAIL:-4})
          done 2>&1 | tee "$OUT/ab.log"
        fi ;;&
    env-ab) read -ra variants <<< "${AB_ENVS:?env-ab needs AB_ENVS, e.g. NANOVLLM_PDL=0 NANOVLLM_PDL=1}"
        ab_variants env "${variants[@]}" 2>&1 | tee "$OUT/env_ab.log" ;;&
    arg-ab) IFS=';' read -ra variants <<< "${AB_ARGS:?arg-ab needs AB_ARGS, e.g. --block-size 16;--block-size 64}"
        ab_variants arg "${variants[@]}" 2>&1 | tee "$OUT/arg_ab.log" ;;&
    latency|all) python3 bench_latency.py ${BENCH_ARGS:-} --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log" ;;
  esac
done
