"""The worker process: connect, receive the init message, load the model, then apply plans in order.

Started either by the engine (``multiprocessing`` spawn, one per device) or by torchrun (ranks >= 1 run
``run_torchrun_worker``; rank 0's process hosts the scheduler and spawns its local worker). Any exception
is sent to the engine as a ``WorkerError`` naming this rank before the process exits.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import signal
import socket
import statistics
import sys
import time
import traceback

from parallel.channels import WorkerChannel
from parallel.distributed import TORCHRUN_ADDRESS_KEY, init_parallel, torchrun_env, torchrun_store
from parallel.protocol import (AllocateKVCache, Hello, Init, KVCacheReady, ProtocolError, Ready, Shutdown,
                               StepPlan, WorkerConfig, WorkerError, decode)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, so no worker outlives a killed engine."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _recv(channel: WorkerChannel, parent_pid: int):
    """Block until the engine sends a message; exit if the parent process is gone."""
    while not channel.poll(1000):
        if parent_pid and os.getppid() != parent_pid:
            sys.exit(1)
    return decode(channel.recv_bytes())


def _expect(message, kind):
    if not isinstance(message, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {type(message).__name__}")
    return message


def worker_main(address: str, rank: int, local_rank: int, parent_pid: int = 0) -> None:
    if parent_pid:
        _die_with_parent()
    channel = WorkerChannel(address, rank)
    try:
        channel.send(Hello(rank=rank, pid=os.getpid(), host=socket.gethostname()))
        init = _expect(_recv(channel, parent_pid), Init)
        config = WorkerConfig(**init.config)
        serve(channel, config, rank, local_rank, parent_pid)
    except BaseException as e:  # report everything, including KeyboardInterrupt, then exit non-zero
        if isinstance(e, SystemExit) and not e.code:
            raise
        try:
            channel.send(WorkerError(rank=rank, message=f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        finally:
            channel.close()
        os._exit(1)
    channel.close()


def serve(channel: WorkerChannel, config: WorkerConfig, rank: int, local_rank: int, parent_pid: int) -> None:
    import torch

    from workers.model_runner import ModelRunner

    if config.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # share the cores among the workers of this host instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.world_size))
    ctx = init_parallel(config.dist_init, rank, config.world_size, config.device)
    runner = ModelRunner(config, ctx, device)
    _serve_steps(channel, runner, rank, parent_pid)
    gc.unfreeze()  # let interpreter shutdown free what startup froze (see _serve_steps)
    if ctx.world_size > 1:
        torch.distributed.destroy_process_group()


def _serve_steps(channel: WorkerChannel, runner, rank: int, parent_pid: int) -> None:
    channel.send(Ready(rank=rank, num_kv_blocks=runner.max_num_kv_blocks(), block_size=runner.block_size))
    runner.allocate_kv_cache(_expect(_recv(channel, parent_pid), AllocateKVCache).num_kv_blocks)
    # Everything allocated so far (model, graphs, imports) lives until exit: freeze it out of the garbage
    # collector, so the collections that per-step garbage triggers stay short (no pauses of many ms).
    gc.collect()
    gc.freeze()
    channel.send(KVCacheReady(rank=rank))
    # Steps overlap: step N+1 is launched on the device before the tokens of step N are waited for, so
    # the device does not idle while this process talks to the engine. Between steps the worker waits for
    # whichever comes first: the next plan (launch it, then report step N), or the end of step N on the
    # device (report it now: the engine may be waiting for those tokens before it can plan further).
    unfinished = []
    timing = StepTiming(runner.device) if os.environ.get("NANOVLLM_STEP_TIMING") else None

    def flush_previous() -> None:
        while unfinished:
            result = runner.finish(unfinished.pop(0))
            if result is not None:
                channel.send(result)

    # profiling aid: the torch profiler over steps 300-330, or NANOVLLM_PROFILE_STEPS="first,last"
    profile_dir = os.environ.get("NANOVLLM_PROFILE_DIR")
    profile_window = tuple(int(s) for s in os.environ.get("NANOVLLM_PROFILE_STEPS", "300,330").split(","))
    cprofile_dir = os.environ.get("NANOVLLM_CPROFILE_DIR")  # profiling aid: Python profile of steps 100-1000
    torch_profiler, python_profiler, step = None, None, 0
    if os.environ.get("NANOVLLM_SYNC_DEBUG") and runner.device.type == "cuda":
        # profiling aid: torch warns at every operation that makes the host wait for the device (beyond
        # the one wait per step, which is on an event and not reported); warm-up and capture are done
        import torch
        torch.cuda.set_sync_debug_mode("warn")
    while True:
        step += 1
        if profile_dir and step in profile_window:  # a window of steps, device and host side
            torch_profiler = _torch_profile_window(torch_profiler, profile_dir, rank)
        if cprofile_dir and step in (100, 1000):
            python_profiler = _python_profile_window(python_profiler, cprofile_dir, rank)
        t0 = time.perf_counter()
        while unfinished and not channel.poll(0):
            if runner.is_done(unfinished[0]):
                flush_previous()
                break
            time.sleep(20e-6)
        message = _recv(channel, parent_pid)
        t1 = time.perf_counter()
        if isinstance(message, Shutdown):
            break
        if timing is not None:
            timing.mark_device()
        handle = runner.launch(_expect(message, StepPlan), flush_previous)
        if timing is not None:
            timing.mark_device()
        t2 = time.perf_counter()
        flush_previous()
        unfinished.append(handle)
        if timing is not None:
            timing.add(t1 - t0, t2 - t1, time.perf_counter() - t2,
                       prefill=bool(message.new_requests) or any(n > 1 for n in message.running_num_tokens))
    flush_previous()
    if python_profiler is not None:  # the run ended inside the window
        _python_profile_window(python_profiler, cprofile_dir, rank)
    if timing is not None:
        timing.report(rank)


def _torch_profile_window(profiler, profile_dir: str, rank: int):
    import torch
    from torch.profiler import ProfilerActivity, profile

    if profiler is None:
        profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        profiler.__enter__()
        return profiler
    torch.cuda.synchronize()
    profiler.__exit__(None, None, None)
    with open(os.path.join(profile_dir, f"worker{rank}.torch.txt"), "w") as f:
        f.write(_device_busy_summary(profiler) + "\n\n")
        table = profiler.key_averages()
        f.write(table.table(sort_by="cuda_time_total", row_limit=30))
        f.write("\n")
        f.write(table.table(sort_by="self_cpu_time_total", row_limit=30))
    return None


def _python_profile_window(profiler, profile_dir: str, rank: int):
    import cProfile
    import pstats

    if profiler is None:
        profiler = cProfile.Profile()
        profiler.enable()
        return profiler
    profiler.disable()
    with open(os.path.join(profile_dir, f"worker{rank}.cprofile.txt"), "w") as f:
        pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(45)
    return None


def _device_busy_summary(profiler) -> str:
    """How much of the profiled window the device spent running kernels (the rest is idle time), and the
    idle gaps that add up to most of it, by the pair of device events around them."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in profiler.events()
                   if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"))
    if not spans:
        return "device busy: no device events"
    busy, cur_start, cur_end, last_name = 0, spans[0][0], spans[0][1], spans[0][2]
    gaps = {}  # (event before, event after) -> [count, total idle]
    for start, end, name in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            pair = gaps.setdefault((last_name[:50], name[:50]), [0, 0.0])
            pair[0] += 1
            pair[1] += start - cur_end
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
        if end >= cur_end:
            last_name = name
    busy += cur_end - cur_start
    window = spans[-1][1] - spans[0][0]
    lines = [f"device busy {busy / 1e3:.1f} ms of a {window / 1e3:.1f} ms window "
             f"({100 * busy / window:.1f} %; idle {100 - 100 * busy / window:.1f} %)",
             "largest idle totals (us, count): event before -> event after"]
    for (before, after), (count, total) in sorted(gaps.items(), key=lambda g: -g[1][1])[:12]:
        lines.append(f"  {total:9.1f} {count:5d}  {before} -> {after}")
    return "\n".join(lines)


