"""End to end on CPU: LLM(...) against transformers, at tensor_parallel_size 1 and 2 (gloo workers)."""

import gc
import random

import pytest

from conftest import hf_greedy
from nanovllm import LLM, SamplingParams

NUM_PROMPTS = 16
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def make_prompts(n=NUM_PROMPTS, seed=0, vocab=512, lo=2, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


PROMPTS = make_prompts()  # lengths 2..60 with block size 16: many span several blocks


@pytest.fixture(scope="module")
def references(tiny_models):
    return {arch: hf_greedy(path, PROMPTS, MAX_TOKENS) for arch, path in tiny_models.items()}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "llama3-scaled", "llama-uneven"])
def test_greedy_matches_transformers(tiny_models, references, arch, tp):
    with LLM(tiny_models[arch], tensor_parallel_size=tp, dtype="float32", kvcache_block_size=16) as llm:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert [o.token_ids for o in outs] == references[arch]
    assert all(o.finish_reason == "length" for o in outs)
    m = outs[0].metrics
    assert m["arrival_time"] <= m["first_token_time"] <= m["finished_time"]


def test_preemption_chunked_prefill_and_prefix_cache(tiny_models, references):
    """A pool too small for the batch (preemption), a small token budget (chunked prefill), then a second
    pass over prompts sharing a long prefix (prefix-cache hits): outputs stay identical to transformers."""
    path = tiny_models["qwen3"]
    with LLM(path, tensor_parallel_size=2, dtype="float32", kvcache_block_size=16, num_gpu_blocks_override=12,
             max_num_batched_tokens=40, max_model_len=128) as llm:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        engine = llm.llm_engine
        assert engine.scheduler.num_preemptions > 0
        assert [o.token_ids for o in outs] == references["qwen3"]

        prefix = make_prompts(1, seed=5, lo=48, hi=48)[0]
        shared = [prefix + tail for tail in make_prompts(4, seed=6, lo=3, hi=9)]
        first = llm.generate(shared[:1], GREEDY, use_tqdm=False)
        hits_before = engine.block_manager.prefix_cache_hits
        rest = llm.generate(shared[1:], GREEDY, use_tqdm=False)
        assert engine.block_manager.prefix_cache_hits - hits_before >= 3 * 48
        assert all(o.num_cached_tokens == 48 for o in rest)
        llm.reset_prefix_cache()
        [again] = llm.generate(shared[:1], GREEDY, use_tqdm=False)
        assert again.num_cached_tokens == 0 and again.token_ids == first[0].token_ids
    assert [o.token_ids for o in first + rest] == hf_greedy(path, shared, MAX_TOKENS)


def test_repetition_penalty_matches_transformers(tiny_models):
    from transformers import AutoModelForCausalLM
    import torch

    path = tiny_models["llama"]
    prompts = make_prompts(4, seed=3)
    with LLM(path, dtype="float32") as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                    repetition_penalty=1.5), use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for ids, out in zip(prompts, outs):
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, min_new_tokens=10,
                           do_sample=False, repetition_penalty=1.5, pad_token_id=0)
        assert out.token_ids == y[0, len(ids):].tolist()


SAMPLED = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=10, ignore_eos=True, seed=1000 + i)
           for i in range(6)]


def test_seeded_sampling_is_reproducible_across_batches_and_tp(tiny_models):
    path = tiny_models["qwen3"]
    prompts = make_prompts(6, seed=9)
    filler = make_prompts(5, seed=10)
    with LLM(path, dtype="float32") as llm:
        alone = llm.generate(prompts, SAMPLED, use_tqdm=False)
        again = llm.generate(prompts, SAMPLED, use_tqdm=False)
        # the same requests in reverse order, mixed with unrelated unseeded ones
        mixed = llm.generate(filler + prompts[::-1],
                             [SamplingParams(temperature=1.0, max_tokens=7)] * 5 + SAMPLED[::-1], use_tqdm=False)
    with LLM(path, dtype="float32", tensor_parallel_size=2) as llm:
        tp2 = llm.generate(prompts, SAMPLED, use_tqdm=False)
    tokens = [o.token_ids for o in alone]
    assert [o.token_ids for o in again] == tokens
    assert [o.token_ids for o in mixed[5:]][::-1] == tokens
    assert [o.token_ids for o in tp2] == tokens
    # and sampling is really sampling: different seeds give different continuations
    assert len({tuple(t) for t in tokens}) > 1
    greedy = [o.token_ids for o in LLM_greedy(path, prompts)]
    assert tokens != greedy


