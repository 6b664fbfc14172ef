"""Triton paged-attention kernels vs an independent float64 reference.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set
below before triton is imported); there only float32 and float16 are meaningful. With CUDA the same
tests run on the GPU, plus bfloat16 variants (marked gpu).
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from workers.kernels.triton_attention import (  # noqa: E402
    _decode_config,
    _prefill_launch,
    _tma_decode_fits,
    _tma_decode_launch,
    tma_decode_applies,
    choose_num_splits,
    has_single_split_variant,
    single_split_one_wave_rows,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_seq_groups,
    store_kvcache,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

BF16 = pytest.param(
    torch.bfloat16,
    marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 needs CUDA (the interpreter mis-handles bf16)")],
    id="bf16",
)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"), BF16]


# --------------------------------------------------------------------------------------------------
# helpers: paged cache construction and the float64 reference
# --------------------------------------------------------------------------------------------------


def _gen(seed):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _randn(shape, gen, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)


class PagedKV:
    """A paged cache holding, for each sequence, `ctx_len` tokens of random K/V in shuffled blocks.

    Every slot that holds no valid token (free blocks, the tail of a sequence's last block) is NaN, so
    a kernel that reads anything it should not shows NaNs. Unused block-table entries are `tail_fill`.
    """

    def __init__(self, ctx_lens, num_kv_heads, head_dim, block_size, dtype, gen, spare_blocks=3,
                 tail_fill=0, extra_table_cols=1):
        self.ctx_lens = list(ctx_lens)
        self.block_size = block_size
        blocks_per_seq = [(c + block_size - 1) // block_size for c in self.ctx_lens]
        num_blocks = sum(blocks_per_seq) + spare_blocks
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        max_blocks = max(blocks_per_seq + [1]) + extra_table_cols
        table = torch.full((len(self.ctx_lens), max_blocks), tail_fill, dtype=torch.int32)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = torch.full(shape, float("nan"), dtype=torch.float64)
        v_cache = torch.full(shape, float("nan"), dtype=torch.float64)
        self.k_seq, self.v_seq = [], []  # per sequence: [ctx, Hkv, D] float64 (after dtype rounding)
        pos = 0
        for b, (c, nb) in enumerate(zip(self.ctx_lens, blocks_per_seq)):
            ids = perm[pos:pos + nb]
            pos += nb
            table[b, :nb] = torch.tensor(ids, dtype=torch.int32)
            k = torch.randn((c, num_kv_heads, head_dim), generator=gen, dtype=torch.float64).to(dtype).double()
            v = torch.randn((c, num_kv_heads, head_dim), generator=gen, dtype=torch.float64).to(dtype).double()
            for t in range(c):
                k_cache[ids[t // block_size], t % block_size] = k[t]
                v_cache[ids[t // block_size], t % block_size] = v[t]
            self.k_seq.append(k)
            self.v_seq.append(v)
        self.k_cache = k_cache.to(dtype=dtype, device=DEVICE)
        self.v_cache = v_cache.to(dtype=dtype, device=DEVICE)
        self.block_tables = table.to(DEVICE)
        self.context_lens = torch.tensor(self.ctx_lens, dtype=torch.int32, device=DEVICE)


def ref_attention(q, k, v, q_pos, scale):
    """float64 dense masked softmax attention for one sequence.

    q: [Lq, Hq, D], k/v: [Lk, Hkv, D], q_pos: [Lq] absolute positions; query i sees keys j <= q_pos[i].
    """
    q = q.double().cpu()
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    if lq == 0:
        return torch.zeros((0, hq, d), dtype=torch.float64)
    if lk == 0:
        return torch.zeros((lq, hq, d), dtype=torch.float64)
    g = hq // hkv
    k = k.repeat_interleave(g, dim=1)  # q head h uses kv head h // g
    v = v.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.arange(lk)[None, :] <= torch.as_tensor(q_pos)[:, None]
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)


def assert_close(out, ref, dtype):
    out = out.double().cpu()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    elif dtype == torch.float16:
        torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    else:  # bf16: relative error (norm-wise) < 1e-2, elementwise loosely
        rel = (out - ref).norm() / ref.norm().clamp_min(1e-12)
        assert rel < 1e-2, f"bf16 relative error {rel:.3e}"
        torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)


# --------------------------------------------------------------------------------------------------
# store_kvcache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (1, 128, 8), (3, 128, 32)])
def test_store_kvcache(dtype, slot_dtype, num_kv_heads, head_dim, block_size):
    gen = _gen(1)
    num_blocks = 6
    n_slots = num_blocks * block_size
    n = 11
    slots = torch.randperm(n_slots, generator=gen)[:n]
    slots[[2, 7]] = -1  # padding rows: write nothing
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = _randn(shape, gen, dtype)
    v_cache = _randn(shape, gen, dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    # key/value as strided views of a fused buffer, like slices of a qkv projection
    fused = _randn((n, 3, num_kv_heads, head_dim), gen, dtype)
    key, value = fused[:, 1], fused[:, 2]
    assert not key.is_contiguous()

    store_kvcache(key, value, k_cache, v_cache, slots.to(device=DEVICE, dtype=slot_dtype))

    exp_k = k_before.view(n_slots, num_kv_heads, head_dim).clone()
    exp_v = v_before.view(n_slots, num_kv_heads, head_dim).clone()
    valid = slots >= 0
    idx = slots[valid].to(DEVICE)
    exp_k[idx] = key[valid.to(DEVICE)]
    exp_v[idx] = value[valid.to(DEVICE)]
    # exact equality everywhere: the written slots hold the rows, every other slot is untouched
    assert torch.equal(k_cache.view(n_slots, num_kv_heads, head_dim), exp_k)
    assert torch.equal(v_cache.view(n_slots, num_kv_heads, head_dim), exp_v)


def test_store_kvcache_all_padding_and_empty():
    gen = _gen(2)
    shape = (2, 16, 2, 64)
    k_cache = _randn(shape, gen, torch.float32)
    v_cache = _randn(shape, gen, torch.float32)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    key = _randn((4, 2, 64), gen, torch.float32)
    store_kvcache(key, key, k_cache, v_cache, torch.full((4,), -1, dtype=torch.int64, device=DEVICE))
    store_kvcache(key[:0], key[:0], k_cache, v_cache, torch.zeros((0,), dtype=torch.int32, device=DEVICE))
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


# --------------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------------


def _run_decode_case(dtype, group, head_dim, block_size, ctx_lens, num_splits, num_kv_heads=2, seed=0,
                     strided_q=False, use_out=False):
    gen = _gen(seed)
    kv = PagedKV(ctx_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    hq = num_kv_heads * group
    b = len(ctx_lens)
    if strided_q:
        q = _randn((b, hq + 3, head_dim), gen, dtype, scale=2.0)[:, 1:hq + 1]
        assert not q.is_contiguous()
    else:
        q = _randn((b, hq, head_dim), gen, dtype, scale=2.0)
    scale = head_dim ** -0.5
    out_buf = torch.full((b, hq, head_dim), float("nan"), dtype=dtype, device=DEVICE) if use_out else None
    out = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale,
                                 num_splits=num_splits, out=out_buf)
    if use_out:
        assert out is out_buf
    ref = torch.stack([
        ref_attention(q[i:i + 1], kv.k_seq[i], kv.v_seq[i], [c - 1], scale)[0] for i, c in enumerate(ctx_lens)
    ])
    assert_close(out, ref, dtype)
    for i, c in enumerate(ctx_lens):
        if c == 0:
            assert torch.count_nonzero(out[i]) == 0, "padded row (context_len 0) must be zeros"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_gqa_head_dim(dtype, group, head_dim):
    # block 16 < BLOCK_N (block ids gathered per position); contexts: 1, not a multiple of the block
    # size, exactly a multiple, a padded row.
    _run_decode_case(dtype, group, head_dim, 16, [1, 37, 64, 0, 150], num_splits=None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim", [(2, 16), (3, 32), (2, 64)])
def test_small_head_dims_at_blocks_of_64(dtype, group, head_dim):
    # the GPU test models' head dims (16: qwen3, 32: qwen2) at the Hopper default block size (64 since
    # session 9), decode by the rule's splits and at one split, and prefill with and without a cached prefix
    ctx = [1, 37, 64, 0, 150]
    for num_splits in (None, 1):
        _run_decode_case(dtype, group, head_dim, 64, ctx, num_splits=num_splits, seed=head_dim)
    _run_prefill_case(dtype, group, head_dim, 64, [(5, 5), (23, 61), (1, 30), (9, 137)], seed=head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 64, 128])
@pytest.mark.parametrize("num_splits", [1, 3, 4])
def test_decode_block_sizes_and_splits(dtype, block_size, num_splits):
    # block 8 (gather path), 64 (== BLOCK_N), 128 (one block spans two tiles); even/odd split counts.
    ctx = [block_size, 1, 0, 3 * block_size - 5, 200]
    _run_decode_case(dtype, 2, 64, block_size, ctx, num_splits=num_splits, seed=block_size + num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_many_splits_strided_q_out(dtype):
    # more splits than tiles for the short rows (empty splits), strided q, caller-provided out buffer
    _run_decode_case(dtype, 4, 128, 32, [300, 5, 0, 64], num_splits=8, strided_q=True, use_out=True, seed=7)


@pytest.mark.skipif(not CUDA, reason="real size (64 sequences x 8 KV heads), too slow for the interpreter")
@pytest.mark.parametrize("block_size", [16, 64])
def test_decode_single_split_real_size(block_size):
    # 512 programs: on a 132-SM GPU one split takes the 64-token, 3-stage tiles (_decode_config) with blocks of
    # 16, and on Hopper the TMA kernel with blocks of 64 (checked here, so this test covers it)
    rng = random.Random(3)
    ctx = [rng.randint(1, 900) for _ in range(62)] + [0, 16]
    _run_decode_case(torch.bfloat16, 2, 128, block_size, ctx, num_splits=1, num_kv_heads=8, seed=3)
    q = torch.empty(64, 16, 128, dtype=torch.bfloat16, device=DEVICE)
    cache = torch.empty(2, block_size, 8, 128, dtype=torch.bfloat16, device=DEVICE)
    one_wave_on_hopper = (torch.cuda.get_device_capability()[0] >= 9
                          and 64 * 8 <= 4 * torch.cuda.get_device_properties(0).multi_processor_count)
    assert _tma_decode_fits(q, cache, cache, q) == (one_wave_on_hopper and block_size == 64)


@pytest.mark.parametrize("dtype", DTYPES)
# group 3: SmolLM2-135M's 9 query heads over 3 KV heads, a group that fills part of the 16-row head tile
@pytest.mark.parametrize("block_size,block_n,group,head_dim", [(64, 64, 2, 64), (128, 64, 2, 128), (64, 32, 1, 64),
                                                               (64, 64, 8, 128), (64, 64, 3, 64)])
def test_tma_decode_against_float64(dtype, block_size, block_n, group, head_dim):
    # The TMA kernel itself (the engine takes it on Hopper only). Contexts: one token, a partial last tile, a
    # multiple of the tile, a padded row, a long one; the slots past every context hold NaN (PagedKV), which a
    # last tile read whole must mask, scores and values.
    gen = _gen(block_size + block_n + group)
    ctx = [1, 37, 2 * block_n, 0, 150]
    kv = PagedKV(ctx, 2, head_dim, block_size, dtype, gen)
    q = _randn((len(ctx), 2 * group, head_dim), gen, dtype, scale=2.0)
    out = torch.full_like(q, float("nan"))
    scale = head_dim ** -0.5
    _tma_decode_launch(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, out, block_n=block_n)
    ref = torch.stack([ref_attention(q[i:i + 1], kv.k_seq[i], kv.v_seq[i], [c - 1], scale)[0]
                       for i, c in enumerate(ctx)])
    assert_close(out, ref, dtype)
    assert torch.count_nonzero(out[3]) == 0, "padded row (context_len 0) must be zeros"


def test_tma_decode_applies_rule():
    # (splits, block size, head dim, element bytes, programs, SMs, compute capability major)
    assert tma_decode_applies(1, 64, 128, 2, 512, 132, 9)  # batch 64 x 8 KV heads, one wave
    assert tma_decode_applies(1, 128, 64, 2, 528, 132, 10)  # four programs an SM, the most that fit at once
    assert not tma_decode_applies(1, 64, 128, 2, 529, 132, 9)  # a second wave
    assert not tma_decode_applies(2, 64, 128, 2, 512, 132, 9)  # split
    assert not tma_decode_applies(1, 16, 128, 2, 512, 132, 9)  # blocks smaller than the tile
    assert not tma_decode_applies(1, 64, 128, 2, 512, 132, 8)  # no TMA before Hopper
    assert not tma_decode_applies(1, 64, 128, 4, 512, 132, 9)  # float32
    assert not tma_decode_applies(1, 64, 96, 2, 512, 132, 9)  # head dim 96


def test_decode_all_padding():
    gen = _gen(3)
    kv = PagedKV([0, 0, 0], 2, 64, 16, torch.float32, gen)
    q = _randn((3, 4, 64), gen, torch.float32)
    for s in (1, 4):
        out = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125, num_splits=s)
        assert torch.count_nonzero(out) == 0 and torch.isfinite(out).all()


def test_single_split_variant_rule():
    # a one-split variant where the rule splits but the rows give >= 2.5 programs per SM (48 x 8 = 384 >= 330)
    assert has_single_split_variant(48, 8, 256, 16, num_sms=132)
    assert has_single_split_variant(96, 8, 256, 16, num_sms=132)
    assert not has_single_split_variant(32, 8, 256, 16, num_sms=132)  # 256 programs
    assert not has_single_split_variant(128, 8, 256, 16, num_sms=132)  # the rule already takes one split
    # its grid holds 4 programs an SM at once: 66 rows of 8 KV heads on 132 SMs (528 programs) are one wave,
    # so the 80- and 96-row graphs (filled >= 90 %: 72+, 87+ rows) run in waves, the 64-row graph does not
    assert single_split_one_wave_rows(8, num_sms=132) == 66
    assert single_split_one_wave_rows(4, num_sms=132) == 132


def test_single_split_tiles():
    # one split: 64-token tiles between 3 and 4 programs per SM (512 programs on 132 SMs), else 128-token
    # tiles; with splits, or float32 caches, 64-token 2-stage tiles; head dims above 128 the smallest tiles
    assert _decode_config(1, 128, 2, 512, 132) == (64, 4, 3)
    assert _decode_config(1, 128, 2, 396, 132) == (128, 4, 3) == _decode_config(1, 128, 2, 529, 132)
    assert _decode_config(4, 128, 2, 2048, 132) == (64, 4, 2) == _decode_config(1, 128, 4, 512, 132)
    assert _decode_config(1, 256, 2, 512, 132) == (32, 4, 2)


def test_kernels_compile_for_hopper():
    """Every engine kernel at the configs the engine picks, compiled for sm_90a on any machine (Triton's
    compiler and ptxas, no GPU; scripts/kernel_resources.py, in its own process, as this module may run the
    interpreter, which executes Python and never the compiler): each compiles, and a program fits an SM's
    registers and shared memory."""
    pytest.importorskip("triton.backends.nvidia")
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(root, "scripts", "kernel_resources.py"), "--json"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    if "no ptxas in the Triton installation" in run.stderr:
        pytest.skip("this Triton installation ships no ptxas")
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert {r["family"] for r in results} == {"decode_attention", "prefill_attention", "store_kvcache",
                                              "decode_gemm", "qkv_rope", "fused", "small_linear", "sampling"}
    for r in results:
        assert r["registers"] <= 255 and r["shared_bytes"] <= 227 * 1024, r


def test_choose_num_splits():
    # enough programs already: no split
    assert choose_num_splits(256, 8, 64, 16, num_sms=132) == 1
    # >= 6 programs per SM from the batch alone: one split (128 x 8 = 1024 >= 6 x 132)
    assert choose_num_splits(128, 8, 256, 16, num_sms=132) == 1
    # below that: the smallest power of two reaching 12 programs per SM (96 x 8 x 4 = 3072 >= 1584)
    assert choose_num_splits(96, 8, 256, 16, num_sms=132) == 4
    # small batch, long context: split, power of two, capped
    s = choose_num_splits(1, 8, 2048, 16, num_sms=132)
    assert s > 1 and s & (s - 1) == 0 and s <= 64
    # short maximum context caps the split count
    assert choose_num_splits(1, 8, 8, 16, num_sms=132) == 1
    assert choose_num_splits(1, 8, 16, 16, num_sms=132) == 2


# --------------------------------------------------------------------------------------------------
# prefill (varlen, paged, causal, with cached prefix / chunked)
# --------------------------------------------------------------------------------------------------


def _run_prefill_case(dtype, group, head_dim, block_size, seqs, num_kv_heads=2, seed=0, strided_q=False,
                      max_seqlen_q=None, extra_kv=(), grouped=False, pack=None):
    """seqs: list of (q_len, context_len). extra_kv: per sequence, tokens already in the cache beyond
    context_len (e.g. a later chunk's K/V): they must be ignored. pack: force tiles that pack a KV head's
    query-head group (True) or one q head a tile (False); None: the default."""
    gen = _gen(seed)
    extra = list(extra_kv) or [0] * len(seqs)
    kv = PagedKV([c + e for (_, c), e in zip(seqs, extra)], num_kv_heads, head_dim, block_size, dtype, gen)
    context_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32, device=DEVICE)
    hq = num_kv_heads * group
    q_lens = [ql for ql, _ in seqs]
    total = sum(q_lens)
    if strided_q:
        q = _randn((total, hq * 2, head_dim), gen, dtype, scale=2.0)[:, ::2]
        assert not q.is_contiguous()
    else:
        q = _randn((total, hq, head_dim), gen, dtype, scale=2.0)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    if max_seqlen_q is None:
        max_seqlen_q = max(q_lens)
    seq_groups = None
    if grouped:
        groups = prefill_seq_groups(q_lens)
        assert groups is not None
        seq_groups = [(torch.tensor(ids, dtype=torch.int32, device=DEVICE), m) for ids, m in groups]
    if pack is None:
        out = paged_prefill_attention(q, kv.k_cache, kv.v_cache, cu, context_lens, kv.block_tables, scale,
                                      max_seqlen_q, seq_groups=seq_groups)
    else:
        assert seq_groups is None
        out = _prefill_launch(q, kv.k_cache, kv.v_cache, cu, context_lens, kv.block_tables, scale, max_seqlen_q,
                              pack=pack)
    refs = []
    start = 0
    for b, (ql, c) in enumerate(seqs):
        q_pos = torch.arange(c - ql, c)
        refs.append(ref_attention(q[start:start + ql], kv.k_seq[b][:c], kv.v_seq[b][:c], q_pos, scale))
        start += ql
    assert_close(out, torch.cat(refs), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (2, 128, 64), (8, 64, 8), (4, 128, 256)])
def test_prefill_varlen_with_prefix(dtype, group, head_dim, block_size):
    # no prefix (q_len == ctx), cached prefix (ctx > q_len), a decode-like row, a long-ish prompt
    seqs = [(5, 5), (23, 61), (1, 30), (40, 40), (9, 9 + 2 * block_size)]
    _run_prefill_case(dtype, group, head_dim, block_size, seqs, seed=group * 10 + block_size)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_chunk_in_middle(dtype):
    # chunked prefill: this step computes tokens [48, 80) of a 130-token prompt whose first 48 are
    # cached; K/V for the later chunk is present in the cache (NaN-free garbage past context_len)
    # and must be ignored. Second sequence: a chunk crossing several BLOCK_M tiles.
    seqs = [(32, 80), (150, 170), (3, 3)]
    _run_prefill_case(dtype, 2, 64, 16, seqs, seed=5, extra_kv=[50, 7, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_strided_q_zero_len_and_oversized_grid(dtype):
    # strided q, a sequence with no new tokens, and max_seqlen_q larger than needed
    seqs = [(17, 17), (0, 12), (6, 33)]
    _run_prefill_case(dtype, 2, 128, 32, seqs, seed=9, strided_q=True, max_seqlen_q=64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (2, 128, 16), (3, 64, 32), (8, 64, 8)])
def test_prefill_tiles_with_and_without_packed_heads(dtype, pack, group, head_dim, block_size):
    # both tile layouts, whatever the default: a tile per q head, and a tile per KV head holding its
    # query-head group (GROUP 3 pads to 4 heads a token; rows of the padding head are never stored).
    # Prompts with and without a cached prefix, decode rows, a chunk crossing several tiles.
    seqs = [(5, 5), (23, 61), (1, 30), (70, 70), (9, 9 + 2 * block_size), (1, 1), (40, 200)]
    _run_prefill_case(dtype, group, head_dim, block_size, seqs, seed=group * 7 + block_size, pack=pack)


def test_prefill_default_tiles_for_a_very_large_group():
    # 128 query heads on one KV head: too many to pack into a 64-row tile, so the default must fall back
    # to a tile per q head (and still be right)
    _run_prefill_case(torch.float32, 128, 16, 16, [(3, 3), (1, 20), (5, 40)], num_kv_heads=1, seed=3)


def test_prefill_seq_groups():
    # decode rows (and any <= 16-token chunk) next to longer prompts: two groups with their own max q_len
    assert prefill_seq_groups([1, 300, 16, 17, 1]) == [([0, 2, 4], 16), ([1, 3], 300)]
    assert prefill_seq_groups([1, 1, 5]) is None  # all short: one launch
    assert prefill_seq_groups([40, 17]) is None  # all long: one launch


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_grouped_launches(dtype):
    # a chunked-prefill step: decode rows with long contexts, a chunk after a cached prefix, a fresh
    # prompt, a 16-token chunk; one launch per group writes exactly its own rows
    seqs = [(1, 90), (70, 70), (16, 60), (1, 17), (33, 100), (1, 1)]
    _run_prefill_case(dtype, 2, 64, 16, seqs, seed=21, grouped=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_decode_agree(dtype):
    # q_len == 1 prefill is decode: the two kernels agree (and both match the reference)
    gen = _gen(11)
    ctx_lens = [1, 33, 100, 64]
    kv = PagedKV(ctx_lens, 2, 64, 16, dtype, gen)
    q = _randn((4, 8, 64), gen, dtype)
    cu = torch.arange(5, dtype=torch.int32, device=DEVICE)
    a = paged_prefill_attention(q, kv.k_cache, kv.v_cache, cu, kv.context_lens, kv.block_tables, 0.125, 1)
    b = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125, num_splits=2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 128])
def test_prefill_prefix_at_tile_boundaries(dtype, block_size):
    # cached prefixes of 62, 63, 64, 65 and 127 tokens: the first query row sits just before, on and
    # just after a KV tile edge (BLOCK_N = 64), where the unmasked/causal loop split must be exact.
    seqs = [(10, 72), (3, 66), (5, 69), (20, 85), (140, 267)]
    _run_prefill_case(dtype, 2, 64, block_size, seqs, seed=13 + block_size)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_decode_and_prefill_cuda_graph_replay():
    # captured once, replayed on new data (context lengths incl. a padded row, queries): same result as eager
    gen = _gen(17)
    dtype = torch.bfloat16
    kv = PagedKV([100, 37, 250, 64], 2, 128, 16, dtype, gen)
    q = _randn((4, 8, 128), gen, dtype)
    out = torch.empty_like(q)
    cu = torch.arange(5, dtype=torch.int32, device=DEVICE)
    out_p = torch.empty_like(q)
    ctx = kv.context_lens.clone()

    def step():
        paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, ctx, 0.1, out=out)
        paged_prefill_attention(q, kv.k_cache, kv.v_cache, cu, ctx, kv.block_tables, 0.1, 1, out=out_p)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    ctx.copy_(torch.tensor([0, 30, 250, 1], dtype=torch.int32))
    q.copy_(_randn((4, 8, 128), gen, dtype))
    g.replay()
    torch.cuda.synchronize()
    eager = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, ctx, 0.1)
    assert torch.equal(out, eager)
    assert torch.count_nonzero(out[0]) == 0
    torch.testing.assert_close(out_p.float(), eager.float(), atol=2e-2, rtol=2e-2)


def test_graph_batch_sizes():
    from workers.model_runner import graph_batch_sizes

    assert graph_batch_sizes(256) == [1, 8] + list(range(16, 257, 16))
    assert graph_batch_sizes(3) == [1, 3]
    assert graph_batch_sizes(8) == [1, 8]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(40) == [1, 8, 16, 32, 40]
    assert graph_batch_sizes(1000)[-1] == 512


def test_prefill_graph_sizes():
    from workers.model_runner import prefill_graph_sizes

    assert prefill_graph_sizes(16384, 4096) == [64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert prefill_graph_sizes(512, 256) == [64, 128, 192, 256]  # capped by the model length
    assert prefill_graph_sizes(64, 4096) == [64]  # and by the step's token budget
    assert prefill_graph_sizes(32, 4096) == []
