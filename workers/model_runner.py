"""Plan -> input tensors -> model -> sampled tokens, on one worker.

The runner keeps a mirror of every live request (its tokens, how many have K/V in the cache, its block
table, its sampling parameters), applies each ``StepPlan`` to it in order, and never decides anything:
which tokens to compute and where their K/V goes is all in the plan.

Steps are asynchronous: ``launch`` queues step N on the device and returns; ``finish`` waits for its
sampled tokens. The engine sends plan N+1 before it has seen the tokens of step N, so a decoding
request's input token in step N+1 is "the token sampled for it in step N": the runner takes it from the
device tensor step N left behind, and the plan delivers its value later (``StepPlan.sampled_*``) for the
mirror. Under tensor parallelism rank 0 samples and broadcasts the tokens to the other ranks.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from parallel.distributed import ParallelContext
from parallel.protocol import ProtocolError, SamplingFields, StepPlan, StepResult, WorkerConfig
from workers.layers import AttentionMetadata, TorchAttentionBackend
from workers.loader import init_dummy_weights, load_weights
from workers.models import CausalLM, ModelSpec
from workers.sampler import SamplingBatch, sample

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRAPH_RESERVE_BYTES = 512 << 20  # kept free for CUDA graphs and allocator slack when sizing the KV cache
# A decode step takes its graph's one-KV-split twin (triton_attention.has_single_split_variant) only when
# its sequences fill at least SINGLE_SPLIT_MIN_ROWS of the graph's rows (full graphs are what was measured),
# and then (use_single_split):
# - when its longest context is at most SINGLE_SPLIT_MAX_OVER_MEAN times the mean: on an H200 equal contexts
#   gained 10-12 % a layer at batch 64 (scripts/probe.py split1), while bench.py's late steps, whose contexts
#   spread over ~[1000, 1900] (longest / mean ~1.3), ran their 33-64-sequence steps 2.3 % slower with it
#   (2026-12-01); the cut between the two is not measured finer;
# - or when its one-split programs run in several waves (80 and 96 rows at 8 KV heads on 132 SMs) and the
#   longest context is at most SINGLE_SPLIT_WAVES_MAX_OVER_MEAN times the mean: with the rows longest first
#   (launch), bench.py's spread contexts (longest / mean ~1.4 there) gained 2-6 % a layer (docs/kernels.md,
#   "Dispatch order"). The cap is measured (scripts/probe.py twinskew, H200): with one context k x the mean,
#   one split stops gaining at 80 rows above k = 2 (1.013 of the rule's time at 2.5) and at 96 rows above 2.5.
SINGLE_SPLIT_MIN_ROWS = 0.9
SINGLE_SPLIT_MAX_OVER_MEAN = 1.15
SINGLE_SPLIT_WAVES_MAX_OVER_MEAN = 2.0
PREFILL_GRAPH_TOKENS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)  # see prefill_graph_sizes


def use_single_split(ends: np.ndarray, graph_rows: int, one_wave_rows: int) -> bool:
    """Whether a decode step with contexts ``ends`` takes the one-split twin of its ``graph_rows``-row graph
    (see SINGLE_SPLIT_MIN_ROWS above); ``one_wave_rows``: triton_attention.single_split_one_wave_rows."""
    batch = len(ends)
    if batch < SINGLE_SPLIT_MIN_ROWS * graph_rows:
        return False
    longest_times_batch, total = int(ends.max()) * batch, int(ends.sum())
    if longest_times_batch <= SINGLE_SPLIT_MAX_OVER_MEAN * total:
        return True
    return batch > one_wave_rows and longest_times_batch <= SINGLE_SPLIT_WAVES_MAX_OVER_MEAN * total


@dataclass
class RequestState:
    token_ids: List[int]  # known tokens (prompt + outputs delivered by plans)
    num_prompt_tokens: int
    num_computed_tokens: int
    row: int  # this request's row in the block table
    num_blocks: int
    sampling: SamplingFields
    num_pending: int = 0  # tokens sampled by this worker whose value no plan has delivered yet
    unconfirmed: List[int] = field(default_factory=list)  # rank 0: those tokens' values (for penalties)


@dataclass
class StepHandle:
    step_id: int
    req_ids: List[int]  # requests that sample this step
    host_tokens: Optional[torch.Tensor]  # pinned host copy (rank 0)
    done: Optional[torch.cuda.Event]
    logprobs: Optional[tuple] = None  # (req ids, sampled logprobs, top ids, top logprobs), device tensors


def select_attention_backend(name: str, device: str, dtype: str = "float32", block_size: int = 0):
    """The attention backend for ``name``. "auto": the torch reference on CPU; on CUDA flash-attn when it is
    installed and fits the dtype (fp16/bf16), the block size (FA2: multiples of 256) and the GPU, else our
    Triton kernels (as vLLM does). block_size 0: not configured; the backend's default_block_size() then
    gives it."""
    if device == "cpu":
        if name not in ("auto", "torch"):
            raise ValueError(f"attention_backend={name!r} needs a CUDA device; on CPU use 'torch'")
        return TorchAttentionBackend()
    if name == "torch":
        return TorchAttentionBackend()
    from workers import flash_attention
    if name == "flash_attn" or (name == "auto" and flash_attention.auto_picks_flash_attn(dtype, block_size)):
        return flash_attention.FlashAttnBackend(dtype, block_size)  # a clear ValueError when it cannot run
    if name in ("auto", "triton"):
        from workers.layers import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"attention_backend={name!r} is not available on this worker (use 'triton' or 'torch')")


def graph_batch_sizes(max_num_seqs: int) -> List[int]:
    """The decode batch sizes captured as CUDA graphs; a batch runs in the smallest one that fits it.

    A single row runs its projections in workers.kernels.small_linear (the fastest there); 2-7 rows run
    padded to 8 (workers.kernels.decode_gemm), which costs about what 2 rows cost (H200, scripts/probe.py)."""
    top = min(max_num_seqs, 512)
    sizes = [s for s in (1, 8) if s < top] + list(range(16, top + 1, 16))
    if not sizes or sizes[-1] != top:
        sizes.append(top)
    return sizes


def prefill_graph_sizes(max_num_batched_tokens: int, max_model_len: int) -> List[int]:
    """Token counts captured as one-sequence prefill graphs; a prefill (or chunk) of one sequence runs in the
    smallest one that fits it. Eager, such a step costs the host ~10 launches a layer, which for a prompt of
    a few hundred tokens is longer than the device's work (time to first token at batch 1)."""
    top = min(max_num_batched_tokens, max_model_len)
    return [s for s in PREFILL_GRAPH_TOKENS if s <= top]


