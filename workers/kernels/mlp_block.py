"""The decode MLP block as one persistent kernel: phases separated by grid barriers instead of kernel
boundaries (an experiment toward a persistent decode layer; see docs/kernels.md).

At 2-64 decode rows the block after attention is three kernels (add+RMSNorm, gate/up + SiLU, down), each
bound by its ramp and latency rather than by its bytes. Here one grid of ``num_programs`` <= #SMs programs,
all resident at once, runs them as phases:

1. (optional, ``with_o``) o_proj: the attention output @ W_o^T as float32 split-K partial sums;
2. add+RMSNorm: the partial sums added up and rounded, plus the residual (new residual stream), normed;
3. gate/up with SiLU-and-mul: [BLOCK_N features x BLOCK_M rows] tiles of both halves, written as h;
4. down: split-K float32 partial sums, returned as ``SplitSums`` for the next layer's RMSNorm.

Between phases every program waits at a grid barrier (an arrival counter and a generation word in a small
int32 buffer the caller keeps; the barrier leaves the counter at zero, so the buffer serves every call).
With ``prefetch`` each program loads the first K tile of its next phase's weights before it waits: the
weights do not depend on the phase before, so their latency overlaps the barrier's.

Results are rounded at exactly the points of the unfused path (``fused.rmsnorm``, ``decode_gemm``'s SiLU
epilogue), so the two agree but for the order of the down projection's partial sums.

Under Triton's interpreter (CPU) programs run one after another, so a grid barrier would never open: there
every phase is its own launch (``phases_per_launch=1``), which checks the arithmetic but not the barrier.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from workers.kernels import pdl
from workers.kernels.decode_gemm import SplitSums, silu_mul_epilogue
from workers.kernels.fused import add_rmsnorm_row
from workers.kernels.pdl import enter as pdl_enter
from workers.kernels.triton_attention import device_sms


@triton.jit
def _grid_barrier(sync_ptr, nprog):
    """All programs of the grid meet here: writes before it are visible to every program after it.
    sync_ptr[0] counts arrivals (the last arrival resets it), sync_ptr[1] is the generation it bumps."""
    tl.debug_barrier()  # every thread's stores issued before this program's release below
    gen = tl.atomic_add(sync_ptr + 1, 0, sem="relaxed")
    if tl.atomic_add(sync_ptr, 1, sem="acq_rel") == nprog - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
        tl.atomic_add(sync_ptr + 1, 1, sem="release")
    else:
        while tl.atomic_add(sync_ptr + 1, 0, sem="acquire") == gen:
            pass
    tl.debug_barrier()


@triton.jit
def _weight_tile(w_ptr, stride_wn, n0, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :])


@triton.jit
def _act_tile(a_ptr, stride_am, m0, k0, M, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, CG: tl.constexpr):
    """[BLOCK_K, BLOCK_M] of the activations (rows past M are zeros); CG: bypass L1, for data that other
    programs of this grid wrote."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptrs = a_ptr + offs_m[None, :].to(tl.int64) * stride_am + offs_k[:, None]
    if CG:
        return tl.load(ptrs, mask=offs_m[None, :] < M, other=0.0, cache_modifier=".cg")
    return tl.load(ptrs, mask=offs_m[None, :] < M, other=0.0)


