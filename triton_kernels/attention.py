"""Fused Triton thought attention (forward + backward) for the flattened, step-major layout.

Layout: ``(1 + S) * L`` tokens, ``index(s, i) = s * L + i``. Query ``(s, i)`` sees key ``(s', j)``
iff base position ``j`` is real and either ``s' == 0 and j <= i`` or ``j == i and 1 <= s' <= s``.

Every query row's keys split into two disjoint sets, and the kernels treat them differently:

* the causal base prefix (``s' == 0``): tiled exactly like causal FlashAttention -- a query tile of
  one step at positions ``[m0, m0 + BLOCK_M)`` walks the base key tiles ``[0, m0 + BLOCK_M)``;
  tiles strictly below the diagonal need no causal mask, tiles above it are never visited;
* the row's own extra keys ``(s', i), 1 <= s' <= s``: a per-row diagonal of at most ``S`` keys, each
  loaded as one ``[BLOCK_M, D]`` slab (row ``i`` takes key row ``s' * L + i``) and reduced with an
  elementwise product -- no ``[BLOCK_M, BLOCK_N]`` tile is spent on the ``S`` useful entries.

Both parts share one online softmax. The forward saves the log-sum-exp; the backward recomputes
probabilities FlashAttention-2 style in four launches, none with atomics (deterministic):
``delta = rowsum(dO * O) - dLSE``; dK/dV of the base keys (a program owns a key tile and loops over
its query heads, steps and the query tiles at or below the diagonal); dQ (a program owns a query
tile); dK/dV of the extra keys (a program owns a tile of one extra step and loops over the later
query steps at the same positions).

Queries may be the last ``nq`` of the ``nk`` key steps (``nq < nk``: the cached sampling call), by
the ``first_q_step = nk - nq`` offset: local query step ``t`` is absolute step ``first_q_step + t``.

Matmuls take the input dtype (fp16/bf16 tensor cores, fp32 accumulation; fp32 inputs use exact
"ieee" dots, not TF32); softmax statistics, the extra-key diagonal and all accumulators are fp32.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from ._attention_kernels import (
    _attn_bwd_dkdv_base,
    _attn_bwd_dkdv_extra,
    _attn_bwd_dq,
    _attn_fwd,
    _bwd_preprocess,
)

__all__ = ["thought_attention", "ThoughtAttentionFunction"]

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

# Set QUIETSTAR_TRITON_AUTOTUNE=0 to use the per-architecture defaults below without benchmarking.
# The interpreter cannot autotune (more than one config fails there), so it never does.
_AUTOTUNE = not _INTERPRET and os.environ.get("QUIETSTAR_TRITON_AUTOTUNE", "1") != "0"


def _arch(device: torch.device) -> str:
    """'interpret', 'hopper' (sm90+), 'a100' (sm80) or 'ampere_small' (sm86/sm89/older)."""
    if _INTERPRET or device.type != "cuda":
        return "interpret"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "hopper"
    if (major, minor) == (8, 0):
        return "a100"
    return "ampere_small"


# (BLOCK_M, BLOCK_N, num_warps, num_stages), first entry = the default, the rest = autotune extras.
# Why these: Hopper (228 KiB shared memory, large register file per SM) and A100 (164 KiB) afford
# 128-row query tiles with 64-key tiles and 3 pipeline stages of K/V -- the same shape FlashAttention-2
# settles on; consumer Ampere/Ada (sm86/89: ~99 KiB) must drop to 64-row tiles or 2 stages to fit.
# D = 256 halves the tiles everywhere (the fp32 accumulator alone is BLOCK_M x 256). The forward and
# dQ also hold fp32 copies of q (and dO) for the extra-key diagonal, so 8 warps at D >= 128 keep the
# per-thread register count below spilling. The dK/dV pass is transposed (a program owns BLOCK_N keys
# and walks BLOCK_M-row query tiles), hence small BLOCK_M and large BLOCK_N there (as in tutorial 06).
# The interpreter uses small tiles so that the tests cross several tiles at tiny L.
_CONFIGS = {
    ("fwd", "interpret"): lambda d: [(32, 16, 4, 1)],
    ("fwd", "hopper"): lambda d: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)] if d <= 64 else
    [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)] if d <= 128 else [(64, 64, 8, 2), (64, 32, 4, 2)],
    ("fwd", "a100"): lambda d: [(128, 64, 4, 3), (64, 64, 4, 3)] if d <= 64 else
    [(128, 64, 8, 2), (64, 64, 4, 3)] if d <= 128 else [(64, 32, 4, 2), (64, 64, 8, 1)],
    ("fwd", "ampere_small"): lambda d: [(128, 64, 4, 2), (64, 64, 4, 2)] if d <= 64 else
    [(64, 64, 4, 2), (128, 32, 8, 2)] if d <= 128 else [(64, 32, 4, 1)],
    ("dkdv", "interpret"): lambda d: [(16, 32, 4, 1)],
    ("dkdv", "hopper"): lambda d: [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3)] if d <= 64 else
    [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)] if d <= 128 else [(16, 64, 8, 2), (32, 64, 8, 1)],
    ("dkdv", "a100"): lambda d: [(32, 128, 4, 3), (32, 64, 4, 3)] if d <= 64 else
    [(32, 128, 8, 2), (32, 64, 4, 2)] if d <= 128 else [(16, 64, 8, 1)],
    ("dkdv", "ampere_small"): lambda d: [(32, 64, 4, 2), (16, 64, 4, 2)] if d <= 128 else [(16, 32, 4, 1)],
    ("dq", "interpret"): lambda d: [(32, 16, 4, 1)],
    ("dq", "hopper"): lambda d: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)] if d <= 64 else
    [(128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)] if d <= 128 else [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("dq", "a100"): lambda d: [(128, 32, 4, 3), (64, 32, 4, 3)] if d <= 64 else
    [(128, 32, 8, 2), (64, 32, 4, 2)] if d <= 128 else [(64, 32, 8, 1)],
    ("dq", "ampere_small"): lambda d: [(64, 32, 4, 2), (128, 32, 8, 2)] if d <= 128 else [(32, 32, 4, 1)],
}


def _elementwise_block(arch: str, head_dim: int) -> tuple[int, int]:
    """(rows per program, num_warps) for the memory-bound preprocess and extra-key dK/dV kernels."""
    if arch == "interpret":
        return 32, 4
    return (64, 4) if head_dim <= 128 else (32, 4)


def _configs(kernel: str, arch: str, head_dim: int, dtype=None) -> list[tuple[int, int, int, int]]:
    cands = _CONFIGS[(kernel, arch)](head_dim)
    # The diagonal split needs the outer tile to be a whole number of inner tiles.
    if kernel == "dkdv":
        return [c for c in cands if c[1] % c[0] == 0]
    return [c for c in cands if c[0] % c[1] == 0]


_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv_base, "dq": _attn_bwd_dq}
_TUNED: dict = {}


def _launch(kernel: str, arch: str, head_dim: int, grid, args, **constexprs) -> None:
    """Launch ``kernel``; ``grid(BLOCK_M, BLOCK_N)`` gives the grid. Autotunes on real GPUs only."""
    if _AUTOTUNE and arch != "interpret":
        key = (kernel, arch, head_dim)
        if key not in _TUNED:
            configs = [
                triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in _configs(kernel, arch, head_dim)
            ]
            # Outputs are fully overwritten on every run (no accumulation), so re-running is safe.
            _TUNED[key] = triton.autotune(configs=configs, key=["L", "Tq", "HAS_PAD", "group"])(_KERNELS[kernel])
        _TUNED[key][lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs)
    else:
        m, n, w, s = _configs(kernel, arch, head_dim)[0]
        _KERNELS[kernel][grid(m, n)](*args, **constexprs, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


def _dot_precision_name(dt: str) -> str:
    return "ieee" if dt == "fp32" else "tf32"


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 dots (TF32 would cost ~1e-3 relative error); 16-bit: tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, pad, base_len: int, scale: float):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    L = base_len
    n_q_steps, n_key_steps = Tq // L, Tk // L
    first_q_step = n_key_steps - n_q_steps
    arch = _arch(q.device)
    # [B, Tq, Hq, D] memory viewed as [B, Hq, Tq, D]: the caller's transpose back to
    # [B, T, H, D] (what transformers' attention functions return) is then free.
    out = torch.empty(B, Tq, Hq, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, Hq, Tq, device=q.device, dtype=torch.float32)
    pad_arg, pad_stride = (pad, pad.stride(0)) if pad is not None else (q, 0)
    args = (
        q, k, v, pad_arg, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), pad_stride,
        Hq, Hq // Hkv, L, first_q_step, Tq, scale * _LOG2E,
    )
    _launch("fwd", arch, D, lambda m, n: (triton.cdiv(L, m), n_q_steps, B * Hq), args,
            HEAD_DIM=D, HAS_PAD=pad is not None, DOT_PRECISION=_dot_precision(q.dtype))
    return out, lse


def _backward(q, k, v, pad, out, lse, d_out, d_lse, base_len: int, scale: float):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    L = base_len
    n_q_steps, n_key_steps = Tq // L, Tk // L
    first_q_step = n_key_steps - n_q_steps
    group = Hq // Hkv
    arch = _arch(q.device)
    precision = _dot_precision(q.dtype)
    pad_arg, pad_stride = (pad, pad.stride(0)) if pad is not None else (q, 0)
    rows, warps = _elementwise_block(arch, D)

    delta = torch.empty_like(lse)
    d_lse_arg = d_lse.float().contiguous() if d_lse is not None else lse
    _bwd_preprocess[(triton.cdiv(Tq, rows), B * Hq)](
        out, d_out, d_lse_arg, delta, *_strides(out), *_strides(d_out), Hq, Tq,
        HEAD_DIM=D, BLOCK_M=rows, HAS_DLSE=d_lse is not None, num_warps=warps,
    )

    d_q, d_k, d_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_scale = scale * _LOG2E
    _launch(
        "dkdv", arch, D, lambda m, n: (triton.cdiv(L, n), B * Hkv),
        (q, k, v, pad_arg, d_out, lse, delta, d_k, d_v,
         *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(d_k), *_strides(d_v), pad_stride,
         Hq, Hkv, group, L, n_q_steps, Tq, qk_scale, scale),
        HEAD_DIM=D, HAS_PAD=pad is not None, DOT_PRECISION=precision,
    )
    _launch(
        "dq", arch, D, lambda m, n: (triton.cdiv(L, m), n_q_steps, B * Hq),
        (q, k, v, pad_arg, d_out, lse, delta, d_q,
         *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(d_q), pad_stride,
         Hq, group, L, first_q_step, Tq, qk_scale, scale),
        HEAD_DIM=D, HAS_PAD=pad is not None, DOT_PRECISION=precision,
    )
    if n_key_steps > 1:
        _attn_bwd_dkdv_extra[(triton.cdiv(L, rows), n_key_steps - 1, B * Hkv)](
            q, k, v, pad_arg, d_out, lse, delta, d_k, d_v,
            *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(d_k), *_strides(d_v), pad_stride,
            Hq, Hkv, group, L, first_q_step, n_key_steps, Tq, qk_scale, scale,
            HEAD_DIM=D, BLOCK_N=rows, HAS_PAD=pad is not None, num_warps=warps,
        )
    return d_q, d_k, d_v


class ThoughtAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and lse; the backward recomputes probabilities.

    Both outputs are differentiable (a gradient on lse folds into delta)."""

    @staticmethod
    def forward(ctx, q, k, v, pad, base_len, scale):
        out, lse = _forward(q, k, v, pad, base_len, scale)
        ctx.save_for_backward(q, k, v, pad, out, lse)
        ctx.base_len, ctx.scale = base_len, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, pad, out, lse = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(out)
        d_q, d_k, d_v = _backward(q, k, v, pad, out, lse, d_out, d_lse, ctx.base_len, ctx.scale)
        return d_q, d_k, d_v, None, None, None


