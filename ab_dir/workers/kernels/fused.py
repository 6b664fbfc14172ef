"""Fused small ops for CUDA (Triton): residual-add + RMSNorm, per-head RMSNorm + RoPE, SiLU-and-mul.

At decode batch sizes every one of these is tiny, so what costs is the number of kernels: written as
plain torch ops they are ~60 launches per layer; here they are 4. Each has a pure-torch twin in
``workers.layers`` that CPU runs use and that the tests compare against.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from workers.kernels import pdl
from workers.kernels.decode_gemm import SplitSums
from workers.kernels.pdl import enter as pdl_enter


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_xs, stride_r, stride_o,
                        stride_ro, n_cols, eps, HAS_RES: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if SPLITS == 0:
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    else:
        # x is a projection's float32 split-K partial sums [SPLITS, rows, n_cols]: add them up and round once
        acc = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLITS):
            acc += tl.load(x_ptr + s * stride_xs + row * stride_x + cols, mask=mask, other=0.0)
        x = acc.to(out_ptr.dtype.element_ty)
    if HAS_RES:
        # the sum is rounded to the model dtype first, exactly like ``x + residual`` in torch
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, normed * w, mask=mask)


def rmsnorm(x, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """RMSNorm over the last dim; with ``residual``: (norm(x + residual), x + residual).

    ``x`` may also be a projection's split-K partial sums (``decode_gemm.SplitSums``), which are added up
    and rounded to the model dtype here, so the split costs no kernel of its own."""
    splits = 0
    if isinstance(x, SplitSums):
        splits, x2, dtype = x.parts.shape[0], x.parts, x.dtype
        shape, stride_xs = x2.shape[1:], x2.stride(0)
        x2 = x2[0]
    else:
        shape, dtype, stride_xs = x.shape, x.dtype, 0
        x2 = x.reshape(-1, shape[-1])
    out = torch.empty(x2.shape, dtype=dtype, device=x2.device)
    rows, cols = x2.shape
    block = triton.next_power_of_2(cols)
    warps = 1 if block <= 256 else (4 if block <= 2048 else 8)
    use_pdl = pdl.enabled(out.device, "norm")
    if residual is None:
        _add_rmsnorm_kernel[(rows,)](x2, x2, weight, out, out, x2.stride(0), stride_xs, 0, out.stride(0), 0, cols,
                                     eps, HAS_RES=False, SPLITS=splits, BLOCK=block, PDL=use_pdl,
                                     num_warps=warps, launch_pdl=use_pdl)
        return out.view(shape)
    r2 = residual.reshape(-1, shape[-1])
    res_out = torch.empty_like(out)
    _add_rmsnorm_kernel[(rows,)](x2, r2, weight, out, res_out, x2.stride(0), stride_xs, r2.stride(0),
                                 out.stride(0), res_out.stride(0), cols, eps, HAS_RES=True, SPLITS=splits,
                                 BLOCK=block, PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _norm_rope_heads(base, stride_h, w_ptr, cos, sin, eps, NUM_HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                     HAS_NORM: tl.constexpr, HALF: tl.constexpr):
    """One token's heads [NUM_HEADS, 2 * HALF] at base: optional per-head RMSNorm, then neox-style rotary,
    written back in place; returns the rotated halves."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    offs = tl.arange(0, HALF)[None, :]
    mask = (heads < NUM_HEADS) & (offs < HALF)
    ptrs = base + heads * stride_h + offs
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    if HAS_NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF) + eps)[:, None]
        # round to the model dtype and scale by the weight, exactly like the torch RMSNorm
        x1 = (f1 * inv).to(dtype) * tl.load(w_ptr + offs)
        x2 = (f2 * inv).to(dtype) * tl.load(w_ptr + HALF + offs)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    y1 = (f1 * cos - f2 * sin).to(dtype)
    y2 = (f2 * cos + f1 * sin).to(dtype)
    tl.store(ptrs, y1, mask=mask)
    tl.store(ptrs + HALF, y2, mask=mask)
    return y1, y2


