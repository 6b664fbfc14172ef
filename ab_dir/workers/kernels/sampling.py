"""Seeded sampling from softmax(logits / T) in one pass over the logits (Triton): ``workers.sampler``'s
two-level Gumbel-max draw (a tile of the vocabulary by its log-sum-exp plus Gumbel noise, then a token of
that tile by Gumbel-max), computing the same hashes, so it draws the same tokens as the torch version.

Programs stream vocabulary chunks of a row tile by tile (one exp per logit), then a second kernel, one
program per row, picks the best chunk's tile and draws within it: the logits are read once (plus one tile a
row) and nothing of size [batch, vocab] is written. Rows with ``T == 0`` take the plain argmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.kernels import pdl
from workers.kernels.pdl import enter as pdl_enter
from workers.sampler import SAMPLE_TILE  # the draw's tile width: part of the algorithm, shared with the reference
from workers.sampler import TILE_SALT as _TILE_SALT


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
def _neg_log(x, FAST: tl.constexpr):
    # -log(x) for x in (0, 1]. On CUDA the hardware approximation (lg2.approx, ~2 ulp): with two logs per
    # vocabulary entry the exact libdevice log made the sampler compute-bound (H200, batch 256: 152 us
    # against 95 us; scripts/probe.py). Triton's interpreter has no libdevice, so CPU runs take tl.log.
    if FAST:
        return -tl.extra.cuda.libdevice.fast_logf(x)
    else:
        return -tl.log(x)


TILE_SALT = tl.constexpr(_TILE_SALT)  # the tile noise's key: hash(key ^ TILE_SALT), as workers.sampler


@triton.jit
def _uniform(key, idx):
    # U in (0, 1) from (key, idx): the same bits as workers.sampler._gumbel
    bits = _hash32(_hash32(key ^ idx.to(tl.uint32)) ^ key)
    return ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # never 0 or 1: workers.sampler.uniform_from_bits


@triton.jit
def _row_keys(seeds_ptr, positions_ptr, row):
    # the row's token-noise key and tile-noise key (workers.sampler._keys)
    seed = (tl.load(seeds_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    pos = (tl.load(positions_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    key = _hash32(_hash32(seed) ^ pos)
    return key, _hash32(key ^ TILE_SALT)


# the chunk length (a multiple of the tile) left unspecialized: one compiled variant whatever the vocabulary
@triton.jit(do_not_specialize=["chunk_len"])
def _tile_scores_kernel(logits_ptr, stride_row, temps_ptr, seeds_ptr, positions_ptr, best_val_ptr, best_tile_ptr,
                        vocab_size, chunk_len, MAX_CHUNKS: tl.constexpr, TILE: tl.constexpr,
                        FAST_LOG: tl.constexpr, PDL: tl.constexpr):
    # program (row, c): over the TILE-wide tiles of vocabulary chunk c, the best tile score: the tile's
    # log-sum-exp of logits / T plus the tile's Gumbel noise (T > 0), or the tile's max logit (T == 0)
    pdl_enter(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temp = tl.load(temps_ptr + row)
    _, tile_key = _row_keys(seeds_ptr, positions_ptr, row)
    use_noise = temp > 0
    scale2 = tl.where(use_noise, 1.4426950408889634 / tl.maximum(temp, 1e-30), 1.0)  # to base-2 units
    first = chunk * chunk_len
    last = tl.minimum(first + chunk_len, vocab_size)
    best_val = float("-inf")
    best_tile = first // TILE
    for start in range(first, last, TILE):
        offs = start + tl.arange(0, TILE)
        x = tl.load(logits_ptr + row * stride_row + offs, mask=offs < last, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        # log2 of sum(2 ** (x * scale2)); a tile with nothing left (all -inf) scores -inf
        m2 = tl.where(m == float("-inf"), 0.0, m * scale2)
        lse = (m2 + tl.log2(tl.sum(tl.exp2(x * scale2 - m2), axis=0))) * 0.6931471805599453
        tile = start // TILE
        gumbel = _neg_log(_neg_log(_uniform(tile_key, tile), FAST_LOG), FAST_LOG)
        score = tl.where(use_noise, lse + gumbel, m)
        better = score > best_val  # strictly: on ties the lower tile (so the lower token id) wins
        best_tile = tl.where(better, tile, best_tile)
        best_val = tl.where(better, score, best_val)
    tl.store(best_val_ptr + row * MAX_CHUNKS + chunk, best_val)
    tl.store(best_tile_ptr + row * MAX_CHUNKS + chunk, best_tile)


@triton.jit(do_not_specialize=["num_chunks"])
def _tile_draw_kernel(logits_ptr, stride_row, temps_ptr, seeds_ptr, positions_ptr, best_val_ptr, best_tile_ptr,
                      out_ptr, vocab_size, num_chunks, MAX_CHUNKS: tl.constexpr, TILE: tl.constexpr,
                      FAST_LOG: tl.constexpr, PDL: tl.constexpr):
    # one program per row: the best chunk's tile, then Gumbel-max over that tile's tokens (argmax if T == 0)
    pdl_enter(PDL)
    row = tl.program_id(0)
    offs_c = tl.arange(0, MAX_CHUNKS)
    vals = tl.load(best_val_ptr + row * MAX_CHUNKS + offs_c, mask=offs_c < num_chunks, other=float("-inf"))
    winner = tl.argmax(vals, axis=0)  # the first chunk holding the maximum: the lowest tile
    tile = tl.load(best_tile_ptr + row * MAX_CHUNKS + winner)
    temp = tl.load(temps_ptr + row)
    key, _ = _row_keys(seeds_ptr, positions_ptr, row)
    use_noise = temp > 0
    inv_temp = tl.where(use_noise, 1.0 / tl.maximum(temp, 1e-30), 1.0)
    offs = tile * TILE + tl.arange(0, TILE)
    mask = offs < vocab_size
    x = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    gumbel = _neg_log(_neg_log(_uniform(key, offs), FAST_LOG), FAST_LOG)
    score = tl.where(use_noise, x * inv_temp + gumbel, x)  # columns past the vocabulary stay -inf (finite noise)
    tl.store(out_ptr + row, (tl.argmax(score, axis=0) + tile * TILE).to(tl.int64))


MAX_CHUNKS = 64


def num_vocab_chunks(vocab: int, tile: int) -> int:
    """Chunks per row: one tile each (every program issues its whole tile's loads at once), at most
    MAX_CHUNKS (a larger vocabulary gets chunks of several tiles). A function of shapes only, so the grid is
    fixed for a CUDA graph. (Until 2026-12-02 about 4 programs per SM in all, i.e. several tiles a program
    from batch 14 up: see docs/kernels.md, "Sampling".)"""
    return max(1, min(MAX_CHUNKS, -(-vocab // tile)))


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor, out: torch.Tensor = None, tile: int = SAMPLE_TILE) -> torch.Tensor:
    """[B, V] logits -> [B] int64 token ids (no host sync; fixed grid): workers.sampler's two-level draw.

    Two launches: each (row, vocabulary chunk) program scores its chunk's tiles (one exp per logit) and keeps
    the best, then one program per row picks the best chunk's tile and draws within it. A chunk is one tile
    up to MAX_CHUNKS tiles a row, so the loads of a whole row are in flight at once."""
    batch, vocab = logits.shape
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    assert tile & (tile - 1) == 0, f"tile {tile} must be a power of two"
    cuda = logits.is_cuda
    use_pdl = pdl.enabled(logits.device, "sampler")
    chunks = num_vocab_chunks(vocab, tile)
    tiles = -(-vocab // tile)
    chunk_tiles = -(-tiles // chunks)  # every chunk a whole number of tiles
    chunk_len, chunks = chunk_tiles * tile, -(-tiles // chunk_tiles)
    best_val = torch.empty(batch, MAX_CHUNKS, dtype=torch.float32, device=logits.device)
    best_tile = torch.empty(batch, MAX_CHUNKS, dtype=torch.int32, device=logits.device)
    _tile_scores_kernel[(batch, chunks)](logits, logits.stride(0), temperatures, seeds, positions, best_val,
                                         best_tile, vocab, chunk_len, MAX_CHUNKS=MAX_CHUNKS, TILE=tile,
                                         FAST_LOG=cuda, PDL=use_pdl, num_warps=8 if cuda else 1,
                                         launch_pdl=use_pdl)
    _tile_draw_kernel[(batch,)](logits, logits.stride(0), temperatures, seeds, positions, best_val, best_tile, out,
                                vocab, chunks, MAX_CHUNKS=MAX_CHUNKS, TILE=tile, FAST_LOG=cuda, PDL=use_pdl,
                                num_warps=8 if cuda else 1, launch_pdl=use_pdl)
    return out
