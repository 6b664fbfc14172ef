"""Plan -> input tensors -> model -> sampled tokens, on one worker.

The runner keeps a mirror of every live request (its tokens, how many have K/V in the cache, its block
table, its sampling parameters), applies each ``StepPlan`` to it in order, and never decides anything:
which tokens to compute and where their K/V goes is all in the plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from parallel.distributed import ParallelContext
from parallel.protocol import NewRequest, ProtocolError, SamplingFields, StepPlan, StepResult, WorkerConfig
from workers.layers import AttentionMetadata, TorchAttentionBackend
from workers.loader import init_dummy_weights, load_weights
from workers.models import CausalLM, ModelSpec
from workers.sampler import SamplingBatch, sample

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RequestState:
    token_ids: List[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    block_ids: List[int]
    sampling: SamplingFields

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def select_attention_backend(name: str, device: str):
    if name in ("auto", "torch") or device == "cpu":
        if name not in ("auto", "torch"):
            raise ValueError(f"attention_backend={name!r} needs a CUDA device; on CPU use 'torch'")
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention_backend {name!r} (supported here: 'auto', 'torch')")


class ModelRunner:
    def __init__(self, config: WorkerConfig, ctx: ParallelContext, device: torch.device):
        self.config, self.ctx, self.device = config, ctx, device
        self.dtype = DTYPES[config.dtype]
        with open(os.path.join(config.model, "config.json")) as f:
            self.spec = ModelSpec.from_hf_config(json.load(f))
        self.block_size = config.block_size
        self.backend = select_attention_backend(config.attention_backend, config.device)
        torch.manual_seed(config.seed)
        with torch.device(device):
            self.model = CausalLM(self.spec, ctx, self.dtype, self.backend,
                                  max_position=max(config.max_model_len, 1))
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_weights(self.model, config.model)
        self.model.eval()
        self.requests: Dict[int, RequestState] = {}
        self.num_kv_blocks = 0

    # ---- KV cache ------------------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        attn = self.model.attention_layers()[0]
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.spec.num_layers * self.block_size * attn.num_kv_heads * attn.head_dim * elem

    def max_num_kv_blocks(self) -> int:
        """How many KV blocks this rank can hold (the engine takes the minimum over ranks)."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.config.gpu_memory_utilization - used
            blocks = int(budget // self.kv_bytes_per_block())
        else:
            blocks = int(self.config.cpu_kvcache_space_bytes // self.kv_bytes_per_block())
        # never more than the scheduler could ever use
        per_seq = -(-self.config.max_model_len // self.block_size)
        blocks = min(blocks, self.config.max_num_seqs * per_seq + 1)
        if self.config.num_gpu_blocks_override:
            blocks = self.config.num_gpu_blocks_override
        if blocks <= 0:
            raise RuntimeError("no memory left for the KV cache: raise gpu_memory_utilization or use a smaller "
                               "model / max_model_len")
        return blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_kv_blocks = num_blocks
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    # ---- applying a plan -----------------------------------------------------------------------------

    def apply_plan(self, plan: StepPlan) -> List[tuple]:
        """Update the request mirror; returns the scheduled (req_id, num_tokens) in plan order."""
        for req_id in list(plan.finished_req_ids) + list(plan.preempted_req_ids):
            self.requests.pop(req_id, None)
        for req_id, token in zip(plan.sampled_req_ids, plan.sampled_token_ids):
            state = self.requests.get(req_id)
            if state is not None:  # a request that finished this step is already gone
                state.token_ids.append(token)
        scheduled = []
        for req in plan.new_requests:
            if req.req_id in self.requests:
                raise ProtocolError(f"StepPlan {plan.step_id}: request {req.req_id} is already live")
            self.requests[req.req_id] = RequestState(
                token_ids=list(req.prompt_token_ids) + list(req.output_token_ids),
                num_prompt_tokens=len(req.prompt_token_ids),
                num_computed_tokens=req.num_computed_tokens,
                block_ids=list(req.block_ids),
                sampling=SamplingFields(**req.sampling),
            )
            scheduled.append((req.req_id, req.num_scheduled_tokens))
        for req_id, n, new_blocks in zip(plan.running_req_ids, plan.running_num_tokens, plan.running_new_block_ids):
            state = self.requests.get(req_id)
            if state is None:
                raise ProtocolError(f"StepPlan {plan.step_id}: request {req_id} is not live on this worker")
            state.block_ids.extend(new_blocks)
            scheduled.append((req_id, n))
        for req_id, n in scheduled:
            state = self.requests[req_id]
            end = state.num_computed_tokens + n
            if end > len(state.token_ids) or end > len(state.block_ids) * self.block_size:
                raise ProtocolError(f"StepPlan {plan.step_id}: request {req_id} scheduled past its tokens or blocks")
        return scheduled

    def prepare_inputs(self, scheduled: List[tuple]):
        input_ids, positions, slots, q_lens, ctx_lens, tables, sample_rows, sample_ids = [], [], [], [], [], [], [], []
        bs = self.block_size
        for req_id, n in scheduled:
            state = self.requests[req_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = state.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            q_lens.append(n)
            ctx_lens.append(end)
            tables.append(blocks)
            if end == len(state.token_ids):  # every known token is in the cache: sample the next one
                sample_rows.append(len(input_ids) - 1)
                sample_ids.append(req_id)
        max_blocks = max(len(t) for t in tables)
        table = [t + [0] * (max_blocks - len(t)) for t in tables]
        dev = self.device
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(table, dtype=torch.int32, device=dev),
            max_seqlen_q=max(q_lens),
            is_decode=all(n == 1 for n in q_lens),
            q_lens_host=q_lens,
            context_lens_host=ctx_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, meta, sample_rows, sample_ids

    def sampling_batch(self, req_ids: List[int]) -> SamplingBatch:
        states = [self.requests[r] for r in req_ids]
        params = [s.sampling for s in states]
        dev = self.device
        temps = [p.temperature for p in params]
        batch = SamplingBatch(
            temperatures=torch.tensor(temps, dtype=torch.float32, device=dev),
            top_ks=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev),
            top_ps=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            min_ps=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev),
            seeds=torch.tensor([p.seed for p in params], dtype=torch.int64, device=dev),
            positions=torch.tensor([s.num_output_tokens for s in states], dtype=torch.int64, device=dev),
            all_greedy=all(t == 0 for t in temps),
            use_top_k=any(p.top_k > 0 and t > 0 for p, t in zip(params, temps)),
            use_top_p=any(p.top_p < 1.0 and t > 0 for p, t in zip(params, temps)),
            use_min_p=any(p.min_p > 0.0 and t > 0 for p, t in zip(params, temps)),
        )
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            V = self.spec.vocab_size
            prompts = [s.token_ids[:s.num_prompt_tokens] for s in states]
            outputs = [s.token_ids[s.num_prompt_tokens:] for s in states]
            batch.prompt_ids = _padded(prompts, V, dev)
            batch.output_ids = _padded(outputs, V, dev)
            batch.repetition_penalties = torch.tensor([p.repetition_penalty for p in params], device=dev)
            batch.presence_penalties = torch.tensor([p.presence_penalty for p in params], device=dev)
            batch.frequency_penalties = torch.tensor([p.frequency_penalty for p in params], device=dev)
        batch.banned = [(row, p.stop_token_ids) for row, (p, s) in enumerate(zip(params, states))
                        if s.num_output_tokens < p.min_tokens and p.stop_token_ids]
        return batch

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> Optional[StepResult]:
        scheduled = self.apply_plan(plan)
        if not scheduled:
            return StepResult(step_id=plan.step_id, req_ids=[], token_ids=[]) if self.ctx.rank == 0 else None
        ids, pos, meta, sample_rows, sample_ids = self.prepare_inputs(scheduled)
        hidden = self.model(ids, pos, meta)
        token_ids: List[int] = []
        if sample_rows:
            logits = self.model.compute_logits(hidden[sample_rows])
            if self.ctx.rank == 0:
                token_ids = sample(logits, self.sampling_batch(sample_ids)).tolist()
        for req_id, n in scheduled:
            self.requests[req_id].num_computed_tokens += n
        if self.ctx.rank != 0:
            return None
        return StepResult(step_id=plan.step_id, req_ids=sample_ids, token_ids=token_ids)


def _padded(rows: List[List[int]], pad: int, device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)
