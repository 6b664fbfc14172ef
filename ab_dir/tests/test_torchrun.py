"""The torchrun launch script at 2 ranks (gloo on CPU) gives transformers' greedy output."""

import json
import os
import socket
import subprocess
import sys

from conftest import hf_greedy
from test_engine import make_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_args(path, prompts_file, out=None):
    args = [os.path.join(ROOT, "launch", "generate.py"), "--model", path, "--prompt-token-ids", str(prompts_file),
            "--max-tokens", "10", "--ignore-eos", "--dtype", "float32"]
    return args + (["--output-json", str(out)] if out else [])


def test_torchrun_two_ranks(tiny_models, tmp_path):
    path = tiny_models["llama"]
    prompts = make_prompts(16, seed=11)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           *_script_args(path, tmp_path / "prompts.json", out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert [g["token_ids"] for g in got] == hf_greedy(path, prompts, 10)


def test_torchrun_two_nodes(tiny_models, tmp_path):
    """Two torchrun agents (--nnodes 2), as on two hosts: the rank on "node 1" finds the engine through the
    store of node 0's agent and joins the process group from there."""
    path = tiny_models["qwen3"]
    prompts = make_prompts(6, seed=12)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "out.json"
    port = str(_free_port())

    def node(rank, out_file=None):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                "--master-addr", "127.0.0.1", "--master-port", port, "--nproc-per-node", "1",
                *_script_args(path, tmp_path / "prompts.json", out_file)]

    node1 = subprocess.Popen(node(1), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        node0 = subprocess.run(node(0, out), cwd=ROOT, capture_output=True, text=True, timeout=180)
        node1_err = node1.communicate(timeout=60)[1]
    finally:
        node1.kill()
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, node1_err[-3000:]
    got = json.loads(out.read_text())
    assert [g["token_ids"] for g in got] == hf_greedy(path, prompts, 10)