def thought_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    base_len: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Fused thought attention over the flattened step-major layout (see the module docstring).

    q ``[B, Hq, nq*L, D]``, k/v ``[B, Hkv, nk*L, D]``: the queries are the LAST ``nq`` of the ``nk``
    steps (``nq == nk``: training replay; ``nq < nk``: cached sampling call). Any strides.
    ``Hkv`` divides ``Hq`` (GQA); ``D`` a power of two in 16..256; fp16, bf16 or fp32.
    ``key_padding_mask`` ``[B, L]`` bool, True for a real base token. ``scale`` defaults to
    ``1/sqrt(D)``. Returns ``out [B, Hq, nq*L, D]`` (q's dtype; memory laid out as
    ``[B, nq*L, Hq, D]``) and, with ``return_lse``, ``lse [B, Hq, nq*L]`` fp32 (natural log; -inf for
    rows that see no key, whose output is 0). Differentiable in q, k, v (and through lse).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"mismatched q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two in 16..256, got {D}; use the quietstar_torch path")
    Tk = k.shape[2]
    if base_len < 1 or Tq % base_len or Tk % base_len or Tq > Tk or Tq == 0:
        raise ValueError(
            f"base_len={base_len} cannot split {Tq} query rows and {Tk} key rows into whole steps "
            f"with the queries being the last steps of the keys"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"triton thought attention needs CUDA tensors (got {q.device}); for CPU tests set "
            "TRITON_INTERPRET=1 before importing triton, otherwise use the quietstar_torch path"
        )
    pad = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, base_len):
            raise ValueError(
                f"key_padding_mask must be [B, L] = [{B}, {base_len}], got {tuple(key_padding_mask.shape)}"
            )
        pad = key_padding_mask.to(device=q.device, dtype=torch.bool).to(torch.uint8).contiguous()
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out, lse = ThoughtAttentionFunction.apply(q, k, v, pad, base_len, scale)
    return (out, lse) if return_lse else out
