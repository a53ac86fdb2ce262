"""Fused Triton thought attention (forward + backward) for the flattened, step-major layout.

Layout: ``(1 + S) * L`` tokens, ``index(s, i) = s * L + i``. Query ``(s, i)`` sees key ``(s', j)``
iff base position ``j`` is real and either ``s' == 0 and j <= i`` or ``j == i and 1 <= s' <= s``.

Every query row's keys split into two disjoint sets, and the kernels treat them differently:

* the causal base prefix (``s' == 0``): tiled exactly like causal FlashAttention -- a query tile of
  one step at positions ``[m0, m0 + BLOCK_M)`` walks the base key tiles ``[0, m0 + BLOCK_M)``;
  tiles above the diagonal are never visited, tiles strictly below it need no causal mask (the
  forward skips it there; the backward masks every tile in one loop, which spills less);
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

Matmuls take the input dtype (fp16/bf16 tensor cores -- wgmma on Hopper -- with fp32 accumulation);
softmax statistics, the extra-key diagonal and all accumulators are fp32.

fp32 policy: fp32 inputs are supported for correctness (tests, debugging), not speed. They use exact
"ieee" dots (FMA, not TF32) with one small tile config per kernel, never autotuned: they compile in a
few seconds and do not spill (see ``_FP32_CONFIGS``). For speed, run the model in bf16/fp16 or under
autocast (the attention then computes in the autocast dtype).

Launch configs: per architecture and head dim (``_CONFIGS``), the first entry being the default. On a
GPU the launcher autotunes among the candidates unless ``QUIETSTAR_TRITON_AUTOTUNE=0``; choices are
remembered per (kernel, head dim, dtype, padding, GQA group) and per power-of-two bucket of the base
length and of the query rows, so varying sequence lengths re-benchmark once per bucket.
``python -m triton_kernels.compile_check`` builds every kernel for sm_90 on a CPU and reports
registers, spills, shared memory and wgmma use.
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


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs; first entry = the default (used when
# autotuning is off), the rest = autotune extras.
#
# Hopper, D = 128: the defaults are the configs the autotuner picked at every benchmark shape on an
# H200 (Triton 3.6, bf16, H 32, L 1024..4096, S 8/16): forward (64, 64, w4, s3), dK/dV (32, 64, w4, s3),
# dQ (128, 64, w8, s2). The extras are the candidates that compile for sm_90 with no register spills
# (tests/test_triton_compile_sm90.py, which states the small spills the defaults still have). Dropped
# for spilling: 128-key dK/dV tiles with 4 warps (k, v, dk and dv of 128 x D stay resident), the
# 128 x 128 forward, and 128 x 32 dQ. D <= 64 has the same defaults (every candidate spill-free). The dK/dV
# pass is transposed (a program owns BLOCK_N keys and walks BLOCK_M-row query tiles), hence small
# BLOCK_M there (as in tutorial 06); wgmma needs 64-row tiles per warpgroup on its M side, so a
# dK/dV BLOCK_N or a forward/dQ BLOCK_M below 64 falls back to mma.sync (the compile test checks).
# D = 256 is unchanged and still spills (188-280 B at its defaults; not in the compile test). Ampere
# entries are unchanged and unmeasured. The interpreter uses small tiles so that the tests
# cross several tiles at tiny L.
_CONFIGS = {
    ("fwd", "interpret"): lambda d: [(32, 16, 4, 1)],
    ("fwd", "hopper"): lambda d: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2)] if d <= 128 else
    [(64, 64, 8, 2), (64, 32, 4, 2)],
    ("fwd", "a100"): lambda d: [(128, 64, 4, 3), (64, 64, 4, 3)] if d <= 64 else
    [(128, 64, 8, 2), (64, 64, 4, 3)] if d <= 128 else [(64, 32, 4, 2), (64, 64, 8, 1)],
    ("fwd", "ampere_small"): lambda d: [(128, 64, 4, 2), (64, 64, 4, 2)] if d <= 64 else
    [(64, 64, 4, 2), (128, 32, 8, 2)] if d <= 128 else [(64, 32, 4, 1)],
    ("dkdv", "interpret"): lambda d: [(16, 32, 4, 1)],
    ("dkdv", "hopper"): lambda d: [(32, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2)] if d <= 64 else
    [(32, 64, 4, 3), (32, 64, 8, 2), (32, 128, 8, 2)] if d <= 128 else [(16, 64, 8, 2), (32, 64, 8, 1)],
    ("dkdv", "a100"): lambda d: [(32, 128, 4, 3), (32, 64, 4, 3)] if d <= 64 else
    [(32, 128, 8, 2), (32, 64, 4, 2)] if d <= 128 else [(16, 64, 8, 1)],
    ("dkdv", "ampere_small"): lambda d: [(32, 64, 4, 2), (16, 64, 4, 2)] if d <= 128 else [(16, 32, 4, 1)],
    ("dq", "interpret"): lambda d: [(32, 16, 4, 1)],
    ("dq", "hopper"): lambda d: [(128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3)] if d <= 64 else
    [(128, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 3)] if d <= 128 else [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("dq", "a100"): lambda d: [(128, 32, 4, 3), (64, 32, 4, 3)] if d <= 64 else
    [(128, 32, 8, 2), (64, 32, 4, 2)] if d <= 128 else [(64, 32, 8, 1)],
    ("dq", "ampere_small"): lambda d: [(64, 32, 4, 2), (128, 32, 8, 2)] if d <= 128 else [(32, 32, 4, 1)],
}

# fp32 inputs are a correctness path (tests, fp32 debugging runs; train in bf16/fp16 or under autocast
# for speed): exact "ieee" dots on CUDA cores, one small config per kernel on every GPU, never
# autotuned. With the 16-bit tiles fp32 took 30-80 s per kernel to compile for sm_90 and spilled
# 40-57 KB per thread (the D = 128 forward also needed 229,888 B of shared memory, a hair under
# Hopper's limit); these compile in 1-5 s without spilling at D <= 128.
_FP32_CONFIGS = {
    "fwd": lambda d: [(32, 32, 4, 2)] if d <= 64 else [(32, 16, 8, 2)] if d <= 128 else [(16, 16, 4, 2)],
    "dkdv": lambda d: [(16, 32, 4, 2)] if d <= 64 else [(16, 16, 4, 2)],
    "dq": lambda d: [(32, 32, 4, 2)] if d <= 64 else [(16, 16, 4, 2)],
}


def _elementwise_block(arch: str, head_dim: int, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(rows per program, num_warps) for the memory-bound preprocess and extra-key dK/dV kernels:
    at most 4096 / (32 * warps) elements of each [rows, D] tile per thread (half that in fp32), so that
    the extra-key dK/dV kernel (k, v, q, dO in the input dtype plus fp32 dk, dv, and the pipelined
    loads of the next step) stays within 255 registers without spilling."""
    if arch == "interpret":
        return 32, 4
    rows, warps = (64, 4) if head_dim <= 64 else (64, 8) if head_dim <= 128 else (32, 8)
    return (rows // 2 if dtype == torch.float32 else rows), warps


def _configs(kernel: str, arch: str, head_dim: int, dtype: torch.dtype | None = None) -> list[tuple]:
    """The launch configs ``kernel`` may use for ``dtype`` inputs on ``arch``; the first is the default."""
    if dtype == torch.float32 and arch != "interpret":
        cands = _FP32_CONFIGS[kernel](head_dim)
    else:
        cands = _CONFIGS[(kernel, arch)](head_dim)
    # The diagonal split needs the outer tile to be a whole number of inner tiles.
    if kernel == "dkdv":
        return [c for c in cands if c[1] % c[0] == 0]
    return [c for c in cands if c[0] % c[1] == 0]


def _bucket(n: int) -> int:
    """Autotune bucket of a length: its next power of two (1000 and 1024 share one; 1025 does not)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _tune_key(kernel: str, arch: str, head_dim: int, dtype: torch.dtype, L: int, Tq: int, has_pad: bool, group: int):
    """What an autotuned choice is remembered by. Lengths are bucketed (next power of two of the base
    length L and of the query rows Tq), so that a training run whose lengths vary re-benchmarks once
    per bucket, not once per new length."""
    return (kernel, arch, head_dim, str(dtype), _bucket(L), _bucket(Tq), bool(has_pad), group)


_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv_base, "dq": _attn_bwd_dq}
_TUNED: dict = {}


def _bench(fn) -> float:
    """Mean milliseconds per call of ``fn`` (Triton's do_bench: the first call, which compiles, is untimed)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def _autotune(key, cands, run):
    """Time ``run(config)`` for every candidate (outputs are overwritten, so re-running is safe) and
    remember the fastest under ``key``. A config that fails to compile or launch (out of resources)
    is skipped; if all fail, the first one's error is raised."""
    if key in _TUNED:
        return _TUNED[key]
    times, first_error = [], None
    for cfg in cands:
        try:
            times.append(_bench(lambda cfg=cfg: run(cfg)))
        except Exception as err:  # noqa: BLE001 -- e.g. triton OutOfResources for one config
            first_error = first_error or err
            times.append(float("inf"))
    best = min(range(len(cands)), key=times.__getitem__)
    if times[best] == float("inf"):
        raise first_error
    _TUNED[key] = cands[best]
    if os.environ.get("TRITON_PRINT_AUTOTUNING") == "1":
        m, n, w, s = cands[best]
        tried = ", ".join(f"{c}: {t:.3f} ms" for c, t in zip(cands, times))
        print(f"quietstar autotune {key}: picked BLOCK_M {m}, BLOCK_N {n}, num_warps {w}, num_stages {s} "
              f"(tried {tried})", flush=True)
    return cands[best]


def _launch(kernel: str, arch: str, head_dim: int, dtype: torch.dtype, grid, args, tune_key, **constexprs) -> None:
    """Launch ``kernel``; ``grid(BLOCK_M, BLOCK_N)`` gives the grid. Autotunes on real GPUs only, and
    only where there is more than one candidate (never in fp32)."""

    def run(cfg):
        m, n, w, s = cfg
        _KERNELS[kernel][grid(m, n)](*args, **constexprs, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)

    cands = _configs(kernel, arch, head_dim, dtype)
    if _AUTOTUNE and arch != "interpret" and len(cands) > 1:
        run(_autotune(tune_key, cands, run))
    else:
        run(cands[0])


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


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
    has_pad = pad is not None
    _launch("fwd", arch, D, q.dtype, lambda m, n: (triton.cdiv(L, m), n_q_steps, B * Hq), args,
            _tune_key("fwd", arch, D, q.dtype, L, Tq, has_pad, Hq // Hkv),
            HEAD_DIM=D, HAS_PAD=has_pad, DOT_PRECISION=_dot_precision(q.dtype))
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
    rows, warps = _elementwise_block(arch, D, q.dtype)

    delta = torch.empty_like(lse)
    d_lse_arg = d_lse.float().contiguous() if d_lse is not None else lse
    _bwd_preprocess[(triton.cdiv(Tq, rows), B * Hq)](
        out, d_out, d_lse_arg, delta, *_strides(out), *_strides(d_out), Hq, Tq,
        HEAD_DIM=D, BLOCK_M=rows, HAS_DLSE=d_lse is not None, num_warps=warps,
    )

    d_q, d_k, d_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_scale = scale * _LOG2E
    has_pad = pad is not None
    _launch(
        "dkdv", arch, D, q.dtype, lambda m, n: (triton.cdiv(L, n), B * Hkv),
        (q, k, v, pad_arg, d_out, lse, delta, d_k, d_v,
         *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(d_k), *_strides(d_v), pad_stride,
         Hq, Hkv, group, L, n_q_steps, Tq, qk_scale, scale),
        _tune_key("dkdv", arch, D, q.dtype, L, Tq, has_pad, group),
        HEAD_DIM=D, HAS_PAD=has_pad, DOT_PRECISION=precision,
    )
    _launch(
        "dq", arch, D, q.dtype, lambda m, n: (triton.cdiv(L, m), n_q_steps, B * Hq),
        (q, k, v, pad_arg, d_out, lse, delta, d_q,
         *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(d_q), pad_stride,
         Hq, group, L, first_q_step, Tq, qk_scale, scale),
        _tune_key("dq", arch, D, q.dtype, L, Tq, has_pad, group),
        HEAD_DIM=D, HAS_PAD=has_pad, DOT_PRECISION=precision,
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
