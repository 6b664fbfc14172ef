"""Registers, spills and shared memory of the decode attention kernel at the engine's tile configs, compiled
for Hopper (sm_90a) on any machine, no GPU needed (Triton's compiler and its bundled ptxas).

    python scripts/kernel_resources.py [--json]

The arguments get the specializations Triton's JIT gives them at run time (pointers and the strides that
are multiples of 16 marked so; the unit strides are 1), or the compiler cannot vectorize the K/V loads and
the numbers mean nothing. Qwen3-0.6B's shapes: GQA group 2, head dim 128, block size 16, bf16.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (set before triton_attention defines its kernels)
from workers.kernels import triton_attention as ta  # noqa: E402

POINTERS = {"Q": "*bf16", "KCache": "*bf16", "VCache": "*bf16", "BlockTables": "*i32", "ContextLens": "*i32",
            "Out": "*bf16", "OWs": "*fp32", "LseWs": "*fp32"}
MULTIPLE_OF_16 = set(POINTERS) | {"stride_qb", "stride_qh", "stride_k_slot", "stride_k_h", "stride_v_slot",
                                  "stride_v_h", "stride_ob", "stride_oh"}
UNIT = {"stride_qd", "stride_od"}  # 1 at run time: the JIT makes them constants


def ptxas_path() -> str:
    """The newest ptxas Triton ships (the PTX it emits may be too new for the older one)."""
    from triton import knobs
    for tool in ("ptxas_blackwell", "ptxas"):
        path = getattr(getattr(knobs.nvidia, tool, None), "path", None)
        if path and os.path.exists(path):
            return path
    raise FileNotFoundError("no ptxas in the Triton installation")


def resources(block_n: int, stages: int, num_splits: int) -> dict:
    """{registers, spill_bytes, shared_bytes} a program of the decode split kernel at this config."""
    fn = ta._decode_split_kernel
    consts = dict(GROUP=2, HEAD_DIM=128, BLOCK_H=16, BLOCK_D=128, BLOCK_N=block_n, BLOCK_SIZE=16,
                  NUM_SPLITS=num_splits, IEEE=False, PDL=True, **dict.fromkeys(UNIT, 1))
    sig = {n: POINTERS.get(n, "constexpr" if n in consts else ("fp32" if n == "qk_scale" else "i32"))
           for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in MULTIPLE_OF_16}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([ptxas_path(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output: {log[-400:]}")
    return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1)),
            "shared_bytes": kernel.metadata.shared}


CONFIGS = ((64, 3, 1), (128, 3, 1), (64, 2, 4))  # (BLOCK_N, stages, splits): what _decode_config picks


def main():
    if "--json" in sys.argv[1:]:  # for tests/test_triton_kernels.py
        print(json.dumps([{"config": list(c), **resources(*c)} for c in CONFIGS]))
        return
    print(f"Triton {triton.__version__}, {os.path.basename(ptxas_path())}; decode split kernel, 4 warps")
    for block_n, stages, splits in CONFIGS:
        r = resources(block_n, stages, splits)
        print(f"  BLOCK_N {block_n:>3}, {stages} stages, {'one split' if splits == 1 else f'{splits} splits'}: "
              f"{r['registers']} registers, {r['spill_bytes']} bytes spilled, "
              f"{r['shared_bytes'] / 1024:.1f} KB shared memory")


if __name__ == "__main__":
    main()
