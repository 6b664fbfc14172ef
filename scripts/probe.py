"""GPU only, exploratory: candidate kernels against what the engine runs (the engine does not import this).

    python scripts/probe.py [--json out.json] [--only small,sampler,attn,gemm]

- small: workers.kernels.small_linear against cuBLAS at 1-4 rows (and cuBLAS at 8), per Qwen3-0.6B layer GEMM;
- sampler: Gumbel-max variants (exact log, log2, libdevice fast_logf, one hash round) at batch 1-256;
- attn: the decode kernel over splits x tile x warps x stages at batch 256 / 128 / 64 / 8;
- gemm: cuBLAS vs cuBLASLt vs tensor-core and CUDA-core Triton GEMMs at 1-16,384 rows.
Timings are CUDA graphs of 28 back-to-back calls on distinct memory (kernel_sweep.graph_time). Results of the
2026-11-22 runs: docs/benchmarks.md, "Probes of this session".
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
from scripts.kernel_sweep import graph_time  # noqa: E402
from workers.kernels import triton_attention as ta  # noqa: E402
from workers.kernels.sampling import gumbel_argmax, _hash32, MAX_CHUNKS, num_vocab_chunks, _gumbel_reduce_kernel  # noqa: E402
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


# ---- sampler variants ---------------------------------------------------------------------------


@triton.jit(do_not_specialize=["chunk_len"])
def _gumbel_variant(logits_ptr, stride_row, temps_ptr, seeds_ptr, positions_ptr, best_val_ptr, best_idx_ptr,
                    vocab_size, chunk_len, MAX_CHUNKS: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temp = tl.load(temps_ptr + row)
    seed = (tl.load(seeds_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    pos = (tl.load(positions_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    key = _hash32(_hash32(seed) ^ pos)
    inv_temp = tl.where(temp > 0, 1.0 / tl.maximum(temp, 1e-30), 1.0)
    use_noise = temp > 0
    first = chunk * chunk_len
    last = tl.minimum(first + chunk_len, vocab_size)
    best_val = float("-inf")
    best_idx = first
    for start in range(first, last, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < last
        x = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if MODE == 3:
            bits = _hash32(key ^ offs.to(tl.uint32))
        else:
            bits = _hash32(_hash32(key ^ offs.to(tl.uint32)) ^ key)
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        if MODE == 1:
            gumbel = -0.6931471805599453 * tl.log2(-0.6931471805599453 * tl.log2(u))
        elif MODE == 2:
            gumbel = -tl.extra.cuda.libdevice.fast_logf(-tl.extra.cuda.libdevice.fast_logf(u))
        else:
            gumbel = -tl.log(-tl.log(u))
        score = tl.where(use_noise, x * inv_temp + gumbel, x)
        score = tl.where(mask, score, float("-inf"))
        tile_max = tl.max(score, axis=0)
        tile_idx = tl.argmax(score, axis=0) + start
        better = tile_max > best_val
        best_idx = tl.where(better, tile_idx, best_idx)
        best_val = tl.where(better, tile_max, best_val)
    tl.store(best_val_ptr + row * MAX_CHUNKS + chunk, best_val)
    tl.store(best_idx_ptr + row * MAX_CHUNKS + chunk, best_idx.to(tl.int64))


def gumbel_variant(logits, temps, seeds, pos, mode, block=4096, warps=8, per_sm=4):
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    sms = device_sms(logits.device)
    chunks = max(1, min(MAX_CHUNKS, -(-vocab // block), -(-per_sm * sms // batch)))
    tiles = -(-vocab // block)
    chunk_tiles = -(-tiles // chunks)
    chunk_len, chunks = chunk_tiles * block, -(-tiles // chunk_tiles)
    best_val = torch.empty(batch, MAX_CHUNKS, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(batch, MAX_CHUNKS, dtype=torch.int64, device=logits.device)
    _gumbel_variant[(batch, chunks)](logits, logits.stride(0), temps, seeds, pos, best_val, best_idx, vocab, chunk_len,
                                     MAX_CHUNKS=MAX_CHUNKS, BLOCK=block, MODE=mode, num_warps=warps)
    _gumbel_reduce_kernel[(batch,)](best_val, best_idx, out, chunks, MAX_CHUNKS=MAX_CHUNKS, num_warps=1)
    return out


def probe_attention(bw, results):
    dev = torch.device("cuda")
    rng = random.Random(0)
    max_blocks = 4096 // BLOCK
    print(f"\n== decode attention variants (us/layer, % of K/V read at copy bw)")
    for batch, lo, hi in ((256, 1024, 1063), (128, 900, 1300), (64, 512, 768), (8, 512, 768)):
        ctx = [rng.randint(lo, hi) for _ in range(batch)]
        need = sum(-(-c // BLOCK) for c in ctx)
        caches = [(torch.randn(need + 1, BLOCK, HKV, D, device=dev, dtype=torch.bfloat16),
                   torch.randn(need + 1, BLOCK, HKV, D, device=dev, dtype=torch.bfloat16)) for _ in range(LAYERS)]
        perm = torch.randperm(need).tolist()
        table = torch.zeros(batch, max_blocks, dtype=torch.int32)
        used = 0
        for b, c in enumerate(ctx):
            n = -(-c // BLOCK)
            table[b, :n] = torch.tensor(perm[used:used + n])
            used += n
        table = table.to(dev)
        lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
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
            print(f"B={batch} ctx~{sum(ctx) / batch:.0f}: current (S={default_s} bn64 w4 st2) {base[0][0] * 1e6:.1f} us "
                  f"({100 * floor / base[0][0]:.1f}%)")
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


def probe_sampler(results):
    dev = torch.device("cuda")
    print(f"\n== sampler variants (us)")
    for batch in (1, 8, 64, 256):
        logits = torch.randn(batch, VOCAB, device=dev, dtype=torch.bfloat16) * 3
        temps = torch.full((batch,), 0.6, device=dev)
        seeds = torch.arange(batch, device=dev)
        pos = torch.zeros(batch, dtype=torch.int64, device=dev)
        ref = gumbel_argmax(logits, temps, seeds, pos)
        line = [f"B={batch:>3}: current {graph_time(lambda i: gumbel_argmax(logits, temps, seeds, pos), repeats=1) * 1e6:6.1f}"]
        for mode, label in ((0, "same"), (1, "log2"), (2, "fastlog"), (3, "1hash")):
            for warps, per_sm in ((8, 4), (4, 8), (16, 2)):
                try:
                    got = gumbel_variant(logits, temps, seeds, pos, mode, warps=warps, per_sm=per_sm)
                    agree = (got == ref).float().mean().item()
                    t = graph_time(lambda i: gumbel_variant(logits, temps, seeds, pos, mode, warps=warps,
                                                            per_sm=per_sm), repeats=1)
                except Exception as e:  # noqa: BLE001
                    line.append(f"{label}/w{warps}/p{per_sm} {type(e).__name__}")
                    continue
                line.append(f"{label}/w{warps}/p{per_sm} {t * 1e6:6.1f} (agree {agree:.2f})")
                results["sampler"].append(dict(batch=batch, mode=label, warps=warps, per_sm=per_sm, seconds=t,
                                               agree=agree))
        print("  ".join(line))


def probe_small_linear(bw, results):
    from workers.kernels.small_linear import small_linear
    dev = torch.device("cuda")
    print(f"\n== small_linear (product kernel) vs cuBLAS, us per layer")
    weights = {name: [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
               for name, (k, n) in SHAPES.items()}
    for m in (1, 2, 3, 4, 8):
        line = [f"M={m}"]
        for name, (k, n) in SHAPES.items():
            ws = weights[name]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t_cublas = graph_time(lambda i: torch.nn.functional.linear(x, ws[i]), repeats=LAYERS)
            t_small = None
            if m <= 4:
                ref = torch.nn.functional.linear(x, ws[0]).float()
                err = (small_linear(x, ws[0]).float() - ref).abs().max().item() / ref.abs().max().item()
                assert err < 2e-2, err
                t_small = graph_time(lambda i: small_linear(x, ws[i]), repeats=LAYERS)
            line.append(f"{name} cublas {t_cublas * 1e6:5.1f} small {t_small * 1e6 if t_small else float('nan'):5.1f}")
            results["small_linear"].append(dict(m=m, name=name, cublas=t_cublas, small=t_small))
        print("  ".join(line))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--only", default="small,sampler,attn,gemm")
    args = p.parse_args()
    bw = measure_copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s")
    results = {"copy_bandwidth": bw, "attention": [], "gemm": [], "sampler": [], "small_linear": []}
    parts = args.only.split(",")
    t0 = time.time()
    for part, fn in (("small", lambda: probe_small_linear(bw, results)), ("sampler", lambda: probe_sampler(results)), ("attn", lambda: probe_attention(bw, results)),
                     ("gemm", lambda: probe_gemm(bw, results))):
        if part in parts:
            fn()
            print(f"[{part} done at {time.time() - t0:.0f} s]", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
