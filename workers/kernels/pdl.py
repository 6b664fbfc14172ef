"""Programmatic dependent launch (PDL, Hopper and later) for the Triton kernels of a decode step.

A decode step at small batch is a chain of ~10 short kernels per layer, and between two of them the GPU
normally idles for the next kernel's launch and ramp-up (scripts/probe.py: a GEMM's output RMSNorm adds
~2 us to a ~4 us GEMM). Launched with PDL, a kernel starts while its predecessor is still finishing and
waits on-device (``griddepcontrol.wait``) before its first memory access, so the launch latency is hidden.
CUDA graphs keep these edges. The rule that makes it safe: every kernel launched this way waits first
(``enter``), so no kernel can finish, and none after it start reading, before its predecessor completed.

``NANOVLLM_PDL=0`` turns it off, ``NANOVLLM_PDL=-gemm,-attention`` for the named kernel families only
(norm, rope, silu, attention, gemm, sampler): for A/B measurements.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device, family: str) -> bool:
    """Whether this family's kernels on this device launch with PDL (CUDA, compute capability 9.0+, not
    turned off)."""
    setting = os.environ.get("NANOVLLM_PDL", "1")
    if device.type != "cuda" or setting == "0" or f"-{family}" in setting.split(","):
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def enter(PDL: tl.constexpr):
    """First thing in a PDL-launched kernel: wait until the previous kernel has completed (its writes are
    visible), then let the next kernel launch (it will wait likewise)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
