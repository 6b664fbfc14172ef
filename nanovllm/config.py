"""EngineConfig: the one place where block size, dtype and length limits are decided.

The scheduler reads it directly; the workers receive the same values in the init message
(``to_worker_config``), so both sides can never disagree about a limit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Optional

from parallel.protocol import WorkerConfig

DTYPE_NAMES = {"float32": "float32", "float": "float32", "float16": "float16", "half": "float16",
               "bfloat16": "bfloat16"}
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")


MAX_NUM_SEQS = 65535  # the attention kernels put the batch on a CUDA grid dimension (y or z: at most 65535)


@dataclass
class EngineConfig:
    model: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 16384
    gpu_memory_utilization: float = 0.9
    kvcache_block_size: Optional[int] = None  # None: the attention backend picks (16, or 64 on Hopper+)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    load_format: str = "auto"
    seed: int = 0
    attention_backend: str = "auto"
    num_gpu_blocks_override: Optional[int] = None
    cpu_kvcache_space_gib: float = 1.0
    distributed_executor_backend: str = "mp"  # "mp": spawn the workers; "torchrun": ranks started by torchrun
    tokenizer: Optional[str] = None

    # filled in by finalize()
    model_dir: str = ""
    hf_config: Optional[dict] = None

    def finalize(self) -> "EngineConfig":
        """Resolve "auto" values against the model and the machine; raise ValueError on a bad value."""
        from nanovllm.model_resolver import resolve_model  # GGUF files and built-in names -> HF directory

        self.model_dir = resolve_model(self.model)
        config_path = os.path.join(self.model_dir, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{self.model_dir} has no config.json: not a Hugging Face model directory")
        with open(config_path) as f:
            self.hf_config = json.load(f)
        self._check_ints()
        if self.device == "auto":
            self.device = "cuda" if _cuda_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: must be 'auto', 'cpu' or 'cuda'")
        if self.device == "cuda" and self.distributed_executor_backend == "mp":
            import torch
            if torch.cuda.device_count() < self.tensor_parallel_size:
                raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} but only "
                                 f"{torch.cuda.device_count()} CUDA device(s) are visible")
        self.dtype = self._resolve_dtype()
        limit = self.hf_config.get("max_position_embeddings")
        if self.max_model_len is None:
            self.max_model_len = limit or 4096
        elif limit and self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings "
                             f"({limit})")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}: choose one of {ATTENTION_BACKENDS}")
        if self.attention_backend == "flash_attn":
            self._check_flash_attn()
        if self.device == "cpu" and self.attention_backend == "triton":
            raise ValueError("attention_backend='triton' needs a CUDA device: on CPU use 'auto' or 'torch'")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format={self.load_format!r}: must be 'auto' or 'dummy'")
        if self.distributed_executor_backend not in ("mp", "torchrun"):
            raise ValueError(f"distributed_executor_backend={self.distributed_executor_backend!r}: 'mp' or 'torchrun'")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        return self

    def _check_ints(self) -> None:
        for name, minimum in (("tensor_parallel_size", 1), ("max_num_seqs", 1), ("max_num_batched_tokens", 1),
                              ("seed", 0)):
            value = getattr(self, name)
            if not _is_int_at_least(value, minimum):
                raise ValueError(f"{name}={value!r}: must be an int >= {minimum}")
        if self.max_num_seqs > MAX_NUM_SEQS:
            raise ValueError(f"max_num_seqs={self.max_num_seqs}: must be at most {MAX_NUM_SEQS} (a decode batch is "
                             "one dimension of the attention kernels' CUDA grid)")
        block = self.kvcache_block_size
        if block is not None and not (_is_int_at_least(block, 1) and block & (block - 1) == 0):
            raise ValueError(f"kvcache_block_size={block!r}: must be a power of two, or None for the attention "
                             "backend's choice")
        if self.max_model_len is not None and not _is_int_at_least(self.max_model_len, 1):
            raise ValueError(f"max_model_len={self.max_model_len!r}: must be a positive int")

    def _check_flash_attn(self) -> None:
        """attention_backend='flash_attn': CUDA, an importable FlashAttention (3 or 2), fp16/bf16, and for FA2 a
        block size that is a multiple of 256. Checked here so the error comes before any worker starts."""
        from workers import flash_attention

        if self.device == "cpu":
            raise ValueError("attention_backend='flash_attn' needs a CUDA device: on CPU use 'auto' or 'torch'")
        problem = flash_attention.flash_attn_problem(self.dtype, self.kvcache_block_size or 0,
                                                     flash_attention.flash_attn_version())
        if problem:
            raise ValueError(problem)

    def _resolve_dtype(self) -> str:
        if self.dtype != "auto":
            name = DTYPE_NAMES.get(str(self.dtype).replace("torch.", ""))
            if name is None:
                raise ValueError(f"dtype={self.dtype!r}: choose 'auto', 'float32', 'float16' or 'bfloat16'")
            return name
        if self.device == "cpu":
            return "float32"  # CPU matmuls are fastest and exact in float32
        ckpt = str(self.hf_config.get("torch_dtype") or self.hf_config.get("dtype") or "bfloat16")
        return {"float16": "float16"}.get(ckpt, "bfloat16")  # float32 checkpoints run in bf16 on GPU

    def to_worker_config(self, dist_init: str) -> WorkerConfig:
        return WorkerConfig(
            model=self.model_dir, dtype=self.dtype, device=self.device, load_format=self.load_format,
            block_size=self.kvcache_block_size or 0, max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            gpu_memory_utilization=float(self.gpu_memory_utilization), enforce_eager=bool(self.enforce_eager),
            attention_backend=self.attention_backend, seed=self.seed, world_size=self.tensor_parallel_size,
            dist_init=dist_init, num_gpu_blocks_override=self.num_gpu_blocks_override or 0,
            cpu_kvcache_space_bytes=int(self.cpu_kvcache_space_gib * (1 << 30)),
        )


ENGINE_ARGS = tuple(f.name for f in fields(EngineConfig) if f.name not in ("model", "model_dir", "hf_config"))


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _is_int_at_least(value, minimum: int) -> bool:
    """An int (not a bool, which Python counts as one) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
