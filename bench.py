"""Throughput benchmark: nano-vLLM's workload, with a memory-bandwidth roofline.

    python bench.py                          # Qwen3-0.6B shape, random (dummy) weights, 256 sequences
    python bench.py --model DIR --tp 2 --runs 3 --json out.json

The default workload is nano-vLLM's bench.py: random.seed(0); 256 sequences; each prompt is
randint(100, 1024) random token ids drawn with randint(0, 10000); each max_tokens is randint(100, 1024);
temperature 0.6, ignore_eos; max_model_len 4096; one short warm-up generate, then the timed generate.

With no --model it writes Qwen3-0.6B's config.json into a temporary directory and runs it with
load_format="dummy" (random weights: the speed is the same as with the real checkpoint). On a machine
without CUDA it runs a small configuration instead (a tiny Qwen3-shaped model, 8 sequences of 16-64
prompt / 8-32 output tokens), so the command works anywhere; flags you give still win.

The roofline is the time the bytes the run had to move would take at the device's measured copy
bandwidth; see docs/benchmarks.md for the formula.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import os
import random
import tempfile
import time

from nanovllm import LLM, SamplingParams

# Qwen/Qwen3-0.6B's config.json, as published
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# the same architecture, shrunk so that a CPU runs it in seconds
TINY_QWEN3 = dict(QWEN3_0_6B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_window_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024,
                  bos_token_id=0, eos_token_id=1, max_position_embeddings=4096)

# workload defaults: nano-vLLM's on a GPU, a small one on CPU
FULL_WORKLOAD = dict(num_seqs=256, min_input_len=100, max_input_len=1024, min_output_len=100, max_output_len=1024)
SMALL_WORKLOAD = dict(num_seqs=8, min_input_len=16, max_input_len=64, min_output_len=8, max_output_len=32)

MAX_TOKEN_ID = 10000  # nano-vLLM draws prompt tokens with randint(0, 10000), both ends included
WARMUP_PROMPT = [1, 2, 3]  # one short prompt, like nano-vLLM's "Benchmark: " (3 tokens)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# ---- model directory ---------------------------------------------------------------------------------------

def write_config_dir(config: dict, root: str) -> str:
    """A model directory holding only config.json, for load_format="dummy"."""
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return root


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


# ---- the roofline ------------------------------------------------------------------------------------------

def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def heads_per_rank(cfg: dict, tp: int) -> tuple:
    """(query heads, KV heads) on rank 0, the busiest rank, of a tp-way split.

    As the engine splits them: whole KV heads with their query-head groups, the first ranks taking one
    more when they do not divide evenly; with fewer KV heads than ranks every rank holds one KV head.
    """
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if kv_heads >= tp:
        kv = _ceil_div(kv_heads, tp)
        return kv * (heads // kv_heads), kv
    return _ceil_div(heads, tp), 1


def weight_params(cfg: dict, tp: int = 1) -> dict:
    """Parameter counts on rank 0 of a tp-way split (the whole model when tp == 1), by part.

    Column-parallel (q/k/v, gate/up) and row-parallel (o, down) weights are split over the ranks, the
    embedding and LM head by vocabulary rows (rounded up); norms and row-parallel biases are replicated.
    ``lm_head`` is 0 when the embedding is tied (the one table serves both).
    """
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_heads, kv_heads = heads_per_rank(cfg, tp)
    arch = (cfg.get("architectures") or [""])[0]
    attention_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = arch == "Qwen2ForCausalLM" or attention_bias
    o_bias = arch == "LlamaForCausalLM" and attention_bias
    mlp_bias = bool(cfg.get("mlp_bias", False))

    q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
    inter_per_rank = _ceil_div(inter, tp)
    attention = hidden * (q_size + 2 * kv_size) + q_size * hidden  # qkv_proj + o_proj
    attention += (q_size + 2 * kv_size) * qkv_bias + hidden * o_bias
    if arch == "Qwen3ForCausalLM":
        attention += 2 * head_dim  # q_norm, k_norm
    mlp = 3 * hidden * inter_per_rank + (2 * inter_per_rank + hidden) * mlp_bias  # gate, up, down
    layer = attention + mlp + 2 * hidden  # + input and post-attention RMSNorm
    vocab_rows = _ceil_div(cfg["vocab_size"], tp)
    tied = bool(cfg.get("tie_word_embeddings", False))
    return {
        "embed": vocab_rows * hidden,
        "layers": cfg["num_hidden_layers"] * layer,
        "final_norm": hidden,
        "lm_head": 0 if tied else vocab_rows * hidden,
    }


def weight_bytes_per_step(cfg: dict, tp: int, dtype_bytes: int) -> int:
    """Bytes of weights rank 0 reads in one forward pass: all of its parameters, except an untied input
    embedding table, of which a step reads only the rows of its tokens (a tied table is read in full by
    the LM head)."""
    parts = weight_params(cfg, tp)
    params = sum(parts.values())
    if parts["lm_head"]:
        params -= parts["embed"]
    return params * dtype_bytes


def kv_bytes_per_token(cfg: dict, tp: int, dtype_bytes: int) -> int:
    """K and V of one token, all layers, on rank 0: 2 x layers x kv_heads x head_dim x dtype size."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    _, kv_heads = heads_per_rank(cfg, tp)
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def kv_tokens_read(prompt_len: int, output_len: int) -> int:
    """Cached tokens a sequence's attention reads over the o forward passes that produce its o output
    tokens: the pass for output i (i = 0 .. o-1) attends over p + i tokens, so o*p + o*(o-1)/2."""
    p, o = prompt_len, output_len
    return o * p + o * (o - 1) // 2


