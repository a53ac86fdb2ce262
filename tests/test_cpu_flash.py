"""The CPU flash-attention form of quietstar_torch (quietstar/ops/cpu_flash.py) in fp64.

fp64 inputs keep the kernel in fp64, so it is compared with the dense oracle at ~1e-12: any error
in the log-sum-exp merge or in its backward (which reuses the kernel's backward with the MERGED
output and log-sum-exp) shows as a gross mismatch, not as rounding.
"""

import math

import pytest
import torch

import quietstar.ops.torch_path as tp
from quietstar.layout import ThoughtLayout, visibility_mask
from quietstar.ops import thought_attention_torch

# (B, Hq, Hkv, L, n_key_steps, n_query_steps, D, padding)
SHAPES = [
    (2, 4, 2, 17, 15, 15, 8, None),  # training replay, S = 14, odd L, GQA
    (2, 2, 2, 13, 6, 6, 16, "left"),
    (3, 3, 1, 9, 4, 4, 8, "right"),  # MQA
    (2, 4, 2, 11, 10, 1, 8, "left"),  # cached sampling step
    (2, 2, 1, 7, 5, 2, 4, "right"),  # cached call with several query steps
    (1, 2, 2, 5, 1, 1, 8, None),  # no extra steps at all: plain causal attention
]


def dense_fp64(q, k, v, base_len, key_padding_mask):
    """The visibility rule as a dense mask, softmax in fp64 (the package's reference computes in fp32)."""
    first_query_step, n_key_steps = ThoughtLayout(base_len).steps(q.shape[2], k.shape[2])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = visibility_mask(base_len, n_key_steps, key_padding_mask, first_query_step)[:, None]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None]) @ v, lse


def _inputs(B, Hq, Hkv, L, nk, nq, D, padding, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = make(B, Hq, nq * L, D), make(B, Hkv, nk * L, D), make(B, Hkv, nk * L, D)
    pad = None
    if padding:
        pad = torch.ones(B, L, dtype=torch.bool)
        pad[0, :3] = padding != "left"
        pad[0, L - 2 :] = padding != "right"
        pad[-1, 1] = False  # a hole inside a row too
    return q, k, v, pad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}-{}_L{}_nk{}_nq{}_D{}_{}".format(*s))
def test_cpu_flash_equals_dense_fp64(shape, monkeypatch):
    monkeypatch.setattr(tp, "USE_CPU_FLASH", True)
    B, Hq, Hkv, L, nk, nq, D, padding = shape
    q, k, v, pad = _inputs(*shape, seed=sum(shape[:7]))
    out_ref, lse_ref = dense_fp64(q, k, v, L, pad)
    out, lse = thought_attention_torch(q, k, v, base_len=L, key_padding_mask=pad, return_lse=True)
    assert out.dtype == torch.float64
    rows = (torch.ones(B, L, dtype=torch.bool) if pad is None else pad.cumsum(-1) > 0).repeat(1, nq)
    rows = rows[:, None, :].expand(B, Hq, -1)  # rows that see at least one key
    torch.testing.assert_close(out[rows], out_ref[rows], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse[rows], lse_ref[rows], atol=1e-12, rtol=1e-12)
    assert torch.isfinite(out).all()

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * rows[..., None]
    want = torch.autograd.grad(out_ref, (q, k, v), grad_out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-11, msg=lambda m: f"d{name}: {m}")


def test_cpu_flash_gradcheck(monkeypatch):
    """Finite differences, independent of the reference's own backward."""
    monkeypatch.setattr(tp, "USE_CPU_FLASH", True)
    q, k, v, pad = _inputs(1, 2, 1, 5, 4, 4, 4, "left", seed=1)
    pad[0, 1] = True  # keep every row with a key, so the output is smooth everywhere
    assert torch.autograd.gradcheck(
        lambda q, k, v: thought_attention_torch(q, k, v, base_len=5, key_padding_mask=pad), (q, k, v)
    )


def test_cpu_flash_equals_chunked_in_fp32(monkeypatch):
    """The two implementations of quietstar_torch agree on fp32 inputs (the model's case)."""
    q, k, v, pad = (t.float().detach().requires_grad_() if t is not None and t.is_floating_point() else t
                    for t in _inputs(2, 4, 2, 19, 15, 15, 16, "left", seed=4))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(8))
    results = []
    for flash in (True, False):
        monkeypatch.setattr(tp, "USE_CPU_FLASH", flash)
        out = thought_attention_torch(q, k, v, base_len=19, key_padding_mask=pad)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out * pad.repeat(1, 15)[:, None, :, None])))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
