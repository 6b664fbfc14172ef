"""On a CUDA machine: the Triton backend and CUDA graphs against transformers and against eager mode."""

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
    with LLM(path, tensor_parallel_size=tp, dtype="float32", enforce_eager=eager, attention_backend="triton",
             max_model_len=256) as llm:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        # a second pass hits the prefix cache: the Triton prefill over cached blocks
        again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    ref = hf_greedy(path, PROMPTS, MAX_TOKENS)
    assert [o.token_ids for o in outs] == ref
    assert [o.token_ids for o in again] == ref


def test_bf16_graph_logits_match_eager(tiny_models):
    """Replay a captured decode graph and run the same step eagerly: bf16 logits agree."""
    from parallel.distributed import ParallelContext
    from parallel.protocol import NewRequest, SamplingFields, StepPlan
    from workers.model_runner import ModelRunner
    from nanovllm.config import EngineConfig

    cfg = EngineConfig(model=tiny_models["qwen3"], dtype="bfloat16", max_model_len=256, max_num_seqs=8).finalize()
    runner = ModelRunner(cfg.to_worker_config("none"), ParallelContext(0, 1), torch.device("cuda", 0))
    runner.allocate_kv_cache(64)
    assert runner.graphs
    news = [NewRequest(req_id=i, prompt_token_ids=p, output_token_ids=[], sampling=SamplingFields(temperature=0).__dict__,
                       block_ids=list(range(4 * i, 4 * i + 4)), num_computed_tokens=0,
                       num_scheduled_tokens=len(p)) for i, p in enumerate(PROMPTS[:5])]
    plan = StepPlan(1, news, [], [], [], [], [], [], [])
    h = runner.launch(plan, lambda: None)
    runner.finish(h)
    # the decode step, by hand: inputs prepared once, run through the graph and eagerly
    plan2 = StepPlan(2, [], list(range(5)), [1] * 5, [[]] * 5, [], [], [], [])
    scheduled = runner.apply_plan(plan2)
    inp = runner._prepare(scheduled)
    ids = torch.zeros(5, dtype=torch.int64, device="cuda")
    ids[torch.tensor(inp["from_prev"][0], device="cuda")] = runner.prev_tokens[torch.tensor(inp["from_prev"][1],
                                                                                            device="cuda")]
    with torch.inference_mode():
        graphed = runner._run_graph(8, 5, inp).clone()
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