@triton.jit
def _norm_rope_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_sin_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                      stride_c_slot, stride_c_h, eps,
                      NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                      HAS_NORM: tl.constexpr, STORE: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr):
    """One token, all its heads: q/k RMSNorm + rotary in place; with STORE, the rotated k and the v of
    the token also go into the paged caches at its slot (slot < 0: padding, nothing written), so no
    separate store-K/V kernel is needed."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    offs = tl.arange(0, HALF)[None, :]
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs)
    _norm_rope_heads(q_ptr + t * stride_qt, stride_qh, qw_ptr, cos, sin, eps, NUM_Q, BLOCK_Q, HAS_NORM, HALF)
    k1, k2 = _norm_rope_heads(k_ptr + t * stride_kt, stride_kh, kw_ptr, cos, sin, eps, NUM_KV, BLOCK_KV,
                              HAS_NORM, HALF)
    if STORE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        heads = tl.arange(0, BLOCK_KV)[:, None]
        # a negative slot masks everything off (a bound, not a scalar & block mask: see store_kvcache)
        mask = (heads < tl.where(slot >= 0, NUM_KV, 0)) & (offs < HALF)
        dst = slot * stride_c_slot + heads * stride_c_h + offs
        tl.store(kc_ptr + dst, k1, mask=mask)
        tl.store(kc_ptr + dst + HALF, k2, mask=mask)
        src = v_ptr + t * stride_vt + heads * stride_vh + offs
        tl.store(vc_ptr + dst, tl.load(src, mask=mask), mask=mask)
        tl.store(vc_ptr + dst + HALF, tl.load(src + HALF, mask=mask), mask=mask)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                 q_weight: Optional[torch.Tensor] = None, k_weight: Optional[torch.Tensor] = None,
                 eps: float = 1e-6, v: Optional[torch.Tensor] = None, k_cache: Optional[torch.Tensor] = None,
                 v_cache: Optional[torch.Tensor] = None, slot_mapping: Optional[torch.Tensor] = None) -> None:
    """In place on q [T, Hq, D] and k [T, Hk, D] (strided views of the qkv output are fine).

    Given v [T, Hk, D], the paged caches [num_blocks, block_size, Hk, D] (contiguous) and slot_mapping [T],
    also writes the rotated k and v into the caches, as ``store_kvcache`` would. One program per token
    (with all its heads: one program per (token, head) was 20 % of a 16k-token prefill on an H200)."""
    tokens, hq, d = q.shape
    hk = k.shape[1]
    if tokens == 0:
        return
    assert q.stride(2) == 1 and k.stride(2) == 1 and d % 2 == 0 and (d & (d - 1)) == 0
    has_norm = q_weight is not None
    store = k_cache is not None
    if store:
        assert v is not None and v.shape == k.shape and v.stride(2) == 1 and slot_mapping.shape == (tokens,)
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (hk, d)
    else:
        v, k_cache, v_cache, slot_mapping = k, k, k, positions  # unused placeholders
    block_q = triton.next_power_of_2(hq)
    use_pdl = pdl.enabled(q.device, "rope")
    warps = 4 if block_q * d >= 2048 else (2 if block_q * d >= 512 else 1)
    _norm_rope_kernel[(tokens,)](
        q, k, v, q_weight if has_norm else q, k_weight if has_norm else k, cos_sin, positions,
        k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        k_cache.stride(-3) if store else 0, k_cache.stride(-2) if store else 0, eps,
        NUM_Q=hq, NUM_KV=hk, BLOCK_Q=block_q, BLOCK_KV=triton.next_power_of_2(hk),
        HAS_NORM=has_norm, STORE=store, HALF=d // 2, PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # torch's silu rounds to the dtype before the product
    tl.store(out_ptr + row * stride_o + cols, silu * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2n] -> silu(x[..., :n]) * x[..., n:]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    n = shape[-1] // 2
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(n))
        use_pdl = pdl.enabled(x.device, "silu")
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n, BLOCK=block,
                                                                PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return out.view(*shape[:-1], n)
