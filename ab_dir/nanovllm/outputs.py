"""What generate returns (vLLM's shapes, plus shortcuts to the single completion)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]  # "stop" | "length" | "abort"; None while running
    # with SamplingParams(logprobs=k): per generated token, {token id: logprob} for the sampled token and
    # the k most likely ones (the model's raw distribution); cumulative_logprob sums the sampled ones
    logprobs: Optional[List[Dict[int, float]]] = None
    cumulative_logprob: Optional[float] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)  # arrival_time, first_token_time, finished_time (time.time())

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> List[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> Optional[str]:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> Optional[List[Dict[int, float]]]:
        return self.outputs[0].logprobs

    @property
    def cumulative_logprob(self) -> Optional[float]:
        return self.outputs[0].cumulative_logprob
