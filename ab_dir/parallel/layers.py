"""Tensor-parallel layers (Megatron-style), with vLLM's names.

Column-parallel layers split the output features across ranks and need no communication; row-parallel
layers split the input features and all-reduce their partial sums. A transformer block therefore does two
all-reduces: after the attention output projection and after the MLP down projection.

Each parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that cuts this rank's part
out of the full checkpoint tensor, so the loader never guesses how a tensor is sharded.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from parallel.distributed import ParallelContext


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, allow_split: bool = False):
    """F.linear, except at decode batch sizes on CUDA, where Triton kernels read the weight faster than
    cuBLAS: workers.kernels.small_linear for one row, workers.kernels.decode_gemm for up to 256 (imported
    lazily so CPU-only use never needs triton). With ``allow_split`` the result may be decode_gemm's
    ``SplitSums`` (float32 partial sums over K) instead of a tensor."""
    if x.is_cuda and x.dim() == 2:
        if x.shape[0] == 1:
            from workers.kernels import small_linear
            if small_linear.supports(x, weight):
                return small_linear.small_linear(x, weight, bias)
        else:
            from workers.kernels import decode_gemm
            config = decode_gemm.choose_config(x, weight, allow_split=allow_split)
            if config is not None:
                return decode_gemm.decode_gemm(x, weight, config, bias)
    return F.linear(x, weight, bias)


def _make_param(shape, dtype, loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by rows (output features); each rank returns its slice of y."""

    def __init__(self, input_size: int, output_size: int, ctx: ParallelContext, bias: bool = False,
                 dtype: torch.dtype = torch.float32, output_size_per_rank: Optional[int] = None):
        super().__init__()
        self.ctx = ctx
        self.output_size_per_rank = output_size_per_rank or _divide(output_size, ctx.world_size, "output size")
        self.weight = _make_param((self.output_size_per_rank, input_size), dtype, self.load_column)
        self.bias = _make_param((self.output_size_per_rank,), dtype, self.load_column) if bias else None

    def load_column(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.ctx.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (e.g. gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], ctx: ParallelContext, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), ctx, bias, dtype)
        self.weight.weight_loader = self.load_merged
        if self.bias is not None:
            self.bias.weight_loader = self.load_merged

    def load_merged(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        tp = self.ctx.world_size
        size = self.output_sizes[shard_id] // tp
        offset = sum(self.output_sizes[:shard_id]) // tp
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.ctx.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, split by attention head.

    Ranks get whole KV heads together with the query heads that share them (their GQA group). When the KV
    heads do not divide evenly, the first ranks get one more (SmolLM2-135M has 9 query / 3 KV heads, so at
    TP 2 rank 0 holds 6 query heads and rank 1 holds 3); ``head_partition`` tells the output projection
    which slice of its input each rank owns. When there are fewer KV heads than ranks, each KV head is
    replicated on ``world_size / num_kv_heads`` ranks (as vLLM does), so every rank holds exactly one.
    """

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 ctx: ParallelContext, bias: bool = False, dtype: torch.dtype = torch.float32):
        tp, rank = ctx.world_size, ctx.rank
        self.head_dim = head_dim
        group = _divide(total_num_heads, total_num_kv_heads, "number of attention heads per KV head: heads")
        if total_num_kv_heads >= tp:
            base, extra = divmod(total_num_kv_heads, tp)
            self.num_kv_heads = base + (rank < extra)
            self.kv_head_start = rank * base + min(rank, extra)
            self.num_heads, self.q_head_start = self.num_kv_heads * group, self.kv_head_start * group
        else:
            replicas = _divide(tp, total_num_kv_heads,
                               f"tensor_parallel_size with {total_num_kv_heads} KV heads: world size")
            self.num_kv_heads = 1
            self.kv_head_start = rank // replicas
            self.num_heads = _divide(total_num_heads, tp, "number of attention heads")
            self.q_head_start = rank * self.num_heads
        per_rank = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, per_rank * tp, ctx, bias, dtype, output_size_per_rank=per_rank)
        self.weight.weight_loader = self.load_qkv
        if self.bias is not None:
            self.bias.weight_loader = self.load_qkv

    @property
    def head_partition(self):
        """(offset, size) of this rank's attention output features, for the output projection."""
        return self.q_head_start * self.head_dim, self.num_heads * self.head_dim

    def load_qkv(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        d = self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            dst, src = param.data.narrow(0, 0, q_size), loaded.narrow(0, self.q_head_start * d, q_size)
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            dst = param.data.narrow(0, offset, kv_size)
            src = loaded.narrow(0, self.kv_head_start * d, kv_size)
        dst.copy_(src)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by columns (input features); partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, ctx: ParallelContext, bias: bool = False,
                 dtype: torch.dtype = torch.float32, input_partition: Optional[tuple] = None):
        super().__init__()
        self.ctx = ctx
        # (offset, size) of this rank's input features; an even split unless the caller says otherwise
        if input_partition is None:
            size = _divide(input_size, ctx.world_size, "input size")
            input_partition = (ctx.rank * size, size)
        self.input_offset, self.input_size_per_rank = input_partition
        self.weight = _make_param((output_size, self.input_size_per_rank), dtype, self.load_row)
        self.bias = _make_param((output_size,), dtype, self.load_full) if bias else None

    def load_row(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded.narrow(1, self.input_offset, self.input_size_per_rank))

    @staticmethod
    def load_full(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor):
        # Split-K sums only on one rank, where the next RMSNorm adds them up for free; across ranks the
        # all-reduce needs one tensor, so they would cost a reduction kernel first. (The device-side index
        # assert once seen at TP 2 with split sums was the staging race fixed in 2687bdf: docs/kernels.md.)
        return self.reduce(_linear(x, self.weight, allow_split=self.ctx.world_size == 1))

    def reduce(self, partial):
        """This rank's x W^T (however it was computed) -> the layer's output: all-reduce, then the bias.

        Split-K partial sums (workers.kernels.decode_gemm.SplitSums) pass through unreduced on one rank
        without a bias: the RMSNorm that consumes the output adds them up (fused.rmsnorm)."""
        if not isinstance(partial, torch.Tensor):
            if self.ctx.world_size == 1 and self.bias is None:
                return partial
            from workers.kernels.decode_gemm import reduce_splits
            partial = reduce_splits(partial)
        y = self.ctx.all_reduce(partial)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by vocabulary rows; ids outside a rank's range contribute zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ctx: ParallelContext,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.ctx = ctx
        self.num_embeddings = num_embeddings
        self.num_per_rank = -(-num_embeddings // ctx.world_size)  # ceil: the last rank is zero-padded
        self.vocab_start = ctx.rank * self.num_per_rank
        self.weight = _make_param((self.num_per_rank, embedding_dim), dtype, self.load_vocab)

    def load_vocab(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        n = max(0, min(self.num_per_rank, self.num_embeddings - self.vocab_start))
        param.data.zero_()
        param.data[:n].copy_(loaded[self.vocab_start:self.vocab_start + n])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_range = (local >= 0) & (local < self.num_per_rank)
        out = F.embedding(local.clamp(0, self.num_per_rank - 1), self.weight)
        out = out * in_range.unsqueeze(-1).to(out.dtype)
        return self.ctx.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection split by vocabulary rows; full logits are gathered on rank 0 only."""

    def forward(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        logits = F.linear(hidden, self.weight)
        logits = self.ctx.gather_last_dim(logits)
        return None if logits is None else logits[..., :self.num_embeddings]
