"""y = x W^T for decode batches (a few to a few hundred rows), on tensor cores (Triton), with split-K.

At decode sizes a projection is a read of the weight, and cuBLAS leaves most of the bandwidth unused: it
tiles the *batch* by 64-128 rows, so a 1024-feature output (o_proj, down_proj) gives it 8-16 tiles for 132
SMs. Here the roles are swapped: each program computes a [BLOCK_N features x BLOCK_M rows] tile as
W_tile @ x_tile^T, so the weight's output features fill the MMA's large dimension and the batch its small
one, and the K dimension can be split over SPLIT_K programs that write float32 partial sums. The partial
sums are added up by whatever consumes them (``fused.rmsnorm`` takes them directly, see ``reduce_splits``),
so splitting costs no extra kernel in the model.

Fused epilogues: a bias, and SiLU-and-mul for a merged [gate | up] weight (the program computes the same
features of both halves and writes silu(gate) * up, rounded exactly like ``fused.silu_and_mul`` after a
plain projection).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from workers.kernels import pdl
from workers.kernels.pdl import enter as pdl_enter
from workers.kernels.triton_attention import device_sms
from workers.norm_input import NormInput, PendingNorm


@triton.jit
def _norm_prologue_rstd(ss_ptr, offs_m, M, K, eps, PARTS: tl.constexpr):
    """1 / RMS of rows offs_m, from their sums of squares in PARTS per-tile pieces [PARTS, M] (NormInput)."""
    ss = tl.zeros(offs_m.shape, tl.float32)
    for p in tl.static_range(PARTS):
        ss += tl.load(ss_ptr + p * M + offs_m, mask=offs_m < M, other=0.0)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def _norm_prologue_apply(x, rstd, g_ptr, offs_k):
    """An x tile [BLOCK_K, BLOCK_M] of the residual stream -> its RMSNorm, rounded exactly like
    fused.rmsnorm: the normalized value in the model dtype, then times the norm weight."""
    return (x.to(tl.float32) * rstd[None, :]).to(x.dtype) * tl.load(g_ptr + offs_k)[:, None]


@triton.jit
def _add_residual_epilogue(total, r_ptr, r_out_ptr, ss_out_ptr, offs_n, offs_m, pid_n, M, stride_rm):
    """The projection's float32 result [BLOCK_N, BLOCK_M] -> the residual stream: rounded to the model dtype,
    plus the old residual (rounded, as ``y + residual`` in torch), written to r_out; this tile's part of
    the rows' sums of squares goes to row pid_n of ss_out [tiles, M] for the next projection's norm."""
    mask = (offs_m[None, :] < M) & (offs_n[:, None] >= 0)
    offs = offs_m[None, :].to(tl.int64) * stride_rm + offs_n[:, None]
    h = total.to(r_ptr.dtype.element_ty) + tl.load(r_ptr + offs, mask=mask, other=0.0)
    tl.store(r_out_ptr + offs, h, mask=mask)
    hf = h.to(tl.float32)
    tl.store(ss_out_ptr + pid_n * M + offs_m, tl.sum(hf * hf, axis=0), mask=offs_m < M)


@triton.jit
def _decode_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, K_PER_SPLIT, HALF_N, stride_xm, stride_wn, stride_ys,
                        stride_ym, ss_in_ptr, g_ptr, eps, r_ptr, r_out_ptr, ss_out_ptr, cnt_ptr,
                        HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, SPLITS: tl.constexpr,
                        NORM_PARTS: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        STAGES: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_s * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    x_mask = offs_m[None, :] < M
    if NORM_PARTS > 0:  # x is the residual stream; its RMSNorm is applied here (one split: whole rows)
        rstd = _norm_prologue_rstd(ss_in_ptr, offs_m, M, K_PER_SPLIT, eps, NORM_PARTS)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # SILU_MUL only (unused otherwise: eliminated)
    up_offset = HALF_N.to(tl.int64) * stride_wn
    for k0 in tl.range(0, K_PER_SPLIT, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptrs + k0, mask=x_mask, other=0.0)
        if NORM_PARTS > 0:
            x = _norm_prologue_apply(x, rstd, g_ptr, offs_k + k0)
        acc = tl.dot(tl.load(w_ptrs + k0), x, acc, input_precision=PRECISION)
        if SILU_MUL:
            acc_up = tl.dot(tl.load(w_ptrs + up_offset + k0), x, acc_up, input_precision=PRECISION)
    if HAS_BIAS:  # added once: by the first split
        first = (pid_s == 0).to(tl.float32)
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[:, None] * first
        if SILU_MUL:
            acc_up += tl.load(b_ptr + HALF_N + offs_n).to(tl.float32)[:, None] * first
    y_ptrs = y_ptr + pid_s * stride_ys + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    if ADD_RESIDUAL:
        if SPLITS > 1:
            # every split stores its partial sums; the last of the tile's splits to arrive adds them up (in
            # split order, so the result does not depend on who came last) and resets the tile's counter
            tl.store(y_ptrs, acc, mask=x_mask)
            tl.debug_barrier()  # all of this program's stores issued before the release below
            tile = pid_m * tl.num_programs(0) + pid_n
            if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == SPLITS - 1:
                total = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                for s in tl.static_range(SPLITS):
                    total += tl.load(y_ptrs + (s - pid_s) * stride_ys, mask=x_mask, other=0.0,
                                     cache_modifier=".cg")
                tl.store(cnt_ptr + tile, 0)
                _add_residual_epilogue(total, r_ptr, r_out_ptr, ss_out_ptr, offs_n, offs_m, pid_n, M, stride_ym)
        else:
            _add_residual_epilogue(acc, r_ptr, r_out_ptr, ss_out_ptr, offs_n, offs_m, pid_n, M, stride_ym)
    elif SPLITS > 1:
        tl.store(y_ptrs, acc, mask=x_mask)
    elif SILU_MUL:
        # round both halves to the model dtype first, as the unfused projection + silu_and_mul would
        gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(y_ptr.dtype.element_ty)
        tl.store(y_ptrs, silu * acc_up.to(y_ptr.dtype.element_ty), mask=x_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=x_mask)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    stages: int
    warps: int


class SplitSums(NamedTuple):
    """Float32 partial sums [splits, M, N] of one projection; ``reduce_splits`` turns them into y."""
    parts: torch.Tensor
    dtype: torch.dtype


def tiles(config: GemmConfig, m: int, n: int, k: int) -> bool:
    """Whether the shape tiles with this config (every program gets whole K and N blocks)."""
    return (n % config.block_n == 0 and k % (config.split_k * config.block_k) == 0
            and config.block_m >= 16 and config.block_n >= 16 and config.block_k >= 16)


def tile_counter_count(n: int) -> int:
    """Size of the int32 counters ``decode_gemm(..., residual=)`` needs for an [*, n] output: one per
    (16-feature, 16-row) tile up to MAX_ROWS rows. They must be zero before a call and are zero after it
    (the kernel resets what it used), so one buffer, allocated zeroed, serves every call."""
    return max(1, n // 16) * (MAX_ROWS // 16)


def decode_gemm(x, weight: torch.Tensor, config: GemmConfig, bias: Optional[torch.Tensor] = None,
                silu_mul: bool = False, residual: Optional[torch.Tensor] = None,
                tile_counters: Optional[torch.Tensor] = None):
    """x [M, K] @ weight [N, K]^T (+ bias). With ``silu_mul`` the weight is [gate | up] (N = 2 I) and the
    result is silu(gate) * up [M, I]. With ``config.split_k > 1`` returns ``SplitSums`` (not with
    silu_mul), else the [M, N] tensor in x's dtype.

    ``x`` may be a ``PendingNorm`` (one split only): the norm is applied to each x tile as it is loaded.
    With ``residual`` [M, N] (no bias, no silu_mul) the result is added to it in the epilogue and the return
    is ``NormInput(x W^T + residual, its rows' sums of squares)``; with split K the last split of each tile
    to finish adds the splits up, counted in ``tile_counters`` (see ``tile_counter_count``)."""
    norm = x if isinstance(x, PendingNorm) else None
    if norm is not None:
        x = norm.source.x
    m, k = x.shape
    n = weight.shape[0]
    out_n = n // 2 if silu_mul else n
    assert x.stride(1) == 1 and weight.stride(1) == 1 and weight.shape[1] == k
    assert tiles(config, m, out_n, k) and not (silu_mul and config.split_k > 1)
    assert norm is None or (config.split_k == 1 and norm.source.sumsq_parts.shape[1] == m)
    split = config.split_k > 1
    has_res = residual is not None
    if has_res:
        assert bias is None and not silu_mul and residual.shape == (m, n) and residual.is_contiguous()
        assert tile_counters.numel() >= n // config.block_n * triton.cdiv(m, config.block_m)
        r_out = torch.empty_like(residual)
        sumsq = torch.empty(n // config.block_n, m, dtype=torch.float32, device=x.device)
    if split:
        y = torch.empty(config.split_k, m, out_n, dtype=torch.float32, device=x.device)
    elif has_res:
        y = r_out  # (not written: the epilogue writes r_out; the row stride is the same)
    else:
        y = torch.empty(m, out_n, dtype=x.dtype, device=x.device)
    grid = (out_n // config.block_n, config.split_k, triton.cdiv(m, config.block_m))
    use_pdl = pdl.enabled(x.device, "gemm")
    unused = y  # pointer arguments of the features not in use
    _decode_gemm_kernel[grid](
        x, weight, bias if bias is not None else weight, y, m, k // config.split_k, out_n, x.stride(0),
        weight.stride(0), y.stride(0) if split else 0, y.stride(-2),
        norm.source.sumsq_parts if norm else unused, norm.weight if norm else weight, norm.eps if norm else 0.0,
        residual if has_res else unused, r_out if has_res else unused, sumsq if has_res else unused,
        tile_counters if has_res else unused,
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, SPLITS=config.split_k,
        NORM_PARTS=norm.source.sumsq_parts.shape[0] if norm else 0, ADD_RESIDUAL=has_res,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, STAGES=config.stages,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=use_pdl, num_warps=config.warps,
        launch_pdl=use_pdl)
    if has_res:
        return NormInput(r_out, sumsq)
    return SplitSums(y, x.dtype) if split else y


def reduce_splits(y) -> torch.Tensor:
    """A projection's output as a tensor: the sum of ``SplitSums``, rounded to the model dtype once (as a
    GEMM rounds its float32 accumulator); a tensor passes through."""
    if isinstance(y, SplitSums):
        return y.parts.sum(0).to(y.dtype)
    return y


# Largest batch this kernel takes, and the shared memory its pipeline may fill (H100/H200: 227 KB a block)
MAX_ROWS = 256
_SMEM_BUDGET = 200 * 1024


def choose_config(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool = False,
                  allow_split: bool = False) -> Optional[GemmConfig]:
    """The config for x @ weight^T, or None where cuBLAS is the better (or the only) choice.

    From the H200 sweep (scripts/probe.py dgemm, docs/kernels.md): 64 features x 128-deep K tiles (64-deep
    for gate/up + SiLU at 33-64 rows), 5 stages; 16 / 32 / 64 batch rows a tile for up to 16 / 64 / 256
    rows; K split (``allow_split``: the caller takes ``SplitSums``) into the most pieces, up to 8, that keep
    one program per SM at most. Up to 64 rows this beats cuBLAS for every Qwen3-0.6B projection; above,
    only where the split applies (1024-feature outputs, which cuBLAS covers with 8-16 tiles), so larger
    batches keep cuBLAS otherwise. (Taking every projection up to 128 rows measured the same in bench.py,
    4.97 against 4.99 s; up to 256, slower: 5.08 s.)"""
    if not (_runs(x, weight, MAX_ROWS) and (not silu_mul or weight.shape[0] % 2 == 0)):
        return None
    return config_for_shape(x.shape[0], weight.shape[0], x.shape[1], x.element_size(), device_sms(x.device),
                            silu_mul, allow_split)


def config_for_shape(m: int, n: int, k: int, elem_bytes: int, num_sms: int, silu_mul: bool = False,
                     allow_split: bool = False) -> Optional[GemmConfig]:
    """``choose_config``'s choice from the shapes alone, once the tensors qualify (scripts/kernel_resources.py
    compiles these configs without a GPU)."""
    out_n = n // 2 if silu_mul else n
    block_m = 16 if m <= 16 else (32 if m <= 64 else 64)
    block_n = next((b for b in (64, 32, 16) if out_n % b == 0), None)
    block_k = _k_tile(k)
    if silu_mul and 32 < m <= 64 and k % 64 == 0:
        # two 32-row tiles of [gate | up]: 64-deep K tiles ran 6.5-6.6 us a layer against 7.6-7.7 with
        # 128-deep ones at 40-64 rows (H200, 2026-12-01); at <= 32 rows 128 stays (5.8-6.3 us)
        block_k = 64
    if block_n is None or block_k is None:
        return None
    tiles = out_n // block_n * triton.cdiv(m, block_m)
    split = 1
    if allow_split and not silu_mul:
        while split < 8 and tiles * split * 2 <= num_sms and k % (split * 2 * block_k) == 0:
            split *= 2
    if m > 64 and split == 1:
        return None
    stages = pipeline_stages(((2 if silu_mul else 1) * block_n + block_m) * block_k * elem_bytes)
    return GemmConfig(block_m, block_n, block_k, split, stages, 4)


def _runs(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """Whether these kernels take x [M, K] @ weight [N, K]^T at all: CUDA, 2..max_rows rows, one 16/32-bit
    float dtype, unit stride along K."""
    m, k = x.shape
    return (x.is_cuda and 2 <= m <= max_rows and weight.shape[1] == k and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.stride(1) == 1 and weight.stride(1) == 1)


def _k_tile(k: int) -> Optional[int]:
    """The deepest K tile (128 down to 16) that divides K, or None."""
    return next((b for b in (128, 64, 32, 16) if k % b == 0), None)


def pipeline_stages(bytes_per_stage: int) -> int:
    """How many K tiles deep the pipeline goes: what fits the shared-memory budget, 2 to 5."""
    return max(2, min(5, _SMEM_BUDGET // bytes_per_stage))


# ---- q/k/v projection with q/k RMSNorm, rotary and the K/V cache write in its epilogue -------------------

@triton.jit
def _qkv_rope_kernel(x_ptr, w_ptr, b_ptr, y_ptr, qw_ptr, kw_ptr, cos_sin_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr,
                     M, K, stride_xm, stride_wn, stride_ym, stride_cs, stride_c_slot, stride_c_h, eps,
                     ss_in_ptr, g_ptr, norm_eps, NORM_PARTS: tl.constexpr, NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_NORM: tl.constexpr, STORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     STAGES: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """One program: one head's 2 * HALF output features for BLOCK_M rows, as two [HALF, BLOCK_M] halves (the
    pair rotary mixes). q and k heads then get their RMSNorm and rotary, with the rounding points of
    fused.qk_norm_rope after a plain projection; every head is written to y, and with STORE the k and v heads
    also into the paged caches at the rows' slots (slot < 0: padding, not written). With NORM_PARTS > 0, x
    is the residual stream and the layer's input RMSNorm is applied to its tiles first (PendingNorm)."""
    pdl_enter(PDL)
    head = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_d = tl.arange(0, HALF)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    feat = head * (2 * HALF) + offs_d
    w1_ptrs = w_ptr + feat[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    w2_ptrs = w1_ptrs + HALF * stride_wn
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    if NORM_PARTS > 0:
        rstd = _norm_prologue_rstd(ss_in_ptr, offs_m, M, K, norm_eps, NORM_PARTS)
    acc1 = tl.zeros([HALF, BLOCK_M], tl.float32)
    acc2 = tl.zeros([HALF, BLOCK_M], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptrs + k0, mask=m_mask[None, :], other=0.0)
        if NORM_PARTS > 0:
            x = _norm_prologue_apply(x, rstd, g_ptr, offs_k + k0)
        acc1 = tl.dot(tl.load(w1_ptrs + k0), x, acc1, input_precision=PRECISION)
        acc2 = tl.dot(tl.load(w2_ptrs + k0), x, acc2, input_precision=PRECISION)
    if HAS_BIAS:
        acc1 += tl.load(b_ptr + feat).to(tl.float32)[:, None]
        acc2 += tl.load(b_ptr + feat + HALF).to(tl.float32)[:, None]
    dtype = y_ptr.dtype.element_ty
    y1 = acc1.to(dtype)  # the projection's output, rounded as a GEMM would
    y2 = acc2.to(dtype)
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + feat[:, None]
    store_mask = m_mask[None, :] & (offs_d[:, None] < HALF)
    slot = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
    cache_mask = (slot[None, :] >= 0) & (offs_d[:, None] < HALF)
    if head < NUM_Q + NUM_KV:  # a q or k head: RMSNorm (Qwen3), then rotary
        f1 = y1.to(tl.float32)
        f2 = y2.to(tl.float32)
        if HAS_NORM:
            is_q = head < NUM_Q
            # the head's norm weight: q_norm's or k_norm's (masked loads, no pointer select)
            nw1 = (tl.load(qw_ptr + offs_d, mask=offs_d < tl.where(is_q, HALF, 0), other=0.0)
                   + tl.load(kw_ptr + offs_d, mask=offs_d < tl.where(is_q, 0, HALF), other=0.0))
            nw2 = (tl.load(qw_ptr + HALF + offs_d, mask=offs_d < tl.where(is_q, HALF, 0), other=0.0)
                   + tl.load(kw_ptr + HALF + offs_d, mask=offs_d < tl.where(is_q, 0, HALF), other=0.0))
            inv = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / (2 * HALF) + eps)[None, :]
            f1 = ((f1 * inv).to(dtype) * nw1[:, None]).to(tl.float32)
            f2 = ((f2 * inv).to(dtype) * nw2[:, None]).to(tl.float32)
        pos = tl.load(pos_ptr + offs_m, mask=m_mask, other=0)
        cs_ptrs = cos_sin_ptr + pos[None, :].to(tl.int64) * stride_cs + offs_d[:, None]
        cos = tl.load(cs_ptrs).to(tl.float32)
        sin = tl.load(cs_ptrs + HALF).to(tl.float32)
        r1 = (f1 * cos - f2 * sin).to(dtype)
        r2 = (f2 * cos + f1 * sin).to(dtype)
        tl.store(y_ptrs, r1, mask=store_mask)
        tl.store(y_ptrs + HALF, r2, mask=store_mask)
        if STORE:
            if head >= NUM_Q:
                dst = kc_ptr + slot[None, :] * stride_c_slot + (head - NUM_Q) * stride_c_h + offs_d[:, None]
                tl.store(dst, r1, mask=cache_mask)
                tl.store(dst + HALF, r2, mask=cache_mask)
    else:  # a v head: as projected
        tl.store(y_ptrs, y1, mask=store_mask)
        tl.store(y_ptrs + HALF, y2, mask=store_mask)
        if STORE:
            dst = vc_ptr + slot[None, :] * stride_c_slot + (head - NUM_Q - NUM_KV) * stride_c_h + offs_d[:, None]
            tl.store(dst, y1, mask=cache_mask)
            tl.store(dst + HALF, y2, mask=cache_mask)


