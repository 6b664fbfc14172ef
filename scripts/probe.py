"""GPU only, exploratory: candidate kernels against what the engine runs (the engine does not import this).

    python scripts/probe.py [--json out.json] [--only small,attn,gemm]

- small: workers.kernels.small_linear against cuBLAS at 1-4 rows (and cuBLAS at 8), per Qwen3-0.6B layer GEMM;
- attn: the decode kernel over splits x tile x warps x stages at batch 256 / 128 / 64 / 8;
- gemm: cuBLAS vs cuBLASLt vs tensor-core and CUDA-core Triton GEMMs at 1-16,384 rows.
Timings are CUDA graphs of 28 back-to-back calls on distinct memory (kernel_sweep.graph_time). Results of the
2026-11-22 runs: docs/benchmarks.md, "Probes of this session" (the sampler variants there were timed with
this script's earlier version, at commit `dc56805`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import measure_copy_bandwidth  # noqa: E402
from scripts.kernel_sweep import graph_time, paged_caches  # noqa: E402
from workers.kernels import triton_attention as ta  # noqa: E402
from workers.kernels.triton_attention import device_sms  # noqa: E402

HQ, HKV, D, LAYERS, HIDDEN, INTER, VOCAB, BLOCK = 16, 8, 128, 28, 1024, 3072, 151936, 16
SHAPES = {"qkv": (HIDDEN, (HQ + 2 * HKV) * D), "o": (HQ * D, HIDDEN), "gate_up": (HIDDEN, 2 * INTER),
          "down": (INTER, HIDDEN)}


@triton.jit
def _dot_linear(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :])
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None])


@triton.jit
def _fma_linear(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    # rows of x one at a time on CUDA cores: for M <= 8, no padding of M to 16
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for m in tl.static_range(BLOCK_M):
        if m < M:
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :])
                x = tl.load(x_ptr + m * stride_xm + k0 + offs_k)
                acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            tl.store(y_ptr + m * stride_ym + offs_n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty))


def run_linear(kernel, x, w, y, bm, bn, bk, stages, warps):
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm) if kernel is _dot_linear else 1)
    kernel[grid](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 STAGES=stages, num_warps=warps)


def probe_attention(bw, results):
    dev = torch.device("cuda")
    rng = random.Random(0)
    max_blocks = 4096 // BLOCK
    print(f"\n== decode attention variants (us/layer, % of K/V read at copy bw)")
    for batch, lo, hi in ((256, 1024, 1063), (128, 900, 1300), (64, 512, 768), (8, 512, 768)):
        ctx = [rng.randint(lo, hi) for _ in range(batch)]
        caches, table, lens = paged_caches(ctx, dev, max_blocks)
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        floor = sum(ctx) * HKV * D * 2 * 2 / bw
        default_s = ta.choose_num_splits(batch, HKV, max_blocks, BLOCK, device_sms(dev))
        rows = []
        for s in sorted({default_s, max(1, default_s // 2), default_s * 2}):
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3):
                        try:
                            t = graph_time(lambda i: ta._decode_launch(q, *caches[i], table, lens, 0.088, s, out,
                                                                       block_n=bn, num_warps=warps, num_stages=stages))
                        except Exception as e:  # noqa: BLE001
                            print(f"  S={s} bn={bn} w={warps} st={stages}: {type(e).__name__}")
                            continue
                        rows.append((t, s, bn, warps, stages))
                        results["attention"].append(dict(batch=batch, splits=s, block_n=bn, warps=warps,
                                                          stages=stages, seconds=t, floor_s=floor))
        rows.sort()
        base = [r for r in rows if r[1] == default_s and r[2] == 64 and r[3] == 4 and r[4] == 2]
        if base:
            t0 = base[0][0]
            print(f"B={batch} ctx~{sum(ctx) / batch:.0f}: S={default_s} bn64 w4 st2 {t0 * 1e6:.1f} us "
                  f"({100 * floor / t0:.1f}%)")
        for t, s, bn, w, st in rows[:5]:
            print(f"   S={s:>2} bn={bn:>3} w={w} st={st}: {t * 1e6:7.1f} us ({100 * floor / t:.1f}%)")
        del caches


def probe_gemm(bw, results):
    dev = torch.device("cuda")
    print(f"\n== GEMMs per layer (us), 28 distinct weights per graph")
    weights = {name: [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
               for name, (k, n) in SHAPES.items()}
    for m in (1, 8, 16, 32, 64, 128, 256, 16384):
        for name, (k, n) in SHAPES.items():
            ws = weights[name]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, ws[0]).float()
            line = {}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                line[lib] = graph_time(lambda i: torch.nn.functional.linear(x, ws[i]), repeats=LAYERS)
            torch.backends.cuda.preferred_blas_library("cublas")
            best = None
            if m <= 256:
                y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                configs = []
                if m <= 16:
                    configs += [(_dot_linear, 16, bn, bk, st, w) for bn in (16, 32, 64) for bk in (128, 256)
                                for st in (2, 4) for w in (2, 4)]
                    if m <= 8:
                        configs += [(_fma_linear, m, bn, bk, st, w) for bn in (8, 16) for bk in (256, 512)
                                    for st in (2, 4) for w in (4,)]
                elif m <= 64:
                    configs += [(_dot_linear, bm, bn, bk, st, w) for bm in (16, 32, 64) for bn in (32, 64)
                                for bk in (64, 128) for st in (3, 4) for w in (4,)]
                else:
                    configs += [(_dot_linear, bm, bn, bk, st, w) for bm in (64, 128) for bn in (64, 128)
                                for bk in (64, 128) for st in (3, 4) for w in (4, 8)]
                for cfg in configs:
                    kern, bm, bn, bk, st, w = cfg
                    if k % bk or n % bn:
                        continue
                    try:
                        run_linear(kern, x, ws[0], y, bm, bn, bk, st, w)
                        err = (y.float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
                        if err > 2e-2:
                            print(f"   {name} m={m} {kern.__name__} {cfg[1:]}: wrong (rel {err:.2e})")
                            continue
                        t = graph_time(lambda i: run_linear(kern, x, ws[i], y, bm, bn, bk, st, w), repeats=LAYERS)
                    except Exception as e:  # noqa: BLE001
                        print(f"   {name} m={m} {kern.__name__} {cfg[1:]}: {type(e).__name__} {str(e)[:80]}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, kern.__name__, cfg[1:])
            floor = n * k * 2 / bw
            extra = f"  triton best {best[0] * 1e6:6.1f} {best[1]} {best[2]}" if best else ""
            print(f"M={m:>5} {name:>8}: cublas {line['cublas'] * 1e6:7.1f}  cublaslt {line['cublaslt'] * 1e6:7.1f}"
                  f"  floor {floor * 1e6:5.1f}{extra}")
            results["gemm"].append(dict(m=m, name=name, cublas=line["cublas"], cublaslt=line["cublaslt"],
                                        triton=best[0] if best else None, triton_cfg=str(best[1:]) if best else None,
                                        floor_s=floor))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--only", default="small,attn,gemm")
    args = p.parse_args()
    bw = measure_copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s")
    results = {"copy_bandwidth": bw, "attention": [], "gemm": [], "small_linear": []}
    parts = args.only.split(",")
    t0 = time.time()
    for part, fn in (("small", lambda: probe_small_linear(bw, results)), ("attn", lambda: probe_attention(bw, results)),
                     ("gemm", lambda: probe_gemm(bw, results))):
        if part in parts:
            fn()
            print(f"[{part} done at {time.time() - t0:.0f} s]", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
