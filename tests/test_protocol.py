"""The plan codec: every message kind round-trips; garbage and malformed messages are clear errors."""

import msgpack
import pytest

from parallel.protocol import (PROTOCOL_VERSION, AllocateKVCache, Hello, Init, KVCacheReady, NewRequest,
                               ProtocolError, Ready, SamplingFields, Shutdown, StepPlan, StepResult, WorkerConfig,
                               WorkerError, decode, encode)


def _plan():
    new = NewRequest(req_id=7, prompt_token_ids=[1, 2, 3], output_token_ids=[4], sampling=SamplingFields(
        temperature=0.7, top_k=5, seed=123, stop_token_ids=[2]).__dict__, block_ids=[3, 9], num_computed_tokens=0,
        num_scheduled_tokens=4)
    return StepPlan(step_id=5, new_requests=[new.__dict__], running_req_ids=[1, 2], running_num_tokens=[1, 30],
                    running_new_block_ids=[[], [11, 12]], sampled_req_ids=[1], sampled_token_ids=[99],
                    finished_req_ids=[4], preempted_req_ids=[6])


def _config():
    return WorkerConfig(model="/m", dtype="float32", device="cpu", load_format="auto", block_size=16,
                        max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, gpu_memory_utilization=0.9,
                        enforce_eager=True, attention_backend="torch", seed=0, world_size=2, dist_init="h:1")


@pytest.mark.parametrize("message", [
    Hello(rank=1, pid=42, host="h"),
    Init(config=_config().__dict__, rank=1),
    Ready(rank=0, num_kv_blocks=100, block_size=64),
    AllocateKVCache(num_kv_blocks=50),
    KVCacheReady(rank=1),
    StepResult(step_id=3, req_ids=[1, 2], token_ids=[10, 20]),
    WorkerError(rank=1, message="boom"),
    Shutdown(),
], ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert decode(encode(message)) == message


def test_plan_round_trip():
    plan = _plan()
    back = decode(encode(plan))
    assert isinstance(back.new_requests[0], NewRequest)
    assert back.new_requests[0].prompt_token_ids == [1, 2, 3]
    assert back.new_requests[0].sampling["seed"] == 123
    assert back.running_new_block_ids == [[], [11, 12]]
    assert (back.sampled_req_ids, back.sampled_token_ids) == ([1], [99])
    assert (back.finished_req_ids, back.preempted_req_ids) == ([4], [6])


def test_garbage_bytes():
    with pytest.raises(ProtocolError, match="msgpack"):
        decode(b"\xc1\xff\x00garbage")
    with pytest.raises(ProtocolError, match=r"\[version, kind, body\]"):
        decode(msgpack.packb({"hello": 1}))


def test_wrong_version_and_kind():
    with pytest.raises(ProtocolError, match="version"):
        decode(msgpack.packb([PROTOCOL_VERSION + 1, "Shutdown", {}]))
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode(msgpack.packb([PROTOCOL_VERSION, "Pickle", {}]))


def test_field_errors_are_named():
    body = _plan().__dict__.copy()
    body["running_num_tokens"] = "many"
    with pytest.raises(ProtocolError, match="running_num_tokens"):
        decode(msgpack.packb([PROTOCOL_VERSION, "StepPlan", body]))
    body = _plan().__dict__.copy()
    del body["step_id"]
    with pytest.raises(ProtocolError, match="missing field 'step_id'"):
        decode(msgpack.packb([PROTOCOL_VERSION, "StepPlan", body]))
    body = _plan().__dict__.copy()
    body["running_num_tokens"] = [1]
    with pytest.raises(ProtocolError, match="differ in length"):
        decode(msgpack.packb([PROTOCOL_VERSION, "StepPlan", body]))
    body = _plan().__dict__.copy()
    body["new_requests"] = [dict(body["new_requests"][0], prompt_token_ids=[1, "x"])]
    with pytest.raises(ProtocolError, match="prompt_token_ids"):
        decode(msgpack.packb([PROTOCOL_VERSION, "StepPlan", body]))
    with pytest.raises(ProtocolError, match="unknown field"):
        decode(msgpack.packb([PROTOCOL_VERSION, "KVCacheReady", {"rank": 0, "evil": 1}]))
    with pytest.raises(ProtocolError, match="should be int"):
        decode(msgpack.packb([PROTOCOL_VERSION, "KVCacheReady", {"rank": True}]))


def test_never_pickle():
    with pytest.raises(ProtocolError, match="not a protocol message"):
        encode(object())
