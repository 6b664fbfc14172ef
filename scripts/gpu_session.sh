#!/usr/bin/env bash
# One call on a lent GPU machine: GPU tests, then the benchmarks. Usage (from the repo root, on the device):
#   bash scripts/gpu_session.sh [tests|bench|bench-tp2|profile|latency|all]...
# Writes logs and JSON under $OUT (or ./gpu_out). `profile` runs bench.py with the worker's torch-profiler
# window (steps 300-330, NANOVLLM_PROFILE_DIR) and prints the device busy/idle share of that window.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ! python3 -c "import zmq" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for what in "${@:-all}"; do
  case $what in
    tests|all) python3 -m pytest -q -x tests/test_gpu.py tests/test_sampler.py tests/test_fused_kernels.py tests/test_triton_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -3 ;;&
    bench|all) NANOVLLM_STEP_TIMING=1 python3 bench.py --runs 2 --json "$OUT/bench.json" 2>&1 | grep -v "^W1122" | tee "$OUT/bench.log" ;;&
    bench-tp2|all) NANOVLLM_STEP_TIMING=1 python3 bench.py --tp 2 --json "$OUT/bench_tp2.json" 2>&1 | grep -v "^W1122" | tee "$OUT/bench_tp2.log" ;;&
    profile|all) mkdir -p "$OUT/prof" && NANOVLLM_PROFILE_DIR="$OUT/prof" python3 bench.py 2>&1 | grep -E "tok/s|roofline:" && head -1 "$OUT/prof/worker0.torch.txt" ;;&
    latency|all) python3 bench_latency.py --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log" ;;
  esac
done
