"""The offline API: ``LLM(model, ...).generate(prompts, sampling_params)``."""

from __future__ import annotations

import atexit
import itertools
import time
import weakref
from typing import List, Optional, Sequence, Union

from tqdm.auto import tqdm

from nanovllm.config import ENGINE_ARGS, EngineConfig
from nanovllm.engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams


def _shutdown_ref(ref) -> None:
    llm = ref()
    if llm is not None:
        llm.shutdown()


class LLM:
    """An offline inference engine. Keyword arguments follow vLLM's names (see ``EngineConfig``):

    ``tensor_parallel_size=1, dtype="auto", device="auto", max_model_len=None, max_num_seqs=256,
    max_num_batched_tokens=16384, gpu_memory_utilization=0.9, kvcache_block_size=None,
    enable_prefix_caching=True, enforce_eager=False,
    load_format="auto"|"dummy", seed=0, attention_backend="auto", num_gpu_blocks_override=None,
    cpu_kvcache_space_gib=1.0, distributed_executor_backend="mp"|"torchrun", tokenizer=None,
    skip_tokenizer_init=False``.
    """

    def __init__(self, model: str, **kwargs):
        skip_tokenizer_init = kwargs.pop("skip_tokenizer_init", False)
        for name in kwargs:
            if name not in ENGINE_ARGS:
                raise TypeError(f"LLM() got an unexpected keyword argument {name!r}")
        self.llm_engine: Optional[LLMEngine] = None
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs), skip_tokenizer_init=skip_tokenizer_init)
        self._request_ids = itertools.count()
        atexit.register(_shutdown_ref, weakref.ref(self))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> None:
        """Drop the prefix cache's contents (e.g. between benchmark runs)."""
        self._engine().block_manager.reset_prefix_cache()

    def generate(self, prompts, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> List[RequestOutput]:
        engine = self._engine()
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        # validate everything before queueing anything, so one bad prompt leaves the engine untouched
        prepared = [engine.prepare_request(p, sp) for p, sp in zip(prompts, params)]
        ids = [f"{next(self._request_ids)}" for _ in prompts]
        for request_id, prompt, sp, prep in zip(ids, prompts, params, prepared):
            engine.add_request(request_id, prompt, sp, prepared=prep)
        outputs = {}
        pbar = tqdm(total=len(prompts), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                start = time.perf_counter()
                finished, num_prefill, num_decode = engine.step()
                elapsed = max(time.perf_counter() - start, 1e-9)
                if num_prefill:
                    pbar.set_postfix_str(f"prefill {num_prefill / elapsed:,.0f} tok/s", refresh=False)
                elif num_decode:
                    pbar.set_postfix_str(f"decode {num_decode / elapsed:,.0f} tok/s", refresh=False)
                for out in finished:
                    outputs[out.request_id] = out
                    pbar.update(1)
        except BaseException:
            for request_id in ids:  # leave the engine usable: drop what this call queued
                if request_id not in outputs and engine.executor.dead is None:
                    engine.abort_request(request_id)
            raise
        finally:
            pbar.close()
        return [outputs[i] for i in ids]

    def _engine(self) -> LLMEngine:
        if self.llm_engine is None:
            raise RuntimeError("this LLM has been shut down")
        return self.llm_engine

    def shutdown(self) -> None:
        if self.llm_engine is not None:
            engine, self.llm_engine = self.llm_engine, None
            engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass
