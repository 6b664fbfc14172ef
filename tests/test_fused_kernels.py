"""The fused Triton kernels against the plain torch ops they replace (interpreter on CPU, real on GPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from workers.kernels import fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [torch.float16])


def ref_rmsnorm(x, w, eps):  # written out independently: float64 math, rounded once at the end
    x64 = x.double()
    return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()).to(x.dtype)


def close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [64, 1000, 1024])
def test_rmsnorm_and_residual(dtype, cols):
    torch.manual_seed(0)
    x = torch.randn(7, cols, dtype=dtype, device=DEVICE)
    r = torch.randn(7, cols, dtype=dtype, device=DEVICE)
    w = torch.rand(cols, dtype=dtype, device=DEVICE) + 0.5
    assert close(fused.rmsnorm(x, w, 1e-6), ref_rmsnorm(x, w, 1e-6), dtype)
    out, res = fused.rmsnorm(x, w, 1e-6, r)
    assert torch.equal(res, x + r)
    assert close(out, ref_rmsnorm(x + r, w, 1e-6), dtype)


def rope_angles(positions: int, d: int) -> torch.Tensor:
    return torch.outer(torch.arange(positions, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))


def ref_norm_rope(x, w, angles, positions):
    """float64 per-head RMSNorm (when w is given), then neox rotary at `positions`."""
    x = ref_rmsnorm(x, w, 1e-6) if w is not None else x
    x1, x2 = x.double().chunk(2, -1)
    a = angles[positions.cpu()].to(x1.device).unsqueeze(1)
    cos, sin = a.cos(), a.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("hq,hk", [(4, 2), (9, 3)])
def test_qk_norm_rope_in_place_on_strided_views(dtype, norm, hq, hk):
    torch.manual_seed(1)
    T, d = 5, 64
    qkv = torch.randn(T, (hq + 2 * hk) * d, dtype=dtype, device=DEVICE)
    before = qkv.clone()
    q = qkv[:, :hq * d].view(T, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(T, hk, d)
    positions = torch.tensor([0, 3, 7, 100, 5], device=DEVICE)
    angles = rope_angles(128, d)
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1).float().to(DEVICE)
    qw = torch.rand(d, dtype=dtype, device=DEVICE) + 0.5 if norm else None
    kw = torch.rand(d, dtype=dtype, device=DEVICE) + 0.5 if norm else None
    fused.qk_norm_rope(q, k, positions, cos_sin, qw, kw, 1e-6)
    assert close(q, ref_norm_rope(before[:, :hq * d].view(T, hq, d), qw, angles, positions), dtype)
    assert close(k, ref_norm_rope(before[:, hq * d:(hq + hk) * d].view(T, hk, d), kw, angles, positions), dtype)
    assert torch.equal(qkv[:, (hq + hk) * d:], before[:, (hq + hk) * d:])  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", [(4, 2), (9, 3)])
def test_qk_norm_rope_writes_the_kv_cache(dtype, hq, hk):
    """With caches given, q and k are rotated in place and the rotated k and the untouched v land in exactly
    the slots of slot_mapping (-1: nothing written): all against the float64 reference."""
    torch.manual_seed(3)
    T, d, blocks, block_size = 4, 32, 3, 4
    qkv = torch.randn(T, (hq + 2 * hk) * d, dtype=dtype, device=DEVICE)
    before = qkv.clone()
    q, k, v = (qkv[:, :hq * d].view(T, hq, d), qkv[:, hq * d:(hq + hk) * d].view(T, hk, d),
               qkv[:, (hq + hk) * d:].view(T, hk, d))
    positions = torch.tensor([0, 3, 7, 9], device=DEVICE)
    angles = rope_angles(16, d)
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1).float().to(DEVICE)
    w = torch.rand(d, dtype=dtype, device=DEVICE) + 0.5
    k_cache = torch.full((blocks, block_size, hk, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.tensor([5, -1, 0, 11], device=DEVICE)
    fused.qk_norm_rope(q, k, positions, cos_sin, w, w, 1e-6, v=v, k_cache=k_cache, v_cache=v_cache,
                       slot_mapping=slots)
    expected_k = ref_norm_rope(before[:, hq * d:(hq + hk) * d].view(T, hk, d), w, angles, positions)
    assert close(q, ref_norm_rope(before[:, :hq * d].view(T, hq, d), w, angles, positions), dtype)
    assert close(k, expected_k, dtype)
    assert torch.equal(v, before[:, (hq + hk) * d:].view(T, hk, d))
    flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert close(flat_k[slot], expected_k[t], dtype) and torch.equal(flat_v[slot], v[t])
    untouched = [s for s in range(blocks * block_size) if s not in slots.tolist()]
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    torch.manual_seed(2)
    x = torch.randn(6, 2 * 1500, dtype=dtype, device=DEVICE)
    g, u = x.double().chunk(2, -1)
    assert close(fused.silu_and_mul(x), (g * torch.sigmoid(g) * u).to(dtype), dtype)



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,bias", [(64, 512, False), (48, 2048, True), (1024, 256, False), (40, 512, True),
                                      (32, 96, False)])
def test_small_linear_against_float64(dtype, n, k, bias):
    from workers.kernels import small_linear

    torch.manual_seed(n + k)
    x = torch.randn(1, k, dtype=dtype, device=DEVICE)
    w = (torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5).contiguous()
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    assert small_linear.supports(x, w)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert close(small_linear.small_linear(x, w, b), ref.to(dtype), dtype)


def test_small_linear_declines_what_it_cannot_tile():
    from workers.kernels import small_linear

    w = torch.randn(64, 512, device=DEVICE)
    assert not small_linear.supports(torch.randn(2, 512, device=DEVICE), w)  # more than one row
    assert not small_linear.supports(torch.randn(1, 100, device=DEVICE), torch.randn(64, 100, device=DEVICE))
    assert small_linear.supports(torch.randn(1, 96, device=DEVICE), torch.randn(64, 96, device=DEVICE))  # K = 3 x 32
    assert not small_linear.supports(torch.randn(1, 512, device=DEVICE), torch.randn(60, 512, device=DEVICE))
    assert not small_linear.supports(torch.randn(1, 512, device=DEVICE).half(), w)  # dtype mismatch
    assert not small_linear.supports(torch.randn(1, 1024, device=DEVICE)[:, ::2], w)  # strided row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_linear_against_float64(dtype, with_residual):
    """The norm fused into the 1-row projection: the same rounding points as fused.rmsnorm, then the GEMV."""
    from workers.kernels import small_linear

    torch.manual_seed(3)
    k, n = 512, 96
    x = torch.randn(1, k, dtype=dtype, device=DEVICE)
    r = torch.randn(1, k, dtype=dtype, device=DEVICE) if with_residual else None
    g = torch.rand(k, dtype=dtype, device=DEVICE) + 0.5
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
    b = torch.randn(n, dtype=dtype, device=DEVICE)
    y, res = small_linear.rmsnorm_linear(x, r, g, 1e-6, w, b)
    summed = x + r if with_residual else x
    assert torch.equal(res, summed)
    ref = ref_rmsnorm(summed, g, 1e-6).double() @ w.double().T + b.double()
    assert close(y, ref.to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_linear_against_float64(dtype):
    from workers.kernels import small_linear

    torch.manual_seed(4)
    k, n = 768, 64
    gate_up = torch.randn(1, 2 * k, dtype=dtype, device=DEVICE) * 2
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
    gate, up = gate_up[:, :k].double(), gate_up[:, k:]
    act = (gate * torch.sigmoid(gate)).to(dtype) * up  # silu rounded to the dtype, then the product
    ref = act.double() @ w.double().T
    assert close(small_linear.silu_mul_linear(gate_up, w), ref.to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,split,silu,bias", [(5, 64, 128, 1, False, False), (20, 64, 256, 2, False, True),
                                                   (33, 128, 128, 1, True, True), (3, 32, 256, 4, False, False),
                                                   (16, 96, 64, 1, True, False)])
def test_decode_gemm_against_float64(dtype, m, n, k, split, silu, bias):
    from workers.kernels import decode_gemm as dg

    torch.manual_seed(m + n + k)
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    if silu:  # the unfused path rounds the projection to the dtype before silu_and_mul
        gate, up = ref.to(dtype).double().chunk(2, -1)
        ref = gate * torch.sigmoid(gate) * up
    config = dg.GemmConfig(block_m=16 if m <= 16 else 32, block_n=16 if n // (2 if silu else 1) % 32 else 32,
                           block_k=32, split_k=split, stages=2, warps=4)
    y = dg.decode_gemm(x, w, config, b, silu_mul=silu)
    assert isinstance(y, dg.SplitSums) == (split > 1)
    assert close(dg.reduce_splits(y), ref.to(dtype), dtype)


@pytest.mark.skipif(DEVICE != "cuda", reason="choose_config picks a kernel config on CUDA only (None elsewhere)")
@pytest.mark.parametrize("m", [2, 16, 48, 64, 200])
@pytest.mark.parametrize("name", ["o", "gate_up+silu", "down"])
def test_decode_gemm_chosen_configs_against_float64(m, name):
    """The engine's own configs (choose_config) at Qwen3-0.6B's shapes compute x W^T (bf16 tolerance)."""
    from workers.kernels import decode_gemm as dg

    k, n = {"o": (2048, 1024), "gate_up+silu": (1024, 6144), "down": (3072, 1024)}[name]
    silu = name == "gate_up+silu"
    torch.manual_seed(m)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE)
    w = torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE) / k ** 0.5
    config = dg.choose_config(x, w, silu_mul=silu, allow_split=not silu)
    if config is None:  # cuBLAS's rows (here: gate/up above 64 rows)
        assert silu and m > 64
        return
    ref = x.double() @ w.double().T
    if silu:
        gate, up = ref.to(torch.bfloat16).double().chunk(2, -1)
        ref = gate * torch.sigmoid(gate) * up
    y = dg.reduce_splits(dg.decode_gemm(x, w, config, silu_mul=silu))
    assert close(y, ref.to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_adds_up_split_sums(dtype):
    from workers.kernels import decode_gemm as dg

    torch.manual_seed(1)
    # multiples of 1/16: every partial sum is exact in float32, so only the final rounding to dtype remains
    parts = torch.randint(-64, 64, (3, 6, 200), device=DEVICE).float() / 16
    r = torch.randn(6, 200, dtype=dtype, device=DEVICE)
    w = torch.rand(200, dtype=dtype, device=DEVICE) + 0.5
    x = parts.double().sum(0).to(dtype)  # the projection's output, rounded once
    out, res = fused.rmsnorm(dg.SplitSums(parts, dtype), w, 1e-6, r)
    assert torch.equal(res, x + r)
    assert close(out, ref_rmsnorm(x + r, w, 1e-6), dtype)
    assert close(fused.rmsnorm(dg.SplitSums(parts, dtype), w, 1e-6), ref_rmsnorm(x, w, 1e-6), dtype)


def test_row_parallel_reduce_passes_split_sums_to_the_norm_or_adds_them_up():
    """One rank and no bias: the partial sums go on to the RMSNorm untouched; with a bias they are added up
    (rounded once) and the bias added, as F.linear would."""
    from parallel.distributed import ParallelContext
    from parallel.layers import RowParallelLinear
    from workers.kernels import decode_gemm as dg

    parts = torch.randint(-64, 64, (2, 3, 8)).float() / 16
    sums = dg.SplitSums(parts, torch.float16)
    plain = RowParallelLinear(16, 8, ParallelContext(0, 1), bias=False, dtype=torch.float16)
    assert plain.reduce(sums) is sums
    biased = RowParallelLinear(16, 8, ParallelContext(0, 1), bias=True, dtype=torch.float16)
    biased.bias.data = torch.arange(8, dtype=torch.float16)
    assert torch.equal(biased.reduce(sums), parts.sum(0).half() + biased.bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,hq,hk,d,norm,bias,block_m,parts", [
    (5, 4, 2, 32, True, False, 16, 1), (20, 2, 1, 64, False, True, 16, 1), (33, 3, 3, 32, True, True, 32, 1),
    (20, 2, 1, 64, False, True, 16, 2), (9, 4, 2, 128, False, False, 16, 2), (9, 4, 2, 128, False, False, 16, 4)])
def test_qkv_rope_against_float64(dtype, m, hq, hk, d, norm, bias, block_m, parts):
    """The q/k/v projection with the q/k RMSNorm, rotary and K/V cache write in its epilogue: every head
    against float64, the caches written at exactly the slots given (-1: nothing), nothing else touched.
    Without the norm also with a head's rotary pairs over 2 or 4 programs."""
    from workers.kernels import decode_gemm as dg

    torch.manual_seed(m + hq + d)
    k, heads, block_size = 64, hq + 2 * hk, 4
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    w = torch.randn(heads * d, k, dtype=dtype, device=DEVICE) / k ** 0.5
    b = torch.randn(heads * d, dtype=dtype, device=DEVICE) if bias else None
    positions = torch.randint(0, 60, (m,), device=DEVICE)
    angles = rope_angles(64, d)
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1).float().to(DEVICE)
    qw = torch.rand(d, dtype=dtype, device=DEVICE) + 0.5 if norm else None
    kw = torch.rand(d, dtype=dtype, device=DEVICE) + 0.5 if norm else None
    blocks = m // block_size + 3
    k_cache = torch.full((blocks, block_size, hk, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.randperm(blocks * block_size, device=DEVICE)[:m]
    slots[1] = -1  # a padded row
    config = dg.QkvRopeConfig(block_m=block_m, block_k=32, stages=2, warps=4, parts=parts)
    y = dg.qkv_rope(x, w, b, config, hq, hk, d, positions, cos_sin, qw, kw, 1e-6, k_cache, v_cache, slots)

    proj = (x.double() @ w.double().T + (b.double() if bias else 0)).to(dtype)  # rounded, as a GEMM writes it
    q_ref = ref_norm_rope(proj[:, :hq * d].view(m, hq, d), qw, angles, positions)
    k_ref = ref_norm_rope(proj[:, hq * d:(hq + hk) * d].view(m, hk, d), kw, angles, positions)
    v_ref = proj[:, (hq + hk) * d:].view(m, hk, d)
    assert close(y[:, :hq * d].view(m, hq, d), q_ref.to(dtype), dtype)
    assert close(y[:, hq * d:(hq + hk) * d].view(m, hk, d), k_ref.to(dtype), dtype)
    assert close(y[:, (hq + hk) * d:].view(m, hk, d), v_ref, dtype)
    flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
    written = [s for s in slots.tolist() if s >= 0]
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert close(flat_k[slot], k_ref[t].to(dtype), dtype) and close(flat_v[slot], v_ref[t], dtype)
    untouched = [s for s in range(blocks * block_size) if s not in written]
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all()


def test_qkv_rope_config_declines_what_it_cannot_run():
    from workers.kernels import decode_gemm as dg

    # a head over head_dim / 64 programs only without the q/k norm, which needs the whole head
    assert dg.qkv_rope_config_for_shape(64, 1024, 128, 2, qk_norm=True).parts == 1
    assert dg.qkv_rope_config_for_shape(64, 1024, 128, 2, qk_norm=False).parts == 2
    assert dg.qkv_rope_config_for_shape(64, 1024, 64, 2, qk_norm=False).parts == 1
    with pytest.raises(AssertionError, match="whole head"):
        dg.qkv_rope(torch.zeros(2, 64), torch.zeros(4 * 128, 64), None, dg.QkvRopeConfig(16, 32, 2, 4, 2), 2, 1,
                    128, torch.zeros(2, dtype=torch.long), torch.zeros(8, 128), torch.ones(128), torch.ones(128))

    w = torch.empty(4 * 64, 128)
    assert dg.choose_qkv_rope_config(torch.empty(8, 128), w, 64) is None  # not CUDA
    if DEVICE == "cuda":
        assert dg.choose_qkv_rope_config(torch.empty(8, 128, device=DEVICE), w.to(DEVICE), 64) is not None
        assert dg.choose_qkv_rope_config(torch.empty(1, 128, device=DEVICE), w.to(DEVICE), 64) is None
        assert dg.choose_qkv_rope_config(torch.empty(dg.QKV_ROPE_MAX_ROWS + 1, 128, device=DEVICE), w.to(DEVICE), 64) is None
        assert dg.choose_qkv_rope_config(torch.empty(8, 128, device=DEVICE), w.to(DEVICE)[:, :100], 64) is None
