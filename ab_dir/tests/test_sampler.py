"""The sampler: the two-level Gumbel-max draw follows softmax(logits / T), truncation keeps the right tokens,
and the Triton kernels compute the same draw as the torch code (interpreter on CPU, real on GPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from workers.sampler import SamplingBatch, gumbel_argmax_reference, sample  # noqa: E402


def batch_of(n, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, seeds=None, device="cpu"):
    return SamplingBatch(
        temperatures=torch.full((n,), float(temperature), device=device),
        top_ks=torch.full((n,), top_k, dtype=torch.int64, device=device),
        top_ps=torch.full((n,), float(top_p), device=device),
        min_ps=torch.full((n,), float(min_p), device=device),
        seeds=(torch.arange(n, dtype=torch.int64) if seeds is None else seeds).to(device),
        positions=torch.zeros(n, dtype=torch.int64, device=device),
        all_greedy=temperature == 0, use_top_k=top_k > 0, use_top_p=top_p < 1, use_min_p=min_p > 0)


def test_draws_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 40000
    b = batch_of(n, temperature=0.7)
    tokens = sample(logits.expand(n, -1).clone(), b)
    freq = torch.bincount(tokens, minlength=5).double() / n
    expected = torch.softmax(logits.double() / 0.7, dim=0)  # independent float64 reference
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


@pytest.mark.parametrize("tile", [4, 16])
def test_two_level_draw_follows_the_softmax(tile):
    """Tiles of 4 over 10 tokens (the last tile partial), and one tile: a tile by log-sum-exp + Gumbel, then
    a token within it, draws each token with its softmax probability (float64 reference)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 1.5, -0.5, 0.2, 1.2, -2.0])
    n = 60000
    temps = torch.full((n,), 0.8)
    tokens = gumbel_argmax_reference(logits.expand(n, -1), temps, torch.arange(n), torch.full((n,), 3), tile=tile)
    freq = torch.bincount(tokens, minlength=10).double() / n
    expected = torch.softmax(logits.double() / 0.8, dim=0)
    assert torch.allclose(freq, expected, atol=0.008), (freq, expected)


def test_noise_is_finite_at_the_extreme_hashes():
    """The hash's extreme outputs map strictly inside (0, 1) in float32, so the Gumbel noise is finite: no
    token can be drawn whatever its probability (float64 bounds, computed independently)."""
    from workers.sampler import uniform_from_bits

    bits = torch.tensor([0, 511, 512, 2**31, 2**32 - 512, 2**32 - 1], dtype=torch.int64)
    u = uniform_from_bits(bits)
    assert (u > 0).all() and (u < 1).all()
    assert u[-1].item() == 1 - 2.0**-24 and u[0].item() == 2.0**-24
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_greedy_and_truncation():
    logits = torch.tensor([[0.1, 3.0, 2.9, -5.0, 1.0]])
    assert sample(logits, batch_of(1, temperature=0)).item() == 1
    # top-k 2 over many seeds: only tokens 1 and 2 ever come out
    n = 2000
    many = logits.expand(n, -1).clone()
    assert set(sample(many, batch_of(n, top_k=2)).tolist()) == {1, 2}
    # top-p: probabilities at T=1 are ~[.02,.47,.43,0,.07]; p=0.5 keeps {1, 2} (1 alone has .47 < .5)
    assert set(sample(many, batch_of(n, top_p=0.5)).tolist()) == {1, 2}
    # min-p 0.5: keep tokens with p >= 0.5 * p_max: tokens 1 and 2 (ratio e^-0.1), not 4 (ratio e^-2)
    assert set(sample(many, batch_of(n, min_p=0.5)).tolist()) == {1, 2}


def test_banned_tokens_and_penalties():
    logits = torch.tensor([[5.0, 4.0, 1.0, -2.0]])
    b = batch_of(1, temperature=0)
    b.banned = [(0, [0])]
    assert sample(logits.clone(), b).item() == 1
    b = batch_of(1, temperature=0)
    b.repetition_penalties = torch.tensor([3.0])
    b.presence_penalties = torch.tensor([0.0])
    b.frequency_penalties = torch.tensor([0.0])
    b.prompt_ids = torch.tensor([[0, 4]])  # 4 = padding (vocab size)
    b.output_ids = torch.tensor([[4]])
    assert sample(logits.clone(), b).item() == 1  # 5/3 < 4


