"""GPU only: time the decode-step pieces at the batch sizes and context lengths bench.py goes through.

    python scripts/kernel_sweep.py [--json out.json]

For each decode batch size B of bench.py's workload (prompts U[100, 1024], outputs U[100, 1024]: at step t
the survivors have contexts prompt + t), it times
- the split-KV decode attention of one layer for several split counts S (and the S that
  ``choose_num_splits`` picks), as a share of reading that K/V once at the measured copy bandwidth;
- the GEMMs of one layer and the LM head (cuBLAS via torch), against reading their weights once;
- the Gumbel-max sampler over B x vocab logits.
Qwen3-0.6B shapes, bf16, block size 16. Times are medians of CUDA-event-timed CUDA-graph replays of
28 back-to-back launches (one per layer), so launch overhead is excluded as it is in the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import measure_copy_bandwidth  # noqa: E402
from workers.kernels import triton_attention as ta  # noqa: E402
from workers.kernels.sampling import gumbel_argmax  # noqa: E402

HQ, HKV, D, LAYERS, HIDDEN, INTER, VOCAB, BLOCK = 16, 8, 128, 28, 1024, 3072, 151936, 16


def graph_time(fn, repeats: int = LAYERS, iters: int = 20) -> float:
    """Seconds per call of fn(i), from a CUDA graph of fn(0) .. fn(repeats - 1) replayed `iters` times
    (median). Each i should touch its own memory (one layer's cache or weights), so L2 does not help."""
    for i in range(repeats):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(repeats):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / repeats)
    return sorted(times)[len(times) // 2]


def paged_caches(ctx, dev, max_blocks: int, block: int = BLOCK):
    """One bf16 K/V cache per layer holding the given contexts in shuffled blocks: (caches, block table,
    context lengths), Qwen3-0.6B heads, blocks of ``block`` positions."""
    blocks_needed = sum(-(-c // block) for c in ctx)
    caches = [(torch.randn(blocks_needed + 1, block, HKV, D, device=dev, dtype=torch.bfloat16),
               torch.randn(blocks_needed + 1, block, HKV, D, device=dev, dtype=torch.bfloat16))
              for _ in range(LAYERS)]
    perm = torch.randperm(blocks_needed, device="cpu").tolist()
    table = torch.zeros(len(ctx), max_blocks, dtype=torch.int32)
    used = 0
    for b, c in enumerate(ctx):
        n = -(-c // block)
        table[b, :n] = torch.tensor(perm[used:used + n])
        used += n
    return caches, table.to(dev), torch.tensor(ctx, dtype=torch.int32, device=dev)


def contexts(batch: int, rng: random.Random):
    """Contexts of the B survivors at the step where bench.py's batch has shrunk to B."""
    step = int(100 + 924 * (1 - batch / 256))  # outputs U[100, 1024]: B = 256 * P(output > step)
    return [rng.randint(100, 1024) + step for _ in range(batch)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--skip-attention", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    bw = measure_copy_bandwidth()
    rng = random.Random(0)
    results = {"copy_bandwidth": bw, "attention": [], "gemm": [], "sampler": []}
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s")
    max_blocks = 4096 // BLOCK
    print(f"\n{'B':>4} {'mean ctx':>8} {'S':>3} {'us/layer':>9} {'% of floor':>10}")
    for batch in () if args.skip_attention else (256, 192, 128, 96, 64, 48, 32, 16, 8, 1):
        ctx = contexts(batch, rng)
        caches, table, lens = paged_caches(ctx, dev, max_blocks)
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        floor = sum(ctx) * HKV * D * 2 * 2 / bw
        default = ta.choose_num_splits(batch, HKV, max_blocks, BLOCK, torch.cuda.get_device_properties(0).multi_processor_count)
        for s in sorted({1, 2, 4, 8, 16, 32, default}):
            t = graph_time(lambda i: ta.paged_decode_attention(q, *caches[i], table, lens, 0.088, num_splits=s,
                                                               out=out))
            mark = " (default)" if s == default else ""
            print(f"{batch:>4} {sum(ctx) / batch:>8.0f} {s:>3} {t * 1e6:>9.1f} {100 * floor / t:>9.1f}%{mark}")
            results["attention"].append({"batch": batch, "mean_ctx": sum(ctx) / batch, "splits": s,
                                         "default": s == default, "seconds": t, "floor_s": floor})
        del caches

    print(f"\n{'M':>4} {'gemm':>12} {'us':>8} {'% of weight-read floor':>22}")
    shapes = {"qkv": (HIDDEN, (HQ + 2 * HKV) * D), "o": (HQ * D, HIDDEN), "gate_up": (HIDDEN, 2 * INTER),
              "down": (INTER, HIDDEN), "lm_head": (HIDDEN, VOCAB)}
    for m in (1, 8, 64, 128, 256, 512):
        for name, (k, n) in shapes.items():
            layers = 1 if name == "lm_head" else LAYERS
            ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t = graph_time(lambda i: torch.nn.functional.linear(x, ws[i]), repeats=layers)
            floor = n * k * 2 / bw
            print(f"{m:>4} {name:>12} {t * 1e6:>8.1f} {100 * floor / t:>21.1f}%")
            results["gemm"].append({"m": m, "name": name, "seconds": t, "floor_s": floor})

    print(f"\n{'B':>4} {'sampler us':>10}")
    for batch in (1, 8, 64, 256):
        logits = torch.randn(batch, VOCAB, device=dev, dtype=torch.bfloat16)
        temps = torch.full((batch,), 0.6, device=dev)
        seeds = torch.arange(batch, device=dev)
        pos = torch.zeros(batch, dtype=torch.int64, device=dev)
        t = graph_time(lambda i: gumbel_argmax(logits, temps, seeds, pos), repeats=1)
        print(f"{batch:>4} {t * 1e6:>10.1f}")
        results["sampler"].append({"batch": batch, "seconds": t})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
