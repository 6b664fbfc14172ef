"""LLMEngine: tokenizer, scheduler and executor, stepped one batch plan at a time."""

from __future__ import annotations

import gc
import itertools
from collections import deque
import json
import os
import random
import statistics
import time
from typing import Deque, Dict, List, Optional, Tuple, Union

from nanovllm.block_manager import BlockManager
from nanovllm.config import EngineConfig
from nanovllm.detokenizer import IncrementalDetokenizer
from nanovllm.executor import Executor
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler import Scheduler
from nanovllm.sequence import Sequence
from parallel.protocol import SamplingFields

Prompt = Union[str, List[int], dict]

# Plans sent ahead of the results they depend on. With 3, when a worker has launched step N the plan for
# N+1 is already waiting in its socket: neither this process's turnaround (results of N-1 in, plan of N+1
# out) nor the worker's own host work is on the device's critical path. The price: a request that stops
# on EOS or a stop string has up to two more steps computed for it, which are discarded.
PLANS_IN_FLIGHT = 3


def _eos_token_ids(model_dir: str, hf_config: dict, tokenizer) -> List[int]:
    ids = []
    path = os.path.join(model_dir, "generation_config.json")
    sources = [hf_config.get("eos_token_id")]
    if os.path.isfile(path):
        with open(path) as f:
            sources.insert(0, json.load(f).get("eos_token_id"))
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for value in sources:
        for v in (value if isinstance(value, list) else [value]):
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig, skip_tokenizer_init: bool = False):
        self.config = config.finalize()
        self.tokenizer = None if skip_tokenizer_init else self._load_tokenizer()
        self.vocab_size = config.hf_config["vocab_size"]
        self.eos_token_ids = _eos_token_ids(config.model_dir, config.hf_config, self.tokenizer)
        self.executor = Executor(config)
        config.kvcache_block_size = self.executor.block_size  # None ("the backend picks") resolved by the workers
        self.block_manager = BlockManager(self.executor.num_kv_blocks, config.kvcache_block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len)
        self.in_flight: Deque[Tuple[int, list]] = deque()  # (step id, scheduled) of plans sent, oldest first
        self.seed_rng = random.Random(config.seed)  # seeds for requests that bring none: reproducible per run
        self.seq_ids = itertools.count()
        self.requests: Dict[str, Sequence] = {}
        self.detokenizers: Dict[int, IncrementalDetokenizer] = {}
        # NANOVLLM_STEP_TIMING=1 (a profiling aid): where this process's time goes per step, and a log of
        # every step (result time, sequences, new tokens, K/V tokens attended) that bench.py breaks down
        self.timing: Optional[list] = [] if os.environ.get("NANOVLLM_STEP_TIMING") else None
        self.step_log: Optional[list] = [] if self.timing is not None else None
        self.step_sizes: Dict[int, tuple] = {}
        # What this process holds after startup (torch, the tokenizer, this engine, the caller's own objects)
        # mostly lives as long as the engine: freeze it out of the garbage collector (as the workers do), so
        # that a full collection, which per-step garbage triggers now and then, walks only what came later.
        # Unfrozen, one walked ~170k objects for 70-170 ms on the CPU machine, a pause in which no plan
        # reaches the workers (bench.py reports these collections). shutdown() unfreezes, unless the caller had
        # frozen objects of its own before: gc cannot unfreeze only ours, and theirs must stay frozen.
        self._unfreeze_at_shutdown = gc.get_freeze_count() == 0
        gc.collect()
        gc.freeze()

    def _load_tokenizer(self):
        from transformers import AutoTokenizer
        path = self.config.tokenizer or self.config.model_dir
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise ValueError(f"could not load a tokenizer from {path} ({type(e).__name__}: {e}); pass "
                             "tokenizer=... or skip_tokenizer_init=True and give prompts as token ids") from e

    # ---- requests ----------------------------------------------------------------------------------------

    def prepare_request(self, prompt: Prompt, params: SamplingParams) -> Tuple[Optional[str], List[int], int]:
        """Validate one request before anything is queued: returns (text, token ids, max_tokens)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (the engine was started with skip_tokenizer_init)")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
            bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        else:
            raise TypeError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("the prompt is empty")
        limit = self.config.max_model_len
        if len(token_ids) >= limit:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, max_model_len is {limit}: no room to generate")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(token_ids)
        if len(token_ids) + max_tokens > limit:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
                             f"({limit})")
        return text, token_ids, max_tokens

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams,
                    prepared: Optional[tuple] = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids, max_tokens = prepared or self.prepare_request(prompt, params)
        stop_ids = []
        if params.min_tokens:
            stop_ids = list(params.stop_token_ids or []) + ([] if params.ignore_eos else self.eos_token_ids)
        seed = params.seed if params.seed is not None else self.seed_rng.getrandbits(32)
        fields = SamplingFields(
            temperature=float(params.temperature), top_p=float(params.top_p), top_k=params.top_k,
            min_p=float(params.min_p), repetition_penalty=float(params.repetition_penalty),
            presence_penalty=float(params.presence_penalty), frequency_penalty=float(params.frequency_penalty),
            min_tokens=params.min_tokens, seed=seed % (1 << 32), stop_token_ids=stop_ids,
            logprobs=-1 if params.logprobs is None else params.logprobs)
        seq = Sequence(next(self.seq_ids), request_id, token_ids, params, fields.__dict__, max_tokens, text)
        self.requests[request_id] = seq
        if params.stop_strings and self.tokenizer is not None:
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        self.detokenizers.pop(seq.seq_id, None)
        return self._output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    # ---- one step ----------------------------------------------------------------------------------------

    def step(self) -> Tuple[List[RequestOutput], int, int]:
        """Wait for the oldest step in flight, keeping later ones queued behind it so the workers never
        wait for this process; returns (outputs finished by that step, its prefill tokens, decode tokens)."""
        t0 = time.perf_counter()
        while len(self.in_flight) < PLANS_IN_FLIGHT and self.scheduler.has_unfinished():
            plan, scheduled = self.scheduler.schedule()
            if plan is None:
                break
            self.executor.send(plan)
            self.in_flight.append((plan.step_id, scheduled))
            if self.step_log is not None:  # num_computed_tokens already counts this step's tokens
                self.step_sizes[plan.step_id] = (len(scheduled), sum(n for _, n in scheduled),
                                                 sum(seq.num_computed_tokens for seq, _ in scheduled))
        if not self.in_flight:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could not schedule any request")
            return [], 0, 0
        step_id, scheduled = self.in_flight.popleft()
        t1 = time.perf_counter()
        result = self.executor.wait_result(step_id)
        t2 = time.perf_counter()
        by_id = {seq.seq_id: seq for seq, _ in scheduled}
        if result.logprobs:
            sampled_token = dict(zip(result.req_ids, result.token_ids))
            for req_id, sampled_lp, top_ids, top_lps in result.logprobs:
                seq = by_id[req_id]
                if not seq.is_finished:
                    entry = dict(zip(top_ids, top_lps))
                    entry[sampled_token[req_id]] = sampled_lp
                    seq.logprobs.append(entry)
        num_decode = sum(1 for seq, n in scheduled if n == 1 and seq.num_output_tokens > 0)
        num_prefill = sum(n for _, n in scheduled) - num_decode
        finished = []
        for req_id, token in zip(result.req_ids, result.token_ids):
            seq = by_id[req_id]
            if seq.is_finished:  # stopped (or aborted) while this step was in flight
                continue
            self.scheduler.append_token(seq, token)
            if seq.first_token_time is None:
                seq.first_token_time = time.time()
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self.requests.pop(seq.request_id, None)
                self.detokenizers.pop(seq.seq_id, None)
                finished.append(self._output(seq))
        if self.timing is not None:
            self.timing.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
            self.step_log.append((t2, *self.step_sizes.pop(step_id)))
        return finished, num_prefill, num_decode

    def _stop_reason(self, seq: Sequence, token: int) -> Optional[str]:
        params = seq.params
        past_min = seq.num_output_tokens >= params.min_tokens
        if past_min and not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if past_min and params.stop_token_ids and token in params.stop_token_ids:
            return "stop"
        detok = self.detokenizers.get(seq.seq_id)
        if detok is not None:
            delta = detok.step(seq.output_token_ids)
            seq.text += delta
            if past_min and delta:
                for stop in params.stop_strings:
                    # only the part that the new text could have completed needs searching
                    idx = seq.text.find(stop, max(0, len(seq.text) - len(delta) - len(stop) + 1))
                    if idx >= 0:
                        seq.text = seq.text[:idx]
                        return "stop"
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        if seq.seq_id in self.detokenizers or seq.params.stop_strings:
            text = seq.text
        elif self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        else:
            text = ""
        completion = CompletionOutput(0, text, seq.output_token_ids, seq.finish_reason)
        if seq.logprobs is not None:
            completion.logprobs = seq.logprobs
            completion.cumulative_logprob = sum(entry[t] for entry, t in zip(seq.logprobs, seq.output_token_ids))
        if seq.is_finished and seq.finished_time is None:
            seq.finished_time = time.time()
        metrics = {"arrival_time": seq.arrival_time, "first_token_time": seq.first_token_time,
                   "finished_time": seq.finished_time}
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion],
                             finished=seq.is_finished, num_cached_tokens=seq.num_cached_tokens, metrics=metrics)

    def shutdown(self) -> None:
        if self.timing:
            n = len(self.timing)
            sums = [sum(r[i] for r in self.timing) / n * 1e3 for i in range(3)]
            # medians too: the means carry the prefill steps and the host's pauses between generate calls
            medians = [statistics.median(r[i] for r in self.timing) * 1e3 for i in range(3)]
            print(f"[engine] {n} steps, ms/step (mean / median): schedule+send {sums[0]:.3f} / {medians[0]:.3f}, "
                  f"wait for result {sums[1]:.3f} / {medians[1]:.3f}, process result {sums[2]:.3f} / "
                  f"{medians[2]:.3f}", flush=True)
        try:
            self.executor.shutdown()
        finally:
            if self._unfreeze_at_shutdown:
                gc.unfreeze()  # leave the process's collector as startup found it
