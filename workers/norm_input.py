"""The residual stream with its RMSNorm still to apply, passed between the decode projections that fold the
norms (workers.kernels.decode_gemm: the residual add in one projection's epilogue, the norm in the next one's
prologue). Here, free of Triton, so the model code can test for these types on any machine."""

from __future__ import annotations

from typing import NamedTuple

import torch


class NormInput(NamedTuple):
    """The residual stream ``x`` [M, N] after a projection added its output to it (``decode_gemm(...,
    residual=)``), with its rows' sums of squares in per-tile parts ``sumsq_parts`` [tiles, M] (float32):
    the next RMSNorm's input."""
    x: torch.Tensor
    sumsq_parts: torch.Tensor


class PendingNorm(NamedTuple):
    """RMSNorm(weight, eps) of ``source.x``, not computed yet: ``decode_gemm`` and ``qkv_rope`` apply it to
    their input tiles as they load them (from ``source.sumsq_parts``); any other consumer calls
    ``materialize``."""
    source: NormInput
    weight: torch.Tensor
    eps: float

    def materialize(self) -> torch.Tensor:
        from workers.kernels.fused import rmsnorm
        return rmsnorm(self.source.x, self.weight, self.eps)
