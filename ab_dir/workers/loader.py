"""Weight loading from Hugging Face safetensors checkpoints.

Checkpoint names are mapped onto our (merged, sharded) parameters by an explicit table: a name is split
into ``<module path>.<module>.<leaf>`` and only ``<module>`` is looked up in the model's ``packed_modules``.
Every missing and every unexpected tensor is reported by name.
"""

from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch import nn

# tensors some checkpoints carry that are not parameters (recomputed here)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_name_to_param(name: str, packed_modules: dict):
    """``model.layers.0.self_attn.q_proj.weight`` -> (``model.layers.0.self_attn.qkv_proj.weight``, "q")."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in packed_modules:
        target, shard_id = packed_modules[parts[-2]]
        return ".".join(parts[:-2] + [target, parts[-1]]), shard_id
    return name, None


def expected_checkpoint_names(model: nn.Module) -> set:
    """Every checkpoint tensor name the model needs (a merged parameter needs each of its sources)."""
    sources = {}
    for ckpt_module, (target, _) in model.packed_modules.items():
        sources.setdefault(target, []).append(ckpt_module)
    names = set()
    for param_name, _ in model.named_parameters():  # tied weights appear once, under the embedding
        parts = param_name.split(".")
        if parts[-2] in sources:
            names.update(".".join(parts[:-2] + [src, parts[-1]]) for src in sources[parts[-2]])
        else:
            names.add(param_name)
    return names


def load_weights(model: nn.Module, model_dir: str) -> None:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    params = dict(model.named_parameters())
    expected = expected_checkpoint_names(model)
    tied = getattr(model.spec, "tie_word_embeddings", False)
    seen, unexpected = set(), []
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                if name not in expected:
                    unexpected.append(name)
                    continue
                param_name, shard_id = checkpoint_name_to_param(name, model.packed_modules)
                param = params[param_name]
                loaded = f.get_tensor(name).to(param.dtype)
                loader = getattr(param, "weight_loader", None)
                with torch.no_grad():
                    if loader is None:
                        if loaded.shape != param.shape:
                            raise ValueError(f"{name}: checkpoint shape {tuple(loaded.shape)}, "
                                             f"model expects {tuple(param.shape)}")
                        param.data.copy_(loaded)
                    elif shard_id is None:
                        loader(param, loaded)
                    else:
                        loader(param, loaded, shard_id)
                seen.add(name)
    missing = sorted(expected - seen)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            problems.append(f"unexpected tensors: {', '.join(sorted(unexpected)[:20])}")
        raise ValueError(f"checkpoint {model_dir} does not match the model: " + "; ".join(problems))


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights for benchmarks (``load_format="dummy"``): small values so activations stay finite."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                values = torch.empty(param.shape, dtype=torch.float32).uniform_(-0.02, 0.02, generator=gen)
                param.copy_(values)