class QkvRopeConfig(NamedTuple):
    block_m: int
    block_k: int
    stages: int
    warps: int


# Most rows ``qkv_rope`` takes: at 192-256 rows cuBLAS + the separate norm/rotary kernel is as fast
QKV_ROPE_MAX_ROWS = 128


def choose_qkv_rope_config(x: torch.Tensor, weight: torch.Tensor, head_dim: int) -> Optional[QkvRopeConfig]:
    """The config for ``qkv_rope``, or None where the projection + fused.qk_norm_rope is the choice.

    H200 (scripts/probe.py qkvrope, Qwen3-0.6B shapes, µs per layer, unfused -> fused): 6.9 -> 6.4 at 2-8
    rows, 7.4 -> 6.6 at 32, 7.7 -> 7.4 at 64, 8.8 -> 8.1 at 128, but 9.1 -> 9.5 at 192. 16 batch rows a tile
    up to 64 rows (one head x 16 rows a program keeps >= 128 programs busy), 32 above; 128-deep K tiles."""
    half = head_dim // 2
    if not (_runs(x, weight, QKV_ROPE_MAX_ROWS) and half >= 16 and (half & (half - 1)) == 0
            and weight.shape[0] % head_dim == 0):
        return None
    return qkv_rope_config_for_shape(x.shape[0], x.shape[1], head_dim, x.element_size())


