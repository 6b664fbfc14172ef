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


@triton.jit
def _decode_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, K_PER_SPLIT, HALF_N, stride_xm, stride_wn, stride_ys,
                        stride_ym, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, SPLIT_OUT: tl.constexpr,
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
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # SILU_MUL only (unused otherwise: eliminated)
    up_offset = HALF_N.to(tl.int64) * stride_wn
    for k0 in tl.range(0, K_PER_SPLIT, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptrs + k0, mask=x_mask, other=0.0)
        acc = tl.dot(tl.load(w_ptrs + k0), x, acc, input_precision=PRECISION)
        if SILU_MUL:
            acc_up = tl.dot(tl.load(w_ptrs + up_offset + k0), x, acc_up, input_precision=PRECISION)
    if HAS_BIAS:  # added once: by the first split
        first = (pid_s == 0).to(tl.float32)
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[:, None] * first
        if SILU_MUL:
            acc_up += tl.load(b_ptr + HALF_N + offs_n).to(tl.float32)[:, None] * first
    y_ptrs = y_ptr + pid_s * stride_ys + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    if SPLIT_OUT:
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


def decode_gemm(x: torch.Tensor, weight: torch.Tensor, config: GemmConfig, bias: Optional[torch.Tensor] = None,
                silu_mul: bool = False):
    """x [M, K] @ weight [N, K]^T (+ bias). With ``silu_mul`` the weight is [gate | up] (N = 2 I) and the
    result is silu(gate) * up [M, I]. With ``config.split_k > 1`` returns ``SplitSums`` (not with
    silu_mul), else the [M, N] tensor in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    out_n = n // 2 if silu_mul else n
    assert x.stride(1) == 1 and weight.stride(1) == 1 and weight.shape[1] == k
    assert tiles(config, m, out_n, k) and not (silu_mul and config.split_k > 1)
    split = config.split_k > 1
    if split:
        y = torch.empty(config.split_k, m, out_n, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(m, out_n, dtype=x.dtype, device=x.device)
    grid = (out_n // config.block_n, config.split_k, triton.cdiv(m, config.block_m))
    use_pdl = pdl.enabled(x.device, "gemm")
    _decode_gemm_kernel[grid](
        x, weight, bias if bias is not None else weight, y, m, k // config.split_k, out_n, x.stride(0),
        weight.stride(0), y.stride(0) if split else 0, y.stride(-2),
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, SPLIT_OUT=split, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, STAGES=config.stages,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=use_pdl, num_warps=config.warps,
        launch_pdl=use_pdl)
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
                     NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr, PARTS: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, STORE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """One program: 2 * HALF / PARTS output features of one head for BLOCK_M rows: its share of the head's
    rotary pairs (features d and d + HALF, which rotary mixes), as two [HALF / PARTS, BLOCK_M] halves. q and k
    heads then get their RMSNorm and rotary, with the rounding points of fused.qk_norm_rope after a plain
    projection; every head is written to y, and with STORE the k and v heads also into the paged caches at
    the rows' slots (slot < 0: padding, not written). PARTS > 1 (no program has a whole head) only without
    the norm (HAS_NORM false)."""
    pdl_enter(PDL)
    head = tl.program_id(0) // PARTS
    part = tl.program_id(0) % PARTS
    PAIRS: tl.constexpr = HALF // PARTS
    pid_m = tl.program_id(1)
    offs_d = part * PAIRS + tl.arange(0, PAIRS)  # this program's rotary pairs: features d and d + HALF
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    feat = head * (2 * HALF) + offs_d
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    if PARTS == 1:
        w1_ptrs = w_ptr + feat[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        w2_ptrs = w1_ptrs + HALF * stride_wn
        acc1 = tl.zeros([HALF, BLOCK_M], tl.float32)
        acc2 = tl.zeros([HALF, BLOCK_M], tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            x = tl.load(x_ptrs + k0, mask=m_mask[None, :], other=0.0)
            acc1 = tl.dot(tl.load(w1_ptrs + k0), x, acc1, input_precision=PRECISION)
            acc2 = tl.dot(tl.load(w2_ptrs + k0), x, acc2, input_precision=PRECISION)
    else:
        # both halves' rows of the pairs stacked into one tile: one dot with >= 64 rows (wgmma), split after
        offs_r = tl.arange(0, 2 * PAIRS)
        rows = head * (2 * HALF) + part * PAIRS + offs_r % PAIRS + (offs_r // PAIRS) * HALF
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        acc = tl.zeros([2 * PAIRS, BLOCK_M], tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            x = tl.load(x_ptrs + k0, mask=m_mask[None, :], other=0.0)
            acc = tl.dot(tl.load(w_ptrs + k0), x, acc, input_precision=PRECISION)
        acc1, acc2 = tl.split(tl.permute(tl.reshape(acc, (2, PAIRS, BLOCK_M)), (1, 2, 0)))
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
    parts: int = 1  # programs a head, each with head_dim / 2 / parts of its rotary pairs (> 1: no q/k norm)


# Most rows ``qkv_rope`` takes: at 192-256 rows cuBLAS + the separate norm/rotary kernel is as fast
QKV_ROPE_MAX_ROWS = 128


def choose_qkv_rope_config(x: torch.Tensor, weight: torch.Tensor, head_dim: int,
                           qk_norm: bool = True) -> Optional[QkvRopeConfig]:
    """The config for ``qkv_rope``, or None where the projection + fused.qk_norm_rope is the choice.
    ``qk_norm``: the call normalizes q and k (Qwen3), which needs a whole head in one program.

    H200 (scripts/probe.py qkvrope, Qwen3-0.6B shapes, µs per layer, unfused -> fused): 6.9 -> 6.4 at 2-8
    rows, 7.4 -> 6.6 at 32, 7.7 -> 7.4 at 64, 8.8 -> 8.1 at 128, but 9.1 -> 9.5 at 192. 16 batch rows a tile
    up to 64 rows (one head x 16 rows a program keeps >= 128 programs busy), 32 above; 128-deep K tiles."""
    half = head_dim // 2
    if not (_runs(x, weight, QKV_ROPE_MAX_ROWS) and half >= 16 and (half & (half - 1)) == 0
            and weight.shape[0] % head_dim == 0):
        return None
    return qkv_rope_config_for_shape(x.shape[0], x.shape[1], head_dim, x.element_size(), qk_norm)


def qkv_rope_config_for_shape(m: int, k: int, head_dim: int, elem_bytes: int,
                              qk_norm: bool = True) -> Optional[QkvRopeConfig]:
    """``choose_qkv_rope_config``'s choice from the shapes alone, once the tensors qualify.

    A program streams its weight rows along K, and at these sizes its time follows those bytes, so without
    the q/k norm heads wider than 64 features go over head_dim / 64 programs (H200, 2026-12-02,
    ``scripts/probe.py --only qkvparts``, Qwen3-0.6B without the q/k norm, µs a layer, one program a head ->
    two: 6.0-6.1 -> 4.7-4.8 at 2-16 rows, 6.1 -> 5.0 at 32, 6.8 -> 5.3 at 64, 7.3-7.5 -> 6.0-6.1 at 96-128)."""
    block_k = _k_tile(k)
    if block_k is None:
        return None
    parts = 1 if qk_norm else max(1, head_dim // 64)
    if parts == 1:
        block_m = 16 if m <= 64 else 32
    else:
        block_m = 16 if m <= 32 else (32 if m <= 64 else 64)
    stages = pipeline_stages((head_dim // parts + block_m) * block_k * elem_bytes)
    return QkvRopeConfig(block_m, block_k, stages, 4, parts)


def qkv_rope(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], config: QkvRopeConfig,
             num_heads: int, num_kv_heads: int, head_dim: int, positions: torch.Tensor, cos_sin: torch.Tensor,
             q_weight: Optional[torch.Tensor] = None, k_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
             k_cache: Optional[torch.Tensor] = None, v_cache: Optional[torch.Tensor] = None,
             slot_mapping: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] @ weight^T (+ bias) = [q | k | v] [M, (Hq + 2 Hk) * D], with q and k already normed (when
    the weights are given) and rotated at ``positions`` by the neox-style ``cos_sin`` table [pos, D] (cos |
    sin); given the paged caches [blocks, block_size, Hk, D] and slot_mapping [M], the rotated k and the v
    also go into the caches. What ``qkv_proj`` + ``fused.qk_norm_rope(..., k_cache=...)`` do, in one kernel."""
    m, k = x.shape
    heads = num_heads + 2 * num_kv_heads
    assert weight.shape == (heads * head_dim, k) and x.stride(1) == 1 and weight.stride(1) == 1
    assert k % config.block_k == 0 and positions.shape == (m,)
    store = k_cache is not None
    if store:
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (num_kv_heads, head_dim)
        assert slot_mapping.shape == (m,)
    y = torch.empty(m, heads * head_dim, dtype=x.dtype, device=x.device)
    has_norm = q_weight is not None
    assert config.parts == 1 or not has_norm, "the q/k norm needs a whole head in one program"
    use_pdl = pdl.enabled(x.device, "gemm")
    _qkv_rope_kernel[(heads * config.parts, triton.cdiv(m, config.block_m))](
        x, weight, bias if bias is not None else weight, y, q_weight if has_norm else weight,
        k_weight if has_norm else weight, cos_sin, positions, k_cache if store else y, v_cache if store else y,
        slot_mapping if store else positions, m, k, x.stride(0), weight.stride(0),
        y.stride(0), cos_sin.stride(0), k_cache.stride(-3) if store else 0, k_cache.stride(-2) if store else 0, eps,
        NUM_Q=num_heads, NUM_KV=num_kv_heads, HALF=head_dim // 2, PARTS=config.parts, HAS_BIAS=bias is not None,
        HAS_NORM=has_norm, STORE=store, BLOCK_M=config.block_m, BLOCK_K=config.block_k, STAGES=config.stages,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=use_pdl, num_warps=config.warps,
        launch_pdl=use_pdl)
    return y
