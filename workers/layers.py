"""Model building blocks: RMSNorm, rotary embedding, SiLU-and-mul, and paged attention.

Attention metadata is an explicit object passed down the forward (no global "context").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# vLLM's default KV block size on CUDA, and ours wherever the attention backend has no reason to pick another
DEFAULT_KV_BLOCK_SIZE = 16


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x, residual: Optional[torch.Tensor] = None):
        """Plain norm, or (when ``residual`` is given) residual-add then norm, returning both. On CUDA ``x``
        may also be a row-parallel projection's split-K partial sums (see parallel.layers.RowParallelLinear)."""
        if not isinstance(x, torch.Tensor) or x.is_cuda:  # one fused kernel (workers.kernels.fused), not ~8
            from workers.kernels.fused import rmsnorm
            return rmsnorm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = xf.to(dtype) * self.weight
        return out if residual is None else (out, residual)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from workers.kernels.fused import silu_and_mul
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's frequency-dependent scaling when ``scaling`` asks for it."""
    # float32 throughout, the way the checkpoints' reference implementation (transformers) computes it
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling {rope_type!r} (supported: default, llama3)")
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > low_wavelen, inv_freq / factor,
                       torch.where(wavelen < high_wavelen, inv_freq, smoothed))


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding, the layout of Llama and Qwen checkpoints."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: Optional[dict]):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq.float())
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, d/2]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache. Built by the model runner, read by attention.

    Sequence b has ``q_len_b`` new tokens (rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of the batch) and
    ``context_lens[b]`` tokens of K/V in total once they are written, so its new tokens sit at positions
    ``context_lens[b] - q_len_b ...``: one formula for prefill, prefill over a cached prefix, later chunks
    of a chunked prefill, and decode (q_len 1).
    """

    slot_mapping: torch.Tensor  # [T] int64, slot of each new token's K/V (-1: padding, write nothing)
    context_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_seqlen_q: int
    is_decode: bool  # every sequence has exactly one new token
    prefix_free: bool = False  # no sequence attends to K/V from earlier steps (plain prefill)
    # decode with the Triton backend: KV splits (None: from the shapes, triton_attention.choose_num_splits)
    decode_splits: Optional[int] = None
    # prefill with the Triton backend: [(int32 sequence indices, their max q_len)] when short and long
    # query lengths share the step, so each gets its own tile size (triton_attention.prefill_seq_groups)
    seq_groups: Optional[list] = None
    # host copies, for the pure-torch backend's per-sequence loop
    q_lens_host: Optional[list] = None
    context_lens_host: Optional[list] = None


def torch_store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def torch_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The reference backend: per sequence, gather its K/V through the block table and attend causally.

    Deliberately simple (a Python loop, float32 math): it is what the GPU kernels are checked against.
    """
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    start = 0
    for b, (q_len, ctx_len) in enumerate(zip(meta.q_lens_host, meta.context_lens_host)):
        blocks = meta.block_tables[b, : -(-ctx_len // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx_len].float().repeat_interleave(group, dim=1)  # [ctx, h, d]
        v = v_cache[blocks].flatten(0, 1)[:ctx_len].float().repeat_interleave(group, dim=1)
        qb = q[start:start + q_len].float()
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        causal = torch.arange(ctx_len, device=q.device)[None, :] > q_pos[:, None]
        scores.masked_fill_(causal, float("-inf"))
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
        start += q_len
    return out


class Attention(nn.Module):
    """Writes this step's K/V into the layer's cache shard, then attends over the paged cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.backend = backend
        # bound by the model runner once the cache is allocated: [num_blocks, block_size, kv_heads, head_dim]
        self.k_cache = self.v_cache = None

    def forward(self, q, k, v, meta: AttentionMetadata, kv_stored: bool = False) -> torch.Tensor:
        """``kv_stored``: the caller has already written this step's K/V into the cache (the fused
        norm/rotary kernel does on CUDA)."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if not kv_stored:
            self.backend.store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = self.backend.attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return out.reshape(-1, self.num_heads * self.head_dim)


class TorchAttentionBackend:
    """Pure torch; runs anywhere. The CPU default and the reference for the GPU backends."""

    name = "torch"
    store_kvcache = staticmethod(torch_store_kvcache)

    @staticmethod
    def default_block_size() -> int:
        return DEFAULT_KV_BLOCK_SIZE

    @staticmethod
    def attention(q, k, v, k_cache, v_cache, meta, scale):
        return torch_paged_attention(q, k_cache, v_cache, meta, scale)


class TritonAttentionBackend:
    """CUDA: our Triton kernels over the paged cache (decode: split-KV; prefill: paged causal), and, below
    Hopper, torch's built-in varlen flash attention for prefills that attend to no cached prefix.

    On Hopper our prefill kernel is the faster one: on one of bench.py's prefill steps (H200, torch 2.11)
    229 causal TFLOP/s against 157 for torch's FlashAttention-2 (docs/kernels.md, "Known limits"). Below
    Hopper FlashAttention-2 is the tuned kernel; not measured there."""

    name = "triton"
    groups_prefill_by_query_len = True  # the runner fills AttentionMetadata.seq_groups for prefills

    def __init__(self):
        from workers.kernels import triton_attention
        self.kernels = triton_attention
        self.hopper_or_later = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
        self.varlen = None if self.hopper_or_later else _torch_varlen_attention()

    def default_block_size(self) -> int:
        """Hopper and later: blocks of 64, the smallest on which the one-split decode reads its K/V tiles by
        TMA (triton_attention.tma_decode_applies). Measured on an H200 against vLLM's 16: batch-64 TPOT 2.14
        against 2.19 ms, bench.py 75.3-75.7 % of the roofline against 74.8 % (docs/benchmarks.md)."""
        return self.kernels.TMA_BLOCK_N if self.hopper_or_later else DEFAULT_KV_BLOCK_SIZE

    def store_kvcache(self, k, v, k_cache, v_cache, slot_mapping):
        self.kernels.store_kvcache(k, v, k_cache, v_cache, slot_mapping)

    def attention(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        if meta.is_decode:
            return self.kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                       scale, num_splits=meta.decode_splits)
        if meta.prefix_free and self.varlen is not None:
            return self.varlen(q, k, v, meta.cu_seqlens_q, meta.max_seqlen_q, scale)
        return self.kernels.paged_prefill_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.context_lens,
                                                    meta.block_tables, scale, meta.max_seqlen_q,
                                                    seq_groups=meta.seq_groups)


def _torch_varlen_attention():
    """torch.nn.attention.varlen.varlen_attn adapted to (q, k, v, cu_seqlens, max_seqlen, scale), or None.

    Its keyword arguments changed between torch releases (2.11 has ``is_causal``; later ones
    ``window_size``); without grouped-query support we return None and the Triton kernel is used.
    """
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters
    except (ImportError, ValueError, TypeError):
        return None
    if "enable_gqa" not in params:
        return None
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

    def run(q, k, v, cu_seqlens, max_seqlen, scale):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, enable_gqa=True,
                           **causal)

    return run
