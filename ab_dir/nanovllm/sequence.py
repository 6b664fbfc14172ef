"""A request as the scheduler sees it."""

from __future__ import annotations

import enum
import time
from typing import List, Optional

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, request_id: str, prompt_token_ids: List[int], params: SamplingParams,
                 sampling_fields: dict, max_tokens: int, prompt: Optional[str] = None):
        self.seq_id = seq_id  # the id on the wire
        self.request_id = request_id  # the user's id
        self.prompt = prompt
        self.token_ids: List[int] = list(prompt_token_ids)  # prompt followed by outputs
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.sampling_fields = sampling_fields  # what the workers need to sample, sent once
        self.max_tokens = max_tokens
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V is in the cache once the plans sent so far have run
        self.num_pending = 0  # tokens being sampled by plans in flight (their values not yet known here)
        self.last_step = -1  # the plan that last scheduled it
        self.num_cached_tokens = 0  # of the prompt, served from the prefix cache at admission
        self.block_ids: List[int] = []
        self.block_hashes: List[int] = []  # chained hashes of this sequence's full blocks, in order
        self.on_workers = False  # False: next time it is scheduled it travels as a NewRequest
        self.num_blocks_on_workers = 0
        self.finish_reason: Optional[str] = None
        self.text = ""  # only maintained when stop strings need it
        self.logprobs: Optional[List[dict]] = [] if params.logprobs is not None else None
        # wall-clock times (time.time()), reported in RequestOutput.metrics
        self.arrival_time = time.time()
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> List[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> List[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
