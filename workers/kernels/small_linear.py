"""y = x W^T (+ b) for a single row (batch-1 decode), on CUDA cores (Triton).

At one row a projection is a pure read of the weight, and cuBLAS's kernels for it leave most of the
bandwidth unused: on an H200 (scripts/probe.py, 2026-11-22) Qwen3-0.6B's per-layer GEMMs at one row take
5.0 / 12.4 / 6.0 / 6.9 us (q/k/v, o, gate/up, down) with cuBLAS and 4.0 / 3.7 / 5.4 / 4.4 us here. Each
program owns BLOCK_N output features and streams their weight rows along K in BLOCK_K pieces (pipelined
NUM_STAGES deep); no tensor cores, no padding of the row to 16. At 2-4 rows a version that loops over the
rows lost to cuBLAS (it re-reads the weight per row: 24.8 / 31.1 / 37.3 us per layer at 2 / 3 / 4 rows
against cuBLAS's 24.2 at 8), so decode batches of 2-7 run cuBLAS, padded to 8 in the CUDA graphs.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from workers.kernels.triton_attention import device_sms

@triton.jit
def _small_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        w = tl.load(w_rows + (k0 + offs_k)[None, :])
        x = tl.load(x_ptr + k0 + offs_k)
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


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``small_linear`` takes this call: a single contiguous row of the weight's dtype, and a
    weight shape that tiles."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype and x.is_contiguous()
            and weight.stride(-1) == 1 and
            _config(weight.shape[0], weight.shape[1], device_sms(x.device)) is not None)


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[1, K] x [N, K]^T (+ [N]) -> [1, N] (check ``supports`` first)."""
    k = x.shape[1]
    n = weight.shape[0]
    block_n, block_k = _config(n, k, device_sms(x.device))
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _small_linear_kernel[(n // block_n,)](x, weight, bias if bias is not None else weight, y, k, weight.stride(0),
                                          HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                          NUM_STAGES=4, num_warps=4)
    return y
