"""quietstar_torch against the dense oracle: outputs and gradients w.r.t. q, k, v.

quietstar_torch has two implementations: on CPU torch's flash-attention kernel (``cpu_flash``), and
the chunked decomposition (every other device); both are checked here on CPU.
"""

import pytest
import torch

import quietstar.ops.torch_path as tp
from quietstar.ops import plain_causal_attention, thought_attention_reference, thought_attention_torch

IMPLEMENTATIONS = ("cpu_flash", "chunked")


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request, monkeypatch):
    monkeypatch.setattr(tp, "USE_CPU_FLASH", request.param == "cpu_flash")
    return request.param

# (B, Hq, Hkv, L, n_key_steps, n_query_steps, D, padding)
SHAPES = [
    (2, 4, 4, 13, 2, 2, 16, "left"),  # S = 1, L not a multiple of 16
    (2, 4, 2, 37, 15, 15, 32, "right"),  # S = 14, GQA
    (1, 2, 1, 20, 16, 16, 8, None),  # S = 15, MQA
    (2, 6, 3, 9, 15, 1, 16, "left"),  # cached sampling step: one query step, 15 key steps
    (3, 2, 2, 1, 5, 5, 4, "right"),  # L = 1
    (2, 4, 2, 11, 6, 3, 8, "left"),  # cached call with several query steps (1 < nq < nk)
    (2, 2, 1, 10, 3, 3, 8, "all"),  # one batch row entirely padding
]
ATOL = 2e-5  # fp32 inputs, fp32 math on both sides


def _inputs(B, Hq, Hkv, L, nk, nq, D, padding, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, nq * L, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, nk * L, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, nk * L, D, generator=g, requires_grad=True)
    pad = None
    if padding:
        pad = torch.ones(B, L, dtype=torch.bool)
        n = min(3, L - 1) if L > 1 else 0
        if padding == "all":
            pad[0] = False
        elif n:
            if padding == "left":
                pad[0, :n] = False
            else:
                pad[-1, L - n:] = False
    return q, k, v, pad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}-{}_L{}_nk{}_nq{}_D{}_{}".format(*s))
def test_torch_path_matches_reference(shape, implementation):
    B, Hq, Hkv, L, nk, nq, D, padding = shape
    q, k, v, pad = _inputs(*shape, seed=sum(shape[:7]))
    scale = 0.3
    out_ref, lse_ref = thought_attention_reference(q, k, v, base_len=L, key_padding_mask=pad, scale=scale, return_lse=True)
    out, lse = thought_attention_torch(q, k, v, base_len=L, key_padding_mask=pad, scale=scale, return_lse=True)
    rows = torch.ones(B, nq * L, dtype=torch.bool) if pad is None else pad.repeat(1, nq)
    rows = rows[:, None, :].expand(B, Hq, -1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[rows], out_ref[rows], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(lse[rows], lse_ref[rows], atol=ATOL, rtol=1e-5)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)) * rows[..., None]
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), grad_out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for name, got, want in zip("qkv", grads, grads_ref):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("chunk", [1, 4, 5, 24], ids=lambda c: f"chunk{c}")
def test_chunked_path_does_not_depend_on_the_chunk(monkeypatch, chunk):
    """Chunk lengths that divide L = 24 (4), do not (5), one row (1) and the whole L: same out and grads."""
    monkeypatch.setattr(tp, "USE_CPU_FLASH", False)
    B, Hq, Hkv, L, S = 2, 2, 1, 24, 3
    q, k, v, pad = _inputs(B, Hq, Hkv, L, S + 1, S + 1, 8, "left", seed=3)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)) * pad.repeat(1, S + 1)[:, None, :, None]
    whole = thought_attention_torch(q, k, v, base_len=L, key_padding_mask=pad)
    whole_grads = torch.autograd.grad(whole, (q, k, v), grad_out)
    rows_per_chunk = B * Hkv * (Hq // Hkv) * (S + 1)  # the "batch_heads_rows" of _chunk_len
    monkeypatch.setattr(tp, "_CHUNK_SCORE_ELEMENTS", chunk * rows_per_chunk * L)
    assert tp._chunk_len(rows_per_chunk, L) == chunk
    chunked = thought_attention_torch(q, k, v, base_len=L, key_padding_mask=pad)
    grads = torch.autograd.grad(chunked, (q, k, v), grad_out)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, whole_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_plain_causal_matches_sdpa_with_cache_offset():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k = torch.randn(2, 2, 10, 8, generator=g)
    v = torch.randn(2, 2, 10, 8, generator=g)
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[0, :2] = False
    out = plain_causal_attention(q, k, v, padding_mask=pad)
    # the 3 queries are positions 7, 8, 9 of 10: the last query rows of full causal attention
    full_q = torch.cat([torch.randn(2, 4, 7, 8, generator=g), q], dim=2)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()[None] & pad[:, None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(
        full_q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed[:, None]
    )[:, :, 7:]
    torch.testing.assert_close(out, ref)


def test_bad_shapes_are_named():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="whole steps"):
        thought_attention_torch(q, torch.randn(1, 2, 15, 8), torch.randn(1, 2, 15, 8), base_len=4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        thought_attention_torch(q, torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8), base_len=5)
    with pytest.raises(ValueError, match="dtypes differ"):
        thought_attention_torch(q, torch.randn(1, 2, 10, 8).double(), torch.randn(1, 2, 10, 8), base_len=5)
    with pytest.raises(ValueError, match="key_padding_mask"):
        thought_attention_torch(q, torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), base_len=5,
                                key_padding_mask=torch.ones(1, 4, dtype=torch.bool))


def test_chunk_budget_depends_on_the_device():
    """CPU keeps small chunks; GPUs take 8x larger ones: 2M-element chunks made the chunked replay 4x
    slower on an H100 (benchmarks/RESULTS.md, "--compare chunks")."""
    rows, L = 32, 1024  # e.g. B 2, 2 kv heads, 8 query rows each
    cpu, gpu = tp._chunk_len(rows, L, "cpu"), tp._chunk_len(rows, L, "cuda")
    assert cpu == (1 << 21) // (rows * L) and gpu == (1 << 24) // (rows * L) == 8 * cpu
    assert tp._chunk_len(rows, 64, "cuda") == 64  # never longer than L
