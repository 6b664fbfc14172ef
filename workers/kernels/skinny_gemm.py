"""y = x @ w.T (+ bias) for a handful of rows (decode at small batch), in Triton.

With 1-16 rows a linear layer only has to stream its weight once, but cuBLAS runs these shapes at
15-50 % of the copy bandwidth on an H200 (scripts/kernel_sweep.py: 5.9 us for the 4 MB attention output
projection at 8 rows): too few output tiles to occupy the GPU. Here every program owns a narrow strip of
``BLOCK_N`` output columns for all rows and streams that strip of the weight along K, so even a
1024-column layer spreads over 64 programs and the weight is read exactly once.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # rows handled by this kernel (one tl.dot tile); more rows go to cuBLAS


# the row count and x's row stride vary with the batch: unspecialized, so one compiled variant serves all
@triton.jit(do_not_specialize=["M", "stride_xm", "stride_ym"])
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            x = tl.load(x_rows + k[None, :], mask=mask_m[:, None], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=mask_n[:, None], other=0.0)
        else:
            x = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & (k[None, :] < K), other=0.0)
            w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & (k[None, :] < K), other=0.0)
        if IEEE:  # float32: no TF32 rounding
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  block_n: int = 16, block_k: int = 256, num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """F.linear for x [M <= MAX_ROWS, K] (any leading shape flattened), weight [N, K] row-major."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and weight.stride(1) == 1, (tuple(x.shape), tuple(weight.shape))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
            x2, weight, bias if bias is not None else weight, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, IEEE=x.dtype == torch.float32, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages)
    return y.view(*shape[:-1], n)