class StepTiming:
    """NANOVLLM_STEP_TIMING=1: where a worker's wall time goes, printed at shutdown (for profiling). On CUDA
    also the device's side: an event before and after each step's work is queued, so the device time from
    one to the other is the step's (its copies, graph and sampler), and from a step's end to the next one's
    start the device waited for this host. The steps with prompt tokens (eager unless one sequence fits a
    prefill graph, so this host launches their kernels one by one) are also reported on their own."""

    def __init__(self, device):
        self.rows = []
        self.events = [] if device.type == "cuda" else None
        if self.events is not None:
            import torch
            self._new_event = functools.partial(torch.cuda.Event, enable_timing=True)

    def add(self, waiting: float, launching: float, reporting: float, prefill: bool) -> None:
        self.rows.append((waiting, launching, reporting, prefill))

    def mark_device(self) -> None:
        if self.events is not None:
            event = self._new_event()
            event.record()
            self.events.append(event)

    def report(self, rank: int) -> None:
        if not self.rows:
            return
        n = len(self.rows)
        means = [1e3 * sum(r[i] for r in self.rows) / n for i in range(3)]
        # medians too: the means carry the prefill steps and the engine's pauses between generate calls
        medians = [1e3 * statistics.median(r[i] for r in self.rows) for i in range(3)]
        print(f"[worker {rank}] {n} steps, ms/step (mean / median): waiting for plan {means[0]:.3f} / "
              f"{medians[0]:.3f}, launch {means[1]:.3f} / {medians[1]:.3f}, report previous {means[2]:.3f} / "
              f"{medians[2]:.3f}", file=sys.stderr, flush=True)
        if self.events and len(self.events) >= 4:
            self.events[-1].synchronize()
            ev = self.events
            spans = [ev[i].elapsed_time(ev[i + 1]) for i in range(0, len(ev) - 1, 2)]
            waits = [ev[i].elapsed_time(ev[i + 1]) for i in range(1, len(ev) - 2, 2)]
            print(f"[worker {rank}] device ms/step (median / mean): step's work {_median_mean(spans)}, idle "
                  f"before the next step {_median_mean(waits)}", file=sys.stderr, flush=True)
            # the steps with prompt tokens apart: mostly eager, the host launching each layer's kernels
            # itself, so when that takes longer than the device the step's span is the host's time
            prefill = [i for i, row in enumerate(self.rows) if row[3] and i < len(spans)]
            if prefill:
                print(f"[worker {rank}] {len(prefill)} steps with prompt tokens, ms/step (median / mean): launch "
                      f"{_median_mean([1e3 * self.rows[i][1] for i in prefill])}, device span "
                      f"{_median_mean([spans[i] for i in prefill])}, idle before it "
                      f"{_median_mean([waits[i - 1] for i in prefill if 0 < i <= len(waits)])}",
                      file=sys.stderr, flush=True)


def _median_mean(values: list) -> str:
    return f"{statistics.median(values):.3f} / {sum(values) / len(values):.3f}" if values else "-"


def run_torchrun_worker() -> None:
    """Entry point of torchrun ranks >= 1: find the engine's address in torchrun's store, then serve."""
    env = torchrun_env()
    if env is None:
        raise RuntimeError("run_torchrun_worker() must be started by torchrun")
    address = torchrun_store().get(TORCHRUN_ADDRESS_KEY).decode()
    worker_main(address, env["rank"], env["local_rank"])
