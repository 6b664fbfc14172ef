"""The ``flash_attn`` attention backend: FlashAttention-3 or FlashAttention-2 over our paged KV cache.

Our cache layout per layer, ``[num_blocks, block_size, num_kv_heads, head_dim]``, is flash-attn's paged
layout, and our int32 block table ``[B, max_blocks]`` is its page table, so nothing is converted: K/V are
written by our Triton ``store_kvcache`` (slot -1 = padding, writes nothing) and each layer's attention is
one flash-attn call. flash-attn's causal mask is aligned bottom-right, so query ``i`` of a sequence with
``q_len`` new tokens and ``context_len`` tokens of K/V sits at ``context_len - q_len + i``: the same
formula as ``AttentionMetadata``, for plain prefill, prefill over a cached prefix, later chunks and decode.

- FlashAttention-3 (module ``flash_attn_interface``, e.g. ``pip install tokenspeed-fa3``; preferred):
  ``flash_attn_with_kvcache`` for everything, decode with q as ``[B, 1, H, D]``, prefill with varlen q
  (``cu_seqlens_q``/``max_seqlen_q``); any block size. Hopper GPUs (sm90).
- FlashAttention-2 (module ``flash_attn``, ``pip install flash-attn``; fallback): ``flash_attn_with_kvcache``
  for decode, ``flash_attn_varlen_func(..., block_table=)`` for prefill. Its paged kernels need the block
  size to be a multiple of 256.

Both take fp16/bf16 only. CUDA graphs: the decode call passes device tensors and shape-derived ints only;
flash-attn derives its split count from shapes (the block table's width bounds the context length) and
allocates its split workspace inside the call, so under capture it comes from the graph's memory pool, as
with our Triton decode.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from workers.layers import DEFAULT_KV_BLOCK_SIZE

FLASH_DTYPES = ("float16", "bfloat16")
FA2_BLOCK_MULTIPLE = 256  # FlashAttention-2's paged KV kernels
INSTALL_HINT = ("pip install flash-attn (FlashAttention-2), or FlashAttention-3 "
                "(e.g. pip install tokenspeed-fa3, which provides flash_attn_interface)")


@functools.lru_cache(maxsize=None)
def flash_attn_version() -> Optional[int]:
    """3 when FlashAttention-3 (``flash_attn_interface``) imports, else 2 when FlashAttention-2
    (``flash_attn``) does, else None. Only tries the imports (no CUDA work); cached."""
    for version, module in ((3, "flash_attn_interface"), (2, "flash_attn")):
        try:
            importlib.import_module(module)
        except Exception:  # not installed, or built for another torch / CUDA (ImportError, OSError, ...)
            continue
        return version
    return None


def flash_attn_problem(dtype: str, block_size: int, version: Optional[int]) -> Optional[str]:
    """Why attention_backend='flash_attn' cannot run this configuration (an error message), or None.
    block_size 0: not configured (FlashAttnBackend.default_block_size picks one that fits)."""
    if version is None:
        return f"attention_backend='flash_attn' needs FlashAttention, which is not installed: {INSTALL_HINT}"
    if dtype not in FLASH_DTYPES:
        return (f"attention_backend='flash_attn' supports float16 and bfloat16 only, not dtype={dtype!r}: "
                f"use dtype='bfloat16' or attention_backend='triton'")
    if version == 2 and block_size and block_size % FA2_BLOCK_MULTIPLE:
        return (f"attention_backend='flash_attn' with FlashAttention-2 needs kvcache_block_size to be a multiple "
                f"of {FA2_BLOCK_MULTIPLE}, got {block_size}: use kvcache_block_size={FA2_BLOCK_MULTIPLE}, "
                f"or FlashAttention-3 (any block size)")
    return None


def flash_attn_supports_gpu(version: int) -> bool:
    """Whether the current CUDA device can run this flash-attn: FA2 needs Ampere or newer; FA3 is built for
    Hopper, plus Ampere when the build kept its sm8x path (flash_attn_config's FLASHATTENTION_DISABLE_SM8x)."""
    major = torch.cuda.get_device_capability()[0]
    if version == 2:
        return major >= 8
    if major == 9:
        return True
    try:
        from flash_attn_config import CONFIG
        return major == 8 and not CONFIG["build_flags"].get("FLASHATTENTION_DISABLE_SM8x", True)
    except Exception:
        return False


def auto_picks_flash_attn(dtype: str, block_size: int) -> bool:
    """attention_backend="auto" on CUDA: flash-attn when it is installed, fits the dtype and block size,
    and runs on this GPU (as vLLM does); otherwise our Triton kernels. An unconfigured block size (0) is
    judged as vLLM's default 16, so FlashAttention-2 (multiples of 256) is taken only when asked for by name
    or by a block size that fits it."""
    version = flash_attn_version()
    return (flash_attn_problem(dtype, block_size or DEFAULT_KV_BLOCK_SIZE, version) is None
            and flash_attn_supports_gpu(version))


class FlashAttnBackend:
    """Same interface as TritonAttentionBackend (workers/layers.py)."""

    name = "flash_attn"

    def __init__(self, dtype: str, block_size: int):
        self.version = flash_attn_version()
        problem = flash_attn_problem(dtype, block_size, self.version)
        if problem:
            raise ValueError(problem)
        if not flash_attn_supports_gpu(self.version):
            raise ValueError(f"attention_backend='flash_attn': FlashAttention-{self.version} does not support "
                             f"{torch.cuda.get_device_name()} (compute capability "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability()))}): use 'triton'")
        self.fa = importlib.import_module("flash_attn_interface" if self.version == 3 else "flash_attn")
        from workers.kernels import triton_attention
        self.kernels = triton_attention

    def default_block_size(self) -> int:
        """FlashAttention-2's paged KV wants multiples of 256; FlashAttention-3 takes any size."""
        return FA2_BLOCK_MULTIPLE if self.version == 2 else DEFAULT_KV_BLOCK_SIZE

    def store_kvcache(self, k, v, k_cache, v_cache, slot_mapping):
        self.kernels.store_kvcache(k, v, k_cache, v_cache, slot_mapping)

    def attention(self, q, k, v, k_cache, v_cache, meta, scale: float):
        """q: [T, Hq, D] (any row stride); K/V of the new tokens are already in the cache (k, v unused)."""
        if meta.is_decode:  # one token per sequence: [B, 1, H, D], flash-attn's own decode shape
            pages = {"page_table" if self.version == 3 else "block_table": meta.block_tables}
            out = self.fa.flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                                  softmax_scale=scale, causal=True, **pages)
            return out.squeeze(1)
        if self.version == 3:  # varlen q over the paged cache; max_seqlen_q sizes the grid
            return self.fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=meta.context_lens,
                                                   page_table=meta.block_tables, cu_seqlens_q=meta.cu_seqlens_q,
                                                   max_seqlen_q=meta.max_seqlen_q, softmax_scale=scale, causal=True)
        # FA2 varlen wants the keys' cumulative lengths too, and a bound on the longest context: exact from
        # the host copy the runner passes with every prefill, else the block table's capacity.
        cu_seqlens_k = F.pad(meta.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
        if meta.context_lens_host:
            max_seqlen_k = max(meta.context_lens_host)
        else:
            max_seqlen_k = meta.block_tables.shape[1] * k_cache.shape[1]
        return self.fa.flash_attn_varlen_func(q, k_cache, v_cache, meta.cu_seqlens_q, cu_seqlens_k, meta.max_seqlen_q,
                                              max_seqlen_k, softmax_scale=scale, causal=True,
                                              block_table=meta.block_tables)
