"""On a CUDA machine: the Triton backend and CUDA graphs against transformers and against eager mode; the
flash_attn backend against the torch reference and against the Triton backend."""

import functools
import random

import numpy as np
import pytest
import torch

from conftest import hf_greedy
from nanovllm import LLM, SamplingParams
from test_engine import MAX_TOKENS, PROMPTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_greedy_float32_matches_transformers(tiny_models, tp, eager):
    if tp > torch.cuda.device_count():
        pytest.skip(f"needs {tp} GPUs")
    path = tiny_models["qwen3"]
    # blocks of 16 (not the Hopper default 64), so that the short prompts fill whole blocks to share
    with LLM(path, tensor_parallel_size=tp, dtype="float32", enforce_eager=eager, attention_backend="triton",
             max_model_len=256, kvcache_block_size=16) as llm:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        # a second pass hits the prefix cache: the Triton prefill over cached blocks
        again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    ref = hf_greedy(path, PROMPTS, MAX_TOKENS)
    assert [o.token_ids for o in outs] == ref
    assert [o.token_ids for o in again] == ref


@pytest.mark.parametrize("tp", [1, 2])
# q/k/v biases; uneven head split at TP 2; split-K partial sums (qwen3-wide); heads over two programs (llama-128)
@pytest.mark.parametrize("arch", ["qwen3", "qwen3-wide", "qwen2", "llama-128", "llama-uneven"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_small_batches_match_transformers(tiny_models, arch, eager, tp):
    """Decode batches of 1 row (projections in workers.kernels.small_linear with the norms fused in, the
    1-row graph) and of 3 rows (workers.kernels.decode_gemm, padded to the 8-row graph; qwen3-wide's o and
    down projections split K, and the next RMSNorm adds the partial sums; llama-128's q/k/v projection runs
    each head as two programs)."""
    if tp > torch.cuda.device_count():
        pytest.skip(f"needs {tp} GPUs")
    path = tiny_models[arch]
    with LLM(path, tensor_parallel_size=tp, dtype="float32", enforce_eager=eager, attention_backend="triton",
             max_model_len=256) as llm:
        one = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        three = llm.generate(PROMPTS[1:4], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in one] == hf_greedy(path, PROMPTS[:1], MAX_TOKENS)
    assert [o.token_ids for o in three] == hf_greedy(path, PROMPTS[1:4], MAX_TOKENS)


def test_chunked_prefill_next_to_decodes_matches_transformers(tiny_models):
    """A 64-token budget: steps carry decode rows next to prefill chunks of 17+ tokens, which the Triton
    backend attends to in two launches (triton_attention.prefill_seq_groups). No block size given: the
    Triton backend's choice, 64 from Hopper on, reported by the worker to the engine's block manager."""
    path = tiny_models["qwen3"]
    with LLM(path, dtype="float32", attention_backend="triton", max_model_len=256,
             max_num_batched_tokens=64) as llm:
        expected = 64 if torch.cuda.get_device_capability(0)[0] >= 9 else 16
        assert llm.llm_engine.config.kvcache_block_size == expected
        assert llm.llm_engine.block_manager.block_size == expected
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == hf_greedy(path, PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-wide"])
def test_bf16_graph_logits_match_eager(tiny_models, arch):
    """Replay a captured decode graph and run the same step eagerly: bf16 logits agree."""
    _check_graph_step_against_eager(tiny_models[arch], PROMPTS[:5], max_num_seqs=8, graph_size=8)


@pytest.mark.parametrize("arch,block_size", [("qwen3", 16), ("qwen3-wide", 64)])
def test_single_split_decode_graph_matches_eager(tiny_models, monkeypatch, arch, block_size):
    """The one-KV-split variant of a decode graph (taken by a step that fills the graph with even contexts),
    against the same step run eagerly with the rule's splits. With blocks of 64 and head_dim 64 the variant's
    attention is the TMA kernel on Hopper (one wave of programs), checked here by counting its launches."""
    from workers.kernels import triton_attention
    from workers.kernels.triton_attention import device_sms, has_single_split_variant, tma_decode_applies
    from workers.model_runner import graph_batch_sizes
    kv_heads, sms = 2, device_sms(torch.device("cuda", 0))  # the tiny qwen3s' KV heads
    max_blocks = 256 // block_size  # max_model_len 256
    size = next(s for s in graph_batch_sizes(512)
                if has_single_split_variant(s, kv_heads, max_blocks, block_size, sms))
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 500) for _ in range(24)] for _ in range(size)]  # equal contexts: it applies
    replayed, tma_launches = [], []
    launch = triton_attention._tma_decode_launch
    monkeypatch.setattr(triton_attention, "_tma_decode_launch",
                        lambda *args, **kwargs: tma_launches.append(1) or launch(*args, **kwargs))

    def spy_on_variant(runner):
        for graph in runner.single_split_graphs[size][0]:
            graph.replay = functools.partial(lambda replay: replayed.append(1) or replay(), graph.replay)

    _check_graph_step_against_eager(tiny_models[arch], prompts, max_num_seqs=size, graph_size=size,
                                    on_runner=spy_on_variant, block_size=block_size)
    assert replayed == [1]  # the decode step above ran the one-split variant
    head_dim = 16 if arch == "qwen3" else 64
    takes_tma = tma_decode_applies(1, block_size, head_dim, 2, size * kv_heads, sms,
                                   torch.cuda.get_device_capability(0)[0])
    assert takes_tma == (block_size == 64 and torch.cuda.get_device_capability(0)[0] >= 9)  # on a 132-SM Hopper
    assert bool(tma_launches) == takes_tma


