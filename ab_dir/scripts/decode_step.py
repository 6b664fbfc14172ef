"""GPU only: one decode step at batch 256 with 1024-token contexts, against its bandwidth floor.

    python scripts/decode_step.py [--batch 256] [--context 1024] [--json out.json]

Qwen3-0.6B shape, dummy bf16 weights. Runs `batch` prompts of `context - 1` random tokens for 40 output
tokens with the engine's step log on (NANOVLLM_STEP_TIMING), keeps the steps where every sequence
decodes (contexts `context` .. `context + 39`), and prints the median time between their results against
the floor: the weights once plus every cached K/V token once, at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

os.environ["NANOVLLM_STEP_TIMING"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--json")
    args = p.parse_args()
    bandwidth = bench.probe_device(bandwidth=True)["copy_bandwidth_bytes_per_s"]
    cfg = bench.QWEN3_0_6B
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp, \
            LLM(bench.write_config_dir(cfg, tmp), load_format="dummy", max_model_len=4096,
                skip_tokenizer_init=True) as llm:
        prompts = [[rng.randint(0, 10000) for _ in range(args.context - 1)] for _ in range(args.batch)]
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=40)
        llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
        engine = llm.llm_engine
        start = len(engine.step_log)
        llm.generate(prompts, params, use_tqdm=False)
        log = engine.step_log[start:]
    steps = [(t1 - t0, kv) for (t0, *_), (t1, seqs, tokens, kv) in zip(log, log[1:])
             if seqs == tokens == args.batch]
    seconds = sorted(s for s, _ in steps)[len(steps) // 2]
    kv_tokens = sorted(kv for _, kv in steps)[len(steps) // 2]
    floor = (bench.weight_bytes_per_step(cfg, 1, 2) + kv_tokens * bench.kv_bytes_per_token(cfg, 1, 2)) / bandwidth
    print(f"decode step, batch {args.batch}, ~{kv_tokens // args.batch} cached tokens each: "
          f"{seconds * 1e3:.3f} ms (median of {len(steps)} steps); floor {floor * 1e3:.3f} ms at "
          f"{bandwidth / 1e9:,.0f} GB/s = {seconds / floor:.2f}x the floor")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "context": args.context, "step_seconds": seconds, "floor_seconds": floor,
                       "kv_tokens": kv_tokens, "copy_bandwidth": bandwidth, "steps": len(steps)}, f, indent=1)


if __name__ == "__main__":
    main()
