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

    From the H200 sweep (scripts/probe.py dgemm, docs/kernels.md): 64 features x 128-deep K tiles, 5 stages;
    16 / 32 / 64 batch rows a tile for up to 16 / 64 / 256 rows; K split (``allow_split``: the caller takes
    ``SplitSums``) into the most pieces, up to 8, that keep one program per SM at most. Up to 64 rows this
    beats cuBLAS for every Qwen3-0.6B projection; above, only where the split applies (1024-feature
    outputs, which cuBLAS covers with 8-16 tiles), so larger batches keep cuBLAS otherwise. (Taking every
    projection up to 128 rows measured the same in bench.py, 4.97 against 4.99 s; up to 256, slower: 5.08 s.)"""
    m, k = x.shape
    n = weight.shape[0]
    out_n = n // 2 if silu_mul else n
    if not (x.is_cuda and 2 <= m <= MAX_ROWS and weight.shape[1] == k and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.stride(1) == 1 and weight.stride(1) == 1 and (not silu_mul or n % 2 == 0)):
        return None
    block_m = 16 if m <= 16 else (32 if m <= 64 else 64)
    block_n = next((b for b in (64, 32, 16) if out_n % b == 0), None)
    block_k = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
    if block_n is None or block_k is None:
        return None
    tiles = out_n // block_n * triton.cdiv(m, block_m)
    split = 1
    if allow_split and not silu_mul:
        while split < 8 and tiles * split * 2 <= device_sms(x.device) and k % (split * 2 * block_k) == 0:
            split *= 2
    if m > 64 and split == 1:
        return None
    per_stage = ((2 if silu_mul else 1) * block_n + block_m) * block_k * x.element_size()
    stages = max(2, min(5, _SMEM_BUDGET // per_stage))
    return GemmConfig(block_m, block_n, block_k, split, stages, 4)