def _check_graph_step_against_eager(path, prompts, max_num_seqs: int, graph_size: int, on_runner=None,
                                    block_size: int = 16):
    """Prefill ``prompts`` (one step), then run one decode step of all of them through the ``graph_size``
    decode graph and eagerly: the bf16 logits agree. ``on_runner`` sees the runner once its graphs exist."""
    from parallel.distributed import ParallelContext
    from parallel.protocol import NewRequest, SamplingFields, StepPlan
    from workers.model_runner import ModelRunner
    from nanovllm.config import EngineConfig

    n = len(prompts)
    cfg = EngineConfig(model=path, dtype="bfloat16", max_model_len=256, max_num_seqs=max_num_seqs,
                       kvcache_block_size=block_size).finalize()
    runner = ModelRunner(cfg.to_worker_config("none"), ParallelContext(0, 1), torch.device("cuda", 0))
    runner.allocate_kv_cache(max(64, 4 * n + 4))
    assert graph_size in runner.graphs
    if on_runner is not None:
        on_runner(runner)
    news = [NewRequest(req_id=i, prompt_token_ids=p, output_token_ids=[], sampling=SamplingFields(temperature=0).__dict__,
                       block_ids=list(range(4 * i, 4 * i + 4)), num_computed_tokens=0,
                       num_scheduled_tokens=len(p)) for i, p in enumerate(prompts)]
    plan = StepPlan(1, news, [], [], [], [], [], [], [])
    h = runner.launch(plan, lambda: None)
    runner.finish(h)
    # the decode step, by hand: inputs prepared once, run through the graph and eagerly
    plan2 = StepPlan(2, [], list(range(n)), [1] * n, [[]] * n, [], [], [], [])
    scheduled = runner.apply_plan(plan2)
    inp = runner._prepare(scheduled)
    ids = torch.zeros(n, dtype=torch.int64, device="cuda")
    ids[torch.tensor(inp["from_prev"][0], device="cuda")] = runner.prev_tokens[torch.tensor(inp["from_prev"][1],
                                                                                            device="cuda")]
    with torch.inference_mode():
        graphed = runner._run_graph(graph_size, n, inp).clone()
        from workers.layers import AttentionMetadata
        meta = AttentionMetadata(
            slot_mapping=runner._to_device(inp["slots"], torch.int64),
            context_lens=runner._to_device(inp["ends"], torch.int32),
            cu_seqlens_q=runner._to_device(inp["cu"], torch.int32),
            block_tables=runner._to_device(runner.block_table[inp["rows"], :inp["width"]], torch.int32),
            max_seqlen_q=1, is_decode=True)
        eager = runner.model(ids, runner._to_device(inp["positions"], torch.int64), meta)
        lg, le = runner.model.compute_logits(graphed).float(), runner.model.compute_logits(eager).float()
    assert torch.allclose(lg, le, atol=2e-2, rtol=2e-2), (lg - le).abs().max()


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_one_sequence_prefill_graphs_match_transformers(tiny_models, arch):
    """Prompts sent one at a time prefill in the one-sequence prefill graphs (the prompt in the first rows,
    padding after): alone, over a cached prefix (a prompt that extends an earlier one), and chunk by chunk
    (max_num_batched_tokens=64: 64-token chunks over the chunks before). Greedy float32 equals transformers."""
    path = tiny_models[arch]
    rng = random.Random(3)
    long_prompt = [rng.randrange(1, 512) for _ in range(150)]
    prompts = [PROMPTS[0], PROMPTS[1], long_prompt, long_prompt[:100] + [7, 8, 9]]
    ref = hf_greedy(path, prompts, MAX_TOKENS)
    for budget in (512, 64):
        with LLM(path, dtype="float32", attention_backend="triton", max_model_len=256,
                 max_num_batched_tokens=budget) as llm:
            outs = [llm.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in prompts]
        assert outs == ref, budget


