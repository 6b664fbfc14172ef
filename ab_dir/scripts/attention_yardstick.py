"""GPU only: one layer's paged decode attention, our Triton kernel vs flash-attn (FlashAttention-3 or -2).

    python scripts/attention_yardstick.py [--json out.json] [--block-size 16] [--max-model-len 4096]

Qwen3-0.6B heads (16 query / 8 KV heads, head_dim 128), bf16, paged KV cache with shuffled blocks; cases
batch 256 x context 1024, 32 x 1024 and 1 x 512. Each time is per layer: a CUDA graph of back-to-back calls,
each on its own layer's cache (enough layers that the K/V working set is several times the L2 cache, so
every call reads from HBM, as in a real forward), replayed and timed with CUDA events (median). The block
tables are ``max_model_len / block_size`` wide, as in the engine's decode graphs (bench.py uses 4096), since
both kernels size their KV splits from that width. "% floor" is the time to read that layer's K/V once at the
device-to-device copy bandwidth measured by bench.py's ``measure_copy_bandwidth``, over the measured time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import measure_copy_bandwidth  # noqa: E402
from kernel_sweep import graph_time  # noqa: E402  (same folder)
from workers.flash_attention import FlashAttnBackend, flash_attn_problem, flash_attn_version  # noqa: E402
from workers.kernels import triton_attention  # noqa: E402
from workers.layers import AttentionMetadata  # noqa: E402

HQ, HKV, D = 16, 8, 128  # Qwen3-0.6B
CASES = [(256, 1024), (32, 1024), (1, 512)]  # (batch, context length)


def run_case(batch: int, context: int, block_size: int, width: int, flash, bandwidth: float) -> dict:
    kv_bytes = batch * context * HKV * D * 2 * 2  # K and V, bf16
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    layers = max(2, min(64, math.ceil(4 * l2 / kv_bytes)))
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, HKV, D)
    k_caches = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
    v_caches = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
    tables = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    tables[:, :blocks_per_seq] = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_seq).int()
    context_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    scale = D ** -0.5
    meta = AttentionMetadata(slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device="cuda"),
                             context_lens=context_lens, cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32,
                                                                                  device="cuda"),
                             block_tables=tables, max_seqlen_q=1, is_decode=True)

    def triton_call(i):
        return triton_attention.paged_decode_attention(q, k_caches[i], v_caches[i], tables, context_lens, scale)

    def flash_call(i):
        return flash.attention(q, None, None, k_caches[i], v_caches[i], meta, scale)

    floor = kv_bytes / bandwidth
    row = {"batch": batch, "context": context, "kv_bytes": kv_bytes, "layers_rotated": layers,
           "floor_us": floor * 1e6}
    t = graph_time(triton_call, layers)
    row.update(triton_us=t * 1e6, triton_pct_floor=100 * floor / t)
    if flash is not None:
        t = graph_time(flash_call, layers)
        ref, out = triton_call(0).float(), flash_call(0).float()
        row.update(flash_attn_us=t * 1e6, flash_attn_pct_floor=100 * floor / t,
                   rel_diff=((out - ref).norm() / ref.norm()).item())
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=4096, help="sets the block tables' width")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attention_yardstick.py needs a CUDA device")
    width = max(-(-args.max_model_len // args.block_size), max(-(-c // args.block_size) for _, c in CASES))
    version = flash_attn_version()
    problem = flash_attn_problem("bfloat16", args.block_size, version)
    flash = None
    if problem is None:
        try:
            flash = FlashAttnBackend("bfloat16", args.block_size)
        except ValueError as e:  # e.g. FA3 on a GPU it was not built for
            problem = str(e)
    bandwidth = measure_copy_bandwidth()
    name = f"flash_attn (FA{version})" if flash is not None else "flash_attn"
    print(f"{torch.cuda.get_device_name(0)}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); decode "
          f"attention, one layer: {HQ} q / {HKV} kv heads, head_dim {D}, bf16, block {args.block_size}, "
          f"block tables {width} blocks wide")
    if problem:
        print(f"{name}: not timed ({problem})")
    print(f"{'batch x ctx':>12} {'K/V MB':>8} {'floor us':>9} {'triton us':>10} {'% floor':>8}"
          + (f" {name + ' us':>22} {'% floor':>8} {'rel diff':>9}" if flash is not None else ""))
    rows = []
    for batch, context in CASES:
        row = run_case(batch, context, args.block_size, width, flash, bandwidth)
        torch.cuda.empty_cache()  # the case's caches are gone: give the next case the memory
        rows.append(row)
        line = (f"{batch:>5} x {context:<5} {row['kv_bytes'] / 1e6:>8.1f} {row['floor_us']:>9.1f} "
                f"{row['triton_us']:>10.1f} {row['triton_pct_floor']:>7.1f}%")
        if flash is not None:
            line += f" {row['flash_attn_us']:>22.1f} {row['flash_attn_pct_floor']:>7.1f}% {row['rel_diff']:>9.1e}"
        print(line)
    result = {"device": torch.cuda.get_device_name(0), "copy_bandwidth_bytes_per_s": bandwidth,
              "flash_attn_version": version if flash is not None else None, "flash_attn_skipped": problem,
              "block_size": args.block_size, "table_width_blocks": width, "heads": [HQ, HKV, D], "cases": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
