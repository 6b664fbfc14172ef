"""bench.py and bench_latency.py: the roofline arithmetic by hand, and both scripts end to end on CPU."""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402
import bench_latency  # noqa: E402

# the tiny Qwen3 used on CPU: hidden 64, 2 layers, 4 query / 2 KV heads of 16, MLP 128, vocab 1024, tied
TINY = bench.TINY_QWEN3


# ---- pure functions, checked against numbers worked out by hand ---------------------------------------------

def test_qwen3_0_6b_parameter_count():
    # embed 151936*1024 = 155,582,464; per layer: q 1024*2048 + k 1024*1024 + v 1024*1024 + o 2048*1024
    # = 6,291,456, q/k norms 2*128, layer norms 2*1024, MLP 3*1024*3072 = 9,437,184 -> 15,730,944;
    # 28 layers = 440,466,432; final norm 1024; tied: no separate LM head
    parts = bench.weight_params(bench.QWEN3_0_6B)
    assert parts == {"embed": 155_582_464, "layers": 440_466_432, "final_norm": 1024, "lm_head": 0}
    assert sum(parts.values()) == 596_049_920  # Qwen3-0.6B's published size ("0.6B", 0.44B non-embedding)
    assert bench.kv_bytes_per_token(bench.QWEN3_0_6B, 1, 2) == 2 * 28 * 8 * 128 * 2 == 114_688


def test_kv_tokens_read_and_written():
    # prompt 10, 4 outputs: the passes producing outputs 0..3 attend over 10, 11, 12, 13 tokens
    assert bench.kv_tokens_read(10, 4) == 10 + 11 + 12 + 13 == 46
    assert bench.kv_tokens_read(5, 1) == 5
    # written: the 10 prompt tokens and outputs 0..2 (the last output's K/V is never computed)
    assert bench.kv_tokens_written(10, 4) == 13
    assert bench.kv_tokens_written(5, 1) == 5


def test_roofline_bytes_by_hand():
    # tiny Qwen3 in bfloat16 (2 bytes), TP 1:
    #   embed (tied, read in full by the LM head) 1024*64 = 65,536
    #   per layer: q 64*64 = 4096, k 64*32 = 2048, v 2048, o 64*64 = 4096 -> 12,288; q/k norms 16+16;
    #              layer norms 64+64; MLP gate+up 2*64*128 = 16,384, down 128*64 = 8192 -> 24,576
    #              = 12,288 + 32 + 128 + 24,576 = 37,024; two layers 74,048
    #   final norm 64 -> 139,648 parameters = 279,296 bytes a step
    #   K/V per token: 2 (K and V) * 2 layers * 2 KV heads * 16 * 2 bytes = 256 bytes
    # two sequences (prompt 10, 4 outputs) and (prompt 5, 1 output), 5 engine steps:
    #   weights 5 * 279,296 = 1,396,480
    #   KV read (46 + 5) * 256 = 13,056;  KV write (13 + 5) * 256 = 4,608
    assert sum(bench.weight_params(TINY).values()) == 139_648
    assert bench.weight_bytes_per_step(TINY, 1, 2) == 279_296
    assert bench.kv_bytes_per_token(TINY, 1, 2) == 256
    got = bench.roofline_bytes(TINY, tp=1, dtype_bytes=2, num_steps=5, prompt_lens=[10, 5], output_lens=[4, 1])
    assert got == {"weights": 1_396_480, "kv_read": 13_056, "kv_write": 4_608, "total": 1_414_144}


def test_roofline_bytes_by_hand_tp2():
    # TP 2, rank 0: 2 query heads, 1 KV head, half the MLP, half the vocabulary rows, norms replicated
    #   embed 512*64 = 32,768
    #   per layer: q 64*32 = 2048, k 64*16 = 1024, v 1024, o 32*64 = 2048 -> 6144; norms 32 + 128;
    #              MLP 2*64*64 + 64*64 = 12,288 -> 18,592; two layers 37,184
    #   final norm 64 -> 70,016 parameters = 140,032 bytes (bf16)
    #   K/V per token on the rank: 2 * 2 layers * 1 KV head * 16 * 2 bytes = 128
    assert bench.weight_params(TINY, 2) == {"embed": 32_768, "layers": 37_184, "final_norm": 64, "lm_head": 0}
    assert bench.kv_bytes_per_token(TINY, 2, 2) == 128
    got = bench.roofline_bytes(TINY, tp=2, dtype_bytes=2, num_steps=5, prompt_lens=[10, 5], output_lens=[4, 1])
    assert got == {"weights": 5 * 140_032, "kv_read": 51 * 128, "kv_write": 18 * 128,
                   "total": 700_160 + 6_528 + 2_304}


