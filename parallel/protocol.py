"""The wire contract between the scheduler process and the workers.

Every message is msgpack of plain values (ints, floats, strings, bytes, lists, maps): never pickle, because
plans cross process and, under torchrun, host boundaries. A message is the list
``[PROTOCOL_VERSION, kind, body]``; ``decode`` checks the version, the kind and the type of every field, so
a malformed message is a ``ProtocolError`` that names the problem, not a crash deep inside the model.

Plans are delta-encoded (like vLLM v1's scheduler output): a request's prompt and sampling parameters travel
once, in ``NewRequest``, when it is first scheduled (or rescheduled after a preemption); after that a step
names each scheduled request by id with its number of tokens to compute and any newly allocated blocks. The
tokens sampled in the previous step travel in ``StepPlan.sampled_*`` so that every worker's mirror of the
request state stays complete. Finished, aborted and preempted ids travel once so workers drop their state.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import msgpack

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message that is not a valid nanovllm protocol message."""


# ---------------------------------------------------------------------------------------------------------
# Message schemas. Field annotations are the wire types that ``decode`` validates.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class WorkerConfig:
    """Everything a worker needs, sent once in the init message (a worker never imports ``nanovllm``)."""

    model: str  # Hugging Face directory (GGUF files are converted by the scheduler side first)
    dtype: str  # "float32" | "float16" | "bfloat16"
    device: str  # "cpu" | "cuda"
    load_format: str  # "auto" | "dummy"
    block_size: int  # KV-cache positions a block; 0: the attention backend picks (Ready reports it)
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    enforce_eager: bool
    attention_backend: str  # "auto" | "torch" | "triton" | "flash_attn"
    seed: int
    world_size: int
    # how ranks find each other: a TCPStore the engine hosts ("host:port"), or "env://" under torchrun
    dist_init: str
    # the engine's cap on KV blocks (num_gpu_blocks_override); 0 means "as many as memory allows"
    num_gpu_blocks_override: int = 0
    cpu_kvcache_space_bytes: int = 1 << 30


@dataclass
class Hello:
    rank: int
    pid: int
    host: str


@dataclass
class Init:
    config: dict  # WorkerConfig as a map
    rank: int


@dataclass
class Ready:
    """A worker has loaded its weights and says how many KV blocks fit on its device, and of what size (the
    configured one, or its attention backend's choice when none was configured)."""

    rank: int
    num_kv_blocks: int
    block_size: int


@dataclass
class AllocateKVCache:
    num_kv_blocks: int  # the minimum over all ranks, chosen by the engine


@dataclass
class KVCacheReady:
    rank: int


@dataclass
class NewRequest:
    req_id: int
    prompt_token_ids: list
    output_token_ids: list  # non-empty only when a preempted request is resumed (recompute)
    sampling: dict  # SamplingFields as a map
    block_ids: list
    num_computed_tokens: int  # tokens whose K/V is already in the cache (prefix-cache hits)
    num_scheduled_tokens: int


