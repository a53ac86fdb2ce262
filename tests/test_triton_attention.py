"""The fused Triton thought attention against the dense oracle and the torch path.

On CPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest.py before
triton is imported), which is slow: shapes are tiny but cross several tiles (the interpreter uses
32x16 / 16x32 tiles, so L = 37 spans three query tiles and L = 13 a partial one).

Tolerances: fp32 -- abs 1e-5 and rel 1e-5 (``torch.testing.assert_close``) for out, lse, dQ, dK, dV;
fp16 -- compared with the fp32-math oracle on the same fp16 inputs, max error <= 1e-3 (out) / 1e-5
(lse, fp32 math) / 2e-3 (dQ, dK, dV) relative to the largest magnitude of the reference tensor: fp16 output rounding and the
fp16 probabilities fed to the P @ V and dS @ K tensor-core dots are ~5e-4 relative each.
"""

from __future__ import annotations

import math

import pytest
import torch

import triton_kernels
from quietstar.ops import thought_attention_reference, thought_attention_torch

ok, why = triton_kernels.is_available()
pytestmark = pytest.mark.skipif(not ok, reason=f"triton kernels unavailable: {why}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, Hq, Hkv, L, nk, nq, D, dtype, pad, seed):
    """Fresh random q/k/v as transposed views of [B, T, H, D] tensors (as transformers passes them)."""
    g = torch.Generator().manual_seed(seed)

    def make(H, T):
        x = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
        return x.requires_grad_()

    q, k, v = make(Hq, nq * L), make(Hkv, nk * L), make(Hkv, nk * L)
    mask = None
    if pad is not None:
        mask = torch.ones(B, L, dtype=torch.bool)
        if "left" in pad:
            mask[0, : L // 3] = False
        if "right" in pad:
            mask[-1, L - L // 4 :] = False
        mask = mask.to(DEVICE)
    d_out = torch.randn(B, Hq, nq * L, D, generator=g).to(DEVICE, dtype)
    return q, k, v, mask, d_out


def _run(fn, q, k, v, mask, d_out, L):
    out, lse = fn(q, k, v, base_len=L, key_padding_mask=mask, return_lse=True)
    grads = torch.autograd.grad((out.float() * d_out.float()).sum(), (q, k, v))
    return out, lse, grads


def _check(name, got, want, dtype):
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        # lse is fp32 math throughout: only the fp16 rounding of the inputs it shares with the oracle.
        tol = {"out": 1e-3, "lse": 1e-5}.get(name, 2e-3) * want.abs().max().item()
        err = (got - want).abs().max().item()
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


# (B, Hq, Hkv, L, nk, nq, D, pad)
CASES = {
    "S1_L13_gqa": (2, 4, 2, 13, 2, 2, 16, None),
    "S1_L37_D64_left": (1, 2, 1, 37, 2, 2, 64, "left"),
    "S14_L13_right": (2, 2, 1, 13, 15, 15, 16, "right"),
    "S14_L37_leftright": (2, 2, 2, 37, 15, 15, 16, "left+right"),
    "cached_S14_L37_D64_gqa": (2, 4, 2, 37, 15, 1, 64, "left+right"),
    "cached_S1_L13": (1, 2, 1, 13, 2, 1, 16, "left"),
    "cached_last5_of_15_L21": (1, 2, 1, 21, 15, 5, 16, "left"),  # thought_forward="incremental"'s last call
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference_and_torch_path(case):
    B, Hq, Hkv, L, nk, nq, D, pad = CASES[case]
    q, k, v, mask, d_out = _inputs(B, Hq, Hkv, L, nk, nq, D, torch.float32, pad, seed=list(CASES).index(case))
    out, lse, grads = _run(triton_kernels.thought_attention, q, k, v, mask, d_out, L)
    seen = torch.isfinite(lse)
    for oracle in (thought_attention_reference, thought_attention_torch):
        out_r, lse_r, grads_r = _run(oracle, q, k, v, mask, d_out, L)
        assert torch.equal(seen, torch.isfinite(lse_r)), "rows that see nothing differ"
        _check("out", out, out_r, torch.float32)
        _check("lse", lse[seen], lse_r[seen], torch.float32)
        for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r):
            _check(name, g, g_r, torch.float32)


@pytest.mark.parametrize("case", ["S14_L37_fp16_gqa_left", "cached_S1_L13_fp16"])
def test_fp16_matches_reference(case):
    shape = {"S14_L37_fp16_gqa_left": (1, 4, 2, 37, 15, 15, 64, "left"),
             "cached_S1_L13_fp16": (2, 2, 1, 13, 2, 1, 16, "right")}[case]
    B, Hq, Hkv, L, nk, nq, D, pad = shape
    q, k, v, mask, d_out = _inputs(B, Hq, Hkv, L, nk, nq, D, torch.float16, pad, seed=7)
    out, lse, grads = _run(triton_kernels.thought_attention, q, k, v, mask, d_out, L)
    out_r, lse_r, grads_r = _run(thought_attention_reference, q, k, v, mask, d_out, L)
    seen = torch.isfinite(lse_r)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    _check("out", out, out_r, torch.float16)
    _check("lse", lse[seen], lse_r[seen], torch.float16)
    for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r):
        _check(name, g, g_r, torch.float16)


def test_lse_gradient_and_contiguous_inputs():
    """A loss on the returned lse back-propagates (folded into delta); contiguous inputs work too."""
    B, Hq, Hkv, L, nk, D = 1, 2, 1, 13, 4, 32
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, nk * L, D, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(B, Hkv, nk * L, D, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(B, Hkv, nk * L, D, generator=g).to(DEVICE).requires_grad_()
    w_out = torch.randn(B, Hq, nk * L, D, generator=g).to(DEVICE)
    w_lse = torch.randn(B, Hq, nk * L, generator=g).to(DEVICE)
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[:, -2:] = False  # right padding only: every row still sees a real key, lse finite
    results = []
    for fn in (triton_kernels.thought_attention, thought_attention_reference):
        out, lse = fn(q, k, v, base_len=L, key_padding_mask=mask, scale=0.3, return_lse=True)
        loss = (out * w_out).sum() + (lse * w_lse).sum()
        results.append((out, lse, *torch.autograd.grad(loss, (q, k, v))))
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), *results):
        _check(name, got, want, torch.float32)


def test_rejects_bad_inputs_with_a_clear_message():
    q = torch.randn(1, 2, 26, 24, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        triton_kernels.thought_attention(q, q, q, base_len=13)
    q = torch.randn(1, 2, 26, 16, device=DEVICE)
    with pytest.raises(ValueError, match="whole steps"):
        triton_kernels.thought_attention(q, q, q, base_len=12)
    with pytest.raises(ValueError, match="key_padding_mask"):
        triton_kernels.thought_attention(q, q, q, base_len=13, key_padding_mask=torch.ones(1, 12, dtype=torch.bool))


def test_import_gives_the_module_and_the_function():
    """``triton_kernels.attention`` is the module (not shadowed); ``triton_kernels.thought_attention``
    the function."""
    import importlib

    module = importlib.import_module("triton_kernels.attention")
    assert module.thought_attention is triton_kernels.thought_attention
    assert callable(triton_kernels.thought_attention) and hasattr(module, "_CONFIGS")


def test_hopper_defaults_are_the_measured_winners_and_fp32_gets_one_small_config():
    from triton_kernels import attention as A

    # What the H200 autotuner picked at every benchmark shape (bf16, D 128, Triton 3.6).
    assert A._configs("fwd", "hopper", 128, torch.bfloat16)[0] == (64, 64, 4, 3)
    assert A._configs("dkdv", "hopper", 128, torch.bfloat16)[0] == (32, 64, 4, 3)
    assert A._configs("dq", "hopper", 128, torch.float16)[0] == (128, 64, 8, 2)
    for kernel in ("fwd", "dkdv", "dq"):
        for d in (16, 64, 128, 256):
            assert len(A._configs(kernel, "hopper", d)) >= 2  # something to autotune among
            fp32 = A._configs(kernel, "hopper", d, torch.float32)
            assert len(fp32) == 1 and fp32[0][0] * fp32[0][1] <= 32 * 32, (kernel, d, fp32)
        assert len(A._configs(kernel, "hopper", 128)) == 3  # benchmarks/gpu_check/sweep_configs.py sweeps 3
        # The interpreter keeps its small tiles whatever the dtype (the fp32 tests run there).
        assert A._configs(kernel, "interpret", 64, torch.float32) == A._configs(kernel, "interpret", 64)


def test_autotune_keys_are_bucketed_by_power_of_two_lengths():
    from triton_kernels import attention as A

    assert [A._bucket(n) for n in (1, 2, 3, 1000, 1024, 1025, 4096)] == [1, 2, 4, 1024, 1024, 2048, 4096]
    key = lambda L, Tq, pad=False: A._tune_key("fwd", "hopper", 128, torch.bfloat16, L, Tq, pad, 1)  # noqa: E731
    assert key(1000, 17 * 1000) == key(1024, 17 * 1024) == key(1001, 17 * 1001)
    assert key(1025, 17 * 1025) != key(1024, 17 * 1024)
    assert key(1024, 1024) != key(1024, 17 * 1024)  # cached sampling (one query step) tunes apart
    assert key(1024, 1024, pad=True) != key(1024, 1024)


def test_launcher_benchmarks_once_per_bucket_skips_failing_configs_and_never_tunes_fp32(monkeypatch):
    """The GPU launch path with a fake kernel and a fake clock (no GPU here)."""
    from triton_kernels import attention as A

    launches, timed = [], []

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **constexprs):
                cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages)
                if cfg == (128, 64, 8, 3):
                    raise RuntimeError("out of resources")  # this one fails to launch
                launches.append(cfg)
            return launch

    fake_ms = {(64, 64, 4, 3): 2.0, (128, 64, 8, 2): 1.5}

    def fake_bench(fn):
        fn()
        timed.append(launches[-1])
        return fake_ms[launches[-1]]

    monkeypatch.setattr(A, "_KERNELS", {"fwd": FakeKernel()})
    monkeypatch.setattr(A, "_bench", fake_bench)
    monkeypatch.setattr(A, "_AUTOTUNE", True)
    monkeypatch.setattr(A, "_TUNED", {})
    grid = lambda m, n: (1, 1, 1)  # noqa: E731
    for L in (1000, 1024, 1017):  # one bucket: benchmarked once
        A._launch("fwd", "hopper", 128, torch.bfloat16, grid, (), A._tune_key("fwd", "hopper", 128, torch.bfloat16,
                  L, 2 * L, False, 1), HEAD_DIM=128)
    assert timed == [(64, 64, 4, 3), (128, 64, 8, 2)]
    assert launches[-3:] == [(128, 64, 8, 2)] * 3  # the fastest one that works, every time
    A._launch("fwd", "hopper", 128, torch.bfloat16, grid, (), A._tune_key("fwd", "hopper", 128, torch.bfloat16,
              1025, 2050, False, 1), HEAD_DIM=128)
    assert len(timed) == 4  # a new bucket benchmarks again
    timed.clear()
    A._launch("fwd", "hopper", 128, torch.float32, grid, (), None, HEAD_DIM=128)
    assert timed == [] and launches[-1] == A._FP32_CONFIGS["fwd"](128)[0]
    monkeypatch.setattr(A, "_AUTOTUNE", False)
    A._launch("fwd", "hopper", 128, torch.bfloat16, grid, (), None, HEAD_DIM=128)
    assert timed == [] and launches[-1] == (64, 64, 4, 3)


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_bf16_long_sequence_matches_torch_path():
    B, Hq, Hkv, L, nk, D = 1, 4, 2, 2048, 5, 128
    q, k, v, mask, d_out = _inputs(B, Hq, Hkv, L, nk, nk, D, torch.bfloat16, "left+right", seed=11)
    out, lse, grads = _run(triton_kernels.thought_attention, q, k, v, mask, d_out, L)
    out_r, lse_r, grads_r = _run(thought_attention_torch, q, k, v, mask, d_out, L)
    seen = torch.isfinite(lse_r)
    # bf16 has an 8-bit mantissa (~4e-3 relative per rounding): allow 2e-2 of the largest magnitude.
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse[seen], *grads), (out_r, lse_r[seen], *grads_r)):
        err = (got.float() - want.float()).abs().max().item()
        assert math.isfinite(err) and err <= 2e-2 * want.float().abs().max().item(), f"{name}: {err}"


