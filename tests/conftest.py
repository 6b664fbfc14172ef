"""Shared fixtures: tiny random-weight models written by transformers, with a small real tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = ("The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in fixed-size "
          "blocks; a scheduler batches requests continuously. 0123456789 tensor parallel ranks all-reduce. "
          "Hello world! How are you today? Language models predict the next token.") * 20


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.2)


def make_config(arch: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kw = dict(TINY, **overrides)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, tie_word_embeddings=False, **kw)
    if arch == "qwen3-wide":  # wide enough that decode_gemm splits o_proj / down_proj over K on the GPU
        kw.update(hidden_size=256, intermediate_size=512)
        return Qwen3Config(head_dim=64, tie_word_embeddings=False, **kw)
    if arch == "qwen2":  # head_dim 32: on the GPU its decode rows take decode_gemm.qkv_rope, with the bias
        kw.update(hidden_size=128)
        return Qwen2Config(tie_word_embeddings=True, **kw)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, **kw)
    if arch == "llama3-scaled":  # llama3 rope scaling, tied embeddings (SmolLM2-style), one KV head
        kw.update(num_key_value_heads=1)
        return LlamaConfig(tie_word_embeddings=True, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256}, **kw)
    if arch == "llama-128":  # head_dim 128, no q/k norm: on the GPU decode_gemm.qkv_rope runs a head as two programs
        kw.update(hidden_size=256, intermediate_size=512)
        return LlamaConfig(head_dim=128, tie_word_embeddings=False, **kw)
    if arch == "llama-uneven":  # 3 KV heads over 2 ranks: an uneven head split (like SmolLM2's 9/3 heads)
        kw.update(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
        return LlamaConfig(tie_word_embeddings=True, **kw)
    raise ValueError(arch)


def write_tiny_model(path: str, arch: str, seed: int = 0, **overrides) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, **overrides)
    config.eos_token_id = 0
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # make Qwen2's q/k/v biases non-trivial: zeros would hide a bias-loading bug
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    build_tokenizer(config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_model(str(root / arch), arch) for arch in ("qwen3", "qwen3-wide", "qwen2", "llama", "llama3-scaled",
                                                                         "llama-128", "llama-uneven")}


def hf_greedy(model_dir: str, prompts, max_new_tokens: int):
    """transformers' own greedy generate, the independent reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # run to max_new_tokens, like ignore_eos
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs
