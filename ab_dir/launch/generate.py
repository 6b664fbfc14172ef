"""Run the engine under torchrun: rank 0 hosts the scheduler, every rank drives one device.

    torchrun --nproc-per-node 2 launch/generate.py --model DIR --prompt "Hello" --max-tokens 32
    torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 --nproc-per-node 8 \
        launch/generate.py --model DIR ...        (several hosts: the model directory must exist on each)

Rank 0 builds ``LLM(..., distributed_executor_backend="torchrun")``, which publishes its ZeroMQ address in
torchrun's store and spawns its local worker; ranks >= 1 are workers that read that address, join the
process group (NCCL on GPU, gloo on CPU) and serve plans until the engine shuts down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face directory, .gguf file or built-in name")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompt-token-ids", help="a JSON file holding a list of token-id lists")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--output-json", help="write the outputs here (rank 0)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if rank != 0:
        from workers.worker import run_torchrun_worker
        run_torchrun_worker()
        return
    from nanovllm import LLM, SamplingParams

    prompts = list(args.prompt)
    if args.prompt_token_ids:
        with open(args.prompt_token_ids) as f:
            prompts += json.load(f)
    if not prompts:
        prompts = ["Hello, my name is", "The capital of France is"]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos)
    backend = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "mp"
    with LLM(args.model, tensor_parallel_size=world_size, distributed_executor_backend=backend, dtype=args.dtype,
             device=args.device, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for out in outputs:
        print(json.dumps({"prompt": out.prompt, "text": out.text, "finish_reason": out.finish_reason}))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump([{"prompt_token_ids": o.prompt_token_ids, "token_ids": o.token_ids, "text": o.text,
                        "finish_reason": o.finish_reason} for o in outputs], f)


if __name__ == "__main__":
    main()
