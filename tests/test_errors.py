"""Bad input gets a clear error before anything runs; a dying worker is reported within seconds."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.executor import WorkerFailure


@pytest.fixture(scope="module")
def llm(tiny_models):
    with LLM(tiny_models["qwen3"], dtype="float32", max_model_len=64) as llm:
        yield llm


def test_bad_requests_leave_the_engine_usable(llm):
    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cases = [
        ([list(range(1, 70))], good, "max_model_len is 64"),
        ([[1, 2, 3]], SamplingParams(max_tokens=62), r"\+ max_tokens \(62\) exceeds max_model_len \(64\)"),
        ([[]], good, "prompt is empty"),
        ([""], good, "prompt is empty"),
        ([[1, 2, 512]], good, r"outside the vocabulary \[0, 512\)"),
        ([[1, -1]], good, "outside the vocabulary"),
        ([[1, 2], [3, 4]], [good], "1 sampling_params for 2 prompts"),
        ([3.5], good, "a prompt must be"),
    ]
    for prompts, params, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            llm.generate([[5, 6]] + prompts if isinstance(params, SamplingParams) else prompts, params,
                         use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()  # nothing was queued, not even the good prompt
    [out] = llm.generate([[5, 6]], good, use_tqdm=False)
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0),
                                         ("min_p", 2.0), ("max_tokens", 0), ("min_tokens", -1),
                                         ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
                                         ("stop", 5), ("stop_token_ids", ["x"]), ("seed", 1.5)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})


def test_bad_engine_arguments(tiny_models, tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_sequences'"):
        LLM(tiny_models["qwen3"], max_num_sequences=4)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="dtype='float8'"):
        LLM(tiny_models["qwen3"], dtype="float8")
    with pytest.raises(ValueError, match="attention_backend='triton' needs a CUDA device"):
        LLM(tiny_models["qwen3"], device="cpu", attention_backend="triton")
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        LLM(tiny_models["qwen3"], max_model_len=100000)
    with pytest.raises(ValueError, match="max_num_seqs=70000: must be at most 65535"):
        LLM(tiny_models["qwen3"], max_num_seqs=70000)
    with pytest.raises(ValueError, match="max_model_len=True: must be a positive int"):
        LLM(tiny_models["qwen3"], max_model_len=True)  # a bool is an int to Python, not a length
    for block in (0, 48, "16", True):
        with pytest.raises(ValueError, match=f"kvcache_block_size={block!r}: must be a power of two"):
            LLM(tiny_models["qwen3"], kvcache_block_size=block)
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["BertModel"], "vocab_size": 10}')
    with pytest.raises(Exception, match="unsupported model architecture.*LlamaForCausalLM, Qwen2ForCausalLM"):
        LLM(str(bad), skip_tokenizer_init=True)


def test_flash_attn_backend_errors(tiny_models, monkeypatch):
    """attention_backend='flash_attn' is checked in the engine process, before any worker starts."""
    import torch

    from workers import flash_attention

    model = tiny_models["qwen3"]
    with pytest.raises(ValueError, match="attention_backend='flash_attn' needs a CUDA device"):
        LLM(model, device="cpu", attention_backend="flash_attn")
    # the remaining checks need device="cuda" to get past the device checks on this CPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    not_installed = r"needs FlashAttention, which is not installed: pip install flash-attn .*tokenspeed-fa3"
    if flash_attention.flash_attn_version() is None:  # the real import failure (CI has neither module)
        with pytest.raises(ValueError, match=not_installed):
            LLM(model, device="cuda", attention_backend="flash_attn")
    monkeypatch.setattr(flash_attention, "flash_attn_version", lambda: None)
    with pytest.raises(ValueError, match=not_installed):
        LLM(model, device="cuda", attention_backend="flash_attn")
    for version in (3, 2):
        monkeypatch.setattr(flash_attention, "flash_attn_version", lambda v=version: v)
        with pytest.raises(ValueError, match=r"supports float16 and bfloat16 only, not dtype='float32'"):
            LLM(model, device="cuda", dtype="float32", attention_backend="flash_attn", kvcache_block_size=256)
    monkeypatch.setattr(flash_attention, "flash_attn_version", lambda: 2)
    with pytest.raises(ValueError, match="FlashAttention-2 needs kvcache_block_size to be a multiple of 256, got 16"):
        LLM(model, device="cuda", dtype="bfloat16", attention_backend="flash_attn", kvcache_block_size=16)
    # what passes the checks (FA2 with block 256, FA3 with any block size), without starting an engine
    assert flash_attention.flash_attn_problem("bfloat16", 256, 2) is None
    assert flash_attention.flash_attn_problem("float16", 16, 3) is None
    assert "multiple of 256" in flash_attention.flash_attn_problem("bfloat16", 128, 2)
    assert flash_attention.flash_attn_problem("bfloat16", 0, 2) is None  # not configured: FA2 picks 256


def test_auto_backend_falls_back_to_triton_when_flash_attn_does_not_fit(monkeypatch):
    """The worker's choice for "auto" on CUDA (no GPU needed to make it): flash-attn only when it fits."""
    from workers import flash_attention
    from workers.model_runner import select_attention_backend

    monkeypatch.setattr(flash_attention, "flash_attn_supports_gpu", lambda version: True)
    # an unconfigured block size (0) counts as vLLM's 16, which FlashAttention-2 cannot take
    for version, dtype, block_size in ((None, "bfloat16", 16), (2, "bfloat16", 16), (2, "bfloat16", 0),
                                       (3, "float32", 16)):
        monkeypatch.setattr(flash_attention, "flash_attn_version", lambda v=version: v)
        assert select_attention_backend("auto", "cuda", dtype, block_size).name == "triton"
    monkeypatch.setattr(flash_attention, "flash_attn_version", lambda: None)
    with pytest.raises(ValueError, match="needs FlashAttention, which is not installed"):
        select_attention_backend("flash_attn", "cuda", "bfloat16", 16)


def test_default_block_size_is_the_backends_choice(monkeypatch):
    """kvcache_block_size left unset: vLLM's 16, except the Triton backend from Hopper on (64, the smallest
    block on which its one-split decode reads K/V tiles by TMA) and FlashAttention-2 (multiples of 256)."""
    import torch
    from workers import flash_attention
    from workers.layers import TorchAttentionBackend, TritonAttentionBackend

    assert TorchAttentionBackend.default_block_size() == 16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((8, 0), 16), ((9, 0), 64), ((10, 0), 64)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert TritonAttentionBackend().default_block_size() == expected
    fa = object.__new__(flash_attention.FlashAttnBackend)  # no flash-attn here: only the rule
    for version, expected in ((2, 256), (3, 16)):
        fa.version = version
        assert fa.default_block_size() == expected


def test_missing_weight_is_named(tiny_models, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file

    path = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.extra.weight"] = weights["model.norm.weight"].clone()
    save_file(weights, path / "model.safetensors")
    with pytest.raises(WorkerFailure, match=r"rank 0 failed.*missing tensors: model.layers.1.mlp.up_proj.weight.*"
                                            r"unexpected tensors: model.layers.0.extra.weight"):
        LLM(str(path), dtype="float32")


def test_killed_worker_is_reported_quickly_and_nothing_is_left(tiny_models):
    llm = LLM(tiny_models["qwen3"], tensor_parallel_size=2, dtype="float32")
    pids = [p.pid for p in llm.llm_engine.executor.processes]
    killed_at = []

    def kill_rank_1():
        time.sleep(2.0)
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    threading.Thread(target=kill_rank_1, daemon=True).start()
    prompts = [[i + 1, i + 2, i + 3] for i in range(32)]
    with pytest.raises(WorkerFailure, match=r"worker rank 1 died \(exit code -9\)"):
        llm.generate(prompts, SamplingParams(max_tokens=1000, ignore_eos=True), use_tqdm=False)
    assert killed_at and time.monotonic() - killed_at[0] < 10
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)
    assert not set(pids) & {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(WorkerFailure):  # the engine stays failed rather than hanging
        llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.shutdown()


def test_worker_exception_names_rank_and_cause(tiny_models, tmp_path):
    import shutil
    path = tmp_path / "nan"
    shutil.copytree(tiny_models["qwen3"], path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    before = set(multiprocessing.active_children())
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"worker rank [01] failed: .*"):
        LLM(str(path), tensor_parallel_size=2, dtype="float32")
    assert time.monotonic() - start < 30
    assert set(multiprocessing.active_children()) <= before


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_engine_process_killed_takes_workers_down(tiny_models, tmp_path):
    """If the scheduler process is SIGKILLed, its workers exit too (no orphans)."""
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys, time\nsys.path.insert(0, %r)\nfrom nanovllm import LLM\n"
        "if __name__ == '__main__':\n"
        "    llm = LLM(%r, tensor_parallel_size=2, dtype='float32')\n"
        "    print(' '.join(str(p.pid) for p in llm.llm_engine.executor.processes), flush=True)\n"
        "    time.sleep(60)\n" % (os.getcwd(), tiny_models["qwen3"]))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