def test_step_breakdown_by_hand():
    # Qwen3-0.6B shape, TP 1, bf16: weights per step from the function checked above, K/V 114,688 bytes
    # per token; a bandwidth of 1e12 B/s keeps the arithmetic readable.
    cfg, bw = bench.QWEN3_0_6B, 1e12
    w, kv = bench.weight_bytes_per_step(cfg, 1, 2), 114_688
    # (result time s, sequences, new tokens, K/V tokens attended)
    log = [(0.010, 2, 300, 300),     # prefill of two prompts: 10 ms
           (0.012, 2, 2, 302),       # decode, batch 2: 2 ms
           (0.015, 2, 2, 304),       # decode, batch 2: 3 ms
           (0.020, 40, 40, 40_000)]  # decode, batch 40: 5 ms
    groups = {g["group"]: g for g in bench.step_breakdown({"step_log": log}, cfg, 1, 2, bw)}
    assert list(groups) == ["with prefill", "decode 1-8", "decode 33-64"]
    assert groups["with prefill"]["steps"] == 1 and groups["with prefill"]["seconds"] == pytest.approx(0.010)
    assert groups["with prefill"]["floor_s"] == pytest.approx((w + 600 * kv) / bw)
    small = groups["decode 1-8"]
    assert small["steps"] == 2 and small["seconds"] == pytest.approx(0.005)
    assert small["floor_s"] == pytest.approx((2 * w + (304 + 306) * kv) / bw)
    assert small["ms_per_step"] == pytest.approx(2.5)
    assert groups["decode 33-64"]["floor_ms_per_step"] == pytest.approx(1e3 * (w + 40_040 * kv) / bw)


def test_untied_embedding_is_not_read_per_step():
    # untied: the input table is only gathered (a few rows a step); the LM head is read in full
    untied = dict(TINY, tie_word_embeddings=False)
    parts = bench.weight_params(untied)
    assert parts["lm_head"] == parts["embed"] == 65_536
    assert bench.weight_bytes_per_step(untied, 1, 2) == bench.weight_bytes_per_step(TINY, 1, 2)


def test_head_split_matches_the_engine():
    # SmolLM2-style 9 query / 3 KV heads at TP 2: rank 0 holds 2 KV heads and their 6 query heads
    assert bench.heads_per_rank({"num_attention_heads": 9, "num_key_value_heads": 3}, 2) == (6, 2)
    # fewer KV heads than ranks: one (replicated) KV head per rank
    assert bench.heads_per_rank({"num_attention_heads": 8, "num_key_value_heads": 2}, 4) == (2, 1)
    assert bench.heads_per_rank({"num_attention_heads": 16, "num_key_value_heads": 8}, 1) == (16, 8)


def test_workload_is_nano_vllms():
    # nano-vLLM's bench.py, draw for draw (global random, seed 0)
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    max_tokens = [random.randint(100, 1024) for _ in range(256)]
    assert bench.make_workload(256, 100, 1024, 100, 1024, 10000) == (prompts, max_tokens)
    # the token counts nano-vLLM's README reports for this workload
    assert sum(map(len, prompts)) == 142_827 and sum(max_tokens) == 133_966


# ---- the scripts, end to end on CPU ---------------------------------------------------------------------------

def run_script(args, timeout=120):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU path, even on a GPU machine
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_gc_pauses_counts_collections_by_generation():
    with bench.GcPauses() as pauses:
        gc.collect()  # a full collection
        gc.collect(1)
    counts = list(pauses.counts)
    assert counts[2] == 1 and counts[1] >= 1 and pauses.seconds > 0
    gc.collect()  # after the block: not counted
    assert pauses.counts == counts


