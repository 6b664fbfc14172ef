"""Triton kernels for the paged KV cache: store, split-KV decode attention, paged prefill attention.

KV cache layout (fixed by the engine), per layer::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot = block_id * block_size + offset_in_block

Every wrapper here is CUDA-graph safe: no host syncs (.item(), .tolist(), data-dependent Python
branches), and every grid depends only on tensor shapes and static Python arguments. Work that depends
on the data (context lengths, query lengths, block ids, padding) is resolved inside the kernels.

Numerics: scores and softmax statistics are fp32 and use exp2 with log2(e) folded into the scale;
P is cast to the value dtype before the P@V product (as flash-attention does). fp32 inputs use
IEEE-precision dots (no TF32) so fp32 results match a float64 reference to ~1e-5.

See docs/kernels.md for the design notes.
"""

from __future__ import annotations

import functools
import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

from workers.kernels import pdl
from workers.kernels.pdl import enter as pdl_enter

__all__ = [
    "store_kvcache",
    "paged_decode_attention",
    "paged_prefill_attention",
    "choose_num_splits",
    "has_single_split_variant",
    "tma_decode_applies",
    "prefill_seq_groups",
]

_LOG2E = 1.4426950408889634

# Decode split heuristic (see choose_num_splits).
_MAX_SPLITS = 64
_MIN_TOKENS_PER_SPLIT = 128
# 12 programs per SM: on an H200 with bench.py's mixed context lengths (scripts/kernel_sweep.py) fewer
# programs leave SMs idle behind the longest sequences (at batch 96, S = 1 ran at 79 % of the copy
# bandwidth, S = 4 at 90 %), while many more pay for the extra partial results (S = 32: 52-70 %).
_PROGRAMS_PER_SM = 12
# ...except that once the batch alone gives >= 6 programs per SM, one split with a longer, deeper-pipelined
# loop wins (H200, scripts/probe.py, 2026-11-22: batch 128 x ~1080 tokens 94.5 % of the copy bandwidth at
# S = 1 against 89.4 % at S = 2; batch 256 x ~1044 95.2 % against 90.4 % with the old 64-token, 2-stage tiles).
_SINGLE_SPLIT_PROGRAMS_PER_SM = 6
# Between 2.5 and 6 programs per SM one split can win too: at batches 48-96 (the "split1" probe, H200,
# 2026-12-01) it beat the rule's S = 4-8 at every longest context from 128 to 2048 tokens, by 4-49 % with
# equal contexts and by up to 49 % (never losing more than 0.4 %) with contexts spread over [L / 2, L]; but
# in bench.py, whose late contexts spread over ~[1000, 1900], taking it at every step of those sizes made
# the 33-64-sequence steps 2.3 % slower. So those decode graphs are captured twice and the model runner
# picks per step (model_runner.ModelRunner._run_graph: a nearly full graph with even contexts, or one whose
# one-split grid runs in several waves, single_split_one_wave_rows).
_SINGLE_SPLIT_VARIANT_PROGRAMS_PER_SM = 2.5
# The most decode programs an SM holds at once: four with 64-token tiles (124 registers a thread, 38.5 KB of
# shared memory; three with 128-token ones), scripts/kernel_resources.py.
_MAX_RESIDENT_PROGRAMS_PER_SM = 4
# The TMA decode kernel's tile and pipeline depth: the best of the H200 probe at batch 64 (docs/kernels.md,
# "K/V tiles by TMA"). A tile is one TMA box inside one cache block, so it is also the smallest block size
# the kernel takes (and the Triton backend's default block size on Hopper).
TMA_BLOCK_N = 64
_TMA_STAGES = 2


# --------------------------------------------------------------------------------------------------
# store_kvcache
# --------------------------------------------------------------------------------------------------


