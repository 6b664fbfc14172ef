"""The torchrun launch script at 2 ranks (gloo on CPU) gives transformers' greedy output."""

import json
import os
import socket
import subprocess
import sys

from conftest import hf_greedy
from test_engine import make_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_two_ranks(tiny_models, tmp_path):
    path = tiny_models["llama"]
    prompts = make_prompts(16, seed=11)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "out.json"
    with socket.socket() as s:  # a free port for torchrun's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           os.path.join(ROOT, "launch", "generate.py"), "--model", path, "--prompt-token-ids",
           str(tmp_path / "prompts.json"), "--max-tokens", "10", "--ignore-eos", "--dtype", "float32",
           "--output-json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert [g["token_ids"] for g in got] == hf_greedy(path, prompts, 10)