@triton.jit
def _split_k_item(t, a_ptr, stride_am, w_ptr, stride_wn, out_ptr, stride_os, stride_om, M, N_TILES, SPLIT,
                  K_PER_SPLIT, w0, HAVE_W0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr, CG: tl.constexpr):
    """Work item t of a split-K projection: a [BLOCK_N, BLOCK_M] tile of split s's float32 partial sums."""
    n0 = (t % N_TILES) * BLOCK_N
    s = (t // N_TILES) % SPLIT
    m0 = (t // (N_TILES * SPLIT)) * BLOCK_M
    k_base = s * K_PER_SPLIT
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    k_first = 0
    if HAVE_W0:
        acc = tl.dot(w0, _act_tile(a_ptr, stride_am, m0, k_base, M, BLOCK_M, BLOCK_K, CG), acc,
                     input_precision=PRECISION)
        k_first = BLOCK_K
    for k0 in tl.range(k_first, K_PER_SPLIT, BLOCK_K, num_stages=STAGES):
        x = _act_tile(a_ptr, stride_am, m0, k_base + k0, M, BLOCK_M, BLOCK_K, CG)
        acc = tl.dot(_weight_tile(w_ptr, stride_wn, n0, k_base + k0, BLOCK_N, BLOCK_K), x, acc,
                     input_precision=PRECISION)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    tl.store(out_ptr + s * stride_os + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None], acc,
             mask=offs_m[None, :] < M)


@triton.jit
def _split_k_first_weights(t, w_ptr, stride_wn, N_TILES, SPLIT, K_PER_SPLIT, n_items,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The first weight tile of split-K item t (any valid tile when t is past the last item)."""
    t = tl.minimum(t, n_items - 1)
    return _weight_tile(w_ptr, stride_wn, (t % N_TILES) * BLOCK_N, ((t // N_TILES) % SPLIT) * K_PER_SPLIT,
                        BLOCK_N, BLOCK_K)


@triton.jit
def _gate_up_item(t, x_ptr, stride_xm, w_ptr, stride_wn, h_ptr, stride_hm, M, K, HALF_N, N_TILES, w0, wu0,
                  HAVE_W0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  STAGES: tl.constexpr, PRECISION: tl.constexpr):
    """Work item t of gate/up + SiLU-and-mul: h[rows, features] = silu(gate) * up for one tile."""
    n0 = (t % N_TILES) * BLOCK_N
    m0 = (t // N_TILES) * BLOCK_M
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    k_first = 0
    if HAVE_W0:
        x = _act_tile(x_ptr, stride_xm, m0, 0, M, BLOCK_M, BLOCK_K, True)
        acc = tl.dot(w0, x, acc, input_precision=PRECISION)
        acc_up = tl.dot(wu0, x, acc_up, input_precision=PRECISION)
        k_first = BLOCK_K
    for k0 in tl.range(k_first, K, BLOCK_K, num_stages=STAGES):
        x = _act_tile(x_ptr, stride_xm, m0, k0, M, BLOCK_M, BLOCK_K, True)
        acc = tl.dot(_weight_tile(w_ptr, stride_wn, n0, k0, BLOCK_N, BLOCK_K), x, acc, input_precision=PRECISION)
        acc_up = tl.dot(_weight_tile(w_ptr, stride_wn, HALF_N + n0, k0, BLOCK_N, BLOCK_K), x, acc_up,
                        input_precision=PRECISION)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    tl.store(h_ptr + offs_m[None, :].to(tl.int64) * stride_hm + offs_n[:, None],
             silu_mul_epilogue(acc, acc_up, h_ptr.dtype.element_ty), mask=offs_m[None, :] < M)


@triton.jit
def _mlp_block_kernel(attn_ptr, wo_ptr, o_ptr, res_ptr, ln_ptr, res_out_ptr, xn_ptr, wgu_ptr, h_ptr, wd_ptr,
                      out_ptr, sync_ptr, M, eps,
                      HIDDEN: tl.constexpr, INTER: tl.constexpr, ATTN_DIM: tl.constexpr, O_SPLIT: tl.constexpr,
                      O_PER_SPLIT: tl.constexpr, D_SPLIT: tl.constexpr, D_PER_SPLIT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GU_BLOCK_N: tl.constexpr, GU_BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                      BLOCK_H: tl.constexpr, FIRST_PHASE: tl.constexpr, LAST_PHASE: tl.constexpr,
                      PREFETCH: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Phases FIRST_PHASE..LAST_PHASE of the block (0: o_proj, 1: add+RMSNorm, 2: gate/up + SiLU, 3: down),
    a grid barrier between two phases. Buffers: o [O_SPLIT, M, HIDDEN] f32 (o_proj's partial sums, phase 0
    writes them or the caller gives them), res / res_out / xn [M, HIDDEN], h [M, INTER], out [D_SPLIT, M,
    HIDDEN] f32."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    h_tiles = HIDDEN // BLOCK_N
    o_items = h_tiles * O_SPLIT * m_tiles
    gu_tiles = INTER // GU_BLOCK_N
    gu_items = gu_tiles * m_tiles
    d_items = h_tiles * D_SPLIT * m_tiles
    # programs past a phase's last item have nothing to prefetch; they load a valid tile and drop it
    dummy = tl.zeros([BLOCK_N, BLOCK_K], wd_ptr.dtype.element_ty)
    gu_dummy = tl.zeros([GU_BLOCK_N, GU_BLOCK_K], wgu_ptr.dtype.element_ty)

    if FIRST_PHASE <= 0:
        w0 = dummy
        if PREFETCH:
            w0 = _split_k_first_weights(pid, wo_ptr, ATTN_DIM, h_tiles, O_SPLIT, O_PER_SPLIT, o_items,
                                        BLOCK_N, BLOCK_K)
        t = pid
        if PREFETCH:
            if t < o_items:
                _split_k_item(t, attn_ptr, ATTN_DIM, wo_ptr, ATTN_DIM, o_ptr, M * HIDDEN, HIDDEN, M, h_tiles,
                              O_SPLIT, O_PER_SPLIT, w0, True, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, PRECISION, False)
            t += nprog
        for t in range(t, o_items, nprog):
            _split_k_item(t, attn_ptr, ATTN_DIM, wo_ptr, ATTN_DIM, o_ptr, M * HIDDEN, HIDDEN, M, h_tiles,
                          O_SPLIT, O_PER_SPLIT, w0, False, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, PRECISION, False)
        if LAST_PHASE > 0:
            _grid_barrier(sync_ptr, nprog)

    if FIRST_PHASE <= 1 and LAST_PHASE >= 1:
        for row in range(pid, M, nprog):
            add_rmsnorm_row(o_ptr, res_ptr, ln_ptr, xn_ptr, res_out_ptr, row, HIDDEN, HIDDEN, M * HIDDEN,
                            HIDDEN, HIDDEN, HIDDEN, eps, True, O_SPLIT, BLOCK_H, FIRST_PHASE == 0)
        if LAST_PHASE > 1:
            w0 = gu_dummy
            wu0 = gu_dummy
            if PREFETCH:
                tw = tl.minimum(pid, gu_items - 1)
                w0 = _weight_tile(wgu_ptr, HIDDEN, (tw % gu_tiles) * GU_BLOCK_N, 0, GU_BLOCK_N, GU_BLOCK_K)
                wu0 = _weight_tile(wgu_ptr, HIDDEN, INTER + (tw % gu_tiles) * GU_BLOCK_N, 0, GU_BLOCK_N,
                                   GU_BLOCK_K)
            _grid_barrier(sync_ptr, nprog)

    if FIRST_PHASE <= 2 and LAST_PHASE >= 2:
        if FIRST_PHASE == 2:
            w0 = gu_dummy
            wu0 = gu_dummy
        t = pid
        if PREFETCH and FIRST_PHASE < 2:
            if t < gu_items:
                _gate_up_item(t, xn_ptr, HIDDEN, wgu_ptr, HIDDEN, h_ptr, INTER, M, HIDDEN, INTER, gu_tiles, w0,
                              wu0, True, BLOCK_M, GU_BLOCK_N, GU_BLOCK_K, STAGES, PRECISION)
            t += nprog
        for t in range(t, gu_items, nprog):
            _gate_up_item(t, xn_ptr, HIDDEN, wgu_ptr, HIDDEN, h_ptr, INTER, M, HIDDEN, INTER, gu_tiles, w0, wu0,
                          False, BLOCK_M, GU_BLOCK_N, GU_BLOCK_K, STAGES, PRECISION)
        if LAST_PHASE > 2:
            w0 = dummy
            if PREFETCH:
                w0 = _split_k_first_weights(pid, wd_ptr, INTER, h_tiles, D_SPLIT, D_PER_SPLIT, d_items,
                                            BLOCK_N, BLOCK_K)
            _grid_barrier(sync_ptr, nprog)

    if LAST_PHASE >= 3:
        if FIRST_PHASE == 3:
            w0 = dummy
        t = pid
        if PREFETCH and FIRST_PHASE < 3:
            if t < d_items:
                _split_k_item(t, h_ptr, INTER, wd_ptr, INTER, out_ptr, M * HIDDEN, HIDDEN, M, h_tiles, D_SPLIT,
                              D_PER_SPLIT, w0, True, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, PRECISION, True)
            t += nprog
        for t in range(t, d_items, nprog):
            _split_k_item(t, h_ptr, INTER, wd_ptr, INTER, out_ptr, M * HIDDEN, HIDDEN, M, h_tiles, D_SPLIT,
                          D_PER_SPLIT, w0, False, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, PRECISION, True)


class MlpBlockConfig(NamedTuple):
    block_m: int        # batch rows a tile
    block_n: int        # output features a tile of o_proj and down
    block_k: int        # K depth of o_proj and down tiles
    gu_block_n: int     # features of gate (and of up) a gate/up tile
    gu_block_k: int
    o_split: int        # o_proj's split-K (phase 0) or the split count of the partial sums given
    d_split: int        # down's split-K
    stages: int
    prefetch: bool


def default_config(m: int, hidden: int, inter: int, attn_dim: int, elem_bytes: int) -> Optional[MlpBlockConfig]:
    """A starting point (scripts/probe.py mlpblock sweeps around it), or None where the shapes do not tile:
    the batch in one row tile up to 64 rows, 64-feature x 128-deep tiles for o_proj and down (64-deep for
    float32, whose tiles are twice the bytes), 32 features of gate and of up a gate/up tile, the most splits
    of o_proj (up to 4) and down (up to 8) that divide K into whole tiles."""
    block_m = max(16, triton.next_power_of_2(m))
    block_k = 128 if elem_bytes <= 2 else 64
    stages = 3 if elem_bytes <= 2 else 2
    if hidden % 64 or inter % 32 or hidden % block_k or block_m > 64:
        return None
    d_split = next((s for s in (8, 4, 2, 1) if inter % (s * block_k) == 0), None)
    o_split = next((s for s in (4, 2, 1) if attn_dim % (s * block_k) == 0), None)
    if d_split is None or o_split is None:
        return None
    return MlpBlockConfig(block_m, 64, block_k, 32, block_k, o_split, d_split, stages, True)


def mlp_block(attn: Optional[torch.Tensor], o, residual: torch.Tensor, ln_weight: torch.Tensor, eps: float,
              w_o: Optional[torch.Tensor], w_gate_up: torch.Tensor, w_down: torch.Tensor, config: MlpBlockConfig,
              sync: torch.Tensor, num_programs: int, phases_per_launch: int = 4):
    """(down's SplitSums, new residual) of the decode MLP block.

    Either ``attn`` [M, A] with ``w_o`` [H, A] (o_proj runs as the first phase, split config.o_split ways), or
    ``o``: o_proj's output (``SplitSums`` or an [M, H] tensor). ``sync``: int32 [2], zero before the first
    call (the kernel leaves it reusable). ``phases_per_launch=1`` launches each phase on its own (Triton's
    interpreter, where programs run one after another)."""
    m, hidden = residual.shape
    inter = w_down.shape[1]
    dev, dtype = residual.device, residual.dtype
    with_o = attn is not None
    if with_o:
        attn_dim = attn.shape[1]
        o_parts = torch.empty(config.o_split, m, hidden, dtype=torch.float32, device=dev)
        o_split = config.o_split
    elif isinstance(o, SplitSums):
        attn_dim, o_parts, o_split = hidden, o.parts, o.parts.shape[0]
    else:
        attn_dim, o_parts, o_split = hidden, o.float().unsqueeze(0), 1
    assert o_parts.is_contiguous() and residual.is_contiguous()
    assert hidden % config.block_n == 0 and inter % config.gu_block_n == 0 and hidden % config.gu_block_k == 0
    assert inter % (config.d_split * config.block_k) == 0
    assert not with_o or attn_dim % (o_split * config.block_k) == 0
    res_out = torch.empty_like(residual)
    xn = torch.empty_like(residual)
    h = torch.empty(m, inter, dtype=dtype, device=dev)
    out = torch.empty(config.d_split, m, hidden, dtype=torch.float32, device=dev)
    use_pdl = pdl.enabled(dev, "gemm")
    first = 0 if with_o else 1
    for phase in range(first, 4, phases_per_launch):
        last = min(3, phase + phases_per_launch - 1)
        _mlp_block_kernel[(num_programs,)](
            attn if with_o else residual, w_o if with_o else w_down, o_parts, residual, ln_weight, res_out, xn,
            w_gate_up, h, w_down, out, sync, m, eps,
            HIDDEN=hidden, INTER=inter, ATTN_DIM=attn_dim, O_SPLIT=o_split, O_PER_SPLIT=attn_dim // o_split,
            D_SPLIT=config.d_split, D_PER_SPLIT=inter // config.d_split, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, GU_BLOCK_N=config.gu_block_n,
            GU_BLOCK_K=config.gu_block_k, STAGES=config.stages, BLOCK_H=triton.next_power_of_2(hidden),
            FIRST_PHASE=phase, LAST_PHASE=last, PREFETCH=config.prefetch and last > phase,
            PRECISION="ieee" if dtype == torch.float32 else "tf32", PDL=use_pdl and phase == first,
            num_warps=4, launch_pdl=use_pdl and phase == first)
    return SplitSums(out, dtype), res_out


MAX_ROWS = 64


def engine_choice(x: torch.Tensor, o_proj, kv_bound: bool, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  mlp_bias: bool):
    """(config, with_o, programs) when the model runs its MLP block (from o_proj's output, or with o_proj
    when ``with_o``) through ``mlp_block``, else None. Off unless NANOVLLM_MLP_BLOCK is 1 (from o_proj's
    output) or "o" (with o_proj): an experiment, for A/B measurements. One rank, CUDA, 2-64 rows, no biases,
    the KV cache bound (a model step, not a warm-up without caches), shapes that tile."""
    mode = os.environ.get("NANOVLLM_MLP_BLOCK", "0")
    m, hidden = x.shape
    if mode not in ("1", "o") or not (x.is_cuda and kv_bound and 2 <= m <= MAX_ROWS):
        return None
    if o_proj.ctx.world_size != 1 or o_proj.bias is not None or mlp_bias or hidden > 8192:
        return None
    config = default_config(m, hidden, w_down.shape[1], o_proj.weight.shape[1], x.element_size())
    if config is None:
        return None
    return config, mode == "o", device_sms(x.device)