@triton.jit
def _store_kvcache_kernel(
    Key, Value, KCache, VCache, SlotMapping,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kc_slot, stride_kc_h,
    stride_vc_slot, stride_vc_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: copies its [num_kv_heads, head_dim] K and V rows into the cache slot.
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(SlotMapping + tok).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # slot < 0 (padding) -> the whole row is masked off: nothing read, nothing written.
    # (The scalar condition is folded into a bound rather than and-ed with a block mask: the Triton
    # interpreter mis-types scalar & block boolean masks.)
    num_heads = tl.where(slot >= 0, NUM_HEADS, 0)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(Key + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                mask=mask, other=0.0)
    v = tl.load(Value + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                mask=mask, other=0.0)
    tl.store(KCache + slot * stride_kc_slot + offs_h[:, None] * stride_kc_h + offs_d[None, :],
             k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(VCache + slot * stride_vc_slot + offs_h[:, None] * stride_vc_h + offs_d[None, :],
             v.to(VCache.dtype.element_ty), mask=mask)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, \
        f"k_cache/v_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache must be contiguous"


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [N, num_kv_heads, head_dim] into the paged cache at slot_mapping [N].

    A slot of -1 (any negative slot) is padding: that row writes nothing. key/value may be strided
    views (e.g. slices of a fused qkv tensor); the cache must be contiguous.
    """
    _check_cache(k_cache, v_cache)
    n, num_heads, head_dim = key.shape
    assert value.shape == key.shape, f"key {tuple(key.shape)} and value {tuple(value.shape)} differ"
    assert k_cache.shape[2] == num_heads and k_cache.shape[3] == head_dim, \
        f"key [*, {num_heads}, {head_dim}] does not match cache {tuple(k_cache.shape)}"
    assert slot_mapping.dim() == 1 and slot_mapping.shape[0] == n, \
        f"slot_mapping must be [{n}], got {tuple(slot_mapping.shape)}"
    if n == 0:
        return
    block_h = triton.next_power_of_2(num_heads)
    block_d = triton.next_power_of_2(head_dim)
    num_warps = 4 if block_h * block_d >= 1024 else (2 if block_h * block_d >= 256 else 1)
    _store_kvcache_kernel[(n,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=num_warps,
    )


# --------------------------------------------------------------------------------------------------
# shared attention helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _kv_slots(bt_row, start_n, offs_n, mask_n, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cache slots (int64) of the KV positions offs_n (= start_n + arange(BLOCK_N)).

    start_n is a multiple of BLOCK_N, and both are powers of two, so when BLOCK_SIZE >= BLOCK_N the
    whole tile lies in one cache block: one scalar block-table load. Otherwise the tile spans
    BLOCK_N // BLOCK_SIZE blocks and the block ids are gathered per position.
    """
    if BLOCK_SIZE >= BLOCK_N:
        bid = tl.load(bt_row + start_n // BLOCK_SIZE).to(tl.int64)
        slots = bid * BLOCK_SIZE + (start_n % BLOCK_SIZE) + tl.arange(0, BLOCK_N)
    else:
        bid = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        slots = bid * BLOCK_SIZE + (offs_n % BLOCK_SIZE)
    return slots


@triton.jit
def _attn_tile(q, acc, l_i, m_i, k_base, v_base, bt_row, start_n, valid_n, qk_scale, q_pos,
               stride_k_slot, stride_v_slot, offs_d, mask_d,
               BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step over KV positions [start_n, start_n + BLOCK_N).

    q: [M, BLOCK_D] (any M >= 16), acc: [M, BLOCK_D] fp32, l_i/m_i: [M] fp32 (base-2 units).
    MASK_N: positions >= valid_n are masked. CAUSAL: position n is masked for row r when n > q_pos[r].
    Callers guarantee each processed tile has at least one unmasked position for every row that
    matters, so m_i is finite after the first tile.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK_N:
        mask_n = offs_n < valid_n
    else:
        mask_n = offs_n >= 0  # all true; folded by the compiler
    slots = _kv_slots(bt_row, start_n, offs_n, mask_n, BLOCK_SIZE, BLOCK_N)
    # K loaded transposed: [BLOCK_D, BLOCK_N]; head_dim is the contiguous (vectorized) axis.
    if MASK_N:
        k = tl.load(k_base + slots[None, :] * stride_k_slot + offs_d[:, None],
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    else:
        k = tl.load(k_base + slots[None, :] * stride_k_slot + offs_d[:, None],
                    mask=mask_d[:, None], other=0.0)
    qk = _dot(q, k, IEEE) * qk_scale
    if CAUSAL:
        keep = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        qk = tl.where(keep, qk, float("-inf"))
    elif MASK_N:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK_N:
        v = tl.load(v_base + slots[:, None] * stride_v_slot + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    else:
        v = tl.load(v_base + slots[:, None] * stride_v_slot + offs_d[None, :],
                    mask=mask_d[None, :], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, l_i, m_new


# --------------------------------------------------------------------------------------------------
# decode: split-KV (flash-decoding), GQA group per program
# --------------------------------------------------------------------------------------------------


@triton.jit
def _split_len(ctx, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Tokens per split for a sequence of length ctx: ctx / NUM_SPLITS rounded up to a whole tile
    # (>= BLOCK_N so that ctx == 0 does not divide by zero in the reducer).
    return tl.maximum(tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N, BLOCK_N)


# The block-table row stride is the width of this step's table, which varies step to step: left
# unspecialized, or Triton would compile a new variant whenever it becomes (or stops being) a multiple of 16.
@triton.jit(do_not_specialize=["stride_bt_b"])
def _decode_split_kernel(
    Q, KCache, VCache, BlockTables, ContextLens, Out, OWs, LseWs,
    stride_qb, stride_qh, stride_qd,
    stride_k_slot, stride_k_h, stride_v_slot, stride_v_h,
    stride_bt_b,
    stride_ob, stride_oh, stride_od,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    # KV heads fastest: consecutive programs read the same cache blocks (a block holds every head of its
    # tokens), so the memory sees whole blocks requested together
    kvh = tl.program_id(0)
    pid_b = tl.program_id(1)
    sid = tl.program_id(2)

    ctx = tl.load(ContextLens + pid_b)
    split_len = _split_len(ctx, NUM_SPLITS, BLOCK_N)
    start = sid * split_len
    end = tl.minimum(start + split_len, ctx)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h  # the q heads of this KV head's group
    q = tl.load(Q + pid_b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt_row = BlockTables + pid_b.to(tl.int64) * stride_bt_b
    k_base = KCache + kvh * stride_k_h
    v_base = VCache + kvh * stride_v_h
    q_pos = offs_h  # unused (CAUSAL=False)
    # Every tile processed has >= 1 valid position (start_n < end), so m_i stays finite.
    for start_n in range(start, end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(q, acc, l_i, m_i, k_base, v_base, bt_row, start_n, end, qk_scale, q_pos,
                                   stride_k_slot, stride_v_slot, offs_d, mask_d,
                                   BLOCK_SIZE, BLOCK_N, True, False, IEEE)

    if NUM_SPLITS == 1:
        # No reduction needed: normalize and write the output (context_len 0 -> zeros).
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(Out + pid_b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(Out.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
    else:
        # Partial result of a non-empty split: normalized output + log2-sum-exp2. Empty splits write
        # nothing; the reducer recomputes which splits are non-empty from context_len.
        mask_hv = offs_h < tl.where(start < ctx, GROUP, 0)  # empty split: no heads stored
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_safe[:, None]
        lse = m_i + tl.log2(l_safe)
        row = (pid_b.to(tl.int64) * (GROUP * tl.num_programs(0)) + heads) * NUM_SPLITS + sid  # [B, Hq, S]
        tl.store(LseWs + row, lse, mask=mask_hv)
        tl.store(OWs + row[:, None] * BLOCK_D + offs_d[None, :], o,
                 mask=mask_hv[:, None] & mask_d[None, :])


@triton.jit
def _decode_reduce_kernel(
    OWs, LseWs, ContextLens, Out,
    stride_ob, stride_oh, stride_od,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(ContextLens + pid_b)
    n_used = tl.cdiv(ctx, _split_len(ctx, NUM_SPLITS, BLOCK_N))  # non-empty splits (0 when ctx == 0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < n_used
    mask_d = offs_d < HEAD_DIM
    row = (pid_b.to(tl.int64) * NUM_HEADS + h) * NUM_SPLITS + offs_s
    lse = tl.load(LseWs + row, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(mask_s, tl.exp2(lse - m), 0.0)
    o = tl.load(OWs + row[:, None] * BLOCK_D + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    denom = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(Out + pid_b.to(tl.int64) * stride_ob + h * stride_oh + offs_d * stride_od,
             res.to(Out.dtype.element_ty), mask=mask_d)


@triton.jit
def _tma_tile(q, acc, l_i, m_i, k_desc, v_desc, bt_row, start_n, ctx, col, qk_scale,
              BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr):
    """_attn_tile with the tile's K and V as boxes of TMA descriptors: positions [start_n, start_n + BLOCK_N)
    lie in one cache block, so they are BLOCK_N consecutive rows of the cache viewed as
    [num_blocks * block_size, num_kv_heads * head_dim], and this KV head's HEAD_DIM columns from col.
    MASK (the last tile): positions >= ctx get score -inf and value 0, since a slot past the context may hold
    anything (the box is loaded whole)."""
    if MASK:
        bid = tl.load(bt_row + start_n // BLOCK_SIZE, mask=start_n < ctx, other=0)
    else:
        bid = tl.load(bt_row + start_n // BLOCK_SIZE)
    row = bid * BLOCK_SIZE + start_n % BLOCK_SIZE
    k = k_desc.load([row, col])  # [BLOCK_N, HEAD_DIM]
    v = v_desc.load([row, col])
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    if MASK:
        valid = (start_n + tl.arange(0, BLOCK_N)) < ctx
        s = tl.where(valid[None, :], s, float("-inf"))
        v = tl.where(valid[:, None], v, 0.0)
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: a tile holds a position < ctx
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["stride_bt_b"])  # see _decode_split_kernel
def _decode_tma_kernel(
    Q, k_desc, v_desc, BlockTables, ContextLens, Out,
    stride_qb, stride_qh, stride_bt_b, stride_ob, stride_oh, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, STAGES: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    """One split on Hopper: one program per (KV head, sequence) over its whole context, the K/V tiles
    fetched by TMA (see tma_decode_applies)."""
    pdl_enter(PDL)
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    ctx = tl.load(ContextLens + b)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_h = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    bt_row = BlockTables + b.to(tl.int64) * stride_bt_b
    col = kvh * HEAD_DIM
    n_full = ctx // BLOCK_N
    for t in tl.range(0, n_full, num_stages=STAGES):
        acc, l_i, m_i = _tma_tile(q, acc, l_i, m_i, k_desc, v_desc, bt_row, t * BLOCK_N, ctx, col, qk_scale,
                                  BLOCK_SIZE, BLOCK_N, False, IEEE)
    if n_full * BLOCK_N < ctx:
        acc, l_i, m_i = _tma_tile(q, acc, l_i, m_i, k_desc, v_desc, bt_row, n_full * BLOCK_N, ctx, col,
                                  qk_scale, BLOCK_SIZE, BLOCK_N, True, IEEE)
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # context 0 (a padded row): zeros
    tl.store(Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(Out.dtype.element_ty), mask=mask_h[:, None])


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability_major_of(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def _capability_major(device: torch.device) -> int:
    return _capability_major_of(device.index if device.index is not None else torch.cuda.current_device())


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device); a fixed 16 elsewhere."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return _num_sms(idx)
    return 16  # CPU / interpreter: any fixed value works


def choose_num_splits(batch: int, num_kv_heads: int, max_blocks_per_seq: int, block_size: int,
                      num_sms: int = 132) -> int:
    """Number of KV splits for decode, from static shapes only (CUDA-graph safe).

    1 when batch * num_kv_heads >= _SINGLE_SPLIT_PROGRAMS_PER_SM * num_sms; else the smallest power of two
    S with batch * num_kv_heads * S >= _PROGRAMS_PER_SM * num_sms (enough programs to fill the GPU),
    capped so that a split of the largest possible context (max_blocks_per_seq * block_size) still holds
    >= _MIN_TOKENS_PER_SPLIT tokens, and at _MAX_SPLITS.
    At run time each sequence's own context is divided evenly among the S splits.
    """
    base = max(1, batch * num_kv_heads)
    if base >= _SINGLE_SPLIT_PROGRAMS_PER_SM * num_sms:
        return 1
    target = _PROGRAMS_PER_SM * num_sms
    s = 1
    while base * s < target and s < _MAX_SPLITS:
        s *= 2
    max_ctx = max(1, max_blocks_per_seq * block_size)
    cap = 1
    while cap * 2 * _MIN_TOKENS_PER_SPLIT <= max_ctx and cap * 2 <= _MAX_SPLITS:
        cap *= 2
    return max(1, min(s, cap))


def has_single_split_variant(batch: int, num_kv_heads: int, max_blocks_per_seq: int, block_size: int,
                             num_sms: int) -> bool:
    """Whether a decode CUDA graph of ``batch`` rows also gets a one-split variant (see
    _SINGLE_SPLIT_VARIANT_PROGRAMS_PER_SM): the rule splits it, yet its rows give >= 2.5 programs per SM."""
    return (choose_num_splits(batch, num_kv_heads, max_blocks_per_seq, block_size, num_sms) > 1
            and batch * num_kv_heads >= _SINGLE_SPLIT_VARIANT_PROGRAMS_PER_SM * num_sms)


def single_split_one_wave_rows(num_kv_heads: int, num_sms: int) -> int:
    """The most decode rows whose one-split grid the GPU holds at once. Above it the programs run in several
    waves, and with the rows longest context first (ModelRunner.launch) those that finish early make room for
    the rest, so spread contexts cost one split little; in a single wave the step waits on its longest
    context, and a spread favours the rule's splits (H200, scripts/probe.py "twin", docs/kernels.md
    "Dispatch order")."""
    return _MAX_RESIDENT_PROGRAMS_PER_SM * num_sms // max(1, num_kv_heads)


def _decode_config(num_splits: int, block_d: int, elem_bytes: int, programs: int, num_sms: int):
    """(BLOCK_N, num_warps, num_stages) of the decode split kernel with ``programs`` programs.

    A single split means each program loops over a whole context: 128-token tiles three stages deep keep
    more of it in flight (H200 sweep in docs/kernels.md), except between 3 and 4 programs per SM, where
    64-token tiles were faster (batch 64 x 8 KV heads = 512 programs: 36.3 against 39.7 us a layer at 512
    tokens; at 384, 640 and 768 programs the 128-token tiles won by 10-16 %; "split1" probe, H200,
    2026-12-01). The programs resident per SM explain it: four with 64-token tiles, three with 128-token
    ones (124 / 137 registers a thread with Triton 3.6, 38.5 / 72.5 KB of shared memory:
    scripts/kernel_resources.py), so 3-4 programs per SM run in one wave of the 64-token tiles, while at
    384, 640 and 768 programs the 128-token tiles fill their waves better. (That reading also predicted the
    64-token tiles faster at 7-8 programs per SM, batch 112-128; measured, they were not, so it is no general
    rule: docs/kernels.md, "Split sizing".) Short per-split loops, float32 caches and head dims above 128 keep
    the smaller tiles (and fit in shared memory)."""
    if block_d > 128:
        return 32, 4, 2
    if num_splits == 1 and elem_bytes <= 2:
        return (64, 4, 3) if 3 * num_sms < programs <= _MAX_RESIDENT_PROGRAMS_PER_SM * num_sms else (128, 4, 3)
    return 64, 4, 2


def tma_decode_applies(num_splits: int, block_size: int, head_dim: int, elem_bytes: int, programs: int,
                       num_sms: int, capability_major: int) -> bool:
    """Whether a decode call takes _decode_tma_kernel instead of the pointer-load kernel: one split, Hopper or
    later, 16-bit, head dim 64 or 128, KV blocks of >= 64 positions (a 64-position tile is one box of one
    block), and one wave of programs (<= _MAX_RESIDENT_PROGRAMS_PER_SM an SM: 128 registers, 38 KB of shared
    memory). There it reads the K/V closer to the copy bandwidth (H200, batch 64 x 640 tokens: 41.0 us a layer
    against the pointer kernel's 47.9 at the same blocks of 64 and 44.3 at blocks of 16; docs/kernels.md,
    "K/V tiles by TMA"). Tiles of several boxes over blocks of 16 were slower (50.2), and from two waves up the
    pointer kernel's 128-position tiles are as fast or faster."""
    return (num_splits == 1 and capability_major >= 9 and elem_bytes == 2 and head_dim in (64, 128)
            and block_size >= TMA_BLOCK_N and programs <= _MAX_RESIDENT_PROGRAMS_PER_SM * num_sms)


def _tma_decode_fits(q, k_cache, v_cache, out) -> bool:
    """tma_decode_applies to this one-split decode call, and q, out and the caches have the layout the kernel
    assumes. NANOVLLM_TMA_DECODE=0 turns it off (for A/B measurements; read at launch, so for graphs at
    capture)."""
    batch, _, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    return (q.device.type == "cuda" and os.environ.get("NANOVLLM_TMA_DECODE", "1") != "0"
            and tma_decode_applies(1, block_size, head_dim, q.element_size(), num_kv_heads * batch,
                                   device_sms(q.device), _capability_major(q.device))
            and q.dtype == k_cache.dtype and q.stride(2) == 1 and out.stride(2) == 1
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def _tma_decode_launch(q, k_cache, v_cache, block_tables, context_lens, scale, out, block_n=TMA_BLOCK_N,
                       stages=_TMA_STAGES):
    """One-split decode attention on _decode_tma_kernel (paged_decode_attention's contract)."""
    batch, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    assert block_size % block_n == 0, f"a {block_n}-position tile must lie in one block of {block_size}"
    from triton.tools.tensor_descriptor import TensorDescriptor  # host-side TMA descriptors, here only
    # Descriptors are host objects (the tensor map is made at launch; in a CUDA graph, once at capture).
    k_desc, v_desc = (TensorDescriptor.from_tensor(c.view(num_blocks * block_size, num_kv_heads * head_dim),
                                                   [block_n, head_dim]) for c in (k_cache, v_cache))
    use_pdl = pdl.enabled(q.device, "attention")
    group = num_q_heads // num_kv_heads
    _decode_tma_kernel[(num_kv_heads, batch)](
        q, k_desc, v_desc, block_tables, context_lens, out,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), scale * _LOG2E,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_SIZE=block_size, STAGES=stages, IEEE=q.dtype == torch.float32, PDL=use_pdl,
        num_warps=4, launch_pdl=use_pdl,
    )
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Single-token (decode) attention over the paged KV cache.

    q: [B, num_q_heads, head_dim], the query of position context_lens[b] - 1 of each sequence.
    block_tables: int32 [B, max_blocks_per_seq]; context_lens: int32 [B] (0 = padded row -> zeros).
    Attends to KV positions [0, context_lens[b]). Returns out [B, num_q_heads, head_dim] (q's dtype
    unless out is given). num_splits=None picks it from shapes (choose_num_splits).
    """
    return _decode_launch(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, out)


def _decode_launch(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None, out=None,
                   block_n=None, num_warps=None, num_stages=None):
    """paged_decode_attention with the tuning knobs exposed (benchmarks, autotuning offline)."""
    _check_cache(k_cache, v_cache)
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    assert cache_head_dim == head_dim, f"q head_dim {head_dim} != cache head_dim {cache_head_dim}"
    assert num_q_heads % num_kv_heads == 0, f"num_q_heads {num_q_heads} not a multiple of num_kv_heads {num_kv_heads}"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch, \
        f"block_tables must be [{batch}, max_blocks_per_seq], got {tuple(block_tables.shape)}"
    assert context_lens.shape == (batch,), f"context_lens must be [{batch}], got {tuple(context_lens.shape)}"
    assert block_tables.stride(1) == 1, "block_tables must be contiguous along its last dim"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape, f"out {tuple(out.shape)} must match q {tuple(q.shape)}"
    if batch == 0:
        return out

    group = num_q_heads // num_kv_heads
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    block_d = triton.next_power_of_2(head_dim)
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size,
                                       device_sms(q.device))
    num_splits = int(num_splits)
    assert num_splits >= 1
    if num_splits == 1 and block_n is None and _tma_decode_fits(q, k_cache, v_cache, out):
        return _tma_decode_launch(q, k_cache, v_cache, block_tables, context_lens, scale, out)
    default_n, default_warps, default_stages = _decode_config(
        num_splits, block_d, k_cache.element_size(), num_kv_heads * batch * num_splits, device_sms(q.device))
    block_n = block_n or default_n
    num_warps = num_warps or default_warps
    num_stages = num_stages or default_stages
    ieee = q.dtype == torch.float32
    use_pdl = pdl.enabled(q.device, "attention")

    if num_splits > 1:
        o_ws = torch.empty((batch, num_q_heads, num_splits, block_d), dtype=torch.float32, device=q.device)
        lse_ws = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        o_ws = lse_ws = out  # unused

    assert batch <= 65535, f"decode batch {batch} exceeds the CUDA grid's second dimension (65535)"
    _decode_split_kernel[(num_kv_heads, batch, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, o_ws, lse_ws,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        scale * _LOG2E,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, IEEE=ieee, PDL=use_pdl,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=use_pdl,
    )
    if num_splits > 1:
        block_s = triton.next_power_of_2(num_splits)
        _decode_reduce_kernel[(batch, num_q_heads)](
            o_ws, lse_ws, context_lens, out,
            out.stride(0), out.stride(1), out.stride(2),
            NUM_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
            NUM_SPLITS=num_splits, BLOCK_S=block_s, PDL=use_pdl,
            num_warps=4 if block_d * block_s >= 2048 else 2, launch_pdl=use_pdl,
        )
    return out


# --------------------------------------------------------------------------------------------------
# prefill: varlen causal attention over the paged cache (prefix caching, chunked prefill)
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["stride_bt_b"])  # see _decode_split_kernel
def _prefill_kernel(
    Q, KCache, VCache, BlockTables, CuSeqlensQ, ContextLens, Out, SeqIds,
    stride_qt, stride_qh, stride_qd,
    stride_k_slot, stride_k_h, stride_v_slot, stride_v_h,
    stride_bt_b,
    stride_ot, stride_oh, stride_od,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PER_TILE: tl.constexpr, HEADS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, IEEE: tl.constexpr, HAS_SEQ_IDS: tl.constexpr,
):
    # A tile of BLOCK_M query rows = BLOCK_M // HEADS_PAD tokens x HEADS_PAD heads (row r: token r // HEADS_PAD,
    # head r % HEADS_PAD of the program's HEADS_PER_TILE). HEADS_PER_TILE = GROUP packs a KV head's whole
    # query-head group into one tile, so each K/V tile loaded serves all of them; 1 gives a tile per q head.
    TOKENS: tl.constexpr = BLOCK_M // HEADS_PAD
    head0 = tl.program_id(0) * HEADS_PER_TILE
    # Largest query tiles (most KV work under the causal mask) are launched first.
    mblk = tl.num_programs(1) - 1 - tl.program_id(1)
    if HAS_SEQ_IDS:  # this launch covers only the sequences listed in SeqIds
        pid_b = tl.load(SeqIds + tl.program_id(2))
    else:
        pid_b = tl.program_id(2)

    q_start = tl.load(CuSeqlensQ + pid_b)
    q_len = tl.load(CuSeqlensQ + pid_b + 1) - q_start
    m_start = mblk * TOKENS  # first token of the tile
    if m_start >= q_len:
        return
    ctx = tl.load(ContextLens + pid_b)
    prefix = ctx - q_len  # KV position of query token 0

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m_start + offs_r // HEADS_PAD  # each row's token
    head_in_tile = offs_r % HEADS_PAD
    heads = head0 + head_in_tile
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = (offs_m < q_len) & (head_in_tile < HEADS_PER_TILE)
    mask_d = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q_pos = prefix + offs_m  # rows past q_len get positions >= ctx: they see all of [0, ctx) harmlessly

    kvh = head0 // GROUP
    bt_row = BlockTables + pid_b.to(tl.int64) * stride_bt_b
    k_base = KCache + kvh * stride_k_h
    v_base = VCache + kvh * stride_v_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Positions [0, full_end) are visible to every row of the tile (<= the first token's position,
    # and < ctx): no masking. full_end is a multiple of BLOCK_N.
    full_end = ((prefix + m_start + 1) // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(q, acc, l_i, m_i, k_base, v_base, bt_row, start_n, ctx, qk_scale, q_pos,
                                   stride_k_slot, stride_v_slot, offs_d, mask_d,
                                   BLOCK_SIZE, BLOCK_N, False, False, IEEE)
    # Diagonal tiles: causal mask, up to the last token's position (and < ctx). Every row has already
    # seen position 0 (full_end > 0) or sees it in the first tile here, so m_i stays finite.
    kv_end = tl.minimum(prefix + m_start + TOKENS, ctx)
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(q, acc, l_i, m_i, k_base, v_base, bt_row, start_n, kv_end, qk_scale, q_pos,
                                   stride_k_slot, stride_v_slot, offs_d, mask_d,
                                   BLOCK_SIZE, BLOCK_N, True, True, IEEE)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(Out + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             o.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _prefill_config(max_seqlen_q: int, block_d: int, heads_pad: int = 1):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel; BLOCK_M counts query rows, i.e.
    tokens x heads_pad when a tile packs a query-head group (_prefill_packs).

    Up to 16 rows (decode rows riding along in a chunked-prefill step: one token x the group's heads):
    (16, 128, 4, 2), streaming the context in long tiles as the decode kernel does. Up to 64 rows: one
    tile of the next power of two rows, 64-token K/V tiles. Longer: (64, 32, 4, 2). H200 (bf16,
    Hq=16/Hkv=8/D=128, `scripts/probe.py --only prefill,prefillpack`; docs/kernels.md): one of bench.py's
    prefill steps 205.4 us a layer packed at (64, 32, 4, 2), 212.3 with a tile per q head at the same
    config, 262.2 at the earlier (128, 64, 4, 3); 8 warps were slower everywhere. 128 decode rows of
    500-1100 tokens: 106.8 us packed at (16, 128, 4, 2), 112.3 at (16, 64, 4, 2), 139.0 unpacked. Head dims
    above 128 take 32-token K/V tiles at any length (shared memory).
    """
    rows = max(1, max_seqlen_q) * heads_pad
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if block_d > 128:
        return block_m, 32, 4, 2
    if rows <= 16:
        return block_m, 128, 4, 2
    if rows > 64:
        return block_m, 32, 4, 2
    return block_m, 64, 4, 2


def _prefill_packs(max_seqlen_q: int, group: int) -> bool:
    """Whether prefill tiles pack a KV head's query-head group (see _prefill_kernel), so that each K/V
    tile loaded serves the whole group: when the group fills its padded tile rows (a power of two), or
    when the queries are decode-like (<= 16 rows packed), where the K/V reads are the whole cost. Never
    for groups of more than 64 heads, which would not fit one token in the largest tile."""
    if group <= 1 or group > 64:
        return False
    return group & (group - 1) == 0 or max_seqlen_q * triton.next_power_of_2(group) <= 16


def prefill_tiles(max_seqlen_q: int, group: int, block_d: int, pack: Optional[bool] = None):
    """What a prefill launch runs: (HEADS_PER_TILE, HEADS_PAD, (BLOCK_M, BLOCK_N, warps, stages)).
    pack=None: the default (_prefill_packs). Shared with scripts/kernel_resources.py and scripts/probe.py."""
    if pack is None:
        pack = _prefill_packs(max_seqlen_q, group)
    heads_per_tile = group if pack else 1
    heads_pad = triton.next_power_of_2(heads_per_tile)
    return heads_per_tile, heads_pad, _prefill_config(max_seqlen_q, block_d, heads_pad)


# Sequences with at most this many new tokens (decode rows riding along in a chunked-prefill step) get a
# launch of their own with 16-row query tiles; see prefill_seq_groups.
SHORT_QUERY_LEN = 16


def prefill_seq_groups(q_lens) -> Optional[List[tuple]]:
    """Split a prefill batch by query length: [(indices of the sequences with <= SHORT_QUERY_LEN new
    tokens, their max q_len), (the others, theirs)], or None when one group would hold them all.

    One launch sizes its query tiles for the longest sequence (128 rows), so a decode row sharing a step
    with a long prompt would compute 128 rows for its one, over its whole context: in bench.py's chunked
    prefill steps (~16k prompt tokens next to ~200 decode rows) that made attention 16 of 45 ms."""
    q_lens = [int(n) for n in q_lens]
    short = [i for i, n in enumerate(q_lens) if n <= SHORT_QUERY_LEN]
    if not short or len(short) == len(q_lens):
        return None
    long = [i for i, n in enumerate(q_lens) if n > SHORT_QUERY_LEN]
    return [(short, max(q_lens[i] for i in short)), (long, max(q_lens[i] for i in long))]


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            block_tables: torch.Tensor, scale: float, max_seqlen_q: int,
                            out: Optional[torch.Tensor] = None, seq_groups: Optional[list] = None) -> torch.Tensor:
    """Causal attention of new query tokens over the paged KV cache (varlen batch).

    q: [T, num_q_heads, head_dim], the new tokens of B sequences concatenated (cu_seqlens_q int32
    [B+1]). context_lens int32 [B]: total KV length of each sequence including the new tokens, whose
    K/V are already in the cache. Query i of sequence b is at position context_lens[b] - q_len_b + i
    and attends to KV positions <= its own. max_seqlen_q (Python int, >= every q_len_b) sizes the grid.
    seq_groups: optional [(int32 device tensor of sequence indices, their max q_len)] covering every
    sequence once (``prefill_seq_groups``): one launch per group, each with tiles sized for its group.
    """
    if not seq_groups:
        return _prefill_launch(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                               max_seqlen_q, out)
    if out is None:
        out = torch.empty_like(q)
    for seq_ids, group_max_q in seq_groups:
        _prefill_launch(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, group_max_q, out,
                        seq_ids=seq_ids)
    return out


def _prefill_launch(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_seqlen_q,
                    out=None, config=None, seq_ids=None, pack=None):
    """paged_prefill_attention with the tuning knobs exposed: config = (block_m, block_n, warps, stages)
    (block_m counts query rows: tokens x heads a tile); pack: whether a tile holds a KV head's whole
    query-head group (None: the default for this query length); seq_ids: only these sequences (an int32
    device tensor), else all."""
    _check_cache(k_cache, v_cache)
    total, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    assert cache_head_dim == head_dim, f"q head_dim {head_dim} != cache head_dim {cache_head_dim}"
    assert num_q_heads % num_kv_heads == 0, f"num_q_heads {num_q_heads} not a multiple of num_kv_heads {num_kv_heads}"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    batch = cu_seqlens_q.shape[0] - 1
    assert context_lens.shape == (batch,), f"context_lens must be [{batch}], got {tuple(context_lens.shape)}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch, \
        f"block_tables must be [{batch}, max_blocks_per_seq], got {tuple(block_tables.shape)}"
    assert block_tables.stride(1) == 1, "block_tables must be contiguous along its last dim"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape, f"out {tuple(out.shape)} must match q {tuple(q.shape)}"
    max_seqlen_q = int(max_seqlen_q)
    if total == 0 or batch == 0 or max_seqlen_q <= 0:
        return out

    group = num_q_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    heads_per_tile, heads_pad, default_config = prefill_tiles(max_seqlen_q, group, block_d, pack)
    block_m, block_n, num_warps, num_stages = config or default_config
    assert block_m % heads_pad == 0, f"a tile of {block_m} rows cannot hold {heads_pad} heads"
    if seq_ids is not None:
        assert seq_ids.dtype == torch.int32 and seq_ids.dim() == 1, "seq_ids must be a 1-D int32 tensor"
        if seq_ids.numel() == 0:
            return out
    grid = (num_q_heads // heads_per_tile, triton.cdiv(max_seqlen_q, block_m // heads_pad),
            batch if seq_ids is None else seq_ids.numel())
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        seq_ids if seq_ids is not None else cu_seqlens_q,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        scale * _LOG2E,
        GROUP=group, HEAD_DIM=head_dim, HEADS_PER_TILE=heads_per_tile, HEADS_PAD=heads_pad,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, IEEE=q.dtype == torch.float32, HAS_SEQ_IDS=seq_ids is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