@pytest.mark.gpu
def test_gpu_deterministic():
    B, Hq, Hkv, L, nk, D = 2, 8, 2, 1024, 9, 64
    q, k, v, mask, d_out = _inputs(B, Hq, Hkv, L, nk, nk, D, torch.bfloat16, "left", seed=5)
    first = _run(triton_kernels.thought_attention, q, k, v, mask, d_out, L)
    second = _run(triton_kernels.thought_attention, q, k, v, mask, d_out, L)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert torch.equal(a, b), "two identical runs differ: a race or nondeterministic reduction"


@pytest.mark.gpu
def test_gpu_offsets_past_2_to_the_31_elements():
    """Rows 2**20 elements apart: every row past 2048 sits more than 2**31 elements from the base pointer,
    so an int32 ``row * stride`` anywhere (q, k, v, out, dq, dk, dv) wraps. ~14 GB of GPU memory."""
    B, H, L, nk, D, row_stride = 1, 1, 1152, 2, 64, 2**20
    T = nk * L  # 2304 rows: the last 256 lie past 2**31
    g = torch.Generator(device="cuda").manual_seed(13)

    def strided():
        buf = torch.empty(B, T, H, row_stride, device="cuda", dtype=torch.bfloat16)
        buf[..., :D] = torch.randn(B, T, H, D, device="cuda", generator=g).to(torch.bfloat16)
        return buf[..., :D].transpose(1, 2).requires_grad_()  # [B, H, T, D], stride_t = 2**20

    q, k, v = strided(), strided(), strided()
    assert q.stride(2) * (T - 1) > 2**31
    d_out = torch.randn(B, H, T, D, device="cuda", generator=g).to(torch.bfloat16)
    out, lse, grads = _run(triton_kernels.thought_attention, q, k, v, None, d_out, L)
    dense = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    out_r, lse_r, grads_r = _run(thought_attention_torch, *dense, None, d_out, L)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (out_r, lse_r, *grads_r)):
        err = (got.float() - want.float()).abs().max().item()
        assert math.isfinite(err) and err <= 2e-2 * want.float().abs().max().item(), f"{name}: {err}"
