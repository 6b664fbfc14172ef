"""SamplingParams, with vLLM's names and defaults; invalid values raise ValueError naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # return the sampled token's logprob and this many top alternatives
    stop_strings: List[str] = field(init=False, repr=False)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad(name, "must be a number")
            return value

        def integer(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(name, "must be an int")
            return value

        if number("temperature") < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < number("top_p") <= 1:
            bad("top_p", "must be in (0, 1]")
        if integer("top_k") < -1 or self.top_k == 0:
            bad("top_k", "must be -1 (off) or >= 1")
        if not 0 <= number("min_p") <= 1:
            bad("min_p", "must be in [0, 1]")
        if number("repetition_penalty") <= 0:
            bad("repetition_penalty", "must be > 0")
        if not -2 <= number("presence_penalty") <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= number("frequency_penalty") <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and integer("max_tokens") < 1:
            bad("max_tokens", "must be >= 1")
        if integer("min_tokens") < 0:
            bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None:
            integer("seed")
        if self.logprobs is not None and not 0 <= integer("logprobs") <= 20:
            bad("logprobs", "must be in [0, 20]")
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_strings = list(self.stop)
        else:
            bad("stop", "must be a string or a list of strings")
        if any(s == "" for s in self.stop_strings):
            bad("stop", "stop strings must not be empty")
        if self.stop_token_ids is not None and not (
                isinstance(self.stop_token_ids, (list, tuple))
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids)):
            bad("stop_token_ids", "must be a list of non-negative ints")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be a bool")