@dataclass
class SamplingFields:
    """The part of SamplingParams the worker needs to sample (stop strings etc. stay on the scheduler side)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    seed: int = 0
    logprobs: int = -1  # how many top logprobs to return besides the sampled token's; -1: none
    # token ids that must not be sampled before min_tokens (EOS and stop_token_ids)
    stop_token_ids: list = field(default_factory=list)


@dataclass
class StepPlan:
    step_id: int
    new_requests: list  # list of NewRequest (maps on the wire)
    # requests scheduled before: parallel lists
    running_req_ids: list
    running_num_tokens: list
    running_new_block_ids: list  # list of lists
    # tokens sampled in the previous step, to append to the workers' mirrors
    sampled_req_ids: list
    sampled_token_ids: list
    finished_req_ids: list  # finished or aborted: drop the state
    preempted_req_ids: list  # preempted: drop the state, it comes back later as a NewRequest


@dataclass
class StepResult:
    step_id: int
    req_ids: list  # the requests that sampled a token this step, in plan order
    token_ids: list
    # for requests that asked for logprobs: [req_id, sampled token's logprob, [top ids], [top logprobs]]
    logprobs: list = field(default_factory=list)


@dataclass
class WorkerError:
    rank: int
    message: str


@dataclass
class Shutdown:
    pass


MESSAGE_TYPES = {
    cls.__name__: cls
    for cls in (Hello, Init, Ready, AllocateKVCache, KVCacheReady, StepPlan, StepResult, WorkerError, Shutdown)
}

_NESTED = (NewRequest, SamplingFields)

_WIRE_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}


def _check_fields(cls, body: Any, where: str) -> dict:
    if not isinstance(body, dict):
        raise ProtocolError(f"{where}: expected a map, got {type(body).__name__}")
    out = {}
    for f in fields(cls):
        wire_type = _WIRE_TYPES[f.type]
        if f.name not in body:
            if f.default is not MISSING or f.default_factory is not MISSING:
                continue
            raise ProtocolError(f"{where}: missing field {f.name!r}")
        value = body[f.name]
        # bool is an int in Python; reject it where an int is expected and vice versa
        if not isinstance(value, wire_type) or (f.type == "int" and isinstance(value, bool)):
            raise ProtocolError(f"{where}: field {f.name!r} should be {f.type}, got {type(value).__name__}")
        out[f.name] = value
    unknown = set(body) - {f.name for f in fields(cls)}
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {sorted(unknown)}")
    return out


def _plain(obj):
    """msgpack's hook for our dataclasses (nested NewRequests): their fields, without asdict's deep copy."""
    if type(obj) in _NESTED:
        return obj.__dict__
    raise TypeError(f"cannot encode {type(obj).__name__}: not a protocol message")


def encode(message) -> bytes:
    kind = type(message).__name__
    if MESSAGE_TYPES.get(kind) is not type(message):
        raise ProtocolError(f"cannot encode {kind}: not a protocol message")
    try:
        return msgpack.packb([PROTOCOL_VERSION, kind, message.__dict__], use_bin_type=True, default=_plain)
    except TypeError as e:
        raise ProtocolError(str(e)) from None


def decode(data: bytes):
    """Bytes -> message dataclass, validating version, kind and every field's type."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated exception types for garbage
        raise ProtocolError(f"not a msgpack message ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, list) and len(obj) == 3):
        raise ProtocolError("a message must be [version, kind, body]")
    version, kind, body = obj
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    message = cls(**_check_fields(cls, body, kind))
    if cls is StepPlan:
        _check_plan(message)
    return message


def _int_list(values, where: str) -> None:
    if not set(map(type, values)) <= {int}:  # type(), not isinstance(): a bool is not a token id
        raise ProtocolError(f"{where}: expected a list of ints")


def _check_plan(plan: StepPlan) -> None:
    where = f"StepPlan {plan.step_id}"
    for i, body in enumerate(plan.new_requests):
        req = NewRequest(**_check_fields(NewRequest, body, f"{where} new_requests[{i}]"))
        for name in ("prompt_token_ids", "output_token_ids", "block_ids"):
            _int_list(getattr(req, name), f"{where} new request {req.req_id} {name}")
        _check_fields(SamplingFields, req.sampling, f"{where} new request {req.req_id} sampling")
        if req.num_scheduled_tokens <= 0 or req.num_computed_tokens < 0:
            raise ProtocolError(f"{where} new request {req.req_id}: bad token counts")
        plan.new_requests[i] = req
    n = len(plan.running_req_ids)
    if len(plan.running_num_tokens) != n or len(plan.running_new_block_ids) != n:
        raise ProtocolError(f"{where}: running lists differ in length")
    if len(plan.sampled_req_ids) != len(plan.sampled_token_ids):
        raise ProtocolError(f"{where}: sampled lists differ in length")
    _int_list(plan.running_req_ids, f"{where} running_req_ids")
    _int_list(plan.running_num_tokens, f"{where} running_num_tokens")
    for blocks in plan.running_new_block_ids:
        if not isinstance(blocks, list):
            raise ProtocolError(f"{where}: running_new_block_ids must hold lists")
        _int_list(blocks, f"{where} running_new_block_ids")
    for name in ("sampled_req_ids", "sampled_token_ids", "finished_req_ids", "preempted_req_ids"):
        _int_list(getattr(plan, name), f"{where} {name}")
    if any(t <= 0 for t in plan.running_num_tokens):
        raise ProtocolError(f"{where}: a running request scheduled with no tokens")