def test_bf16_prefill_graph_logits_match_eager(tiny_models):
    """A one-sequence prefill step goes through a prefill graph (``launch`` picks it), and the graph's bf16
    logits agree with an eager forward of the same step."""
    from parallel.distributed import ParallelContext
    from parallel.protocol import NewRequest, SamplingFields, StepPlan
    from workers.layers import AttentionMetadata
    from workers.model_runner import ModelRunner
    from nanovllm.config import EngineConfig

    cfg = EngineConfig(model=tiny_models["qwen3"], dtype="bfloat16", max_model_len=256, max_num_seqs=8).finalize()
    runner = ModelRunner(cfg.to_worker_config("none"), ParallelContext(0, 1), torch.device("cuda", 0))
    runner.allocate_kv_cache(64)
    assert sorted(runner.prefill_graphs) == [64, 128, 192, 256]
    calls = []
    run_graph = runner._run_prefill_graph
    runner._run_prefill_graph = lambda size, n, inp: calls.append(size) or run_graph(size, n, inp)
    prompt = [random.Random(5).randrange(1, 512) for _ in range(150)]
    new = NewRequest(req_id=0, prompt_token_ids=prompt, output_token_ids=[],
                     sampling=SamplingFields(temperature=0).__dict__,
                     block_ids=list(range(-(-len(prompt) // runner.block_size))),  # the backend's block size
                     num_computed_tokens=0, num_scheduled_tokens=len(prompt))
    scheduled = runner.apply_plan(StepPlan(1, [new], [], [], [], [], [], [], []))
    inp = runner._prepare(scheduled)
    with torch.inference_mode():
        graphed = run_graph(192, 150, inp).clone()
        meta = AttentionMetadata(
            slot_mapping=runner._to_device(inp["slots"], torch.int64),
            context_lens=runner._to_device(inp["ends"], torch.int32),
            cu_seqlens_q=runner._to_device(inp["cu"], torch.int32),
            block_tables=runner._to_device(runner.block_table[inp["rows"], :inp["width"]], torch.int32),
            max_seqlen_q=150, is_decode=False, prefix_free=True)
        eager = runner.model(runner._to_device(inp["input_ids"], torch.int64),
                             runner._to_device(inp["positions"], torch.int64), meta)
        lg, le = runner.model.compute_logits(graphed).float(), runner.model.compute_logits(eager).float()
    assert torch.allclose(lg, le, atol=2e-2, rtol=2e-2), (lg - le).abs().max()
    # and through launch: a second request with the same prompt (a prefix-cache hit for all but the last block)
    full = len(prompt) // runner.block_size  # 150 is a multiple of neither 16 nor 64
    again = NewRequest(req_id=1, prompt_token_ids=prompt, output_token_ids=[],
                       sampling=SamplingFields(temperature=0).__dict__, block_ids=list(range(full)) + [20],
                       num_computed_tokens=full * runner.block_size,
                       num_scheduled_tokens=len(prompt) - full * runner.block_size)
    result = runner.finish(runner.launch(StepPlan(2, [again], [], [], [], [], [], [], []), lambda: None))
    assert calls == [64]
    assert le[-1, result.token_ids[0]] >= le[-1].max() - 2e-2  # greedy: the eager argmax (or a near-tie)


# ---- attention_backend="flash_attn" (FlashAttention-3 or -2) ------------------------------------------------

def _flash_version():
    """The installed flash-attn's version (3 or 2) when it runs on this GPU, else None."""
    from workers.flash_attention import flash_attn_supports_gpu, flash_attn_version
    version = flash_attn_version() if torch.cuda.is_available() else None
    return version if version and flash_attn_supports_gpu(version) else None


needs_flash_attn = pytest.mark.skipif(
    _flash_version() is None,
    reason="needs flash-attn for this GPU: FlashAttention-3 (flash_attn_interface, e.g. tokenspeed-fa3; "
           "scripts/gpu_session.sh unpacks .fa3/) or FlashAttention-2 (pip install flash-attn)")


def _flash_block_size():
    return 16 if _flash_version() == 3 else 256  # FA2's paged kernels need multiples of 256


def _paged_case(q_lens, ctx_lens, num_q_heads, num_kv_heads, head_dim, block_size, seed=0):
    """Random bf16 inputs for one step: sequence b has q_lens[b] new tokens ending at ctx_lens[b]; the cache
    holds random K/V everywhere (earlier tokens and stale slots alike), its blocks handed out shuffled."""
    from workers.layers import AttentionMetadata

    torch.manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16
    num_blocks = [-(-c // block_size) for c in ctx_lens]
    free = torch.randperm(sum(num_blocks) + 4).tolist()
    tables = torch.zeros(len(ctx_lens), max(num_blocks) + 2, dtype=torch.int32)  # wider than needed, like the engine's
    slots = []
    for b, (n, c) in enumerate(zip(q_lens, ctx_lens)):
        ids, free = free[:num_blocks[b]], free[num_blocks[b]:]
        tables[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        slots += [ids[p // block_size] * block_size + p % block_size for p in range(c - n, c)]
    k_cache = torch.randn(len(free) + sum(num_blocks), block_size, num_kv_heads, head_dim, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    total = sum(q_lens)
    q = torch.randn(total, num_q_heads, head_dim, device=dev, dtype=dt)
    k = torch.randn(total, num_kv_heads, head_dim, device=dev, dtype=dt)
    v = torch.randn(total, num_kv_heads, head_dim, device=dev, dtype=dt)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
        cu_seqlens_q=torch.tensor([0] + list(np.cumsum(q_lens)), dtype=torch.int32, device=dev),
        block_tables=tables.to(dev), max_seqlen_q=max(q_lens), is_decode=max(q_lens) == 1,
        prefix_free=list(q_lens) == list(ctx_lens), q_lens_host=list(q_lens), context_lens_host=list(ctx_lens))
    return q, k, v, k_cache, v_cache, meta


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


FLASH_CASES = {  # (q_lens, context_lens): no context length is a multiple of 16
    "decode": ([1] * 6, [1, 15, 17, 100, 333, 1001]),
    "prefill": ([7, 33, 129, 300], [7, 33, 129, 300]),
    "prefill_cached_prefix": ([5, 40, 1, 77], [37, 141, 65, 77 + 301]),  # a 1-token row too: a mixed step
}


@needs_flash_attn
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_attn_kernel_matches_torch_reference(case, group, head_dim):
    from workers.flash_attention import FlashAttnBackend
    from workers.layers import torch_paged_attention

    q_lens, ctx_lens = FLASH_CASES[case]
    block_size = _flash_block_size()
    q, k, v, k_cache, v_cache, meta = _paged_case(q_lens, ctx_lens, 2 * group, 2, head_dim, block_size)
    backend = FlashAttnBackend("bfloat16", block_size)
    backend.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
    out = backend.attention(q, k, v, k_cache, v_cache, meta, head_dim ** -0.5)
    ref = torch_paged_attention(q, k_cache, v_cache, meta, head_dim ** -0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_err(out, ref) < 1e-2


@needs_flash_attn
def test_flash_attn_decode_replays_in_a_cuda_graph():
    """Capture one decode call, then change the context lengths and block tables in place and replay."""
    from workers.flash_attention import FlashAttnBackend
    from workers.layers import torch_paged_attention

    block_size = _flash_block_size()
    backend = FlashAttnBackend("bfloat16", block_size)
    q, k, v, k_cache, v_cache, meta = _paged_case([1] * 8, [3, 40, 999, 16, 17, 250, 1, 600], 16, 8, 128, block_size)
    scale = 128 ** -0.5
    with torch.inference_mode():
        backend.attention(q, k, v, k_cache, v_cache, meta, scale)  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = backend.attention(q, k, v, k_cache, v_cache, meta, scale)
        new_lens = [700, 5, 33, 1000, 2, 64, 129, 1]  # within the table's width (65 blocks of 16, 6 of 256)
        new_tables = torch.randint(0, k_cache.shape[0], tuple(meta.block_tables.shape), dtype=torch.int32)
        meta.context_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        meta.block_tables.copy_(new_tables)
        graph.replay()
        torch.cuda.synchronize()
    meta.context_lens_host = new_lens  # what the reference reads
    ref = torch_paged_attention(q, k_cache, v_cache, meta, scale)
    assert _rel_err(out, ref) < 1e-2


def _assert_greedy_agrees(a, b, tol=0.1):
    """Two bf16 greedy runs with different attention kernels: the same tokens with close logprobs, up to the
    first position where they pick different tokens, which must be a near-tie in both runs (random-weight
    models have them; bf16 rounding differs between kernels). Later tokens have different contexts."""
    for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
        la, lb = a.logprobs[i], b.logprobs[i]
        if x != y:
            assert y in la and x in lb, f"position {i}: {x} vs {y}, not among each other's top tokens"
            assert abs(la[x] - la[y]) < tol and abs(lb[x] - lb[y]) < tol, f"position {i}: {la} vs {lb}"
            return False
        assert abs(la[x] - lb[x]) < tol, f"position {i}: token {x} logprob {la[x]} vs {lb[x]}"
    return True


@needs_flash_attn
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_flash_attn_engine_matches_triton(tiny_models, eager):
    """bf16 greedy runs with attention_backend="flash_attn" and "triton" agree: chunked prefill and mixed steps
    (max_num_batched_tokens=64), decode (graphed or not), and a second pass over cached prefixes."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    runs = {}
    for backend in ("flash_attn", "triton"):
        with LLM(tiny_models["qwen3"], dtype="bfloat16", attention_backend=backend, enforce_eager=eager,
                 kvcache_block_size=_flash_block_size(), max_model_len=256, max_num_batched_tokens=64) as llm:
            runs[backend] = llm.generate(PROMPTS, params, use_tqdm=False) + llm.generate(PROMPTS, params,
                                                                                         use_tqdm=False)
    agreed = [_assert_greedy_agrees(a, b) for a, b in zip(runs["flash_attn"], runs["triton"])]
    assert sum(agreed) >= 0.75 * len(agreed), f"only {sum(agreed)} of {len(agreed)} outputs agree in full"
