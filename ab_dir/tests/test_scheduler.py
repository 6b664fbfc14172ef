"""Block manager and scheduler on hand-worked cases (no model, no workers)."""

from nanovllm.block_manager import BlockManager
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler import Scheduler
from nanovllm.sequence import Sequence, SequenceStatus


def seq(i, tokens, max_tokens=8):
    return Sequence(i, str(i), tokens, SamplingParams(max_tokens=max_tokens), {}, max_tokens)


def run_step(sched):
    """Schedule, then pretend the workers ran it: token 1 arrives for every sequence the step sampled."""
    plan, scheduled = sched.schedule()
    for s, _ in scheduled:
        while s.num_pending:
            sched.append_token(s, 1)
    return plan, scheduled


def test_prefix_cache_shares_full_blocks_and_verifies_tokens():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(0, list(range(10)))  # blocks: [0..3] [4..7] [8,9]
    ids, hashes = bm.find_cached_prefix(a)
    assert ids == []
    assert bm.admit(a, ids, hashes, 10)
    assert len(a.block_ids) == 3 and bm.num_free_blocks == 7
    b = seq(1, list(range(8)) + [50, 51, 52])  # shares the two full blocks
    ids, hashes = bm.find_cached_prefix(b)
    assert ids == a.block_ids[:2]
    assert bm.admit(b, ids, hashes, 3)
    assert b.num_computed_tokens == 8 and bm.blocks[ids[0]].ref_count == 2
    assert bm.prefix_cache_hits == 8
    # a fully cached prompt still computes its last token (its logits are needed)
    c = seq(2, list(range(8)))
    ids, _ = bm.find_cached_prefix(c)
    assert len(ids) == 1
    # a hash collision cannot serve wrong K/V: stored token ids are compared
    bm.blocks[a.block_ids[0]].token_ids = (99, 99, 99, 99)
    assert bm.find_cached_prefix(seq(3, list(range(10))))[0] == []


def test_freed_blocks_are_reused_least_recently_used_and_keep_their_cache():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq(0, [1, 2, 3, 4, 5])
    bm.admit(a, [], [], 5)  # 3 blocks
    first_two = a.block_ids[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4
    # the unhashed tail block and the never-used block go first; the prefix blocks survive
    b = seq(1, [7, 8, 9])
    bm.admit(b, [], [], 3)
    assert not set(b.block_ids) & set(first_two)
    ids, _ = bm.find_cached_prefix(seq(2, [1, 2, 3, 4, 6]))
    assert ids == first_two


def test_chunked_prefill_respects_token_budget():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16, max_model_len=1000)
    long = seq(0, list(range(40)))
    sched.add(long)
    plan, scheduled = run_step(sched)
    assert scheduled == [(long, 16)] and plan.new_requests[0].num_scheduled_tokens == 16
    plan, scheduled = run_step(sched)
    assert scheduled == [(long, 16)] and plan.running_num_tokens == [16]
    assert plan.running_new_block_ids == [[long.block_ids[4], long.block_ids[5], long.block_ids[6], long.block_ids[7]]]
    plan, scheduled = run_step(sched)
    assert scheduled == [(long, 8)] and long.num_output_tokens == 1
    plan, scheduled = run_step(sched)  # decode
    assert scheduled == [(long, 1)] and plan.sampled_req_ids == [0] and plan.sampled_token_ids == [1]


def test_preemption_by_recompute_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1000)
    a, b = seq(0, [1, 2, 3]), seq(1, [4, 5, 6])
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each, all 4 used, each has 4 tokens now
    assert bm.num_free_blocks == 0
    plan, scheduled = run_step(sched)  # a's 4th token fits its 2nd block; same for b
    plan, scheduled = run_step(sched)  # both need a 3rd block: b (the newest) is preempted
    assert sched.num_preemptions == 1 and b.status == SequenceStatus.WAITING
    assert plan.preempted_req_ids == [1] and scheduled == [(a, 1)]
    assert sched.waiting[0] is b and b.block_ids == [] and b.num_output_tokens == 2
    # once a finishes, b comes back as a new request carrying its outputs so far
    sched.finish(a, "length")
    plan, scheduled = sched.schedule()
    assert plan.finished_req_ids == [0]
    assert plan.new_requests[0].req_id == 1 and plan.new_requests[0].output_token_ids == [1, 1]
    assert scheduled == [(b, 5)]


def test_max_num_seqs():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=1000)
    for i in range(3):
        sched.add(seq(i, [1, 2, 3]))
    _, scheduled = run_step(sched)
    assert [s.seq_id for s, _ in scheduled] == [0, 1] and len(sched.waiting) == 1


def test_plans_run_ahead_of_results():
    """The next plan is built before the tokens of the previous step are known."""
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1000)
    a = seq(0, [1, 2, 3], max_tokens=3)
    sched.add(a)
    plan1, _ = sched.schedule()  # prefill; samples output 1
    plan2, s2 = sched.schedule()  # decodes output 1 (not known yet), samples output 2
    assert s2 == [(a, 1)] and a.num_pending == 2 and a.num_computed_tokens == 4
    plan3, s3 = sched.schedule()  # samples output 3 = max_tokens: after that nothing more is scheduled
    assert s3 == [(a, 1)] and a.num_pending == 3
    assert sched.schedule() == (None, [])
    sched.append_token(a, 7)
    assert sched.schedule() == (None, [])  # still complete once the pending ones arrive
    assert sched.pending_sampled == [(0, 7)]


def test_a_skipped_sequence_waits_for_its_token():
    """Workers keep only the last step's sampled tokens: a sequence skipped for a step must not be
    scheduled again until the value of its pending token has arrived."""
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4, max_model_len=1000)
    r = seq(0, [1, 2])
    sched.add(r)
    sched.schedule()  # plan 1: r's prefill, samples (pending 1)
    x = seq(1, list(range(10, 19)))  # 9 tokens, put ahead of r so it eats the budget
    sched.add(x)
    sched.waiting.remove(x)
    assert bm.admit(x, [], [], 0)
    x.status = r.status
    sched.running.insert(0, x)
    _, s2 = sched.schedule()  # plan 2: x takes the whole budget, r is skipped
    assert [q for q, _ in s2] == [x]
    _, s3 = sched.schedule()  # plan 3: x takes 4 of its 5 remaining tokens
    _, s4 = sched.schedule()  # plan 4: x's last token, r still waits for its token from plan 1
    assert r not in [q for q, _ in s3 + s4]
    sched.append_token(r, 7)  # the value arrives
    _, s5 = sched.schedule()
    assert (r, 1) in s5