def LLM_greedy(path, prompts):
    with LLM(path, dtype="float32") as llm:
        return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)


def test_text_prompts_stops_and_min_tokens(tiny_models):
    path = tiny_models["qwen2"]
    with LLM(path, dtype="float32") as llm:
        tok = llm.get_tokenizer()
        [free] = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                              use_tqdm=False)
        assert free.prompt_token_ids == tok.encode("Hello world")
        assert free.text == tok.decode(free.token_ids, skip_special_tokens=True)
        # stop on a token id: cut right there, finish_reason "stop"
        stop_at = free.token_ids[4]
        [out] = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at]),
                             use_tqdm=False)
        assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:free.token_ids.index(stop_at) + 1]
        # stop on a string: the text ends before it
        target = free.text[len(free.text) // 2:][:3]
        if target.strip():
            [out] = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=20, stop=[target]),
                                 use_tqdm=False)
            assert out.finish_reason == "stop" and target not in out.text
            assert free.text.startswith(out.text)
        # min_tokens keeps EOS (token 0) from ending the request early
        [out] = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, min_tokens=8,
                                                         stop_token_ids=[stop_at]), use_tqdm=False)
        assert len(out.token_ids) == 8 and stop_at not in out.token_ids[:7]


def test_abort(tiny_models):
    with LLM(tiny_models["qwen3"], dtype="float32") as llm:
        engine = llm.llm_engine
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
        engine.add_request("b", [4, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True))
        engine.step()
        aborted = engine.abort_request("a")
        assert aborted.finish_reason == "abort"
        done = []
        while engine.has_unfinished_requests():
            done += engine.step()[0]
        assert [o.request_id for o in done] == ["b"]
        assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)


def test_startup_objects_are_frozen_out_of_the_collector_until_shutdown(tiny_models):
    """A full garbage collection in the engine's process walks only what came after startup (bench.py showed
    one of ~170k objects taking 70-170 ms mid-run); shutdown leaves the collector as it found it."""
    def tracked(obj) -> bool:
        return any(o is obj for o in gc.get_objects())

    before = [object()]  # a container the collector tracks, alive across the engine's life
    assert tracked(before)
    with LLM(tiny_models["qwen3"], dtype="float32") as llm:
        assert not tracked(before) and not tracked(llm.llm_engine.scheduler)
        llm.generate(make_prompts(2, seed=3), GREEDY, use_tqdm=False)
        after = [object()]
        assert tracked(after)
    assert tracked(before) and gc.get_freeze_count() == 0


def test_shutdown_keeps_what_the_caller_froze_before_startup(tiny_models):
    # gc can only unfreeze everything, so an engine started in a process that had frozen objects of its own
    # leaves the freeze in place at shutdown instead of unfreezing the caller's objects
    callers = [object()]
    gc.freeze()
    try:
        with LLM(tiny_models["qwen3"], dtype="float32") as llm:
            llm.generate(make_prompts(1, seed=4), GREEDY, use_tqdm=False)
        assert gc.get_freeze_count() > 0 and not any(o is callers for o in gc.get_objects())
    finally:
        gc.unfreeze()


def test_unset_block_size_is_resolved_by_the_workers(tiny_models):
    """No kvcache_block_size: the workers' attention backend picks it (the torch backend on CPU: vLLM's 16)
    and the engine's config and block manager take what they report."""
    with LLM(tiny_models["qwen3"], dtype="float32", tensor_parallel_size=2) as llm:
        assert llm.llm_engine.config.kvcache_block_size == 16
        assert llm.llm_engine.block_manager.block_size == 16
        assert llm.llm_engine.executor.block_size == 16


def test_prefix_caching_can_be_disabled(tiny_models):
    prompt = make_prompts(1, seed=5, lo=40, hi=40)
    with LLM(tiny_models["qwen3"], dtype="float32", enable_prefix_caching=False) as llm:
        llm.generate(prompt, GREEDY, use_tqdm=False)
        [out] = llm.generate(prompt, GREEDY, use_tqdm=False)
        assert out.num_cached_tokens == 0 and llm.llm_engine.block_manager.prefix_cache_hits == 0


def test_logprobs_match_transformers(tiny_models):
    """The sampled token's logprob and the top-3 alternatives equal log_softmax of transformers' logits."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_models["qwen2"]
    prompts = make_prompts(3, seed=21)
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.9, max_tokens=5, ignore_eos=True, logprobs=0, seed=4),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]
    with LLM(path, dtype="float32", tensor_parallel_size=2) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[2].logprobs is None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for out, k in zip(outs[:2], (3, 0)):
        ids = torch.tensor([out.prompt_token_ids + out.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        n = len(out.prompt_token_ids)
        assert len(out.logprobs) == len(out.token_ids) == 5
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            row = ref[n - 1 + i]
            assert abs(entry[token] - row[token].item()) < 1e-4
            top = row.topk(k).indices.tolist() if k else []
            assert set(entry) == set(top) | {token}
        assert abs(out.cumulative_logprob - sum(e[t] for e, t in zip(out.logprobs, out.token_ids))) < 1e-9


def test_decode_rows_run_longest_context_first(tiny_models):
    """A decode step's rows are reordered by context length, longest first (the attention's programs start in
    batch order, so the long ones should not start last); the tokens still go to their own requests: each is
    transformers' greedy next token for that request's prompt."""
    import torch

    from nanovllm.config import EngineConfig
    from parallel.protocol import NewRequest, SamplingFields, StepPlan
    from parallel.distributed import ParallelContext
    from workers.model_runner import ModelRunner

    path = tiny_models["qwen3"]
    prompts = make_prompts(n=4, seed=3, lo=3, hi=40)
    prompts[2] = list(prompts[1])  # two equal contexts: they keep the plan's order
    cfg = EngineConfig(model=path, dtype="float32", max_model_len=128, max_num_seqs=8).finalize()
    runner = ModelRunner(cfg.to_worker_config("none"), ParallelContext(0, 1), torch.device("cpu"))
    runner.allocate_kv_cache(32)
    news = [NewRequest(req_id=i, prompt_token_ids=p, output_token_ids=[], sampling=SamplingFields(temperature=0).__dict__,
                       block_ids=list(range(4 * i, 4 * i + 4)), num_computed_tokens=0, num_scheduled_tokens=len(p))
            for i, p in enumerate(prompts)]
    first = runner.finish(runner.launch(StepPlan(1, news, [], [], [], [], [], [], []), lambda: None))
    n = len(prompts)
    second = runner.finish(runner.launch(StepPlan(2, [], list(range(n)), [1] * n, [[]] * n, [], [], [], []),
                                         lambda: None))
    by_length = sorted(range(n), key=lambda i: -len(prompts[i]))  # stable: request 1 before its twin 2
    assert second.req_ids == by_length
    assert second.req_ids != list(range(n))  # the case exercises a reorder
    tokens = dict(zip(first.req_ids, first.token_ids))
    expected = hf_greedy(path, prompts, 2)
    assert {r: [tokens[r], t] for r, t in zip(second.req_ids, second.token_ids)} == dict(enumerate(expected))


def test_one_split_twin_choice():
    """When a decode step takes its graph's one-KV-split twin (hand-worked cases; 66 rows are one wave of the
    one-split grid at 8 KV heads on 132 SMs)."""
    import numpy as np

    from workers.model_runner import use_single_split

    wave = 66
    assert use_single_split(np.full(64, 640), 64, wave)  # even contexts, a full graph
    assert not use_single_split(np.full(57, 640), 64, wave)  # below 90 % of the rows
    spread = np.linspace(750, 1720, 96).astype(int)  # bench.py's late contexts: longest / mean 1.4
    assert not use_single_split(spread[:64], 64, wave)  # one wave: it would wait on its longest context
    assert use_single_split(spread, 96, wave)  # several waves, rows longest first: balanced
    skewed = np.array([8000] + [700] * 95)  # one context 10x the others (7.7x the mean): kept split
    assert not use_single_split(skewed, 96, wave)