def kv_tokens_written(prompt_len: int, output_len: int) -> int:
    """Tokens whose K/V are written once: the prompt, plus every output token but the last (whose K/V
    no later step needs)."""
    return prompt_len + output_len - 1


def roofline_bytes(cfg: dict, tp: int, dtype_bytes: int, num_steps: int, prompt_lens, output_lens) -> dict:
    """The bytes rank 0 (the busiest rank) has to move in a run; each rank moves its own share at the
    same time, so these bytes over one device's bandwidth is the floor time.

    weights:  the weights once per engine step
    kv_read:  every cached K/V token read by attention (kv_tokens_read)
    kv_write: every K/V token written once (kv_tokens_written)
    """
    per_token = kv_bytes_per_token(cfg, tp, dtype_bytes)
    weights = num_steps * weight_bytes_per_step(cfg, tp, dtype_bytes)
    kv_read = per_token * sum(kv_tokens_read(p, o) for p, o in zip(prompt_lens, output_lens))
    kv_write = per_token * sum(kv_tokens_written(p, o) for p, o in zip(prompt_lens, output_lens))
    return {"weights": weights, "kv_read": kv_read, "kv_write": kv_write, "total": weights + kv_read + kv_write}


def measure_copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth of cuda:0 in bytes/s, counting bytes read + written (best of iters)."""
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(iters):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * nbytes / best


def probe_device(bandwidth: bool = False) -> dict:
    """What the benchmark reports about the machine: the device, and (with CUDA) its copy bandwidth.

    The CUDA work runs in a separate process, so this (scheduler) process never creates a CUDA context
    or holds GPU memory that the workers' KV-cache sizing would then have to leave free.
    """
    if not cuda_available():
        return {"device": f"cpu ({os.cpu_count()} cores)", "copy_bandwidth_bytes_per_s": None}
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_probe_cuda, bandwidth).result()


def _probe_cuda(bandwidth: bool) -> dict:
    import torch
    return {"device": f"cuda ({torch.cuda.get_device_name(0)} x{torch.cuda.device_count()})",
            "copy_bandwidth_bytes_per_s": measure_copy_bandwidth() if bandwidth else None}


# ---- workload ----------------------------------------------------------------------------------------------

def make_workload(num_seqs, min_input_len, max_input_len, min_output_len, max_output_len, max_token_id, seed=0):
    """nano-vLLM's draws, in its order: every prompt (length, then tokens), then every max_tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, max_token_id) for _ in range(rng.randint(min_input_len, max_input_len))]
               for _ in range(num_seqs)]
    max_tokens = [rng.randint(min_output_len, max_output_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def shift_tokens(prompts, shift: int, max_token_id: int):
    """The same prompts with every token id moved by `shift`: a run after the first must not find the
    earlier run's prompts in the prefix cache."""
    return [[(t + shift) % (max_token_id + 1) for t in p] for p in prompts]


# ---- main --------------------------------------------------------------------------------------------------

def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model, engine and output flags bench.py and bench_latency.py share (see engine_kwargs)."""
    p.add_argument("--model", help="HF directory, .gguf file or built-in name (default: Qwen3-0.6B shape, "
                                   "dummy weights)")
    p.add_argument("--load-format", choices=["auto", "dummy"], help="default: dummy without --model, else auto")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "flash_attn", "torch"])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=None,
                   help="kvcache_block_size (default: the attention backend's choice, 64 on Hopper with the Triton "
                        "backend, else 16)")
    p.add_argument("--small", action="store_true", help="the small CPU configuration, even on a GPU")
    p.add_argument("--json", help="write every number to this file")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--num-seqs", type=int)
    p.add_argument("--min-input-len", type=int)
    p.add_argument("--max-input-len", type=int)
    p.add_argument("--min-output-len", type=int)
    p.add_argument("--max-output-len", type=int)
    p.add_argument("--runs", type=int, default=1, help="timed runs (each is reported, then the median)")
    return p.parse_args(argv)


def fill_defaults(args, small: bool) -> None:
    """Workload flags left out take nano-vLLM's values, or the small ones."""
    for name, value in (SMALL_WORKLOAD if small else FULL_WORKLOAD).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def model_source(args, small: bool, tmp: str) -> tuple:
    """(model path, load_format) for the engine: --model as given, else Qwen3-0.6B's (or, small, a tiny
    Qwen3's) config.json written into tmp, with dummy weights."""
    if args.model:
        return args.model, args.load_format or "auto"
    return write_config_dir(TINY_QWEN3 if small else QWEN3_0_6B, tmp), args.load_format or "dummy"


def engine_kwargs(args, load_format: str) -> dict:
    return dict(tensor_parallel_size=args.tp, dtype=args.dtype, max_model_len=args.max_model_len,
                enforce_eager=args.enforce_eager, attention_backend=args.attention_backend,
                gpu_memory_utilization=args.gpu_memory_utilization, kvcache_block_size=args.block_size,
                load_format=load_format, skip_tokenizer_init=True)


def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache: a count that grows while the run compiles a kernel."""
    path = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return len(os.listdir(path)) if os.path.isdir(path) else 0


class GcPauses:
    """The garbage collections of this process (the engine's: it schedules every step) while active: how many
    of each generation and the seconds they took. A full (generation-2) collection walks every tracked
    object of the process, and while it runs no plan reaches the workers."""

    def __enter__(self) -> "GcPauses":
        self.counts, self.seconds, self._started = [0, 0, 0], 0.0, None
        gc.callbacks.append(self._callback)
        return self

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.counts[info["generation"]] += 1
            self.seconds += time.perf_counter() - self._started

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


def timed_run(llm, prompts, max_tokens, temperature=0.6) -> dict:
    """One timed generate of the whole workload; returns its numbers."""
    engine = llm.llm_engine
    params = [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=n) for n in max_tokens]
    steps_before = engine.scheduler.step_id
    preemptions_before = getattr(engine.scheduler, "num_preemptions", 0)
    kernels_before = triton_cache_entries()
    log_before = len(engine.step_log) if engine.step_log is not None else 0
    with GcPauses() as gc_pauses:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    step_log = engine.step_log[log_before:] if engine.step_log is not None else None
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "seconds": seconds,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "total_tokens": prompt_tokens + output_tokens,
        "output_tok_per_s": output_tokens / seconds,
        "total_tok_per_s": (prompt_tokens + output_tokens) / seconds,
        "engine_steps": engine.scheduler.step_id - steps_before,
        "preemptions": getattr(engine.scheduler, "num_preemptions", 0) - preemptions_before,
        "prefix_cache_hit_tokens": sum(o.num_cached_tokens for o in outputs),
        "output_lens": [len(o.token_ids) for o in outputs],
        "triton_kernels_compiled": triton_cache_entries() - kernels_before,
        "engine_gc_collections": gc_pauses.counts,  # by generation
        "engine_gc_seconds": gc_pauses.seconds,
        "step_log": [(t - start, *sizes) for t, *sizes in step_log] if step_log else None,
    }


def add_roofline(run: dict, cfg: dict, tp: int, dtype_bytes: int, prompt_lens, bandwidth) -> None:
    run["roofline_bytes"] = roofline_bytes(cfg, tp, dtype_bytes, run["engine_steps"], prompt_lens,
                                           run["output_lens"])
    if bandwidth:
        run["roofline_floor_s"] = run["roofline_bytes"]["total"] / bandwidth
        run["roofline_pct"] = 100 * run["roofline_floor_s"] / run["seconds"]


STEP_BUCKETS = ((1, 8), (9, 32), (33, 64), (65, 128), (129, 192), (193, 256), (257, 1 << 30))


def step_breakdown(run: dict, cfg: dict, tp: int, dtype_bytes: int, bandwidth: float) -> list:
    """Where the run's time went, from the engine's step log (NANOVLLM_STEP_TIMING=1): steps grouped into
    prefill-carrying steps and decode steps by batch size, each group's wall time (between consecutive
    results) against its floor (weights + K/V attended + K/V written, at the copy bandwidth)."""
    weights, per_token = weight_bytes_per_step(cfg, tp, dtype_bytes), kv_bytes_per_token(cfg, tp, dtype_bytes)
    groups, previous = {}, 0.0
    for t, seqs, tokens, kv_tokens in run["step_log"]:
        if tokens > seqs:
            name = "with prefill"
        else:
            name = next(f"decode {lo}-{hi}" if hi < 1 << 30 else f"decode {lo}+" for lo, hi in STEP_BUCKETS
                        if lo <= seqs <= hi)
        g = groups.setdefault(name, {"group": name, "steps": 0, "seconds": 0.0, "floor_s": 0.0})
        g["steps"] += 1
        g["seconds"] += t - previous
        g["floor_s"] += (weights + (kv_tokens + tokens) * per_token) / bandwidth
        previous = t
    for g in groups.values():
        g["ms_per_step"] = 1e3 * g["seconds"] / g["steps"]
        g["floor_ms_per_step"] = 1e3 * g["floor_s"] / g["steps"]
    order = ["with prefill"] + [f"decode {lo}-{hi}" if hi < 1 << 30 else f"decode {lo}+" for lo, hi in STEP_BUCKETS]
    return [groups[name] for name in order if name in groups]


def print_breakdown(groups: list) -> None:
    print(f"{'steps':>24} {'count':>6} {'seconds':>8} {'ms/step':>8} {'floor ms':>9} {'% of floor':>10}")
    for g in groups:
        print(f"{g['group']:>24} {g['steps']:>6} {g['seconds']:>8.3f} {g['ms_per_step']:>8.3f} "
              f"{g['floor_ms_per_step']:>9.3f} {100 * g['floor_s'] / g['seconds']:>9.1f}%")


def fmt_bytes(nbytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes:,.0f} B"


def print_run(label: str, run: dict) -> None:
    line = (f"{label}: {run['output_tokens']:,} output tok in {run['seconds']:.2f} s = "
            f"{run['output_tok_per_s']:,.0f} output tok/s, {run['total_tok_per_s']:,.0f} total tok/s, "
            f"{run['engine_steps']:,} steps")
    if "roofline_pct" in run:
        line += f", {run['roofline_pct']:.1f}% of roofline"
    if run.get("triton_kernels_compiled"):
        line += f", {run['triton_kernels_compiled']} Triton kernels compiled during the run"
    print(line, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = cuda_available()
    small = args.small or not cuda
    fill_defaults(args, small)
    probe = probe_device(bandwidth=cuda)
    bandwidth = probe["copy_bandwidth_bytes_per_s"]
    print(f"device: {probe['device']}")
    if small:
        why = "--small" if args.small else "no CUDA on this machine"
        print(f"small configuration ({why}): {'' if args.model else 'a tiny Qwen3-shaped model, '}"
              f"{args.num_seqs} sequences of {args.min_input_len}-{args.max_input_len} prompt / "
              f"{args.min_output_len}-{args.max_output_len} output tokens")

    if bandwidth:
        print(f"copy bandwidth: {bandwidth / 1e9:,.0f} GB/s (1 GiB device-to-device copy on cuda:0, read + write)")

    with tempfile.TemporaryDirectory(prefix="nanovllm-bench-") as tmp:
        model, load_format = model_source(args, small, tmp)
        with LLM(model, **engine_kwargs(args, load_format)) as llm:
            config = llm.llm_engine.config
            cfg, tp = config.hf_config, config.tensor_parallel_size
            dtype_bytes = DTYPE_BYTES[config.dtype]
            max_token_id = min(MAX_TOKEN_ID, cfg["vocab_size"] - 1)
            prompts, max_tokens = make_workload(args.num_seqs, args.min_input_len, args.max_input_len,
                                                args.min_output_len, args.max_output_len, max_token_id)
            prompt_lens = [len(p) for p in prompts]
            model_name = args.model or ("tiny Qwen3" if small else "Qwen3-0.6B shape")
            print(f"model: {model_name} ({load_format} weights), {config.dtype}, TP {tp}, "
                  f"attention {args.attention_backend}, enforce_eager={args.enforce_eager}, "
                  f"block size {config.kvcache_block_size}, {llm.llm_engine.executor.num_kv_blocks:,} KV blocks")
            print(f"workload: {len(prompts)} seqs, {sum(prompt_lens):,} prompt tokens, "
                  f"{sum(max_tokens):,} output tokens (max_tokens, ignore_eos), temperature 0.6")

            llm.generate([WARMUP_PROMPT], SamplingParams(), use_tqdm=False)
            runs = []
            for i in range(args.runs):
                run = timed_run(llm, shift_tokens(prompts, i, max_token_id), max_tokens)
                add_roofline(run, cfg, tp, dtype_bytes, prompt_lens, bandwidth)
                runs.append(run)
                if args.runs > 1:
                    print_run(f"run {i + 1}/{args.runs}", run)
                if run["output_tokens"] != sum(max_tokens):
                    print(f"WARNING: {run['output_tokens']} output tokens, expected {sum(max_tokens)}")

    # the median run by time: its numbers are reported together so they stay consistent with each other
    median = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    label = f" (median of {len(runs)} runs)" if len(runs) > 1 else ""
    rb = median["roofline_bytes"]
    per_rank = " per rank" if tp > 1 else ""
    print(f"\nresults{label}")
    print(f"output tokens:  {median['output_tokens']:,}")
    print(f"prompt tokens:  {median['prompt_tokens']:,}")
    print(f"seconds:        {median['seconds']:.3f}")
    print(f"output tok/s:   {median['output_tok_per_s']:,.1f}")
    print(f"total tok/s:    {median['total_tok_per_s']:,.1f}")
    print(f"engine steps:   {median['engine_steps']:,}")
    print(f"Triton kernels compiled during the run: {median['triton_kernels_compiled']}")
    print(f"engine-process garbage collections during the run: {median['engine_gc_collections'][2]} full, "
          f"{sum(median['engine_gc_collections'][:2])} young, {median['engine_gc_seconds'] * 1e3:.1f} ms in all")
    if median["preemptions"] or median["prefix_cache_hit_tokens"]:
        print(f"note: {median['preemptions']} preemptions, {median['prefix_cache_hit_tokens']} prefix-cache hit "
              "tokens (the roofline counts neither)")
    print(f"roofline bytes{per_rank}: {fmt_bytes(rb['total'])} = weights {fmt_bytes(rb['weights'])} "
          f"({fmt_bytes(weight_bytes_per_step(cfg, tp, dtype_bytes))} x {median['engine_steps']:,} steps) + "
          f"KV read {fmt_bytes(rb['kv_read'])} + KV write {fmt_bytes(rb['kv_write'])}")
    if bandwidth:
        print(f"roofline:       floor {median['roofline_floor_s']:.3f} s at {bandwidth / 1e9:,.0f} GB/s = "
              f"{median['roofline_pct']:.1f}% of roofline")
    else:
        print("roofline: n/a (no CUDA)")
    if median.get("step_log") and bandwidth:
        median["step_breakdown"] = step_breakdown(median, cfg, tp, dtype_bytes, bandwidth)
        print("\nwhere the time went (NANOVLLM_STEP_TIMING=1; floor = weights + K/V read and written at the copy "
              "bandwidth)")
        print_breakdown(median["step_breakdown"])

    result = {
        "device": probe["device"],
        "small": small,
        "model": args.model or ("tiny-qwen3" if small else "qwen3-0.6b-shape"),
        "load_format": load_format,
        "dtype": config.dtype,
        "tensor_parallel_size": tp,
        "kvcache_block_size": config.kvcache_block_size,
        "args": vars(args),
        "hf_config": cfg,
        "workload": {"num_seqs": len(prompts), "prompt_lens": prompt_lens, "max_tokens": max_tokens,
                     "temperature": 0.6, "ignore_eos": True, "seed": 0},
        "weight_params": weight_params(cfg, tp),
        "weight_bytes_per_step": weight_bytes_per_step(cfg, tp, dtype_bytes),
        "kv_bytes_per_token": kv_bytes_per_token(cfg, tp, dtype_bytes),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "runs": runs,
        "median": median,
    }
    write_json(args.json, result)
    return result


def write_json(path, result: dict) -> None:
    """Write a benchmark's result (all numbers) when --json asked for it."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
