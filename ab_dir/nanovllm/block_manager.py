"""Paged KV-cache blocks: allocation, reference counts and prefix caching.

A full block is identified by a chained hash of its token ids and of the hash of the block before it, so
equal hashes mean equal prefixes; the stored token ids are compared too, so a hash collision can never
serve wrong K/V. Freed blocks keep their contents and hash and sit in a least-recently-used free list: a
later request with the same prefix takes them back, and allocation evicts the least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from nanovllm.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None
        self.token_ids: Optional[tuple] = None


def chain_hash(parent_hash: Optional[int], token_ids: tuple) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: "OrderedDict[int, None]" = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: Dict[int, int] = {}  # hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens served from the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_ids))

    # ---- prefix cache -------------------------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> Tuple[List[int], List[int]]:
        """Block ids and hashes of the longest cached prefix of ``seq`` (full blocks only).

        At least one token is always left to compute: its logits are needed to sample the next token.
        """
        if not self.enable_prefix_caching:
            return [], []
        ids, hashes, parent = [], [], None
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            ids.append(block_id)
            hashes.append(h)
            parent = h
        return ids, hashes

    def admit(self, seq: Sequence, cached_ids: List[int], cached_hashes: List[int], num_new_tokens: int) -> bool:
        """Give a waiting sequence its cached prefix plus blocks for ``num_new_tokens``; False if they don't fit."""
        reusable_free = sum(1 for b in cached_ids if self.blocks[b].ref_count == 0)
        num_cached_tokens = len(cached_ids) * self.block_size
        total = -(-(num_cached_tokens + num_new_tokens) // self.block_size)
        if total - len(cached_ids) > self.num_free_blocks - reusable_free:
            return False
        for block_id in cached_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
        seq.block_ids = list(cached_ids)
        seq.block_hashes = list(cached_hashes)
        seq.num_computed_tokens = num_cached_tokens
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += num_cached_tokens
        self._grow(seq, num_new_tokens)
        return True

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Blocks for ``num_new_tokens`` more tokens of a running sequence; False if they don't fit."""
        if self.blocks_needed(seq, num_new_tokens) > self.num_free_blocks:
            return False
        self._grow(seq, num_new_tokens)
        return True

    def _grow(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_ids.append(self._take_free_block())
        # only blocks whose tokens are all known can be hashed (a token still being sampled is not)
        self._register_full_blocks(seq, min(seq.num_computed_tokens + num_new_tokens, seq.num_tokens))

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evict its cached contents
        block.hash, block.token_ids, block.ref_count = None, None, 1
        return block_id

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Hash every block that ``num_tokens`` fills, so later requests can share it.

        Registering at scheduling time is safe: workers apply plans in order, so the K/V is written before
        any later step can read it.
        """
        if not self.enable_prefix_caching:
            return
        num_full = num_tokens // self.block_size
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = chain_hash(parent, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_ids[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.cached.setdefault(h, block.block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no running sequence holds (their contents become plain free
        blocks); blocks in use keep their hashes, which stay true."""
        for block_id in self.free_blocks:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, None

    def free(self, seq: Sequence) -> None:
        # tail blocks first, so a prefix outlives its continuations in the LRU order
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free_blocks[block_id] = None
                    self.free_blocks.move_to_end(block_id, last=False)  # no content worth keeping: reuse first
                else:
                    self.free_blocks[block_id] = None
        seq.block_ids, seq.block_hashes = [], []
        seq.num_computed_tokens = 0
