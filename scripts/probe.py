"""GPU only, exploratory: candidate kernels against what the engine runs (the engine does not import this).

    python scripts/probe.py [--json out.json] [--only attn,split1,order,twin,twinskew,blocks,dgemm,lmhead,qkvrope,qkvparts,prefill,prefillpack,fa2,sampler,tma]

- attn: the decode kernel over splits (1, 2 and the rule's S, S / 2, 2 S) x tile x stages (PROBE_STAGES,
  default 2,3,4; 4 warps) at PROBE_BATCHES (default 256,128,64,8; also 32, 48, 80, 96 with bench_latency's
  512-768-token contexts, 64F with 640 tokens each, and 64L, 32L with bench.py's late 900-2000-token ones);
- split1: at decode graph sizes 16-128 (PROBE_BATCHES), the rule's kernel against one split with 64- and
  128-token tiles (and two splits) by the batch's longest context, contexts flat or spread;
- dgemm: workers.kernels.decode_gemm (block sizes x split-K x stages) against cuBLAS at 8-256 rows, with the
  following RMSNorm where the output is the hidden size (the consumer of the split-K partial sums);
- lmhead: the LM head at 8-64 rows, cuBLAS against decode_gemm's tiles;
- prefill: the Triton prefill attention over BLOCK_M x BLOCK_N x warps x stages at one of bench.py's prefill
  steps (prompts U[100, 1024] up to 16,384 tokens, no cached prefix), in causal TFLOP/s;
- prefillpack: prefill tiles packing a KV head's query-head group against a tile per q head, at that step
  and at the decode rows riding along in chunked-prefill steps (there also against the decode kernel);
- fa2: torch's FlashAttention-2 (aten._flash_attention_forward) on that prefill step, grouped and expanded
  K/V, against the Triton prefill kernel;
- qkvrope: decode_gemm.qkv_rope (the q/k/v projection with q/k norm, rotary and the K/V cache write fused)
  over its row-tile sizes, against the projection as parallel.layers._linear runs it + fused.qk_norm_rope
  (PROBE_ROWS: the batch sizes, comma-separated);
- qkvparts: qkv_rope without the q/k norm with a head's rotary pairs over 1, 2 or 4 programs, over row and K
  tiles, against the normed one-program kernel and the plain projection (PROBE_ROWS);
- order: the engine's decode attention at bench.py's contexts by batch (PROBE_BATCHES), sequences in drawn
  order, longest first and shortest first (PROBE_SPLITS: split counts to time besides the rule's);
- twin: the decode graphs with a one-split twin, 90-100 % full of bench.py's contexts longest first, the
  rule's split count against one split (PROBE_BATCHES, PROBE_SEEDS);
- twinskew: the one-split twin's guard: full 80- and 96-row graphs of bench.py's contexts with one context k x
  the mean (PROBE_SKEW), the rule's split count against one split;
- blocks: the engine's decode attention by KV block size (16, 64, 128) and block placement (random over an
  engine-sized pool, or each sequence's blocks contiguous), at batch 8 / 64 / 256 with bench contexts;
- tma: the one-split decode attention with its K/V tiles by TMA against the pointer-load kernel, by KV block
  size (16, 64, 128), tile and stages (PROBE_BATCHES);
- sampler: workers.kernels.sampling.gumbel_argmax at batch 1-256 over Qwen3's vocabulary, and torch.argmax
  (all-greedy batches).
Timings are CUDA graphs of 28 back-to-back calls on distinct memory (kernel_sweep.graph_time). Results of the
2026-11-22 runs: docs/benchmarks.md, "Probes of this session" (the sampler variants there were timed with
this script's earlier version, at commit `dc56805`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import measure_copy_bandwidth  # noqa: E402
from scripts.kernel_sweep import contexts, graph_time, paged_caches  # noqa: E402
from workers.kernels import triton_attention as ta  # noqa: E402
from workers.kernels.triton_attention import device_sms  # noqa: E402

HQ, HKV, D, LAYERS, HIDDEN, INTER, VOCAB, BLOCK = 16, 8, 128, 28, 1024, 3072, 151936, 16
SHAPES = {"qkv": (HIDDEN, (HQ + 2 * HKV) * D), "o": (HQ * D, HIDDEN), "gate_up": (HIDDEN, 2 * INTER),
          "down": (INTER, HIDDEN)}


def probe_attention(bw, results):
    dev = torch.device("cuda")
    rng = random.Random(0)
    max_blocks = 4096 // BLOCK
    print("\n== decode attention variants (us/layer, % of K/V read at copy bw)")
    # (label, batch, context range): bench_latency's contexts (512-768) and, "L", bench.py's late, long ones
    cases = [(str(b), b, 512, 768) for b in (8, 32, 48, 64, 80, 96)] + [
        ("256", 256, 1024, 1063), ("128", 128, 900, 1300), ("64L", 64, 900, 2000), ("32L", 32, 900, 2000),
        ("64F", 64, 640, 640)]  # F: equal contexts, the one-split graph's case
    wanted = os.environ.get("PROBE_BATCHES", "256,128,64,8").split(",")
    for label, batch, lo, hi in cases:
        if label not in wanted:
            continue
        ctx = [rng.randint(lo, hi) for _ in range(batch)]
        caches, table, lens = paged_caches(ctx, dev, max_blocks)
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        floor = sum(ctx) * HKV * D * 2 * 2 / bw
        default_s = ta.choose_num_splits(batch, HKV, max_blocks, BLOCK, device_sms(dev))
        rows = []
        warps = 4  # 8 warps were slower everywhere (2026-11-22 sweep)
        splits = sorted({1, 2, default_s, max(1, default_s // 2), default_s * 2})
        stage_list = [int(x) for x in os.environ.get("PROBE_STAGES", "2,3,4").split(",")]
        for s, bn, stages in itertools.product(splits, (32, 64, 128), stage_list):
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
        dn, dw, dst = ta._decode_config(default_s, D, 2, batch * HKV * default_s, device_sms(dev))
        base = [r for r in rows if r[1:] == (default_s, dn, dw, dst)]
        if base:
            t0 = base[0][0]
            print(f"B={label} ctx~{sum(ctx) / batch:.0f}: engine S={default_s} bn{dn} w{dw} st{dst} {t0 * 1e6:.1f} us "
                  f"({100 * floor / t0:.1f}%)")
        for t, s, bn, w, st in rows[:8]:
            print(f"   S={s:>2} bn={bn:>3} w={w} st={st}: {t * 1e6:7.1f} us ({100 * floor / t:.1f}%)")
        del caches


def probe_order(bw, results):
    """The engine's decode attention over bench.py's contexts at the batch sizes its batch shrinks through,
    with the sequences in drawn order, longest first and shortest first: what the order in which programs
    are dispatched costs when a batch's contexts differ (one split walks a whole context per program)."""
    dev = torch.device("cuda")
    rng = random.Random(0)
    max_blocks = 4096 // BLOCK
    print("\n== decode attention by the order of the sequences (us/layer, % of K/V at copy bw)")
    for batch in [int(b) for b in os.environ.get("PROBE_BATCHES", "256,224,192,160,128,96,64,32").split(",")]:
        drawn = contexts(batch, rng)
        s = ta.choose_num_splits(batch, HKV, max_blocks, BLOCK, device_sms(dev))
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        floor = sum(drawn) * HKV * D * 2 * 2 / bw
        row = {}
        # the rule's split count, and (PROBE_SPLITS) others with their own default tiles
        extra = [int(x) for x in os.environ.get("PROBE_SPLITS", "").split(",") if x and int(x) != s]
        for order, ctx in (("drawn", drawn), ("longest_first", sorted(drawn, reverse=True)),
                           ("shortest_first", sorted(drawn))):
            caches, table, lens = paged_caches(ctx, dev, max_blocks)
            for splits in [s] + extra:
                label = order if splits == s else f"{order}_S{splits}"
                row[label] = graph_time(lambda i: ta._decode_launch(q, *caches[i], table, lens, 0.088, splits, out))
            del caches
        print(f"B={batch:>3} S={s} ctx {min(drawn)}-{max(drawn)}: " +
              "  ".join(f"{k} {v * 1e6:6.1f} ({100 * floor / v:.1f}%)" for k, v in row.items()), flush=True)
        results["order"].append(dict(batch=batch, splits=s, floor_s=floor, **row))