class ModelRunner:
    def __init__(self, config: WorkerConfig, ctx: ParallelContext, device: torch.device):
        self.config, self.ctx, self.device = config, ctx, device
        self.dtype = DTYPES[config.dtype]
        with open(os.path.join(config.model, "config.json")) as f:
            self.spec = ModelSpec.from_hf_config(json.load(f))
        self.backend = select_attention_backend(config.attention_backend, config.device, config.dtype,
                                                config.block_size)
        self.block_size = config.block_size or self.backend.default_block_size()
        self.use_graphs = device.type == "cuda" and not config.enforce_eager
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
        # one block-table row per live request (at most max_num_seqs live at once)
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        self.block_table = np.zeros((config.max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self.free_rows = list(range(config.max_num_seqs - 1, -1, -1))
        # per-row sampling parameters, so a step gathers them with one numpy index instead of Python loops
        seqs = config.max_num_seqs
        self.row_temperature = np.zeros(seqs, dtype=np.float32)
        self.row_top_k = np.zeros(seqs, dtype=np.int64)
        self.row_top_p = np.ones(seqs, dtype=np.float32)
        self.row_min_p = np.zeros(seqs, dtype=np.float32)
        self.row_seed = np.zeros(seqs, dtype=np.int64)
        self.row_min_tokens = np.zeros(seqs, dtype=np.int64)
        self.row_prompt_len = np.zeros(seqs, dtype=np.int64)
        self.row_penalized = np.zeros(seqs, dtype=bool)
        # the previous step's sampled tokens (device), for requests whose input is one of them
        self.prev_tokens: Optional[torch.Tensor] = None
        self.prev_index: Dict[int, int] = {}
        self.graphs: Dict[int, List[torch.cuda.CUDAGraph]] = {}
        self.prefill_graphs: Dict[int, tuple] = {}  # tokens -> (graph, its output)
        # decode size -> (graphs, outputs) of its one-KV-split twin, where it has one
        self.single_split_graphs: Dict[int, tuple] = {}
        self.single_split_one_wave_rows = 0  # set with those graphs (triton_attention.single_split_one_wave_rows)
        seqs, tokens = config.max_num_seqs, config.max_num_batched_tokens
        self.staging = Staging(device, {
            torch.int64: 4 * tokens + 8 * seqs + 16 * Staging.ALIGN,
            torch.int32: seqs * (self.max_blocks_per_seq + 3) + tokens + 16 * Staging.ALIGN,
            torch.float32: 8 * seqs + 16 * Staging.ALIGN,
        })
        self.token_buffers = [torch.empty(seqs, dtype=torch.int64, pin_memory=device.type == "cuda")
                              for _ in range(2)]

    # ---- KV cache sizing and allocation --------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        attn = self.model.attention_layers()[0]
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.spec.num_layers * self.block_size * attn.num_kv_heads * attn.head_dim * elem

    @torch.inference_mode()
    def max_num_kv_blocks(self) -> int:
        """How many KV blocks this rank can hold (the engine takes the minimum over ranks).

        On CUDA: run the largest step the scheduler can send (``max_num_batched_tokens`` of prefill, then
        logits and sampling for ``max_num_seqs`` rows) to measure peak activation memory; what
        ``gpu_memory_utilization`` leaves after that, the weights, non-torch memory (NCCL, context) and a
        reserve for CUDA graphs goes to the KV cache.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._profile_run()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
            budget = total * self.config.gpu_memory_utilization - peak - non_torch - GRAPH_RESERVE_BYTES
            blocks = int(budget // self.kv_bytes_per_block())
            torch.cuda.empty_cache()
        else:
            blocks = int(self.config.cpu_kvcache_space_bytes // self.kv_bytes_per_block())
        blocks = min(blocks, self.config.max_num_seqs * self.max_blocks_per_seq + 1)  # more is never used
        if self.config.num_gpu_blocks_override:
            blocks = self.config.num_gpu_blocks_override
        if blocks <= 0:
            raise RuntimeError("no memory left for the KV cache: raise gpu_memory_utilization, or lower "
                               "max_num_batched_tokens / max_model_len, or use more tensor parallelism")
        return blocks

    def _profile_run(self) -> None:
        """A forward at the scheduler's largest token budget, against a one-block scratch cache."""
        self._bind_cache(1)
        tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.config.max_model_len)
        seq_len = min(tokens, self.config.max_model_len)
        lens = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
        self._dummy_forward(lens, sample_rows=min(self.config.max_num_seqs, tokens))
        self._bind_cache(0)

    def _dummy_forward(self, q_lens: List[int], sample_rows: int) -> None:
        """A throw-away step (profiling, kernel warm-up): every K/V slot is -1, so nothing is written."""
        dev = self.device
        total = sum(q_lens)
        cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.full((total,), -1, dtype=torch.int64, device=dev),
            context_lens=torch.tensor(q_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=cu,
            block_tables=torch.zeros((len(q_lens), self.max_blocks_per_seq), dtype=torch.int32, device=dev),
            max_seqlen_q=max(q_lens), is_decode=max(q_lens) == 1, prefix_free=False,
            q_lens_host=q_lens, context_lens_host=q_lens)
        if not meta.is_decode:
            meta.seq_groups = self._prefill_seq_groups(q_lens)
        ids = torch.zeros(total, dtype=torch.int64, device=dev)
        pos = torch.cat([torch.arange(n, device=dev) for n in q_lens])
        hidden = self.model(ids, pos, meta)
        rows = torch.arange(sample_rows, device=dev) % total
        logits = self.model.compute_logits(hidden[rows])
        if logits is not None:
            n = logits.shape[0]
            batch = SamplingBatch(
                temperatures=torch.ones(n, device=dev), top_ks=torch.full((n,), -1, device=dev),
                top_ps=torch.ones(n, device=dev), min_ps=torch.zeros(n, device=dev),
                seeds=torch.zeros(n, dtype=torch.int64, device=dev),
                positions=torch.zeros(n, dtype=torch.int64, device=dev),
                all_greedy=False, use_top_k=False, use_top_p=False, use_min_p=False)
            sample(logits, batch)

    def _bind_cache(self, num_blocks: int) -> None:
        for attn in self.model.attention_layers():
            if num_blocks == 0:
                attn.k_cache = attn.v_cache = None
                continue
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_kv_blocks = num_blocks
        self._bind_cache(num_blocks)
        if self.device.type == "cuda":
            self._warm_up_kernels()
            if self.use_graphs:
                self._capture_graphs()

    # ---- CUDA graphs ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def _warm_up_kernels(self) -> None:
        """Compile every Triton kernel variant a run can hit now, so none compiles inside a timed region."""
        for q in (16, 32, 64, 128, 256):  # the prefill kernel's tile sizes, alone and next to a decode row
            self._dummy_forward([q], sample_rows=1)
            self._dummy_forward([q, 1], sample_rows=2)
        # The LM head runs outside the decode graphs with one row per sampling sequence: let cuBLAS pick
        # (and the driver load) its kernel for every row count now rather than on first use mid-run.
        hidden = torch.zeros(self.config.max_num_seqs, self.spec.hidden_size, dtype=self.dtype, device=self.device)
        for rows in range(1, self.config.max_num_seqs + 1):
            self.model.compute_logits(hidden[:rows])
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        sizes = graph_batch_sizes(self.config.max_num_seqs)
        top, dev = sizes[-1], self.device
        self.graph_inputs = {
            **self._token_buffers(top),
            "context_lens": torch.zeros(top, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros((top, self.max_blocks_per_seq), dtype=torch.int32, device=dev),
        }
        # Two graph instances per size, used on alternate steps: the driver can block the host when a graph
        # is launched again while its previous launch is still queued, which is exactly what launching
        # step N+1 before step N has finished does. Instances share one memory pool (they never overlap).
        self.graph_outputs: Dict[int, List[torch.Tensor]] = {}
        self.graph_metas: Dict[int, AttentionMetadata] = {}  # the graphs read these tensors: keep them alive
        pool = None
        g = self.graph_inputs
        for size in reversed(sizes):  # largest first, so smaller graphs reuse its memory pool
            meta = self.graph_metas[size] = self._graph_meta(size)
            run = functools.partial(self.model, g["input_ids"][:size], g["positions"][:size], meta)
            self.graphs[size], self.graph_outputs[size], pool = self._capture(run, pool, instances=2)
            if self._has_single_split_twin(size):
                run = functools.partial(self.model, g["input_ids"][:size], g["positions"][:size],
                                        replace(meta, decode_splits=1))
                graphs, outputs, pool = self._capture(run, pool, instances=2)
                self.single_split_graphs[size] = (graphs, outputs)
        if self.single_split_graphs:
            from workers.kernels.triton_attention import device_sms, single_split_one_wave_rows
            kv_heads = self.model.attention_layers()[0].num_kv_heads  # this rank's
            self.single_split_one_wave_rows = single_split_one_wave_rows(kv_heads, device_sms(dev))
        torch.cuda.synchronize(dev)
        self._capture_prefill_graphs(pool)

    def _has_single_split_twin(self, size: int) -> bool:
        """Whether the decode graph of ``size`` rows is also captured with one KV split (Triton backend only,
        triton_attention.has_single_split_variant)."""
        if self.backend.name != "triton":
            return False
        from workers.kernels.triton_attention import device_sms, has_single_split_variant
        kv_heads = self.model.attention_layers()[0].num_kv_heads  # this rank's
        return has_single_split_variant(size, kv_heads, self.max_blocks_per_seq, self.block_size,
                                        device_sms(self.device))

    def _token_buffers(self, rows: int) -> Dict[str, torch.Tensor]:
        """A graph's per-token input buffers (filled by ``_put_token_inputs``); slot -1 = padding."""
        dev = self.device
        return {"input_ids": torch.zeros(rows, dtype=torch.int64, device=dev),
                "positions": torch.zeros(rows, dtype=torch.int64, device=dev),
                "slot_mapping": torch.full((rows,), -1, dtype=torch.int64, device=dev)}

    def _capture(self, run: Callable[[], torch.Tensor], pool, instances: int):
        """Two eager calls of ``run`` (they compile its kernels for this shape), then ``instances`` CUDA
        graphs of it in ``pool``: (graphs, their outputs, the pool for the next capture)."""
        for _ in range(2):
            run()
        torch.cuda.synchronize(self.device)
        graphs, outputs = [], []
        for _ in range(instances):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs.append(run())
            pool = graph.pool()
            graphs.append(graph)
        return graphs, outputs, pool

    def _capture_prefill_graphs(self, pool) -> None:
        """One graph per ``prefill_graph_sizes`` entry for steps that prefill exactly one sequence: its
        tokens in the first rows, the rest padding (slot -1, attended by no sequence). Attention is the
        Triton paged prefill kernel, whose grid depends only on the graph's size, with or without a cached
        prefix. Triton backend only (flash-attn's varlen prefill reads host lengths)."""
        sizes = prefill_graph_sizes(self.config.max_num_batched_tokens, self.config.max_model_len)
        if not sizes or self.backend.name != "triton":
            return
        top, dev = sizes[-1], self.device
        p = self.prefill_inputs = {
            **self._token_buffers(top),
            "context_lens": torch.zeros(1, dtype=torch.int32, device=dev),
            "cu_seqlens_q": torch.zeros(2, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros((1, self.max_blocks_per_seq), dtype=torch.int32, device=dev),
        }
        for size in reversed(sizes):  # largest first, as for the decode graphs (same pool)
            meta = AttentionMetadata(slot_mapping=p["slot_mapping"][:size], context_lens=p["context_lens"],
                                     cu_seqlens_q=p["cu_seqlens_q"], block_tables=p["block_tables"],
                                     max_seqlen_q=size, is_decode=False)
            # the eager calls before capture see zero lengths: nothing is read or written
            run = functools.partial(self.model, p["input_ids"][:size], p["positions"][:size], meta)
            [graph], [out], pool = self._capture(run, pool, instances=1)
            self.prefill_graphs[size] = (graph, out)  # meta's tensors are views of prefill_inputs
        torch.cuda.synchronize(dev)

    def _graph_meta(self, size: int) -> AttentionMetadata:
        g = self.graph_inputs
        return AttentionMetadata(
            slot_mapping=g["slot_mapping"][:size], context_lens=g["context_lens"][:size],
            cu_seqlens_q=torch.arange(size + 1, dtype=torch.int32, device=self.device),
            block_tables=g["block_tables"][:size], max_seqlen_q=1, is_decode=True)

    # ---- applying a plan -----------------------------------------------------------------------------

    def apply_plan(self, plan: StepPlan) -> List[tuple]:
        """Update the request mirror; returns the scheduled (state, num_tokens, req_id) in plan order."""
        for req_id in list(plan.finished_req_ids) + list(plan.preempted_req_ids):
            state = self.requests.pop(req_id, None)
            if state is not None:
                self.row_penalized[state.row] = False
                self.free_rows.append(state.row)
        for req_id, token in zip(plan.sampled_req_ids, plan.sampled_token_ids):
            state = self.requests.get(req_id)
            if state is None:  # finished or preempted meanwhile: nothing to update
                continue
            if state.num_pending <= 0:
                raise ProtocolError(f"StepPlan {plan.step_id}: a token for request {req_id}, which sampled none")
            state.token_ids.append(token)
            state.num_pending -= 1
            if state.unconfirmed:
                state.unconfirmed.pop(0)
        scheduled = []
        for req in plan.new_requests:
            if req.req_id in self.requests:
                raise ProtocolError(f"StepPlan {plan.step_id}: request {req.req_id} is already live")
            if not self.free_rows:
                raise ProtocolError(f"StepPlan {plan.step_id}: more than max_num_seqs live requests")
            if len(req.block_ids) > self.max_blocks_per_seq:
                raise ProtocolError(f"StepPlan {plan.step_id}: request {req.req_id} has more blocks than fit")
            state = RequestState(
                token_ids=list(req.prompt_token_ids) + list(req.output_token_ids),
                num_prompt_tokens=len(req.prompt_token_ids), num_computed_tokens=req.num_computed_tokens,
                row=self.free_rows.pop(), num_blocks=len(req.block_ids), sampling=SamplingFields(**req.sampling))
            self.block_table[state.row, :state.num_blocks] = req.block_ids
            self._set_row_params(state)
            self.requests[req.req_id] = state
            scheduled.append((state, req.num_scheduled_tokens, req.req_id))
        for req_id, n, new_blocks in zip(plan.running_req_ids, plan.running_num_tokens, plan.running_new_block_ids):
            state = self.requests.get(req_id)
            if state is None:
                raise ProtocolError(f"StepPlan {plan.step_id}: request {req_id} is not live on this worker")
            if new_blocks:
                end = state.num_blocks + len(new_blocks)
                if end > self.max_blocks_per_seq:
                    raise ProtocolError(f"StepPlan {plan.step_id}: request {req_id} has more blocks than fit")
                self.block_table[state.row, state.num_blocks:end] = new_blocks
                state.num_blocks = end
            scheduled.append((state, n, req_id))
        for state, n, req_id in scheduled:
            end = state.num_computed_tokens + n
            known = len(state.token_ids)
            # a token not yet delivered can be an input only if it is the newest one, sampled in the
            # previous step (older undelivered tokens were inputs of earlier steps already)
            pending_ok = n == 1 and end == known + state.num_pending and req_id in self.prev_index
            if (end > known and not pending_ok) or end > state.num_blocks * self.block_size:
                raise ProtocolError(f"StepPlan {plan.step_id}: request {req_id} scheduled past its tokens or blocks")
        return scheduled

    def _set_row_params(self, state: RequestState) -> None:
        p, row = state.sampling, state.row
        self.row_temperature[row], self.row_top_k[row], self.row_top_p[row] = p.temperature, p.top_k, p.top_p
        self.row_min_p[row], self.row_seed[row], self.row_min_tokens[row] = p.min_p, p.seed, p.min_tokens
        self.row_prompt_len[row] = state.num_prompt_tokens
        self.row_penalized[row] = _uses_penalties(p)

    def _prepare(self, scheduled: List[tuple]):
        """Host-side inputs of a step, vectorized with numpy where it matters at large batch."""
        bs = self.block_size
        q_lens = np.fromiter((n for _, n, _ in scheduled), dtype=np.int64, count=len(scheduled))
        starts = np.fromiter((s.num_computed_tokens for s, _, _ in scheduled), dtype=np.int64, count=len(scheduled))
        rows = np.fromiter((s.row for s, _, _ in scheduled), dtype=np.int64, count=len(scheduled))
        ends = starts + q_lens
        cu = np.zeros(len(scheduled) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        total = int(cu[-1])
        input_ids: List[int] = []
        from_prev_dst, from_prev_src, sample_rows, sample_states, sample_ids = [], [], [], [], []
        for i, (state, n, req_id) in enumerate(scheduled):
            start, end, known = state.num_computed_tokens, state.num_computed_tokens + n, len(state.token_ids)
            if end <= known:
                input_ids.extend(state.token_ids[start:end])
            else:  # the input is the token this request sampled in the previous step (checked in apply_plan)
                input_ids.append(0)
                from_prev_dst.append(int(cu[i + 1]) - 1)
                from_prev_src.append(self.prev_index[req_id])
            if end == known + state.num_pending:  # every token is in the cache now: sample the next one
                sample_rows.append(int(cu[i + 1]) - 1)
                sample_states.append(state)
                sample_ids.append(req_id)
        positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1] - starts, q_lens)
        slots = self.block_table[np.repeat(rows, q_lens), positions // bs].astype(np.int64) * bs + positions % bs
        width = int(-(-ends.max() // bs))
        return dict(input_ids=input_ids, positions=positions, slots=slots, q_lens=q_lens, ends=ends, cu=cu,
                    rows=rows, width=width, from_prev=(from_prev_dst, from_prev_src), sample_rows=sample_rows,
                    sample_states=sample_states, sample_ids=sample_ids,
                    prefix_free=bool((starts == 0).all()))

    def _to_device(self, array, dtype) -> torch.Tensor:
        """Host values -> a device tensor, through staging buffers allocated once (see ``Staging``)."""
        return self.staging.put(array, dtype)

    def sampling_batch(self, states: List[RequestState], rows: np.ndarray, ends: np.ndarray) -> SamplingBatch:
        temps = self.row_temperature[rows]
        out_positions = ends - self.row_prompt_len[rows]  # index, among the outputs, of the token to sample
        top_k, top_p, min_p = self.row_top_k[rows], self.row_top_p[rows], self.row_min_p[rows]
        sampling = temps > 0
        all_greedy = not sampling.any()
        if not all_greedy:
            # two copies, not six; rows padded to the staging alignment so every row starts aligned
            width = -(-len(rows) // Staging.ALIGN) * Staging.ALIGN
            floats = self._to_device(_rows_padded([temps, top_p, min_p], width, np.float32), torch.float32)
            ints = self._to_device(_rows_padded([top_k, self.row_seed[rows], out_positions], width, np.int64),
                                   torch.int64)
            floats, ints = floats[:, :len(rows)], ints[:, :len(rows)]
        else:  # every row greedy: the argmax reads none of these, so nothing is copied to the device
            floats, ints = [None] * 3, [None] * 3
        batch = SamplingBatch(
            temperatures=floats[0], top_ps=floats[1], min_ps=floats[2],
            top_ks=ints[0], seeds=ints[1], positions=ints[2],
            all_greedy=all_greedy,
            use_top_k=bool((sampling & (top_k > 0)).any()),
            use_top_p=bool((sampling & (top_p < 1.0)).any()),
            use_min_p=bool((sampling & (min_p > 0.0)).any()),
        )
        if self.row_penalized[rows].any():
            params = [s.sampling for s in states]
            V = self.spec.vocab_size
            batch.prompt_ids = _padded([s.token_ids[:s.num_prompt_tokens] for s in states], V, self.device)
            batch.output_ids = _padded([s.token_ids[s.num_prompt_tokens:] + s.unconfirmed for s in states], V,
                                       self.device)
            batch.repetition_penalties = self._to_device([p.repetition_penalty for p in params], torch.float32)
            batch.presence_penalties = self._to_device([p.presence_penalty for p in params], torch.float32)
            batch.frequency_penalties = self._to_device([p.frequency_penalty for p in params], torch.float32)
        under_min = np.nonzero(out_positions < self.row_min_tokens[rows])[0]
        batch.banned = [(int(i), states[i].sampling.stop_token_ids) for i in under_min
                        if states[i].sampling.stop_token_ids]
        return batch

    def needs_history(self, plan: StepPlan) -> bool:
        """Whether sampling this plan may read token histories (penalties), i.e. need every earlier token.

        Conservative: any live request with penalties counts, so the per-step cost is one comparison."""
        return self.row_penalized.any() or any(
            _uses_penalties(SamplingFields(**r.sampling)) for r in plan.new_requests)

    # ---- a step --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def launch(self, plan: StepPlan, flush_previous: Callable[[], None]) -> StepHandle:
        """Queue step ``plan`` on the device; ``flush_previous`` finishes the step before it when needed."""
        if self.ctx.rank == 0 and self.needs_history(plan):
            flush_previous()  # penalties need the previous step's tokens on the host
        scheduled = self.apply_plan(plan)
        is_decode = all(n == 1 for _, n, _ in scheduled)  # every row one new token
        if is_decode and len(scheduled) > 1:
            # Decode: longest context first. The attention's programs start in batch order and, at large
            # batch (one KV split), each walks its sequence's whole context; started last, the long ones
            # would run on an otherwise idle GPU. Rows are independent and results keyed by request id,
            # so only the order of the programs changes (stable: equal contexts keep the plan's order).
            scheduled.sort(key=lambda item: -item[0].num_computed_tokens)
        if not scheduled:
            self.prev_index = {}  # nothing sampled: no later step may take an input from here
            return StepHandle(plan.step_id, [], None, None)
        self.staging.begin_step()
        inp = self._prepare(scheduled)
        dev = self.device
        batch = len(scheduled)
        fitting = [size for size in self.graphs if size >= batch] if is_decode else []
        num_tokens = int(inp["cu"][-1])
        prefill_fitting = [size for size in self.prefill_graphs if size >= num_tokens] \
            if batch == 1 and not is_decode else []
        if fitting:
            hidden = self._run_graph(min(fitting), batch, inp)
        elif prefill_fitting:
            hidden = self._run_prefill_graph(min(prefill_fitting), num_tokens, inp)
        else:
            ids = self._to_device(inp["input_ids"], torch.int64)
            self._fill_from_prev(ids, inp)
            meta = AttentionMetadata(
                slot_mapping=self._to_device(inp["slots"], torch.int64),
                context_lens=self._to_device(inp["ends"], torch.int32),
                cu_seqlens_q=self._to_device(inp["cu"], torch.int32),
                block_tables=self._to_device(self.block_table[inp["rows"], :inp["width"]], torch.int32),
                max_seqlen_q=int(inp["q_lens"].max()), is_decode=is_decode, prefix_free=inp["prefix_free"],
                seq_groups=None if is_decode else self._prefill_seq_groups(inp["q_lens"]),
                q_lens_host=inp["q_lens"].tolist(), context_lens_host=inp["ends"].tolist())
            hidden = self.model(ids, self._to_device(inp["positions"], torch.int64), meta)
        for state, n, _ in scheduled:
            state.num_computed_tokens += n
        sample_ids = inp["sample_ids"]
        if not sample_ids:
            self.prev_index = {}
            return StepHandle(plan.step_id, [], None, None)
        if len(sample_ids) == hidden.shape[0]:  # every row samples (decode): no gather needed
            logits = self.model.compute_logits(hidden)
        else:
            logits = self.model.compute_logits(hidden[self._to_device(inp["sample_rows"], torch.int64)])
        states = inp["sample_states"]
        if self.ctx.rank == 0:
            rows = np.fromiter((s.row for s in states), dtype=np.int64, count=len(states))
            ends = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=len(states))
            tokens = sample(logits, self.sampling_batch(states, rows, ends))
            logprobs = self._logprobs(logits, tokens, states, sample_ids)
        else:
            tokens = torch.empty(len(sample_ids), dtype=torch.int64, device=dev)
            logprobs = None
        if self.ctx.world_size > 1:  # every rank needs the tokens: they are the next step's inputs
            torch.distributed.broadcast(tokens, src=0, group=self.ctx.group)
        for state in states:
            state.num_pending += 1
        self.prev_tokens = tokens
        self.prev_index = {r: i for i, r in enumerate(sample_ids)}
        host, done = None, None
        if dev.type == "cuda":
            if self.ctx.rank == 0:
                host = self.token_buffers[self.staging.turn][:tokens.shape[0]]
                host.copy_(tokens, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        elif self.ctx.rank == 0:
            host = tokens
        return StepHandle(plan.step_id, sample_ids, host, done, logprobs)

    def _run_graph(self, size: int, batch: int, inp: dict) -> torch.Tensor:
        """Inputs go straight from the pinned staging buffers into the graph's input buffers."""
        g, put = self.graph_inputs, self.staging.put_into
        self._put_token_inputs(g, size, inp)
        put(g["context_lens"][:size], np.pad(inp["ends"], (0, size - batch)))
        put(g["block_tables"][:batch, :inp["width"]], self.block_table[inp["rows"], :inp["width"]])
        instance = self.staging.turn  # alternates every step
        graphs, outputs = self.graphs[size], self.graph_outputs[size]
        if size in self.single_split_graphs and use_single_split(inp["ends"], size, self.single_split_one_wave_rows):
            graphs, outputs = self.single_split_graphs[size]
        graphs[instance].replay()
        return outputs[instance][:batch]

    def _put_token_inputs(self, buffers: dict, size: int, inp: dict) -> None:
        """A step's per-token inputs into a graph's buffers; rows past the step's tokens get slot -1."""
        put, num_tokens = self.staging.put_into, len(inp["positions"])
        put(buffers["input_ids"][:num_tokens], inp["input_ids"])
        self._fill_from_prev(buffers["input_ids"], inp)
        put(buffers["positions"][:num_tokens], inp["positions"])
        put(buffers["slot_mapping"][:size], np.pad(inp["slots"], (0, size - num_tokens), constant_values=-1))

    def _run_prefill_graph(self, size: int, num_tokens: int, inp: dict) -> torch.Tensor:
        """One sequence's ``num_tokens`` new tokens through the ``size``-token prefill graph."""
        p, put = self.prefill_inputs, self.staging.put_into
        self._put_token_inputs(p, size, inp)
        put(p["context_lens"], inp["ends"])
        put(p["cu_seqlens_q"], inp["cu"])
        put(p["block_tables"][:, :inp["width"]], self.block_table[inp["rows"], :inp["width"]])
        graph, out = self.prefill_graphs[size]
        graph.replay()
        return out[:num_tokens]

    def _prefill_seq_groups(self, q_lens) -> Optional[list]:
        """Sequence groups by query length for backends that launch prefill attention per group."""
        if not getattr(self.backend, "groups_prefill_by_query_len", False):
            return None
        from workers.kernels.triton_attention import prefill_seq_groups
        groups = prefill_seq_groups(q_lens)
        if groups is None:
            return None
        return [(self._to_device(np.asarray(ids, dtype=np.int32), torch.int32), max_q) for ids, max_q in groups]

    def _fill_from_prev(self, input_ids: torch.Tensor, inp: dict) -> None:
        """Inputs that are last step's sampled tokens: copied on the device, never through the host."""
        dst, src = inp["from_prev"]
        if not dst:
            return
        if dst == src == list(range(len(dst))):  # the usual decode step: the same rows in the same order
            input_ids[:len(dst)].copy_(self.prev_tokens[:len(dst)])
            return
        index = self._to_device(np.array([dst, src], dtype=np.int64), torch.int64)
        input_ids[index[0]] = self.prev_tokens[index[1]]

    @staticmethod
    def is_done(handle: StepHandle) -> bool:
        """Whether a launched step has finished on the device (always, on CPU)."""
        return handle.done is None or handle.done.query()

    def finish(self, handle: StepHandle) -> Optional[StepResult]:
        """Wait for a launched step's tokens; rank 0 returns them as the step's result.

        Every rank waits: the others too, so that step N's staging buffers are free before step N+2 reuses
        them (``Staging``) by this rule and not only because the collectives pace them with rank 0."""
        if handle.done is not None:
            handle.done.synchronize()
        if self.ctx.rank != 0:
            return None
        tokens = handle.host_tokens.tolist() if handle.host_tokens is not None else []
        for req_id, token in zip(handle.req_ids, tokens):
            state = self.requests.get(req_id)
            if state is not None:
                state.unconfirmed.append(token)
        logprobs = []
        if handle.logprobs is not None:
            req_ids, sampled, top_ids, top_lps = handle.logprobs
            for req_id, lp, ids, lps in zip(req_ids, sampled.tolist(), top_ids.tolist(), top_lps.tolist()):
                k = self.requests[req_id].sampling.logprobs if req_id in self.requests else 0
                logprobs.append([req_id, lp, ids[:k], lps[:k]])
        return StepResult(step_id=handle.step_id, req_ids=handle.req_ids, token_ids=tokens, logprobs=logprobs)

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, states: List[RequestState], req_ids: List[int]):
        """Log-probabilities of the model's raw distribution (before penalties, temperature and
        truncation, as vLLM returns by default) for the rows that asked for them; None if none did."""
        rows = [i for i, s in enumerate(states) if s.sampling.logprobs >= 0]
        if not rows:
            return None
        k = max(states[i].sampling.logprobs for i in rows)
        index = torch.tensor(rows, device=logits.device)
        lp = torch.log_softmax(logits[index].float(), dim=-1)
        sampled = lp.gather(1, tokens[index].unsqueeze(1)).squeeze(1)
        top_lps, top_ids = lp.topk(max(k, 1), dim=-1)
        return [req_ids[i] for i in rows], sampled, top_ids, top_lps


class Staging:
    """Host->device input staging with no allocation per step.

    Pinned host buffers come in two sets used on alternate steps: a step's host values are written while
    the copies of the step before may still be queued on the device, but the worker always waits for
    step N before it launches step N+2, so the set it reuses is free. Device buffers need only one set:
    copies and kernels run in stream order. Within a step, ``put`` hands out consecutive slices.
    (Allocating pinned memory per step instead can stall the host on ``cudaHostAlloc``.)
    """

    def __init__(self, device: torch.device, capacity: Dict[torch.dtype, int]):
        self.device = device
        self.cuda = device.type == "cuda"
        self.capacity = capacity
        self.host = [{dt: torch.empty(n, dtype=dt, pin_memory=self.cuda) for dt, n in capacity.items()}
                     for _ in range(2)]
        self.dev = {dt: torch.empty(n, dtype=dt, device=device) for dt, n in capacity.items()} if self.cuda else None
        self.turn = 0
        self.used = dict.fromkeys(capacity, 0)

    ALIGN = 16  # elements: every slice starts 64-byte aligned, so Triton (which specializes kernels on
    # pointer alignment) compiles one variant at warm-up instead of new ones in the middle of a run

    def _take(self, dtype: torch.dtype, n: int) -> Optional[int]:
        start = self.used[dtype]
        if start + n > self.capacity[dtype]:
            return None
        self.used[dtype] = start + -(-n // self.ALIGN) * self.ALIGN
        return start

    def begin_step(self) -> None:
        self.turn ^= 1
        self.used = dict.fromkeys(self.capacity, 0)

    def put_into(self, dst: torch.Tensor, values) -> None:
        """Copy host values into an existing device tensor (e.g. a CUDA graph's input buffer)."""
        if not self.cuda:
            dst.copy_(torch.as_tensor(np.asarray(values)).view(dst.shape))
            return
        array = np.asarray(values)
        start = self._take(dst.dtype, array.size)
        if start is None:
            dst.copy_(torch.as_tensor(array).view(dst.shape))
            return
        host = self.host[self.turn][dst.dtype][start:start + array.size]
        host.numpy()[:] = array.reshape(-1)
        dst.copy_(host.view(dst.shape), non_blocking=True)

    def put(self, values, dtype: torch.dtype) -> torch.Tensor:
        array = np.asarray(values)
        n = array.size
        start = self._take(dtype, n)
        if start is None:  # larger than planned for: a one-off copy
            t = torch.as_tensor(array).to(dtype).reshape(array.shape)
            return t.to(self.device, non_blocking=False) if self.cuda else t
        host = self.host[self.turn][dtype][start:start + n]
        host.numpy()[:] = array.reshape(-1)
        if not self.cuda:
            return host.view(array.shape)
        dev = self.dev[dtype][start:start + n]
        dev.copy_(host, non_blocking=True)
        return dev.view(array.shape)


def _rows_padded(rows: list, width: int, dtype) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _uses_penalties(p: SamplingFields) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0


def _padded(rows: List[List[int]], pad: int, device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)
