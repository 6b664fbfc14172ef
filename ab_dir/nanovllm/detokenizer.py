"""Incremental detokenization, for stop strings.

Decoding token by token is wrong for byte-level BPE (a character can span tokens) and decoding everything
each step is quadratic. So, as in vLLM / transformers' streamers: decode a short window of recent tokens
twice (with and without the new ones) and emit the difference once it no longer ends in a partial
character.
"""

from __future__ import annotations

from typing import List


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, output_ids: List[int]) -> str:
        """The new text that ``output_ids`` (all outputs so far) adds to what was emitted before."""
        decode = self.tokenizer.decode
        prefix = decode(output_ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = decode(output_ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(output_ids)
            return full[len(prefix):]
        return ""
