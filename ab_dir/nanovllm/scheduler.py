"""Continuous batching with chunked prefill and preemption by recompute.

Each step has a token budget (``max_num_batched_tokens``). Running sequences are served first, in
arrival order, each with all the tokens it still has to compute (one for a decoding sequence, the rest
of the prompt, up to the budget, for a sequence in chunked prefill). Waiting sequences are then admitted
while budget, ``max_num_seqs`` and free KV blocks allow, taking their cached prefix from the block
manager. When a running sequence needs a block and none is free, the most recently admitted running
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
later (most of it usually comes straight back from the prefix cache).

Plans run ahead of results: the engine sends plan N+1 before it has the tokens of step N. A sequence
whose last step samples a token has that token "pending"; the next plan computes it anyway (the workers
take its value from the device), so decoding never waits for the round trip to this process. A sequence
that will be done once its pending tokens arrive (``max_tokens``, ``max_model_len``) is not scheduled
again; one that stops on EOS or a stop string wastes at most one step.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, List, Optional, Tuple

from nanovllm.block_manager import BlockManager
from nanovllm.sequence import Sequence, SequenceStatus
from parallel.protocol import NewRequest, StepPlan


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.step_id = 0
        self.num_preemptions = 0
        # what the next plan must tell the workers
        self.pending_sampled: List[Tuple[int, int]] = []
        self.pending_finished: List[int] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _will_finish(self, seq: Sequence) -> bool:
        return (seq.num_output_tokens + seq.num_pending >= seq.max_tokens
                or seq.num_tokens + seq.num_pending >= self.max_model_len)

    def schedule(self) -> Tuple[Optional[StepPlan], List[Tuple[Sequence, int]]]:
        """Decide the next step's work: the plan for the workers and the (sequence, tokens) scheduled.

        Returns (None, []) when nothing can run until results arrive."""
        budget = self.max_num_batched_tokens
        scheduled: List[Tuple[Sequence, int]] = []
        preempted: List[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens + seq.num_pending - seq.num_computed_tokens, budget)
            # a token still in flight can be an input only in the very next step (the workers keep just
            # the last step's sampled tokens on the device); after a skipped step, wait for its value
            stale = seq.num_pending and seq.last_step != self.step_id
            if n <= 0 or stale or self._will_finish(seq):
                i += 1
                continue
            while not self.block_manager.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
                i += 1
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with a token in flight: readmit once it has arrived
                break
            cached_ids, cached_hashes = self.block_manager.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(cached_ids) * self.block_manager.block_size, budget)
            if not self.block_manager.admit(seq, cached_ids, cached_hashes, n):
                if not self.running and not scheduled:
                    raise RuntimeError(f"request {seq.request_id} needs more KV blocks than the whole cache holds "
                                       f"({len(self.block_manager.blocks)} blocks); lower max_model_len or "
                                       "give the KV cache more memory")
                break
            self.waiting.popleft()
            if seq.num_computed_tokens and not seq.num_output_tokens:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        if not scheduled and not preempted:
            return None, []
        plan = self._make_plan(scheduled, preempted)
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens + seq.num_pending:  # this step samples its next token
                seq.num_pending += 1
        return plan, scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _make_plan(self, scheduled: List[Tuple[Sequence, int]], preempted: List[Sequence]) -> StepPlan:
        self.step_id += 1
        new, running_ids, running_n, running_blocks = [], [], [], []
        for seq, n in scheduled:
            if not seq.on_workers:
                new.append(NewRequest(
                    req_id=seq.seq_id, prompt_token_ids=seq.prompt_token_ids, output_token_ids=seq.output_token_ids,
                    sampling=seq.sampling_fields, block_ids=list(seq.block_ids),
                    num_computed_tokens=seq.num_computed_tokens, num_scheduled_tokens=n))
                seq.on_workers = True
            else:
                running_ids.append(seq.seq_id)
                running_n.append(n)
                running_blocks.append(seq.block_ids[seq.num_blocks_on_workers:])
            seq.num_blocks_on_workers = len(seq.block_ids)
            seq.last_step = self.step_id
        preempted_ids = [s.seq_id for s in preempted if s.on_workers]
        for seq in preempted:
            seq.on_workers = False
            seq.num_blocks_on_workers = 0
        plan = StepPlan(
            step_id=self.step_id,
            new_requests=new,
            running_req_ids=running_ids, running_num_tokens=running_n, running_new_block_ids=running_blocks,
            sampled_req_ids=[r for r, _ in self.pending_sampled],
            sampled_token_ids=[t for _, t in self.pending_sampled],
            finished_req_ids=self.pending_finished, preempted_req_ids=preempted_ids,
        )
        self.pending_sampled, self.pending_finished = [], []
        return plan

    def append_token(self, seq: Sequence, token_id: int) -> None:
        """A sampled token arrived: it becomes known here and travels to the workers' mirrors."""
        seq.token_ids.append(token_id)
        seq.num_pending -= 1
        if seq.on_workers:
            self.pending_sampled.append((seq.seq_id, token_id))

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence: free its blocks and tell the workers to drop it."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        if seq.on_workers:
            self.pending_finished.append(seq.seq_id)
            seq.on_workers = False
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
