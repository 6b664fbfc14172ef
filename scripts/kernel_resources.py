"""Every Triton kernel of the engine compiled for Hopper (sm_90a) on any machine, no GPU needed (Triton's
compiler and the ptxas it ships): registers a thread, spilled bytes and shared memory a program.

    python scripts/kernel_resources.py [--only decode_attention,...] [--json]

Each kernel is compiled at the configs the engine picks for Qwen3-0.6B's shapes in bf16 (16 q heads, 8 KV
heads, head dim 128, hidden 1024, intermediate 3072; 132 SMs), with the specializations Triton's JIT gives
the arguments at run time: pointers and the other integer arguments marked multiples of 16, the unit
strides the constant 1. Without them the compiler cannot prove the loads contiguous and aligned, and the
numbers mean nothing. tests/test_triton_kernels.py runs it in CI: the interpreter that runs the kernels
on the CPU executes Python, not the compiler, so this is where a kernel that would not compile shows up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (before the kernel modules define their kernels)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workers.kernels import decode_gemm as dg  # noqa: E402
from workers.kernels import fused, sampling, small_linear  # noqa: E402
from workers.kernels import triton_attention as ta  # noqa: E402

HQ, HKV, D, HIDDEN, INTER, SMS = 16, 8, 128, 1024, 3072, 132
FLOAT_ARGS = {"qk_scale", "eps"}


class Spec(NamedTuple):
    family: str  # for --only
    label: str
    kernel: object  # a triton.JITFunction
    pointers: dict  # argument -> pointer type ("*bf16", ...)
    constexprs: dict  # the kernel's constexpr arguments, and run-time constants (unit strides)
    num_warps: int
    num_stages: int = 3


def _gemm(label: str, m: int, n: int, k: int, silu: bool = False, split: bool = False) -> Spec:
    """decode_gemm at the config choose_config picks for these shapes (``split``: the row-parallel
    projections at TP 1, whose consumer takes split-K partial sums)."""
    config = dg.config_for_shape(m, n, k, 2, SMS, silu_mul=silu, allow_split=split)
    out = "*fp32" if config.split_k > 1 else "*bf16"
    return Spec("decode_gemm", f"{label} ({config.block_m}, {config.block_n}, {config.block_k}, "
                f"split {config.split_k}, {config.stages} stages)", dg._decode_gemm_kernel,
                {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": out},
                dict(HAS_BIAS=False, SILU_MUL=silu, SPLIT_OUT=config.split_k > 1, BLOCK_M=config.block_m,
                     BLOCK_N=config.block_n, BLOCK_K=config.block_k, STAGES=config.stages, PRECISION="tf32",
                     PDL=True), config.warps, config.stages)


def specs() -> list:
    """The kernels and configs compiled: what decode_gemm's and triton_attention's config functions and
    small_linear._config pick for Qwen3-0.6B; the fused and sampling kernels at their wrappers' launch
    settings (block sizes and warps written out here as those wrappers compute them)."""
    attn_ptrs = {"Q": "*bf16", "KCache": "*bf16", "VCache": "*bf16", "BlockTables": "*i32", "ContextLens": "*i32",
                 "Out": "*bf16", "OWs": "*fp32", "LseWs": "*fp32", "CuSeqlensQ": "*i32", "SeqIds": "*i32"}
    out = []
    for programs, splits in ((512, 1), (1024, 1), (2048, 4)):  # batch 64 / 128 one split, batch 64 four splits
        block_n, warps, stages = ta._decode_config(splits, D, 2, programs, SMS)
        out.append(Spec("decode_attention", f"decode split kernel, BLOCK_N {block_n}, {stages} stages, "
                        f"{splits} split(s)", ta._decode_split_kernel, attn_ptrs,
                        dict(GROUP=HQ // HKV, HEAD_DIM=D, BLOCK_H=16, BLOCK_D=D, BLOCK_N=block_n, BLOCK_SIZE=16,
                             NUM_SPLITS=splits, IEEE=False, PDL=True, stride_qd=1, stride_od=1), warps, stages))
    tma_ptrs = dict(attn_ptrs, k_desc=f"tensordesc<bf16[{ta.TMA_BLOCK_N}, {D}]>",
                    v_desc=f"tensordesc<bf16[{ta.TMA_BLOCK_N}, {D}]>")
    out.append(Spec("decode_attention", f"decode TMA kernel (Hopper), blocks of 64, BLOCK_N {ta.TMA_BLOCK_N}, "
                    f"{ta._TMA_STAGES} stages", ta._decode_tma_kernel, tma_ptrs,
                    dict(GROUP=HQ // HKV, HEAD_DIM=D, BLOCK_H=16, BLOCK_N=ta.TMA_BLOCK_N, BLOCK_SIZE=64,
                         STAGES=ta._TMA_STAGES, IEEE=False, PDL=True), 4, ta._TMA_STAGES))
    out.append(Spec("decode_attention", "decode split reduction, 4 splits", ta._decode_reduce_kernel, attn_ptrs,
                    dict(NUM_HEADS=HQ, HEAD_DIM=D, BLOCK_D=D, BLOCK_N=64, NUM_SPLITS=4, BLOCK_S=4, PDL=True,
                         stride_od=1), 2))
    for q_len in (1, 16, 64, 1024):
        heads, heads_pad, (bm, bn, warps, stages) = ta.prefill_tiles(q_len, HQ // HKV, D)
        out.append(Spec("prefill_attention", f"prefill, queries of {q_len} tokens ({bm}, {bn}, {warps}, {stages}), "
                        f"{heads} head(s) a tile", ta._prefill_kernel, attn_ptrs,
                        dict(GROUP=HQ // HKV, HEAD_DIM=D, HEADS_PER_TILE=heads, HEADS_PAD=heads_pad, BLOCK_M=bm,
                             BLOCK_D=D, BLOCK_N=bn, BLOCK_SIZE=16, IEEE=False, HAS_SEQ_IDS=q_len <= 16,
                             stride_qd=1, stride_od=1), warps, stages))
    out.append(Spec("store_kvcache", "K/V cache store", ta._store_kvcache_kernel,
                    {"Key": "*bf16", "Value": "*bf16", "KCache": "*bf16", "VCache": "*bf16", "SlotMapping": "*i64"},
                    dict(NUM_HEADS=HKV, HEAD_DIM=D, BLOCK_H=HKV, BLOCK_D=D, stride_kd=1, stride_vd=1), 4))
    out.append(_gemm("decode_gemm o_proj, 64 rows", 64, HIDDEN, HQ * D, split=True))
    out.append(_gemm("decode_gemm gate/up + SiLU, 64 rows", 64, 2 * INTER, HIDDEN, silu=True))
    out.append(_gemm("decode_gemm q/k/v, 8 rows", 8, (HQ + 2 * HKV) * D, HIDDEN))
    for qk_norm in (True, False):  # without the norm: a head over two programs
        qkv = dg.qkv_rope_config_for_shape(64, HIDDEN, D, 2, qk_norm)
        out.append(Spec("qkv_rope", f"q/k/v projection + {'norm + ' if qk_norm else ''}rotary + K/V store, 64 rows, "
                        f"{qkv.parts} program(s) a head", dg._qkv_rope_kernel,
                        {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "qw_ptr": "*bf16",
                         "kw_ptr": "*bf16", "cos_sin_ptr": "*bf16", "pos_ptr": "*i64", "kc_ptr": "*bf16",
                         "vc_ptr": "*bf16", "slot_ptr": "*i64"},
                        dict(NUM_Q=HQ, NUM_KV=HKV, HALF=D // 2, PARTS=qkv.parts, HAS_BIAS=False, HAS_NORM=qk_norm,
                             STORE=True, BLOCK_M=qkv.block_m, BLOCK_K=qkv.block_k, STAGES=qkv.stages,
                             PRECISION="tf32", PDL=True), qkv.warps, qkv.stages))
    norm_ptrs = {"x_ptr": "*fp32", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16"}
    for splits in (0, 4):
        out.append(Spec("fused", f"residual add + RMSNorm, {splits or 'no'} split-K partial sums",
                        fused._add_rmsnorm_kernel, dict(norm_ptrs, x_ptr="*fp32" if splits else "*bf16"),
                        dict(HAS_RES=True, SPLITS=splits, BLOCK=HIDDEN, PDL=True), 4))
    out.append(Spec("fused", "q/k norm + rotary + K/V store, one token", fused._norm_rope_kernel,
                    {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16",
                     "cos_sin_ptr": "*bf16", "pos_ptr": "*i64", "kc_ptr": "*bf16", "vc_ptr": "*bf16",
                     "slot_ptr": "*i64"},
                    dict(NUM_Q=HQ, NUM_KV=HKV, BLOCK_Q=HQ, BLOCK_KV=HKV, HAS_NORM=True, STORE=True, HALF=D // 2,
                         PDL=True), 4))
    out.append(Spec("fused", "SiLU and mul", fused._silu_mul_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16"},
                    dict(BLOCK=1024, PDL=True), 4))
    for prologue, (n, k) in ((small_linear.ADD_RMSNORM, (HQ * D + 2 * HKV * D, HIDDEN)),
                             (small_linear.SILU_MUL, (HIDDEN, INTER))):
        block_n, block_k = small_linear._config(n, k, SMS)
        out.append(Spec("small_linear", f"one-row GEMV, prologue {prologue}, [{n}, {k}]",
                        small_linear._small_linear_kernel,
                        {"x_ptr": "*bf16", "r_ptr": "*bf16", "g_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16",
                         "y_ptr": "*bf16", "r_out_ptr": "*bf16"},
                        dict(PROLOGUE=prologue, HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k,
                             BLOCK_ROW=triton.next_power_of_2(2 * k if prologue == small_linear.SILU_MUL else k),
                             NUM_STAGES=4), 4))
    sample_ptrs = {"logits_ptr": "*bf16", "temps_ptr": "*fp32", "seeds_ptr": "*i64", "positions_ptr": "*i64",
                   "best_val_ptr": "*fp32", "best_tile_ptr": "*i32", "out_ptr": "*i64"}
    out.append(Spec("sampling", "sampler, tile scores of vocabulary chunks", sampling._tile_scores_kernel,
                    sample_ptrs, dict(MAX_CHUNKS=sampling.MAX_CHUNKS, TILE=sampling.SAMPLE_TILE, FAST_LOG=True,
                                      PDL=True), 8))
    out.append(Spec("sampling", "sampler, draw within the best tile", sampling._tile_draw_kernel, sample_ptrs,
                    dict(MAX_CHUNKS=sampling.MAX_CHUNKS, TILE=sampling.SAMPLE_TILE, FAST_LOG=True, PDL=True), 8))
    return out


def ptxas_path() -> str:
    """The newest ptxas Triton ships (the PTX it emits may be too new for the older one)."""
    from triton import knobs
    for tool in ("ptxas_blackwell", "ptxas"):
        path = getattr(getattr(knobs.nvidia, tool, None), "path", None)
        if path and os.path.exists(path):
            return path
    raise FileNotFoundError("no ptxas in the Triton installation")


def resources(spec: Spec) -> dict:
    """{registers, spill_bytes, shared_bytes} of one program of ``spec``'s kernel."""
    fn = spec.kernel
    unspecialized = {fn.arg_names[i] if isinstance(i, int) else i for i in (fn.do_not_specialize or ())}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in spec.constexprs:
            sig[name] = "constexpr"
        elif name in spec.pointers:
            sig[name] = spec.pointers[name]
            if sig[name].startswith("*"):  # not a TMA descriptor ("tensordesc<...>")
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in unspecialized:
                attrs[(i,)] = [["tt.divisibility", 16]]
    unknown = set(spec.constexprs) - set(fn.arg_names)
    assert not unknown, f"{spec.label}: {fn.__name__} has no arguments {sorted(unknown)}"
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=spec.constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
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


def main():
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated families (decode_attention, prefill_attention, store_kvcache, "
                                  "decode_gemm, qkv_rope, fused, small_linear, sampling)")
    p.add_argument("--json", action="store_true", help="one JSON list on stdout (tests/test_triton_kernels.py)")
    args = p.parse_args()
    chosen = [s for s in specs() if args.only is None or s.family in args.only.split(",")]
    if args.json:
        print(json.dumps([{"family": s.family, "label": s.label, **resources(s)} for s in chosen]))
        return
    print(f"Triton {triton.__version__}, {os.path.basename(ptxas_path())}, sm_90a")
    for s in chosen:
        r = resources(s)
        print(f"  {s.label}: {r['registers']} registers, {r['spill_bytes']} bytes spilled, "
              f"{r['shared_bytes'] / 1024:.1f} KB shared memory ({s.num_warps} warps)", flush=True)


if __name__ == "__main__":
    main()