def test_bench_cpu(tmp_path):
    path = tmp_path / "bench.json"
    out = run_script(["bench.py", "--num-seqs", "4", "--runs", "2", "--json", str(path)])
    for field in ("small configuration", "output tokens:", "seconds:", "output tok/s:", "total tok/s:",
                  "engine steps:", "roofline bytes:", "roofline: n/a (no CUDA)", "run 1/2", "run 2/2",
                  "median of 2 runs", "engine-process garbage collections during the run:"):
        assert field in out, (field, out)
    res = json.loads(path.read_text())
    assert all(len(run["engine_gc_collections"]) == 3 for run in res["runs"])
    assert res["small"] and res["dtype"] == "float32" and res["copy_bandwidth_bytes_per_s"] is None
    work = res["workload"]
    prompts, max_tokens = bench.make_workload(4, 16, 64, 8, 32, 1023)  # the small workload, vocab 1024
    assert work["prompt_lens"] == [len(p) for p in prompts] and work["max_tokens"] == max_tokens
    cfg, per_token = res["hf_config"], res["kv_bytes_per_token"]
    assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] == 1024
    assert len(res["runs"]) == 2 and res["median"] in res["runs"]
    for run in res["runs"]:
        assert run["output_tokens"] == sum(work["max_tokens"])  # ignore_eos: every sequence runs to max_tokens
        assert run["output_lens"] == work["max_tokens"]
        assert run["prompt_tokens"] == sum(work["prompt_lens"])
        assert run["total_tokens"] == run["prompt_tokens"] + run["output_tokens"]
        assert run["output_tok_per_s"] == pytest.approx(run["output_tokens"] / run["seconds"])
        assert run["total_tok_per_s"] == pytest.approx(run["total_tokens"] / run["seconds"])
        # at least one step per output token of the longest sequence; at most one per token of the workload
        assert max(work["max_tokens"]) <= run["engine_steps"] <= run["total_tokens"]
        assert run["prefix_cache_hit_tokens"] == 0  # the second run's prompts are shifted, not cached
        rb = run["roofline_bytes"]
        assert rb["weights"] == run["engine_steps"] * res["weight_bytes_per_step"]
        assert rb["kv_read"] == per_token * sum(o * p + o * (o - 1) // 2
                                                for p, o in zip(work["prompt_lens"], work["max_tokens"]))
        assert rb["kv_write"] == per_token * (run["total_tokens"] - len(work["max_tokens"]))
        assert rb["total"] == rb["weights"] + rb["kv_read"] + rb["kv_write"]
        assert "roofline_floor_s" not in run


def test_request_tpot_is_first_to_last_token_per_later_token():
    # hand-worked: 5 tokens, the first at t = 10.0 s, the last at 10.8 s -> 4 gaps of 0.2 s (arrival unused)
    out = SimpleNamespace(metrics={"arrival_time": 9.0, "first_token_time": 10.0, "finished_time": 10.8})
    assert bench_latency.request_tpot(out, 5) == pytest.approx(0.2)


def test_bench_latency_cpu(tmp_path):
    path = tmp_path / "latency.json"
    out = run_script(["bench_latency.py", "--batch-sizes", "1,3", "--input-len", "20", "--output-len", "5",
                      "--repeats", "2", "--json", str(path)])
    for field in ("small configuration", "TTFT ms", "TPOT ms", "decode tok/s"):
        assert field in out, (field, out)
    res = json.loads(path.read_text())
    assert (res["input_len"], res["output_len"], res["repeats"]) == (20, 5, 2)
    assert [r["batch_size"] for r in res["results"]] == [1, 3]
    for r in res["results"]:
        assert len(r["ttft_s_all"]) == len(r["tpot_s_all"]) == len(r["e2e_s_all"]) == 2
        for tpot, full in zip(r["tpot_s_all"], r["e2e_s_all"]):
            assert 0 < tpot * 4 < full  # the requests' own first to last token: inside the full generate
        assert r["ttft_s"] > 0 and r["e2e_s"] > 0
        assert r["decode_tok_per_s"] == pytest.approx(r["batch_size"] / r["tpot_s"])
