"""y = x W^T (+ b) for a single row (batch-1 decode), on CUDA cores (Triton).

At one row a projection is a pure read of the weight, and cuBLAS's kernels for it leave most of the
bandwidth unused: on an H200 (scripts/probe.py, 2026-11-22) Qwen3-0.6B's per-layer GEMMs at one row take
5.0 / 12.4 / 6.0 / 6.9 us (q/k/v, o, gate/up, down) with cuBLAS and 4.0 / 3.7 / 5.4 / 4.4 us here. Each
program owns BLOCK_N output features and streams their weight rows along K in BLOCK_K pieces (pipelined
NUM_STAGES deep); no tensor cores, no padding of the row to 16. At 2-4 rows a version that loops over the
rows lost to cuBLAS (it re-reads the weight per row: 24.8 / 31.1 / 37.3 us per layer at 2 / 3 / 4 rows
against cuBLAS's 24.2 at 8), so decode batches of 2-7 are padded to 8 in the CUDA graphs and run
workers.kernels.decode_gemm.

Unlike the other decode-step kernels it launches without programmatic dependent launch (workers.kernels.pdl):
with it, TPOT at batch 1 rose from 0.94 to 1.05 ms (bench_latency.py, H200, 2026-11-22).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from workers.kernels.triton_attention import device_sms

# What the kernel computes its input row from (the op before the projection, fused into it); the kernel
# spells these values out (Triton kernels read only constexpr globals)
PLAIN, RMSNORM, ADD_RMSNORM, SILU_MUL = 0, 1, 2, 3


@triton.jit
def _small_linear_kernel(x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, r_out_ptr, K, stride_wn, eps,
                         PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_ROW: tl.constexpr, NUM_STAGES: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if PROLOGUE == 1 or PROLOGUE == 2:  # RMSNORM, ADD_RMSNORM
        # the row's RMS first (every program: the row is a few KB, read from L2), rounded exactly like
        # fused.rmsnorm: the residual sum in the model dtype, the normalized value rounded before the weight
        cols = tl.arange(0, BLOCK_ROW)
        row = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        if PROLOGUE == 2:
            row = row + tl.load(r_ptr + cols, mask=cols < K, other=0.0)
            if tl.program_id(0) == 0:  # one program writes the new residual stream
                tl.store(r_out_ptr + cols, row, mask=cols < K)
        rf = row.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(rf * rf, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        w = tl.load(w_rows + (k0 + offs_k)[None, :])
        x = tl.load(x_ptr + k0 + offs_k)
        if PROLOGUE == 1 or PROLOGUE == 2:  # RMSNORM, ADD_RMSNORM
            if PROLOGUE == 2:
                x = x + tl.load(r_ptr + k0 + offs_k)
            x = (x.to(tl.float32) * rstd).to(x.dtype) * tl.load(g_ptr + k0 + offs_k)
        if PROLOGUE == 3:  # SILU_MUL: x_ptr holds [gate | up], each K wide; rounded like fused.silu_and_mul
            gate = x.to(tl.float32)
            x = (gate / (1.0 + tl.exp(-gate))).to(x.dtype) * tl.load(x_ptr + K + k0 + offs_k)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty))


def _config(n: int, k: int, num_sms: int):
    """(BLOCK_N, BLOCK_K) for an [n, k] weight, or None if the shape does not tile.

    From the H200 sweep: 16 features per program when that still gives >= 2 programs per SM (q/k/v,
    gate/up), else 8 (o, down: 1024 features); 256-wide K pieces up to K = 1024, 512 above (or the
    largest power of two from 16 up that divides a smaller K: small test models take the same path)."""
    block_n = 16 if n // 16 >= 2 * num_sms else 8
    block_k = 256 if k <= 1024 else 512
    while block_k > 16 and k % block_k:
        block_k //= 2
    if n % block_n or k % block_k:
        return None
    return block_n, block_k


def weight_fits(weight: torch.Tensor) -> bool:
    """Whether an [N, K] weight (unit stride along K) tiles for this kernel."""
    return weight.stride(-1) == 1 and _config(weight.shape[0], weight.shape[1], device_sms(weight.device)) is not None


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``small_linear`` takes this call: a single contiguous row of the weight's dtype, and a
    weight that tiles."""
    return x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype and x.is_contiguous() and weight_fits(weight)


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[1, K] x [N, K]^T (+ [N]) -> [1, N] (check ``supports`` first)."""
    return _launch(PLAIN, x, weight, bias)


def rmsnorm_linear(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                   weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """One row: ``fused.rmsnorm(x, norm_weight, eps, residual)`` and then the projection, in one kernel.
    Returns (y, new residual) with a residual (x + residual), else (y, x)."""
    if residual is None:
        return _launch(RMSNORM, x, weight, bias, norm_weight=norm_weight, eps=eps), x
    residual_out = torch.empty_like(x)
    y = _launch(ADD_RMSNORM, x, weight, bias, residual=residual, norm_weight=norm_weight, eps=eps,
                residual_out=residual_out)
    return y, residual_out


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """One row: ``fused.silu_and_mul(gate_up)`` and then the projection, in one kernel."""
    return _launch(SILU_MUL, gate_up, weight, bias)


def _launch(prologue, x, weight, bias=None, residual=None, norm_weight=None, eps=0.0, residual_out=None):
    k, n = weight.shape[1], weight.shape[0]
    assert x.shape == (1, 2 * k if prologue == SILU_MUL else k) and x.is_contiguous()
    block_n, block_k = _config(n, k, device_sms(x.device))
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _small_linear_kernel[(n // block_n,)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x, weight,
        bias if bias is not None else weight, y, residual_out if residual_out is not None else y,
        k, weight.stride(0), eps, PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_ROW=triton.next_power_of_2(k), NUM_STAGES=4, num_warps=4)
    return y
