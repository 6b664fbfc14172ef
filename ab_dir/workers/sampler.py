"""Sampling: penalties, min_tokens, temperature, top-k, top-p, min-p, then a seeded draw.

The draw is Gumbel-max in two levels. ``argmax_i(logits_i / T + G_i)``, with ``G_i = -log(-log(U_i))``
independent Gumbel noise, samples ``i`` with probability ``softmax(logits / T)_i``; and the maximum over a
group of tokens of ``logits_i / T + G_i`` is itself distributed as the group's log-sum-exp plus one Gumbel.
So the vocabulary is cut into tiles of ``SAMPLE_TILE`` tokens, a tile is drawn by ``argmax_t(LSE_t + G_t)``
(probability: the tile's share of the softmax), then a token of that tile by Gumbel-max over its own tokens:
exactly the same distribution, with one exp per logit instead of two logs and a hash (the per-token noise is
computed for one tile a row). The ``U`` come from a counter-based hash of (request seed, output position,
token or tile id), so a request's tokens depend only on its own seed and logits: not on what else is in the
batch, not on the tensor-parallel size. On CUDA the draw is a Triton kernel pair
(``workers.kernels.sampling``) computing the same hashes. No softmax and no [batch, vocab] temporaries on
CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (constants < 2**31, so no product overflows int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


SAMPLE_TILE = 4096  # tokens per tile of the two-level draw: part of the algorithm (which tokens a seed gives)
TILE_SALT = 0x2545F491  # the tile noise's key is hash(key ^ TILE_SALT): independent of the token noise


def _keys(seeds: torch.Tensor, positions: torch.Tensor):
    """Per row: the token-noise key and the tile-noise key."""
    key = _hash32(_hash32(seeds & _M32) ^ (positions & _M32))
    return key, _hash32(key ^ TILE_SALT)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """A hash's 32 bits -> U in (0, 1), never 0 or 1 in float32: (23 high bits + 0.5) / 2**23. (With 24 bits,
    (2**24 - 0.5) / 2**24 rounds to 1.0 in float32, and -log(-log(1)) is +inf: until 2026-12-02 one token in
    2**24 got infinite noise, i.e. was drawn whatever its probability.)"""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def _gumbel(key: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise, a pure function of (key [B, 1], id [B, N])."""
    return -torch.log(-torch.log(uniform_from_bits(_hash32(_hash32(key ^ ids) ^ key))))