def probe_twin(bw, results):
    """The decode graphs that have a one-split twin (PROBE_BATCHES: graph sizes, default 48,64,80,96), filled
    to 90 % and 100 % with bench.py's contexts in the engine's order (longest first, padded rows last with
    context 0): the rule's split count against one split, over PROBE_SEEDS draws (default 4)."""
    dev = torch.device("cuda")
    max_blocks = 4096 // BLOCK
    print("\n== one-split twin at bench.py's contexts, rows longest first (us/layer)")
    seeds = int(os.environ.get("PROBE_SEEDS", "4"))
    for size in [int(b) for b in os.environ.get("PROBE_BATCHES", "48,64,80,96").split(",")]:
        s = ta.choose_num_splits(size, HKV, max_blocks, BLOCK, device_sms(dev))
        q = torch.randn(size, HQ, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        for fill in (0.9, 1.0):
            rows = -(-int(size * fill * 10) // 10)
            times = {"rule": [], "one": []}
            for seed in range(seeds):
                ctx = sorted(contexts(rows, random.Random(seed)), reverse=True) + [0] * (size - rows)
                caches, table, lens = paged_caches(ctx, dev, max_blocks)
                times["rule"].append(graph_time(lambda i: ta._decode_launch(q, *caches[i], table, lens, 0.088, s, out)))
                times["one"].append(graph_time(lambda i: ta._decode_launch(q, *caches[i], table, lens, 0.088, 1, out)))
                del caches
            rule, one = (sum(v) / len(v) for v in (times["rule"], times["one"]))
            print(f"graph {size:>3} rows {rows:>3}: rule S={s} {rule * 1e6:6.1f}  one split {one * 1e6:6.1f}  "
                  f"({one / rule:.3f}; per draw {' '.join(f'{a / b:.3f}' for a, b in zip(times['one'], times['rule']))})",
                  flush=True)
            results["twin"].append(dict(size=size, rows=rows, splits=s, rule=times["rule"], one=times["one"]))


def probe_twin_skew(bw, results):
    """The one-split twin's guard (model_runner.SINGLE_SPLIT_WAVES_MAX_OVER_MEAN): full decode graphs
    (PROBE_BATCHES, default 80,96) of bench.py's contexts in which one sequence is k times the batch's mean
    context (PROBE_SKEW, default 1.5,2,2.5,3,4), longest first: the rule's split count against one split."""
    dev = torch.device("cuda")
    max_blocks = 4096 // BLOCK  # the engine's table width at bench.py's max_model_len sets the split count
    print("\n== one-split twin with one context k x the mean, rows longest first (us/layer)")
    for size in [int(b) for b in os.environ.get("PROBE_BATCHES", "80,96").split(",")]:
        s = ta.choose_num_splits(size, HKV, max_blocks, BLOCK, device_sms(dev))
        q = torch.randn(size, HQ, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        for k in [float(x) for x in os.environ.get("PROBE_SKEW", "1.5,2,2.5,3,4").split(",")]:
            others = contexts(size - 1, random.Random(0))
            # long / mean = k with the mean over all rows: long = k * sum(others) / (size - k)
            ctx = [round(k * sum(others) / (size - k))] + sorted(others, reverse=True)
            caches, table, lens = paged_caches(ctx, dev, -(-max(ctx) // BLOCK))
            rule = graph_time(lambda i: ta._decode_launch(q, *caches[i], table, lens, 0.088, s, out))
            one = graph_time(lambda i: ta._decode_launch(q, *caches[i], table, lens, 0.088, 1, out))
            del caches
            print(f"graph {size:>3} longest {ctx[0]:>5} = {k:.1f} x mean: rule S={s} {rule * 1e6:6.1f}  one split "
                  f"{one * 1e6:6.1f}  ({one / rule:.3f})", flush=True)
            results["twin_skew"].append(dict(size=size, k=k, longest=ctx[0], splits=s, rule=rule, one=one))


def probe_block_sizes(bw, results):
    """The engine's decode attention config by KV block size and placement. Each layer's K and V cache is a
    pool of ~1.5 GB (the engine's are ~2 GB at gpu_memory_utilization 0.9), and a sequence's blocks are either
    drawn at random from it or one contiguous run: which of block-table gathers, block size and locality
    costs what."""
    dev = torch.device("cuda")
    rng = random.Random(0)
    pool_gb = float(os.environ.get("PROBE_POOL_GB", "1.5"))
    print("\n== decode attention by KV block size and placement (us/layer, % of K/V at copy bw)")
    for batch, lo, hi in ((8, 1300, 1700), (64, 512, 768), (64, 640, 640), (128, 900, 1300), (256, 1024, 1063)):
        ctx = [rng.randint(lo, hi) for _ in range(batch)]
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        floor = sum(ctx) * HKV * D * 2 * 2 / bw
        for bs in (16, 64, 128):
            num_blocks = int(pool_gb * 1e9) // (bs * HKV * D * 2)
            caches = [(torch.empty(num_blocks, bs, HKV, D, device=dev, dtype=torch.bfloat16).normal_(),
                       torch.empty(num_blocks, bs, HKV, D, device=dev, dtype=torch.bfloat16).normal_())
                      for _ in range(LAYERS)]
            max_blocks = 4096 // bs
            splits = ta.choose_num_splits(batch, HKV, max_blocks, bs, device_sms(dev))
            for placement in os.environ.get("PROBE_PLACEMENTS", "random,contiguous").split(","):
                need = [-(-c // bs) for c in ctx]
                if placement == "random":
                    ids = rng.sample(range(num_blocks), sum(need))
                else:  # runs spread evenly over the pool
                    gap = num_blocks // batch
                    ids = [b * gap + j for b, n in enumerate(need) for j in range(n)]
                table = torch.zeros(batch, max_blocks, dtype=torch.int32)
                used = 0
                for b, n in enumerate(need):
                    table[b, :n] = torch.tensor(ids[used:used + n])
                    used += n
                table, lens = table.to(dev), torch.tensor(ctx, dtype=torch.int32, device=dev)
                # the rule's split count, and one split where the engine also captures a one-split graph
                twin = ta.has_single_split_variant(batch, HKV, max_blocks, bs, device_sms(dev))
                for s in (splits, 1) if twin else (splits,):
                    t = graph_time(lambda i: ta._decode_launch(q, *caches[i], table, lens, 0.088, s, out))
                    print(f"B={batch:>3} ctx~{sum(ctx) / batch:.0f} block {bs:>3} {placement:>10} S={s:>2}: "
                          f"{t * 1e6:7.1f} us ({100 * floor / t:.1f}%)", flush=True)
                    results["blocks"].append(dict(batch=batch, block_size=bs, placement=placement, splits=s,
                                                  seconds=t, floor_s=floor))
            del caches
            torch.cuda.empty_cache()


def probe_tma(bw, results):
    """The one-split decode attention with its K/V tiles by TMA (triton_attention._tma_decode_launch) against
    the pointer-load kernel (the rule's splits and one), by KV block size and the TMA kernel's tile and
    stages, at PROBE_BATCHES (default 32, 64F, 64, 128, 256; bench_latency's and bench.py's contexts)."""
    dev = torch.device("cuda")
    rng = random.Random(0)
    print("\n== decode attention, K/V tiles by TMA (us/layer, % of K/V at copy bw)")
    cases = [("32", 32, 512, 768), ("64F", 64, 640, 640), ("64", 64, 512, 768), ("128", 128, 900, 1300),
             ("256", 256, 1024, 1063)]
    wanted = os.environ.get("PROBE_BATCHES", "32,64F,64,128,256").split(",")
    tma_configs = {64: [(64, 2), (64, 3), (64, 4), (64, 6), (32, 2), (32, 4)], 128: [(64, 2), (64, 4), (128, 2)]}
    for label, batch, lo, hi in cases:
        if label not in wanted:
            continue
        ctx = [rng.randint(lo, hi) for _ in range(batch)]
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        floor = sum(ctx) * HKV * D * 2 * 2 / bw
        rows = []
        for bs in (16, 64, 128):
            caches, table, lens = paged_caches(ctx, dev, 4096 // bs, block=bs)
            rule = ta.choose_num_splits(batch, HKV, table.shape[1], bs, device_sms(dev))
            os.environ["NANOVLLM_TMA_DECODE"] = "0"  # the pointer-load kernel, also at one split
            for s in sorted({rule, 1}):
                rows.append((graph_time(lambda i: ta._decode_launch(q, *caches[i], table, lens, 0.088, s, out)),
                             f"pointer loads, blocks of {bs}, S={s}"))
            del os.environ["NANOVLLM_TMA_DECODE"]
            for bn, stages in tma_configs.get(bs, []):
                rows.append((graph_time(lambda i: ta._tma_decode_launch(q, *caches[i], table, lens, 0.088, out,
                                                                        block_n=bn, stages=stages)),
                             f"TMA, blocks of {bs}, {bn}-position tiles, {stages} stages"))
            del caches
            torch.cuda.empty_cache()
        print(f"B={label} ctx~{sum(ctx) / batch:.0f}, K/V floor {floor * 1e6:.1f} us:", flush=True)
        for t, name in sorted(rows):
            print(f"   {name:<48} {t * 1e6:7.1f} us ({100 * floor / t:.1f}%)", flush=True)
            results["tma"].append(dict(case=label, variant=name, seconds=t, floor_s=floor))


def probe_single_split(bw, results):
    """For each decode graph size that the rule gives several KV splits: the rule's kernel against one split
    (two tile configs) over the longest context in the batch, contexts either all equal to it ("flat") or
    uniform over [L / 2, L] ("wide"): where one split wins, and by how much (the split-KV reduction too)."""
    dev = torch.device("cuda")
    rng = random.Random(0)
    max_blocks = 4096 // BLOCK
    print("\n== one KV split vs the rule's (us/layer), by batch and longest context L")
    # 112 and 128: one split is already the rule there; the row "rule" is its 128-token tiles, against which
    # the 64-token ones run (predicted faster at 7-8 programs per SM; measured, they were not: docs/kernels.md)
    batches = [int(b) for b in os.environ.get("PROBE_BATCHES", "16,32,48,64,80,96,112,128").split(",")]
    for batch in batches:
        rule_s = ta.choose_num_splits(batch, HKV, max_blocks, BLOCK, device_sms(dev))
        rn, rw, rst = ta._decode_config(rule_s, D, 2, batch * HKV * rule_s, device_sms(dev))
        for top in (128, 256, 384, 512, 768, 1024, 1536, 2048):
            for spread in ("flat", "wide"):
                ctx = [top if spread == "flat" else rng.randint(top // 2, top) for _ in range(batch)]
                caches, table, lens = paged_caches(ctx, dev, max_blocks)
                q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
                out = torch.empty_like(q)
                row = {}
                for label, s, bn, st in (("rule", rule_s, rn, rst), ("s1_bn64_st3", 1, 64, 3),
                                         ("s1_bn128_st3", 1, 128, 3), ("s2_bn64_st2", 2, 64, 2)):
                    row[label] = graph_time(lambda i: ta._decode_launch(q, *caches[i], table, lens, 0.088, s, out,
                                                                        block_n=bn, num_warps=rw, num_stages=st))
                best = min((v, k) for k, v in row.items() if k != "rule")
                print(f"B={batch:>3} S={rule_s:>2} L={top:>4} {spread}: rule {row['rule'] * 1e6:6.1f}  " +
                      "  ".join(f"{k} {v * 1e6:6.1f}" for k, v in row.items() if k != "rule") +
                      f"  best/rule {best[0] / row['rule']:.3f}")
                results["single_split"].append(dict(batch=batch, rule_splits=rule_s, longest=top, spread=spread,
                                                    **row))
                del caches


def probe_decode_gemm(bw, results):
    """workers.kernels.decode_gemm over block sizes x split-K x stages against cuBLAS, per layer GEMM and
    batch; for split K also with the partial sums consumed by fused.rmsnorm (what the model runs)."""
    from workers.kernels import decode_gemm as dg
    from workers.kernels.fused import rmsnorm, silu_and_mul
    dev = torch.device("cuda")
    print("\n== decode GEMMs per layer (us), 28 distinct weights per graph")
    weights = {name: [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
               for name, (k, n) in SHAPES.items()}
    norm_w = torch.ones(HIDDEN, device=dev, dtype=torch.bfloat16)
    for m in (8, 16, 32, 64, 128, 256):
        for name, (k, n) in list(SHAPES.items()) + [("gate_up+silu", SHAPES["gate_up"])]:
            silu = name == "gate_up+silu"
            ws = weights["gate_up" if silu else name]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, ws[0])
            if silu:
                ref = silu_and_mul(ref)
                cublas = graph_time(lambda i: silu_and_mul(torch.nn.functional.linear(x, ws[i])))
            else:
                cublas = graph_time(lambda i: torch.nn.functional.linear(x, ws[i]))
            ref = ref.float()
            res = torch.randn(m, HIDDEN, device=dev, dtype=torch.bfloat16)
            cublas_norm = graph_time(lambda i: rmsnorm(torch.nn.functional.linear(x, ws[i]), norm_w, 1e-6, res)) \
                if n == HIDDEN else None
            bms = [max(16, triton.next_power_of_2(m))] if m <= 64 else [64, 128]
            if m == 64:
                bms = [32, 64]
            tiles_nk = [(bn, bk) for bn in (32, 64, 128) for bk in (64, 128)] + [(32, 256)]
            configs = [dg.GemmConfig(bm, bn, bk, sk, st, 8 if bm * bn >= 128 * 128 else 4)
                       for bm in bms for bn, bk in tiles_nk for sk in (1, 2, 4, 8) for st in (3, 5)
                       if not (silu and sk > 1)]
            out_n = n // 2 if silu else n
            timed = []
            for cfg in configs:
                if not dg.tiles(cfg, m, out_n, k):
                    continue
                try:
                    y = dg.reduce_splits(dg.decode_gemm(x, ws[0], cfg, silu_mul=silu)).float()
                    err = (y - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
                    if err > 2e-2:
                        print(f"   {name} m={m} {cfg}: wrong (rel {err:.2e})")
                        continue
                    t = graph_time(lambda i: dg.decode_gemm(x, ws[i], cfg, silu_mul=silu))
                    t_norm = None
                    if n == HIDDEN:
                        t_norm = graph_time(lambda i: rmsnorm(dg.decode_gemm(x, ws[i], cfg), norm_w, 1e-6, res))
                except Exception as e:  # noqa: BLE001
                    print(f"   {name} m={m} {cfg}: {type(e).__name__} {str(e)[:80]}")
                    continue
                timed.append((t_norm if t_norm is not None else t, t, cfg))
            timed.sort(key=lambda r: r[0])
            floor = n * k * 2 / bw
            with_norm = f" (+norm {cublas_norm * 1e6:5.1f})" if cublas_norm else ""
            print(f"M={m:>4} {name:>12}: cublas {cublas * 1e6:6.1f}{with_norm}  floor {floor * 1e6:5.1f}  best: "
                  + "; ".join(f"{tt * 1e6:5.1f} ({t * 1e6:5.1f}) {tuple(c)}" for tt, t, c in timed[:3]), flush=True)
            results["decode_gemm"].append(dict(m=m, name=name, cublas=cublas, cublas_norm=cublas_norm, floor_s=floor,
                                               best=[(tt, t, tuple(c)) for tt, t, c in timed[:8]]))


def probe_lm_head(bw, results):
    """The LM head (Qwen3-0.6B: 151,936 x 1,024, 311 MB) at 8-64 rows: cuBLAS (what the engine runs) against
    workers.kernels.decode_gemm's tiles; 4 distinct weights per graph."""
    from workers.kernels import decode_gemm as dg
    dev = torch.device("cuda")
    print("\n== LM head (us), 4 distinct weights per graph")
    ws = [torch.randn(VOCAB, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(4)]
    floor = VOCAB * HIDDEN * 2 / bw
    for m in (8, 16, 32, 64):
        x = torch.randn(m, HIDDEN, device=dev, dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x, ws[0]).float()
        cublas = graph_time(lambda i: torch.nn.functional.linear(x, ws[i]), repeats=4)
        timed = []
        row_tiles = (16,) if m <= 16 else ((32,) if m <= 32 else (32, 64))  # choose_config's rows a tile, +64
        for bm, bn, bk, st, warps in itertools.product(row_tiles, (64, 128), (64, 128), (3, 5), (4, 8)):
            cfg = dg.GemmConfig(bm, bn, bk, 1, st, warps)
            if not dg.tiles(cfg, m, VOCAB, HIDDEN):
                continue
            try:
                y = dg.decode_gemm(x, ws[0], cfg).float()
                if (y - ref).abs().max().item() > 2e-2 * ref.abs().max().item():
                    print(f"   m={m} {cfg}: wrong")
                    continue
                timed.append((graph_time(lambda i: dg.decode_gemm(x, ws[i], cfg), repeats=4), cfg))
            except Exception as e:  # noqa: BLE001
                print(f"   m={m} {cfg}: {type(e).__name__} {str(e)[:60]}")
        timed.sort(key=lambda r: r[0])
        print(f"M={m:>3}: cublas {cublas * 1e6:6.1f} us  floor {floor * 1e6:5.1f}  best: "
              + "; ".join(f"{t * 1e6:6.1f} {tuple(c)}" for t, c in timed[:3]), flush=True)
        results["lm_head"].append(dict(m=m, cublas=cublas, floor_s=floor, best=[(t, tuple(c)) for t, c in timed[:8]]))
    del ws


def _prefill_step(dev, rng):
    """One of bench.py's prefill steps: prompts U[100, 1024] up to 16,384 tokens, no cached prefix, in
    caches of 28 layers; (lens, caches, block table, context lens, cu_seqlens, q, out, causal flops)."""
    lens = []
    while sum(lens) < 16384:
        lens.append(min(rng.randint(100, 1024), 16384 - sum(lens)))
    caches, table, ctx = paged_caches(lens, dev, 1024 // BLOCK)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)
    q = torch.randn(sum(lens), HQ, D, device=dev, dtype=torch.bfloat16)
    flops = sum(n * n for n in lens) * 2 * D * HQ  # causal: QK^T and PV over half of each L x L square
    return lens, caches, table, ctx, cu, q, torch.empty_like(q), flops


def probe_prefill(bw, results):
    dev = torch.device("cuda")
    lens, caches, table, ctx, cu, q, out, flops = _prefill_step(dev, random.Random(0))
    default = ta.prefill_tiles(max(lens), HQ // HKV, D)[2]
    print(f"\n== prefill attention, {len(lens)} prompts, {sum(lens)} tokens (us/layer, causal TFLOP/s); "
          f"default {default}")
    rows = []
    for bm in (64, 128):
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    cfg = (bm, bn, warps, stages)
                    try:
                        t = graph_time(lambda i: ta._prefill_launch(q, *caches[i], cu, ctx, table, 0.088, max(lens),
                                                                    out, config=cfg))
                    except Exception as e:  # noqa: BLE001
                        print(f"   {cfg}: {type(e).__name__} {str(e)[:60]}")
                        continue
                    rows.append((t, cfg))
                    results["prefill"].append(dict(config=cfg, seconds=t, tflops=flops / t / 1e12))
    rows.sort()
    for t, cfg in rows[:6] + [r for r in rows if r[1] == default]:
        print(f"   {cfg}{' (default)' if cfg == default else ''}: {t * 1e6:7.1f} us ({flops / t / 1e12:5.0f} TFLOP/s)")
    del caches


def probe_prefill_fa2(bw, results):
    """torch's FlashAttention-2 (aten._flash_attention_forward, varlen, causal) on one of bench.py's prefill
    steps (prompts with no cached prefix, the step's own K/V), against the engine's Triton prefill kernel:
    K/V with the KV heads as they are (FlashAttention-2 takes grouped-query K/V), and expanded to the q heads
    (repeat_interleave, its time included)."""
    dev = torch.device("cuda")
    lens, caches, table, ctx, cu, q, out, flops = _prefill_step(dev, random.Random(0))
    qs = [torch.randn_like(q) for _ in range(LAYERS)]
    ks = [torch.randn(q.shape[0], HKV, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    vs = [torch.randn_like(k) for k in ks]
    top = max(lens)

    def fa2(i, expand):
        k, v = ks[i], vs[i]
        if expand:
            k, v = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)
        return torch.ops.aten._flash_attention_forward(qs[i], k, v, cu, cu, top, top, 0.0, True, False,
                                                       scale=0.088)[0]

    print(f"\n== prefill attention, {len(lens)} prompts, {sum(lens)} tokens: us/layer (causal TFLOP/s)")
    for label, fn in (("triton (engine)", lambda i: ta._prefill_launch(qs[i], *caches[i], cu, ctx, table, 0.088,
                                                                      top, out)),
                      ("fa2, grouped K/V", lambda i: fa2(i, False)),
                      ("fa2, K/V expanded", lambda i: fa2(i, True))):
        try:
            t = graph_time(fn)
        except Exception as e:  # noqa: BLE001
            print(f"   {label}: {type(e).__name__} {str(e)[:200]}")
            continue
        print(f"   {label:>20}: {t * 1e6:7.1f} us ({flops / t / 1e12:5.0f} TFLOP/s)", flush=True)
        results["prefill_fa2"].append(dict(label=label, seconds=t))
    # the same numbers? (FlashAttention-2 against the Triton kernel on layer 0; the cache holds ks/vs first)
    try:
        k_cache, v_cache = caches[0]
        slots = torch.cat([table[b, :(n + BLOCK - 1) // BLOCK].long().repeat_interleave(BLOCK)[:n] * BLOCK
                           + torch.arange(n, device=dev) % BLOCK for b, n in enumerate(lens)])
        k_cache.view(-1, HKV, D)[slots] = ks[0]
        v_cache.view(-1, HKV, D)[slots] = vs[0]
        a = ta._prefill_launch(qs[0], k_cache, v_cache, cu, ctx, table, 0.088, top, torch.empty_like(q)).float()
        b = fa2(0, False).float()
        print(f"   max |triton - fa2| {(a - b).abs().max().item():.4f} (|triton| max {a.abs().max().item():.2f})")
    except Exception as e:  # noqa: BLE001
        print(f"   comparison: {type(e).__name__} {str(e)[:200]}")
    del caches


def probe_prefill_packed(bw, results):
    """Prefill tiles holding one q head against tiles packing a KV head's query-head group (K/V loaded once
    for the group): one of bench.py's prefill steps (long prompts), and the decode rows that ride along in
    its chunked-prefill steps (q_len 1, contexts 500-1100), there also against the decode kernel."""
    dev = torch.device("cuda")
    rng = random.Random(0)
    lens, caches, table, ctx, cu, q, out, flops = _prefill_step(dev, rng)
    print(f"\n== prefill, {len(lens)} prompts, {sum(lens)} tokens: us/layer (causal TFLOP/s)")
    configs = [(False, None)] + [(True, (bm, bn, w, st)) for bm in (64, 128) for bn in (32, 64)
                                 for w in (4, 8) for st in (2, 3)]
    for pack, cfg in configs:
        try:
            t = graph_time(lambda i: ta._prefill_launch(q, *caches[i], cu, ctx, table, 0.088, max(lens), out,
                                                        config=cfg, pack=pack))
        except Exception as e:  # noqa: BLE001
            print(f"   pack {pack} {cfg}: {type(e).__name__} {str(e)[:60]}")
            continue
        print(f"   pack {pack!s:5} {cfg or 'default'}: {t * 1e6:7.1f} us ({flops / t / 1e12:5.0f} TFLOP/s)")
        results["prefill_packed"].append(dict(case="prompts", pack=pack, config=cfg, seconds=t))
    del caches
    for batch in (32, 128, 230):
        rows = [rng.randint(500, 1100) for _ in range(batch)]
        caches, table, ctx = paged_caches(rows, dev, 1200 // BLOCK + 1)
        cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        kv_bytes = sum(rows) * HKV * D * 2 * 2
        print(f"\n== decode rows of a prefill step, batch {batch}, contexts 500-1100: us/layer (% of copy bandwidth)")
        runs = [("prefill, tile per q head (default)", lambda i: ta._prefill_launch(
                    q, *caches[i], cu, ctx, table, 0.088, 1, out, pack=False))]
        for bn, st in ((64, 2), (64, 3), (128, 2), (128, 3)):
            runs.append((f"prefill, packed (16, {bn}, 4, {st})", lambda i, c=(16, bn, 4, st): ta._prefill_launch(
                q, *caches[i], cu, ctx, table, 0.088, 1, out, config=c, pack=True)))
        runs.append(("decode kernel (its rule)", lambda i: ta.paged_decode_attention(
            q, *caches[i], table, ctx, 0.088, out=out)))
        for name, fn in runs:
            t = graph_time(fn)
            print(f"   {name}: {t * 1e6:7.1f} us ({100 * kv_bytes / t / bw:5.1f} %)")
            results["prefill_packed"].append(dict(case=f"decode rows {batch}", name=name, seconds=t))
        del caches


def probe_sampler(bw, results):
    """workers.kernels.sampling.gumbel_argmax (temperature 0.6) at batch 1-256 over Qwen3's vocabulary."""
    from workers.kernels.sampling import gumbel_argmax
    dev = torch.device("cuda")
    print("\n== Gumbel sampler (us per call), bf16 logits [batch, 151936], 28 distinct logits buffers")
    for batch in (1, 8, 64, 128, 256):
        logits = [torch.randn(batch, VOCAB, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
        temps = torch.full((batch,), 0.6, device=dev)
        seeds = torch.arange(batch, device=dev)
        pos = torch.arange(batch, device=dev) + 100
        t = graph_time(lambda i: gumbel_argmax(logits[i], temps, seeds, pos))
        # every row greedy: torch.argmax, what the engine runs
        t_argmax = graph_time(lambda i: logits[i].argmax(dim=-1))
        print(f"B={batch:>4}: {t * 1e6:6.1f} us (logits read at copy bw: {batch * VOCAB * 2 / bw * 1e6:5.1f}); "
              f"greedy: torch.argmax {t_argmax * 1e6:6.1f}", flush=True)
        results["sampler"].append(dict(batch=batch, seconds=t, argmax_seconds=t_argmax))
        del logits


def _qkv_inputs(dev):
    """What the qkv_rope probes share: K, 28 q/k/v weights, q/k norm weights, a rotary table, and a cache of
    513 blocks per layer."""
    k_in, n = SHAPES["qkv"]
    ws = [torch.randn(n, k_in, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    qw = torch.rand(D, device=dev, dtype=torch.bfloat16) + 0.5
    kw = torch.rand(D, device=dev, dtype=torch.bfloat16) + 0.5
    angles = torch.outer(torch.arange(4096, dtype=torch.float32), 1.0 / 1e6 ** (torch.arange(0, D, 2) / D))
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1).to(dev)
    blocks = 256 * 2 + 1
    caches = [(torch.zeros(blocks, BLOCK, HKV, D, device=dev, dtype=torch.bfloat16),
               torch.zeros(blocks, BLOCK, HKV, D, device=dev, dtype=torch.bfloat16)) for _ in range(LAYERS)]
    return k_in, ws, qw, kw, cos_sin, blocks, caches


def _qkv_rows(m, k_in, blocks, dev):
    """The per-row inputs of a qkv_rope probe at m rows: x, positions, and distinct cache slots."""
    return (torch.randn(m, k_in, device=dev, dtype=torch.bfloat16), torch.randint(0, 4000, (m,), device=dev),
            torch.randperm(blocks * BLOCK, device=dev)[:m])


def probe_qkv_parts(bw, results):
    """qkv_rope with a head's rotary pairs over 1, 2 or 4 programs (parts), without the q/k norm (which needs a
    whole head in one program), against the normed one-program kernel and the plain projection."""
    from parallel.layers import _linear
    from workers.kernels import decode_gemm as dg
    from workers.kernels.fused import qk_norm_rope
    dev = torch.device("cuda")
    print("\n== qkv_rope, 1, 2 or 4 programs a head (us per layer), 28 distinct weights per graph")
    k_in, ws, qw, kw, cos_sin, blocks, caches = _qkv_inputs(dev)
    for m in [int(r) for r in os.environ.get("PROBE_ROWS", "2,8,16,32,64,96,128").split(",")]:
        x, pos, slots = _qkv_rows(m, k_in, blocks, dev)
        qkv = _linear(x, ws[0])
        qk_norm_rope(qkv[:, :HQ * D].view(m, HQ, D), qkv[:, HQ * D:(HQ + HKV) * D].view(m, HKV, D), pos, cos_sin)
        ref = qkv.float()
        t_plain = graph_time(lambda i: _linear(x, ws[i]))
        default = dg.qkv_rope_config_for_shape(m, k_in, D, 2)
        t_norm = graph_time(lambda i: dg.qkv_rope(x, ws[i], None, default, HQ, HKV, D, pos, cos_sin, qw, kw, 1e-6,
                                                  caches[i][0], caches[i][1], slots))
        line = [f"M={m:>4}: plain projection {t_plain * 1e6:5.1f}, normed (parts 1) {t_norm * 1e6:5.1f}; no norm:"]
        for parts, bm, bk in itertools.product((1, 2, 4), (16, 32, 64), (64, 128)):
            if bm > max(16, triton.next_power_of_2(m)):
                continue
            cfg = dg.QkvRopeConfig(bm, bk, dg.pipeline_stages((D // parts + bm) * bk * 2), 4, parts)

            def fused(i, cfg=cfg):
                return dg.qkv_rope(x, ws[i], None, cfg, HQ, HKV, D, pos, cos_sin, None, None, 1e-6, caches[i][0],
                                   caches[i][1], slots)
            err = (fused(0).float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
            if err > 2e-2:
                line.append(f"{tuple(cfg)} wrong (rel {err:.2e})")
                continue
            t = graph_time(fused)
            line.append(f"{t * 1e6:5.1f} {tuple(cfg)}")
            results["qkv_parts"].append(dict(m=m, plain=t_plain, normed=t_norm, config=tuple(cfg), seconds=t))
        print("\n    ".join(line), flush=True)


def probe_qkv_rope(bw, results):
    """decode_gemm.qkv_rope against the unfused pair the model ran before it, per layer, at 2-256 rows."""
    from parallel.layers import _linear
    from workers.kernels import decode_gemm as dg
    from workers.kernels.fused import qk_norm_rope
    dev = torch.device("cuda")
    print("\n== q/k/v projection + q/k norm + rotary + K/V store per layer (us), 28 distinct weights per graph")
    k_in, ws, qw, kw, cos_sin, blocks, caches = _qkv_inputs(dev)
    for m in [int(r) for r in os.environ.get("PROBE_ROWS", "2,8,16,32,64,96,128,192,256").split(",")]:
        x, pos, slots = _qkv_rows(m, k_in, blocks, dev)

        def unfused(i):
            qkv = _linear(x, ws[i])
            q = qkv[:, :HQ * D].view(m, HQ, D)
            k = qkv[:, HQ * D:(HQ + HKV) * D].view(m, HKV, D)
            v = qkv[:, (HQ + HKV) * D:].view(m, HKV, D)
            qk_norm_rope(q, k, pos, cos_sin, qw, kw, 1e-6, v=v, k_cache=caches[i][0], v_cache=caches[i][1],
                         slot_mapping=slots)
            return qkv

        ref = unfused(0).float()
        t_unfused = graph_time(unfused)
        default = dg.choose_qkv_rope_config(x, ws[0], D)  # None above the rows the engine fuses at
        if default is None:
            default = dg.qkv_rope_config_for_shape(m, k_in, D, 2)
        timed = []
        for bm, bk in itertools.product((16, 32, 64), (64, 128)):
            cfg = default._replace(block_m=bm, block_k=bk, stages=dg.pipeline_stages((D + bm) * bk * 2))

            def fused(i, cfg=cfg):
                return dg.qkv_rope(x, ws[i], None, cfg, HQ, HKV, D, pos, cos_sin, qw, kw, 1e-6, caches[i][0],
                                   caches[i][1], slots)
            err = (fused(0).float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
            if err > 2e-2:
                print(f"   m={m} {cfg}: wrong (rel {err:.2e})")
                continue
            timed.append((graph_time(fused), tuple(cfg)))
        timed.sort()
        t_default = next((t * 1e6 for t, c in timed if c == tuple(default)), float("nan"))
        print(f"M={m:>4}: unfused {t_unfused * 1e6:6.1f}  fused default {tuple(default)} {t_default:5.1f}; best: "
              + "; ".join(f"{t * 1e6:5.1f} {c}" for t, c in timed[:4]), flush=True)
        results["qkv_rope"].append(dict(m=m, unfused=t_unfused, default=tuple(default),
                                        fused=[(t, c) for t, c in timed]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--only", default="attn,dgemm,qkvrope")  # the other parts: the docstring
    args = p.parse_args()
    bw = measure_copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s")
    results = {"copy_bandwidth": bw, "attention": [], "decode_gemm": [], "qkv_rope": [], "qkv_parts": [], "prefill": [], "sampler": [],
               "single_split": [], "lm_head": [], "blocks": [], "prefill_packed": [], "prefill_fa2": [], "order": [], "twin": [], "twin_skew": [], "tma": []}
    parts = args.only.split(",")
    t0 = time.time()
    for part, fn in (("attn", lambda: probe_attention(bw, results)),
                     ("split1", lambda: probe_single_split(bw, results)),
                     ("order", lambda: probe_order(bw, results)),
                     ("twin", lambda: probe_twin(bw, results)),
                     ("twinskew", lambda: probe_twin_skew(bw, results)),
                     ("blocks", lambda: probe_block_sizes(bw, results)),
                     ("dgemm", lambda: probe_decode_gemm(bw, results)),
                     ("lmhead", lambda: probe_lm_head(bw, results)),
                     ("qkvrope", lambda: probe_qkv_rope(bw, results)),
                     ("qkvparts", lambda: probe_qkv_parts(bw, results)),
                     ("prefill", lambda: probe_prefill(bw, results)),
                     ("prefillpack", lambda: probe_prefill_packed(bw, results)),
                     ("fa2", lambda: probe_prefill_fa2(bw, results)),
                     ("sampler", lambda: probe_sampler(bw, results)),
                     ("tma", lambda: probe_tma(bw, results))):
        if part in parts:
            fn()
            print(f"[{part} done at {time.time() - t0:.0f} s]", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
