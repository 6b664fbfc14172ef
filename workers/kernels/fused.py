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


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro,
                        n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        # the sum is rounded to the model dtype first, exactly like ``x + residual`` in torch
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, normed * w, mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """RMSNorm over the last dim; with ``residual``: (norm(x + residual), x + residual)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty_like(x2)
    rows, cols = x2.shape
    block = triton.next_power_of_2(cols)
    warps = 1 if block <= 256 else (4 if block <= 2048 else 8)
    if residual is None:
        _add_rmsnorm_kernel[(rows,)](x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, cols, eps,
                                     HAS_RES=False, BLOCK=block, num_warps=warps)
        return out.view(shape)
    r2 = residual.reshape(-1, shape[-1])
    res_out = torch.empty_like(x2)
    _add_rmsnorm_kernel[(rows,)](x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0),
                                 res_out.stride(0), cols, eps, HAS_RES=True, BLOCK=block, num_warps=warps)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _norm_rope_kernel(q_ptr, k_ptr, qw_ptr, kw_ptr, cos_sin_ptr, pos_ptr, stride_qt, stride_qh, stride_kt,
                      stride_kh, stride_cs, num_q_heads, eps, HAS_NORM: tl.constexpr, HALF: tl.constexpr):
    """One (token, head): optional per-head RMSNorm, then neox-style rotary, in place."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    is_q = h < num_q_heads
    if is_q:
        base = q_ptr + t * stride_qt + h * stride_qh
        w_ptr = qw_ptr
    else:
        base = k_ptr + t * stride_kt + (h - num_q_heads) * stride_kh
        w_ptr = kw_ptr
    offs = tl.arange(0, HALF)
    x1 = tl.load(base + offs)
    x2 = tl.load(base + HALF + offs)
    dtype = x1.dtype
    if HAS_NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / (2 * HALF) + eps)
        # round to the model dtype and scale by the weight, exactly like the torch RMSNorm
        x1 = (f1 * inv).to(dtype) * tl.load(w_ptr + offs)
        x2 = (f2 * inv).to(dtype) * tl.load(w_ptr + HALF + offs)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base + offs, (f1 * cos - f2 * sin).to(dtype))
    tl.store(base + HALF + offs, (f2 * cos + f1 * sin).to(dtype))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                 q_weight: Optional[torch.Tensor] = None, k_weight: Optional[torch.Tensor] = None,
                 eps: float = 1e-6) -> None:
    """In place on q [T, Hq, D] and k [T, Hk, D] (strided views of the qkv output are fine)."""
    tokens, hq, d = q.shape
    hk = k.shape[1]
    if tokens == 0:
        return
    assert q.stride(2) == 1 and k.stride(2) == 1 and d % 2 == 0 and (d & (d - 1)) == 0
    has_norm = q_weight is not None
    _norm_rope_kernel[(tokens, hq + hk)](
        q, k, q_weight if has_norm else q, k_weight if has_norm else k, cos_sin, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0), hq, eps,
        HAS_NORM=has_norm, HALF=d // 2, num_warps=1)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
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
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n,
                                                                BLOCK=block, num_warps=4)
    return out.view(*shape[:-1], n)