def gumbel_argmax_reference(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                            positions: torch.Tensor, tile: int = SAMPLE_TILE) -> torch.Tensor:
    """Pure-torch two-level draw (CPU, and the reference for the Triton kernels); rows with T == 0 are
    greedy (the first maximal token, as torch.argmax: ties go to the lower tile, then the lower id)."""
    batch, vocab = logits.shape
    n_tiles = -(-vocab // tile)
    x = torch.nn.functional.pad(logits.float(), (0, n_tiles * tile - vocab), value=float("-inf"))
    x = x.view(batch, n_tiles, tile)
    sampling = temperatures > 0
    inv_temp = torch.where(sampling, 1.0 / temperatures.clamp_min(1e-30), torch.ones_like(temperatures))
    key, tile_key = _keys(seeds, positions)
    tile_ids = torch.arange(n_tiles, device=logits.device, dtype=torch.int64)[None, :]
    tile_scores = torch.where(sampling[:, None],
                              torch.logsumexp(x * inv_temp[:, None, None], dim=-1) + _gumbel(tile_key[:, None], tile_ids),
                              x.max(dim=-1).values)
    chosen = tile_scores.argmax(dim=-1)  # [B]
    ids = chosen[:, None] * tile + torch.arange(tile, device=logits.device, dtype=torch.int64)[None, :]
    xt = x[torch.arange(batch, device=logits.device), chosen]  # [B, tile]
    # the padding past the vocabulary is -inf, and stays -inf: the noise is finite
    scores = torch.where(sampling[:, None], xt * inv_temp[:, None] + _gumbel(key[:, None], ids), xt)
    return chosen * tile + scores.argmax(dim=-1)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of the sequences that sample this step, as device tensors. The six
    per-row tensors may be None when ``all_greedy`` (the argmax reads none of them)."""

    temperatures: Optional[torch.Tensor]  # [B] float32, 0 = greedy
    top_ks: Optional[torch.Tensor]  # [B] int64, <= 0 = off
    top_ps: Optional[torch.Tensor]  # [B] float32
    min_ps: Optional[torch.Tensor]  # [B] float32
    seeds: Optional[torch.Tensor]  # [B] int64
    positions: Optional[torch.Tensor]  # [B] int64, index of the token being sampled among the outputs
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    # penalties (None when no row uses them): histories as padded id lists
    repetition_penalties: Optional[torch.Tensor] = None
    presence_penalties: Optional[torch.Tensor] = None
    frequency_penalties: Optional[torch.Tensor] = None
    prompt_ids: Optional[torch.Tensor] = None  # [B, Lp] int64, padded with vocab_size
    output_ids: Optional[torch.Tensor] = None  # [B, Lo] int64, padded with vocab_size
    # rows still under min_tokens, and the ids they must not sample yet
    banned: Optional[List[tuple]] = None  # [(row, [token ids])]


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    B, V = logits.shape
    out_counts = torch.zeros(B, V + 1, dtype=logits.dtype, device=logits.device)
    out_counts.scatter_add_(1, batch.output_ids, torch.ones_like(batch.output_ids, dtype=logits.dtype))
    out_counts = out_counts[:, :V]
    seen = out_counts > 0
    prompt_seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    prompt_seen.scatter_(1, batch.prompt_ids, True)
    seen_any = seen | prompt_seen[:, :V]
    # repetition penalty (CTRL paper, as transformers/vLLM): divide positive logits, multiply negative ones
    rep = batch.repetition_penalties[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen_any, penalized, logits)
    logits = logits - batch.frequency_penalties[:, None] * out_counts
    return logits - batch.presence_penalties[:, None] * seen.to(logits.dtype)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B, V] logits (any float dtype) -> [B] token ids."""
    if batch.repetition_penalties is not None or batch.banned:
        logits = logits.float()  # a working copy (for float32 input, the input itself: it is a temporary)
        if batch.repetition_penalties is not None:
            logits = _apply_penalties(logits, batch)
        for row, ids in batch.banned or ():
            logits[row, ids] = float("-inf")
    if batch.all_greedy:
        return logits.argmax(dim=-1)
    if batch.use_top_k or batch.use_top_p or batch.use_min_p:
        logits = _truncate(logits.float(), batch)  # removed tokens become -inf, which no noise can lift
    if logits.is_cuda:
        from workers.kernels.sampling import gumbel_argmax
        return gumbel_argmax(logits, batch.temperatures, batch.seeds, batch.positions)
    return gumbel_argmax_reference(logits.float(), batch.temperatures, batch.seeds, batch.positions)


def _truncate(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Top-k, top-p and min-p on the temperature-scaled distribution; greedy rows are left alone."""
    temps = torch.where(batch.temperatures > 0, batch.temperatures, torch.ones_like(batch.temperatures))
    scaled = logits / temps[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None, :]
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if batch.use_top_k:
        k = torch.where(batch.top_ks > 0, batch.top_ks, torch.full_like(batch.top_ks, V))
        remove |= rank >= k[:, None]
    if batch.use_top_p:
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= mass_before >= batch.top_ps[:, None]
    if batch.use_min_p:  # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
        threshold = sorted_logits[:, :1] + torch.log(batch.min_ps.clamp_min(1e-30))[:, None]
        remove |= (sorted_logits < threshold) & (batch.min_ps > 0)[:, None]
    remove &= (batch.temperatures > 0)[:, None]
    remove_unsorted = torch.empty_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(remove_unsorted, float("-inf"))
