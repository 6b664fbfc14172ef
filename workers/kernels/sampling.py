"""Seeded Gumbel-max sampling in one pass over the logits (Triton).

``argmax(logits / T + G)`` with ``G = -log(-log(U))`` draws from ``softmax(logits / T)``; ``U`` comes from
a counter-based hash of (seed, output position, token id), the same hash as ``workers.sampler``'s torch
version, so a request's tokens depend only on its own seed and logits. Rows with ``T == 0`` take the plain
argmax. Programs stream vocabulary chunks of a row in tiles, then a second tiny kernel picks each row's best
chunk: the logits are read once and nothing of size [batch, vocab] is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.kernels import pdl
from workers.kernels.pdl import enter as pdl_enter
from workers.kernels.triton_attention import device_sms


@triton.jit
def _hash32(x):
    # the same mixer as workers.sampler._hash32, in uint32 arithmetic (products wrap modulo 2**32)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x5BD1E995
    x = x ^ (x >> 16)
    return x


# chunk counts and lengths follow the batch size: left unspecialized so no batch size compiles a new variant
@triton.jit
def _neg_log(x, FAST: tl.constexpr):
    # -log(x) for x in (0, 1]. On CUDA the hardware approximation (lg2.approx, ~2 ulp): with two logs per
    # vocabulary entry the exact libdevice log made the sampler compute-bound (H200, batch 256: 152 us
    # against 95 us; scripts/probe.py). Triton's interpreter has no libdevice, so CPU runs take tl.log.
    if FAST:
        return -tl.extra.cuda.libdevice.fast_logf(x)
    else:
        return -tl.log(x)


@triton.jit(do_not_specialize=["chunk_len"])
def _gumbel_partial_kernel(logits_ptr, stride_row, temps_ptr, seeds_ptr, positions_ptr, best_val_ptr, best_idx_ptr,
                           vocab_size, chunk_len, MAX_CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
                           FAST_LOG: tl.constexpr, PDL: tl.constexpr):
    # program (row, c): the best (score, token) of vocabulary chunk c of this row
    pdl_enter(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temp = tl.load(temps_ptr + row)
    seed = (tl.load(seeds_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    pos = (tl.load(positions_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    key = _hash32(_hash32(seed) ^ pos)
    inv_temp = tl.where(temp > 0, 1.0 / tl.maximum(temp, 1e-30), 1.0)
    use_noise = temp > 0
    first = chunk * chunk_len
    last = tl.minimum(first + chunk_len, vocab_size)
    best_val = float("-inf")
    best_idx = first
    for start in range(first, last, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < last
        x = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        bits = _hash32(_hash32(key ^ offs.to(tl.uint32)) ^ key)
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        gumbel = _neg_log(_neg_log(u, FAST_LOG), FAST_LOG)
        score = tl.where(use_noise, x * inv_temp + gumbel, x)
        score = tl.where(mask, score, float("-inf"))
        tile_max = tl.max(score, axis=0)
        tile_idx = tl.argmax(score, axis=0) + start
        better = tile_max > best_val  # strictly: on ties the lower token id wins, as torch.argmax
        best_idx = tl.where(better, tile_idx, best_idx)
        best_val = tl.where(better, tile_max, best_val)
    tl.store(best_val_ptr + row * MAX_CHUNKS + chunk, best_val)
    tl.store(best_idx_ptr + row * MAX_CHUNKS + chunk, best_idx.to(tl.int64))


@triton.jit(do_not_specialize=["num_chunks"])
def _gumbel_reduce_kernel(best_val_ptr, best_idx_ptr, out_ptr, num_chunks, MAX_CHUNKS: tl.constexpr,
                          PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, MAX_CHUNKS)
    vals = tl.load(best_val_ptr + row * MAX_CHUNKS + offs, mask=offs < num_chunks, other=float("-inf"))
    winner = tl.argmax(vals, axis=0)  # the first chunk holding the maximum: the lowest token id
    tl.store(out_ptr + row, tl.load(best_idx_ptr + row * MAX_CHUNKS + winner))


MAX_CHUNKS = 64


def num_vocab_chunks(batch: int, vocab: int, block: int, num_sms: int) -> int:
    """Chunks per row: enough programs to cover the device (~4 per SM) at small batch, each at least one
    tile, at most MAX_CHUNKS. A function of shapes only, so the grid is fixed for a CUDA graph."""
    return max(1, min(MAX_CHUNKS, -(-vocab // block), -(-4 * num_sms // max(batch, 1))))


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """[B, V] logits -> [B] int64 token ids (no host sync; fixed grid).

    Two launches: each (row, vocabulary chunk) program finds its chunk's best score, then one program
    per row picks the best chunk. Splitting the vocabulary keeps the whole device busy at small batch,
    where one program per row would stream 150k logits on a single SM."""
    batch, vocab = logits.shape
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    cuda = logits.is_cuda
    use_pdl = pdl.enabled(logits.device, "sampler")
    block = 4096 if cuda else 256
    chunks = num_vocab_chunks(batch, vocab, block, device_sms(logits.device) if cuda else 4)
    tiles = -(-vocab // block)
    chunk_tiles = -(-tiles // chunks)  # every chunk a whole number of tiles
    chunk_len, chunks = chunk_tiles * block, -(-tiles // chunk_tiles)
    best_val = torch.empty(batch, MAX_CHUNKS, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(batch, MAX_CHUNKS, dtype=torch.int64, device=logits.device)
    _gumbel_partial_kernel[(batch, chunks)](logits, logits.stride(0), temperatures, seeds, positions, best_val,
                                            best_idx, vocab, chunk_len, MAX_CHUNKS=MAX_CHUNKS, BLOCK=block,
                                            FAST_LOG=cuda, PDL=use_pdl, num_warps=8 if cuda else 1,
                                            launch_pdl=use_pdl)
    _gumbel_reduce_kernel[(batch,)](best_val, best_idx, out, chunks, MAX_CHUNKS=MAX_CHUNKS, PDL=use_pdl, num_warps=1,
                                    launch_pdl=use_pdl)
    return out
