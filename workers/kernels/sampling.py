"""Seeded Gumbel-max sampling in one pass over the logits (Triton).

``argmax(logits / T + G)`` with ``G = -log(-log(U))`` draws from ``softmax(logits / T)``; ``U`` comes from
a counter-based hash of (seed, output position, token id), the same hash as ``workers.sampler``'s torch
version, so a request's tokens depend only on its own seed and logits. Rows with ``T == 0`` take the plain
argmax. One program per row streams the vocabulary in tiles: the logits are read once and nothing of size
[batch, vocab] is written, which is the whole cost of sampling at large batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hash32(x):
    # the same mixer as workers.sampler._hash32, in uint32 arithmetic (products wrap modulo 2**32)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x5BD1E995
    x = x ^ (x >> 16)
    return x


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, stride_row, temps_ptr, seeds_ptr, positions_ptr, out_ptr, vocab_size,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temp = tl.load(temps_ptr + row)
    seed = (tl.load(seeds_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    pos = (tl.load(positions_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    key = _hash32(_hash32(seed) ^ pos)
    inv_temp = tl.where(temp > 0, 1.0 / tl.maximum(temp, 1e-30), 1.0)
    use_noise = temp > 0
    best_val = float("-inf")
    best_idx = 0
    for start in range(0, vocab_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab_size
        x = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        bits = _hash32(_hash32(key ^ offs.to(tl.uint32)) ^ key)
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        gumbel = -tl.log(-tl.log(u))
        score = tl.where(use_noise, x * inv_temp + gumbel, x)
        score = tl.where(mask, score, float("-inf"))
        tile_max = tl.max(score, axis=0)
        tile_idx = tl.argmax(score, axis=0) + start
        better = tile_max > best_val
        best_idx = tl.where(better, tile_idx, best_idx)
        best_val = tl.where(better, tile_max, best_val)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """[B, V] logits -> [B] int64 token ids (no host sync; fixed grid)."""
    batch, vocab = logits.shape
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch:
        _gumbel_argmax_kernel[(batch,)](logits, logits.stride(0), temperatures, seeds, positions, out, vocab,
                                        BLOCK=4096 if logits.is_cuda else 256, num_warps=8 if logits.is_cuda else 1)
    return out
