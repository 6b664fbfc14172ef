"""Process-group set-up and the collectives the model layers use.

A ``ParallelContext`` is passed explicitly to every tensor-parallel layer: there is no global "current
group". World size 1 is an ordinary context whose collectives do nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

TORCHRUN_ADDRESS_KEY = "nanovllm/engine_address"


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    group: Optional[object] = None  # the torch.distributed process group; None when world_size == 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Concatenate along the last dimension on rank 0; other ranks get None."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None


def torchrun_env() -> Optional[dict]:
    """The torchrun variables of this process, or None when it was not started by torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    return {
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
        "master_addr": os.environ["MASTER_ADDR"],
        "master_port": int(os.environ["MASTER_PORT"]),
    }


def torchrun_store(timeout_s: float = 300.0) -> dist.TCPStore:
    """A client of the key-value store torchrun's agent hosts at MASTER_ADDR:MASTER_PORT.

    Under torchrun (TORCHELASTIC_USE_AGENT_STORE=True, its default) the agent hosts the store and every
    process is a client; otherwise the rank-0 process hosts it. The engine publishes its ZeroMQ address
    there and the workers build their process group on it.
    """
    env = torchrun_env()
    if env is None:
        raise RuntimeError("torchrun_store() called in a process not started by torchrun")
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(
        env["master_addr"], env["master_port"], env["world_size"],
        is_master=(env["rank"] == 0 and not agent_hosts),
        timeout=timedelta(seconds=timeout_s), multi_tenant=True,
    )


def init_parallel(dist_init: str, rank: int, world_size: int, device: str,
                  timeout_s: float = 600.0) -> ParallelContext:
    """Join the process group of the ``world_size`` workers (NCCL on CUDA, gloo on CPU).

    ``dist_init`` is ``"host:port"`` of a TCPStore the engine hosts (spawned workers), or ``"torchrun"``.
    """
    if world_size == 1:
        return ParallelContext(rank=0, world_size=1)
    timeout = timedelta(seconds=timeout_s)
    if dist_init == "torchrun":
        store = dist.PrefixStore("nanovllm/pg", torchrun_store(timeout_s))
    else:
        host, port = dist_init.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timeout)
    backend = "nccl" if device == "cuda" else "gloo"
    kwargs = {}
    if device == "cuda":
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return ParallelContext(rank=rank, world_size=world_size, group=dist.group.WORLD)