def qkv_rope_config_for_shape(m: int, k: int, head_dim: int, elem_bytes: int) -> Optional[QkvRopeConfig]:
    """``choose_qkv_rope_config``'s choice from the shapes alone, once the tensors qualify."""
    block_k = _k_tile(k)
    if block_k is None:
        return None
    block_m = 16 if m <= 64 else 32
    stages = pipeline_stages((head_dim + block_m) * block_k * elem_bytes)
    return QkvRopeConfig(block_m, block_k, stages, 4)


def qkv_rope(x, weight: torch.Tensor, bias: Optional[torch.Tensor], config: QkvRopeConfig,
             num_heads: int, num_kv_heads: int, head_dim: int, positions: torch.Tensor, cos_sin: torch.Tensor,
             q_weight: Optional[torch.Tensor] = None, k_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
             k_cache: Optional[torch.Tensor] = None, v_cache: Optional[torch.Tensor] = None,
             slot_mapping: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] @ weight^T (+ bias) = [q | k | v] [M, (Hq + 2 Hk) * D], with q and k already normed (when
    the weights are given) and rotated at ``positions`` by the neox-style ``cos_sin`` table [pos, D] (cos |
    sin); given the paged caches [blocks, block_size, Hk, D] and slot_mapping [M], the rotated k and the v
    also go into the caches. What ``qkv_proj`` + ``fused.qk_norm_rope(..., k_cache=...)`` do, in one kernel.
    ``x`` may be a ``PendingNorm`` (the layer's input norm, applied to the x tiles as they are loaded)."""
    norm = x if isinstance(x, PendingNorm) else None
    if norm is not None:
        x = norm.source.x
    m, k = x.shape
    heads = num_heads + 2 * num_kv_heads
    assert weight.shape == (heads * head_dim, k) and x.stride(1) == 1 and weight.stride(1) == 1
    assert k % config.block_k == 0 and positions.shape == (m,)
    assert norm is None or norm.source.sumsq_parts.shape[1] == m
    store = k_cache is not None
    if store:
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (num_kv_heads, head_dim)
        assert slot_mapping.shape == (m,)
    y = torch.empty(m, heads * head_dim, dtype=x.dtype, device=x.device)
    has_norm = q_weight is not None
    use_pdl = pdl.enabled(x.device, "gemm")
    _qkv_rope_kernel[(heads, triton.cdiv(m, config.block_m))](
        x, weight, bias if bias is not None else weight, y, q_weight if has_norm else weight,
        k_weight if has_norm else weight, cos_sin, positions, k_cache if store else y, v_cache if store else y,
        slot_mapping if store else positions, m, k, x.stride(0), weight.stride(0), y.stride(0), cos_sin.stride(0),
        k_cache.stride(-3) if store else 0, k_cache.stride(-2) if store else 0, eps,
        norm.source.sumsq_parts if norm else y, norm.weight if norm else weight, norm.eps if norm else 0.0,
        NORM_PARTS=norm.source.sumsq_parts.shape[0] if norm else 0, NUM_Q=num_heads, NUM_KV=num_kv_heads, HALF=head_dim // 2, HAS_BIAS=bias is not None, HAS_NORM=has_norm,
        STORE=store, BLOCK_M=config.block_m, BLOCK_K=config.block_k, STAGES=config.stages,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=use_pdl, num_warps=config.warps,
        launch_pdl=use_pdl)
    return y