def test_same_seed_same_draw_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16])
    full = gumbel_argmax_reference(logits, torch.full((6,), 0.9), seeds, torch.arange(6))
    part = gumbel_argmax_reference(logits[2:4], torch.full((2,), 0.9), seeds[2:4], torch.arange(2, 4))
    assert torch.equal(full[2:4], part)


@pytest.mark.parametrize("tile", [None, 128])
def test_triton_kernel_matches_torch(tile):
    """The kernels draw what the torch reference draws, at the engine's tile width and at 128 (8 tiles on
    the CPU's vocabulary of 1000)."""
    pytest.importorskip("triton")
    from workers.kernels.sampling import gumbel_argmax
    from workers.sampler import SAMPLE_TILE

    tile = tile or SAMPLE_TILE
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    V = 1000 if device == "cpu" else 151936
    logits = torch.randn(8, V) * 3
    temps = torch.tensor([0.0, 0.5, 1.0, 1.5, 0.6, 0.6, 2.0, 0.0])
    seeds = torch.tensor([1, 2, 3, 4, 5, 6, 2**32 - 1, 9], dtype=torch.int64)
    positions = torch.tensor([0, 1, 2, 3, 4, 1000, 7, 8], dtype=torch.int64)
    expected = gumbel_argmax_reference(logits, temps, seeds, positions, tile=tile)
    assert torch.equal(expected[[0, 7]], logits[[0, 7]].argmax(dim=-1))  # greedy rows: the plain argmax
    got = gumbel_argmax(logits.to(device), temps.to(device), seeds.to(device), positions.to(device), tile=tile)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("batch,tile", [(1, 128), (3, 128), (16, 128), (3, 8)])
def test_triton_kernel_vocab_chunks_and_ties(batch, tile):
    """A chunk per tile (128-token tiles: 8 a row), or chunks of two tiles (8-token tiles: 125 a row, more
    than MAX_CHUNKS): the same draw as torch, and on ties the lowest token id wins, as torch.argmax, across
    tiles and chunks."""
    pytest.importorskip("triton")
    from workers.kernels.sampling import gumbel_argmax

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(batch)
    V = 1000
    logits = torch.randn(batch, V)
    logits[0, 300] = logits[0, 700] = 50.0  # a tie across tiles (and chunks): greedy must pick 300
    temps = torch.full((batch,), 0.7)
    temps[0] = 0.0
    seeds = torch.arange(batch, dtype=torch.int64) * 7919
    positions = torch.arange(batch, dtype=torch.int64)
    expected = gumbel_argmax_reference(logits, temps, seeds, positions, tile=tile)
    assert expected[0] == 300
    got = gumbel_argmax(logits.to(device), temps.to(device), seeds.to(device), positions.to(device), tile=tile)
    assert torch.equal(got.cpu(), expected)


def test_triton_kernel_never_draws_a_removed_token():
    """Truncation leaves three tokens in two tiles; every other tile is all -inf: kernel and reference draw
    only those three (both -inf-only tiles and partly -inf tiles), and the same ones."""
    pytest.importorskip("triton")
    from workers.kernels.sampling import gumbel_argmax

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, V = 64, 1000
    logits = torch.full((n, V), float("-inf"))
    logits[:, 5], logits[:, 600], logits[:, 610] = 0.3, 1.0, 0.1
    temps = torch.full((n,), 1.0)
    seeds, positions = torch.arange(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    expected = gumbel_argmax_reference(logits, temps, seeds, positions, tile=128)
    assert set(expected.tolist()) == {5, 600, 610}
    got = gumbel_argmax(logits.to(device), temps.to(device), seeds.to(device), positions.to(device), tile=128)
    assert torch.equal(got.cpu(), expected)
