"""Latency benchmark: time to first token (TTFT) and time per output token (TPOT) at several batch sizes.

    python bench_latency.py                                  # Qwen3-0.6B shape, dummy weights, batch 1, 8, 64
    python bench_latency.py --model DIR --tp 2 --batch-sizes 1,16 --json out.json

For each batch size B: one warm-up generate, then `--repeats` times
  TTFT = the time of a generate of B prompts (input-len random tokens each) with max_tokens=1
  full = the time of a generate of B fresh prompts with max_tokens=output-len
  TPOT = in that full generate, per request (finished_time - first_token_time) / (output-len - 1), from the
         engine's RequestOutput.metrics (vLLM's definition: each request against its own first token),
         the median over the requests
and the median of each over the repeats is reported. Greedy, ignore_eos, so every sequence makes exactly
output-len tokens. (Until 2026-12-02 TPOT was (full - TTFT) / (output-len - 1) with the TTFT of the separate
generate before it, which carried that generate's run-to-run spread, e.g. 15-32 ms at batch 8 on an H200, into
TPOT; the JSON's e2e_s_all and ttft_s_all still give that figure.)
Every generate gets prompts it has not seen, so the prefix cache never shortens a prefill.
On a machine without CUDA a small configuration runs instead (a tiny Qwen3-shaped model, batch 1 and 4,
32 prompt / 8 output tokens); flags you give still win.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

from bench import (MAX_TOKEN_ID, WARMUP_PROMPT, add_engine_args, cuda_available, engine_kwargs, model_source,
                   probe_device, write_json)
from nanovllm import LLM, SamplingParams

FULL_DEFAULTS = dict(batch_sizes="1,8,64", input_len=512, output_len=256)
SMALL_DEFAULTS = dict(batch_sizes="1,4", input_len=32, output_len=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--batch-sizes", help="comma-separated (default 1,8,64)")
    p.add_argument("--input-len", type=int, help="prompt tokens per sequence (default 512)")
    p.add_argument("--output-len", type=int, help="output tokens per sequence (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per batch size (the median is reported)")
    return p.parse_args(argv)


def timed_generate(llm, rng, batch_size: int, input_len: int, max_tokens: int, max_token_id: int):
    """(seconds, RequestOutputs) of one generate of batch_size fresh random prompts; checks every sequence ran
    to max_tokens."""
    prompts = [[rng.randint(0, max_token_id) for _ in range(input_len)] for _ in range(batch_size)]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    assert all(len(o.token_ids) == max_tokens for o in outputs), "a sequence stopped before max_tokens"
    return seconds, outputs


def request_tpot(output, output_len: int) -> float:
    """Seconds per output token after the first, for one finished request (its own engine timestamps)."""
    return (output.metrics["finished_time"] - output.metrics["first_token_time"]) / (output_len - 1)


def measure(llm, batch_size: int, input_len: int, output_len: int, repeats: int, max_token_id: int) -> dict:
    rng = random.Random(batch_size)
    timed_generate(llm, rng, batch_size, input_len, min(output_len, 4), max_token_id)  # warm-up at this shape
    ttfts, fulls, tpots = [], [], []
    for _ in range(repeats):
        ttft, _ = timed_generate(llm, rng, batch_size, input_len, 1, max_token_id)
        full, outputs = timed_generate(llm, rng, batch_size, input_len, output_len, max_token_id)
        ttfts.append(ttft)
        fulls.append(full)
        tpots.append(statistics.median(request_tpot(o, output_len) for o in outputs))
    tpot = statistics.median(tpots)
    return {
        "batch_size": batch_size,
        "ttft_s": statistics.median(ttfts),
        "tpot_s": tpot,
        "e2e_s": statistics.median(fulls),
        "decode_tok_per_s": batch_size / tpot,
        "ttft_s_all": ttfts,
        "tpot_s_all": tpots,
        "e2e_s_all": fulls,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = cuda_available()
    small = args.small or not cuda
    for name, value in (SMALL_DEFAULTS if small else FULL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    if args.output_len < 2:
        raise SystemExit("--output-len must be >= 2 (TPOT divides by output-len - 1)")
    device = probe_device()["device"]
    print(f"device: {device}")
    if small:
        why = "--small" if args.small else "no CUDA on this machine"
        print(f"small configuration ({why}): {'' if args.model else 'a tiny Qwen3-shaped model, '}"
              f"batch {args.batch_sizes}, {args.input_len} prompt / {args.output_len} output tokens")

    with tempfile.TemporaryDirectory(prefix="nanovllm-bench-") as tmp:
        model, load_format = model_source(args, small, tmp)
        with LLM(model, max_num_seqs=max(256, *batch_sizes), **engine_kwargs(args, load_format)) as llm:
            config = llm.llm_engine.config
            max_token_id = min(MAX_TOKEN_ID, config.hf_config["vocab_size"] - 1)
            model_name = args.model or ("tiny Qwen3" if small else "Qwen3-0.6B shape")
            print(f"model: {model_name} ({load_format} weights), {config.dtype}, TP {config.tensor_parallel_size}, "
                  f"attention {args.attention_backend}, enforce_eager={args.enforce_eager}")
            print(f"{args.input_len} prompt tokens, {args.output_len} output tokens, greedy, ignore_eos, "
                  f"median of {args.repeats}")
            llm.generate([WARMUP_PROMPT], SamplingParams(), use_tqdm=False)
            print(f"\n{'batch':>6} {'TTFT ms':>10} {'TPOT ms':>10} {'decode tok/s':>13} {'e2e s':>9}")
            results = []
            for batch_size in batch_sizes:
                r = measure(llm, batch_size, args.input_len, args.output_len, args.repeats, max_token_id)
                results.append(r)
                print(f"{batch_size:>6} {r['ttft_s'] * 1e3:>10.2f} {r['tpot_s'] * 1e3:>10.2f} "
                      f"{r['decode_tok_per_s']:>13,.0f} {r['e2e_s']:>9.3f}", flush=True)

    result = {
        "device": device,
        "small": small,
        "model": args.model or ("tiny-qwen3" if small else "qwen3-0.6b-shape"),
        "load_format": load_format,
        "dtype": config.dtype,
        "tensor_parallel_size": config.tensor_parallel_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "repeats": args.repeats,
        "args": vars(args),
        "results": results,
    }
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
