"""Starts the workers and talks to them: init handshake, one plan per step, results from rank 0.

Two ways to get workers: ``mp`` spawns one process per device on this host (``LLM(tensor_parallel_size=N)``);
``torchrun`` uses the ranks torchrun started (this process is rank 0 and spawns only its local worker; the
other ranks find the engine's address in torchrun's store). Either way every wait polls with a short
timeout and checks that the workers are alive, so a dead worker is reported within seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import timedelta
from typing import List, Optional

import torch.distributed as dist

from nanovllm.config import EngineConfig
from parallel.channels import EngineChannel
from parallel.distributed import TORCHRUN_ADDRESS_KEY, torchrun_env, torchrun_store
from parallel.protocol import (AllocateKVCache, Hello, Init, KVCacheReady, Ready, Shutdown, StepPlan, StepResult,
                               WorkerError)
from workers.worker import worker_main

POLL_MS = 100
STARTUP_TIMEOUT_S = 900.0  # loading a large model can take minutes
STEP_TIMEOUT_S = 900.0  # a long prefill or a first-run compile


class WorkerFailure(RuntimeError):
    """A worker raised or died; the message names the rank and the cause."""


class Executor:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.world_size = config.tensor_parallel_size
        self.processes: List[multiprocessing.Process] = []  # the workers this process spawned, by position
        self.process_ranks: List[int] = []
        self.store = None
        self.channel: Optional[EngineChannel] = None
        self.dead: Optional[str] = None
        self.num_kv_blocks = 0
        self.block_size = 0  # positions a KV block, as the workers report it (Ready)
        self._start()

    # ---- start-up ----------------------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.config
        spawn = multiprocessing.get_context("spawn")
        if cfg.distributed_executor_backend == "torchrun":
            env = torchrun_env()
            if env is None or env["rank"] != 0:
                raise RuntimeError("distributed_executor_backend='torchrun' needs this process to be torchrun rank 0")
            if env["world_size"] != self.world_size:
                raise ValueError(f"tensor_parallel_size={self.world_size} but torchrun started {env['world_size']} ranks")
            # the other ranks (maybe on other hosts) reach the engine where they reach torchrun's store
            self.channel = EngineChannel(env["master_addr"])
            dist_init = "torchrun"
            torchrun_store().set(TORCHRUN_ADDRESS_KEY, self.channel.address)
            ranks = [0]
        else:
            self.channel = EngineChannel("127.0.0.1")
            if self.world_size > 1:
                # the engine hosts the store the workers rendezvous on: port 0 lets the OS pick a free one
                self.store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=60),
                                           wait_for_workers=False)
                dist_init = f"127.0.0.1:{self.store.port}"
            else:
                dist_init = "none"
            ranks = list(range(self.world_size))
        for rank in ranks:
            p = spawn.Process(target=worker_main, args=(self.channel.address, rank, rank, os.getpid()),
                              name=f"nanovllm-worker-{rank}", daemon=True)
            p.start()
            self.processes.append(p)
            self.process_ranks.append(rank)
        try:
            self._handshake(cfg.to_worker_config(dist_init).__dict__)
        except BaseException:
            self.shutdown()
            raise

    def _handshake(self, worker_config: dict) -> None:
        all_ranks = range(self.world_size)
        for rank, msg in self._collect(Hello, all_ranks, STARTUP_TIMEOUT_S, "start"):
            self.channel.send(rank, Init(config=worker_config, rank=rank))
        ready = self._collect(Ready, all_ranks, STARTUP_TIMEOUT_S, "load the model")
        self.num_kv_blocks = min(msg.num_kv_blocks for _, msg in ready)
        # the configured block size, or the one every rank's attention backend picked (the same GPUs and
        # backend everywhere give the same one; anything else is refused rather than guessed at)
        sizes = {rank: msg.block_size for rank, msg in ready}
        if len(set(sizes.values())) != 1:
            raise RuntimeError(f"the workers chose different KV block sizes {sizes}: set kvcache_block_size")
        self.block_size = sizes[0]
        self.channel.broadcast(all_ranks, AllocateKVCache(num_kv_blocks=self.num_kv_blocks))
        self._collect(KVCacheReady, all_ranks, STARTUP_TIMEOUT_S, "allocate the KV cache")

    # ---- waiting with failure detection ------------------------------------------------------------------

    def _check_alive(self) -> None:
        for rank, p in zip(self.process_ranks, self.processes):
            if p.exitcode is not None:
                self._fail(f"worker rank {rank} died (exit code {p.exitcode})")

    def _root_cause(self, error: str) -> str:
        """A worker's collective fails when a peer dies: name the dead peer first, it is the real cause."""
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            dead = [(r, p.exitcode) for r, p in zip(self.process_ranks, self.processes) if p.exitcode is not None]
            dead = [(r, code) for r, code in dead if code != 1]  # exit code 1: a worker that reported its error
            if dead:
                rank, code = dead[0]
                return f"worker rank {rank} died (exit code {code}); then {error}"
            time.sleep(0.05)
        return error

    def _fail(self, why: str) -> None:
        self.dead = why
        self.shutdown()
        raise WorkerFailure(why)

    def _collect(self, kind, ranks, timeout_s: float, doing: str) -> list:
        """Wait for one message of ``kind`` from each of ``ranks``; returns [(rank, message)] in arrival order."""
        waiting, got = set(ranks), []
        deadline = time.monotonic() + timeout_s
        while waiting:
            if self.dead:
                raise WorkerFailure(self.dead)
            if self.channel.poll(POLL_MS):
                rank, msg = self.channel.recv()
                if isinstance(msg, WorkerError):
                    self._fail(self._root_cause(f"worker rank {msg.rank} failed: {msg.message}"))
                if not isinstance(msg, kind):
                    self._fail(f"worker rank {rank} sent {type(msg).__name__} while the engine expected "
                               f"{kind.__name__}")
                waiting.discard(rank)
                got.append((rank, msg))
                continue
            self._check_alive()
            if time.monotonic() > deadline:
                self._fail(f"workers {sorted(waiting)} did not {doing} within {timeout_s:.0f} s")
        return got

    # ---- steps -------------------------------------------------------------------------------------------

    def send(self, plan: StepPlan) -> None:
        if self.dead:
            raise WorkerFailure(self.dead)
        self.channel.broadcast(range(self.world_size), plan)

    def wait_result(self, step_id: int) -> StepResult:
        """The sampled tokens of step ``step_id`` (results arrive in plan order)."""
        (_, result), = self._collect(StepResult, [0], STEP_TIMEOUT_S, f"finish step {step_id}")
        if result.step_id != step_id:
            self._fail(f"worker rank 0 answered step {result.step_id}, the engine expected step {step_id}")
        return result

    def shutdown(self) -> None:
        if self.channel is not None:
            if not self.dead:
                try:
                    self.channel.broadcast(range(self.world_size), Shutdown())
                except Exception:
                    pass  # a worker already gone: fall through to terminate
        # a clean shutdown gets 5 s to exit; after a failure the survivors may be stuck in a collective
        deadline = time.monotonic() + (0.5 if self.dead else 5)
        for p in self.processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        self.processes, self.process_ranks = [], []
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.store = None
