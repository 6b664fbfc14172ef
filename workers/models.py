"""The Llama family (Llama 2/3, SmolLM2, Qwen2, Qwen3) as one tensor-parallel decoder.

The three architectures differ only in a few switches (q/k/v bias, per-head q/k RMSNorm, rope scaling,
tied embeddings), so one class with a ``ModelSpec`` reads more plainly than three near-copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from parallel.distributed import ParallelContext
from parallel.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                             VocabParallelEmbedding)
from workers.layers import Attention, AttentionMetadata, RMSNorm, RotaryEmbedding, SiluAndMul

# architecture name in config.json -> the switches that differ between them
ARCHITECTURES = {
    "LlamaForCausalLM": dict(qkv_bias=None, qk_norm=False),  # None: read "attention_bias"
    "Qwen2ForCausalLM": dict(qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(qkv_bias=None, qk_norm=True),
}


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelSpec":
        archs = cfg.get("architectures") or []
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            raise ValueError(f"unsupported model architecture {archs or cfg.get('model_type')!r}; "
                             f"supported: {', '.join(sorted(ARCHITECTURES))}")
        arch = known[0]
        switches = ARCHITECTURES[arch]
        # transformers 5 moved rope_theta / rope_scaling into rope_parameters; read either layout
        rope = dict(cfg.get("rope_parameters") or {})
        rope.update(cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) not in (None, "default") else None
        heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if switches["qkv_bias"] is None else switches["qkv_bias"],
            o_bias=attention_bias if arch == "LlamaForCausalLM" else False,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=switches["qk_norm"],
        )


class DecoderAttention(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: ParallelContext, dtype, backend, max_position: int):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, ctx,
                                          bias=spec.qkv_bias, dtype=dtype)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size, self.kv_size = self.num_heads * spec.head_dim, self.num_kv_heads * spec.head_dim
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, ctx, bias=spec.o_bias,
                                        dtype=dtype, input_partition=self.qkv_proj.head_partition)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
        self.qk_norm = spec.qk_norm
        self.rotary_emb = RotaryEmbedding(spec.head_dim, max_position, spec.rope_theta, spec.rope_scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, spec.head_dim, spec.head_dim ** -0.5, backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if x.is_cuda and self.attn.k_cache is not None:
            # decode batch sizes: q/k norms, rotary and the K/V cache write run in the projection's epilogue
            from workers.kernels import decode_gemm
            proj = self.qkv_proj
            config = decode_gemm.choose_qkv_rope_config(x, proj.weight, self.head_dim, self.qk_norm)
            if config is not None:
                qkv = decode_gemm.qkv_rope(
                    x, proj.weight, proj.bias, config, self.num_heads, self.num_kv_heads, self.head_dim, positions,
                    self.rotary_emb.cos_sin, *self._qk_norm_args(), self.attn.k_cache, self.attn.v_cache,
                    meta.slot_mapping)
                q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
                return self.o_proj(self.attn(q, k, v, meta, kv_stored=True))
        return self.attend(positions, self.qkv_proj(x), meta)

    def _qk_norm_args(self) -> tuple:
        """(q_norm weight, k_norm weight, eps) for the fused kernels; (None, None, 0.0) without q/k norms."""
        if not self.qk_norm:
            return None, None, 0.0
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Everything after the q/k/v projection: norms, rotary, the cache write, attention, o_proj."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        if q.is_cuda and self.attn.k_cache is not None:
            # q/k RMSNorm and rotary in one kernel, in place on the qkv output, which also writes this
            # step's K/V into the paged cache
            from workers.kernels.fused import qk_norm_rope
            v = v.view(-1, self.num_kv_heads, self.head_dim)
            qk_norm_rope(q, k, positions, self.rotary_emb.cos_sin, *self._qk_norm_args(),
                         v=v, k_cache=self.attn.k_cache, v_cache=self.attn.v_cache, slot_mapping=meta.slot_mapping)
            return self.o_proj(self.attn(q, k, v, meta, kv_stored=True))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class DecoderMLP(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: ParallelContext, dtype):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [spec.intermediate_size] * 2, ctx,
                                                       bias=spec.mlp_bias, dtype=dtype)
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, ctx, bias=spec.mlp_bias,
                                           dtype=dtype)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor):
        if x.is_cuda:  # at decode batch sizes the SiLU-and-mul runs inside the gate/up projection
            from workers.kernels import decode_gemm
            gate_up = self.gate_up_proj
            config = decode_gemm.choose_config(x, gate_up.weight, silu_mul=True)
            if config is not None:
                return self.down_proj(decode_gemm.decode_gemm(x, gate_up.weight, config, gate_up.bias, silu_mul=True))
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: ParallelContext, dtype, backend, max_position: int):
        super().__init__()
        self.self_attn = DecoderAttention(spec, ctx, dtype, backend, max_position)
        self.mlp = DecoderMLP(spec, ctx, dtype)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)

    def forward(self, positions, hidden, residual, meta):
        """(hidden, residual) -> the same for the next layer. On CUDA ``hidden`` between layers may be the
        down projection's split-K partial sums, which the next RMSNorm adds up."""
        if positions.is_cuda and positions.shape[0] == 1 and self._one_row_kernels_fit(hidden):
            return self._forward_one_row(positions, hidden, residual, meta)
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def _one_row_kernels_fit(self, hidden: torch.Tensor) -> bool:
        from workers.kernels.small_linear import supports, weight_fits
        return (supports(hidden, self.self_attn.qkv_proj.weight) and weight_fits(self.mlp.gate_up_proj.weight)
                and weight_fits(self.mlp.down_proj.weight))

    def _forward_one_row(self, positions, hidden, residual, meta):
        """One token (batch-1 decode) on CUDA: both RMSNorms and the SiLU-and-mul run inside the projections
        that follow them (workers.kernels.small_linear): 3 kernels a layer fewer, at a size where every
        launch costs more than its work."""
        from workers.kernels import small_linear
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv, residual = small_linear.rmsnorm_linear(hidden, residual, norm1.weight, norm1.eps, attn.qkv_proj.weight,
                                                    attn.qkv_proj.bias)
        hidden = attn.attend(positions, qkv, meta)
        gate_up, residual = small_linear.rmsnorm_linear(hidden, residual, norm2.weight, norm2.eps,
                                                        mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
        return mlp.down_proj.reduce(small_linear.silu_mul_linear(gate_up, mlp.down_proj.weight)), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: ParallelContext, dtype, backend, max_position: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, ctx, dtype)
        self.layers = nn.ModuleList(DecoderLayer(spec, ctx, dtype, backend, max_position)
                                    for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, meta):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """Llama / Qwen2 / Qwen3 for causal LM, tensor-parallel over ``ctx``."""

    # checkpoint module name -> (our merged module, shard id); the loader maps names with this table only
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: ModelSpec, ctx: ParallelContext, dtype: torch.dtype, backend, max_position: int):
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec, ctx, dtype, backend, max_position)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, ctx, dtype)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Full-vocabulary logits on rank 0, None elsewhere."""
        return self.lm_head(hidden)

    def attention_layers(self):
        return [layer.self_attn.attn for layer in self.model.layers]
