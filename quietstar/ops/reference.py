"""Dense-mask thought attention: the oracle every other path is tested against.

Builds the full ``[(nq*L), (nk*L)]`` mask from :func:`quietstar.layout.visibility_mask` and does the
attention with explicit matmuls, so it shares no code with the fast paths. Small inputs only.
"""

from __future__ import annotations

import math

import torch

from ..layout import ThoughtLayout, visibility_mask


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"mismatched q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def thought_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    base_len: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """``softmax(q k^T * scale + mask) v`` with the dense visibility mask; fp32 math.

    q ``[B, Hq, nq*L, D]``, k/v ``[B, Hkv, nk*L, D]`` (queries are the last nq steps). Rows that see
    nothing (padding) give 0 and lse = -inf.
    """
    _check_qkv(q, k, v)
    first_query_step, n_key_steps = ThoughtLayout(base_len).steps(q.shape[2], k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    mask = visibility_mask(base_len, n_key_steps, key_padding_mask, first_query_step, device=q.device)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Tq]
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])  # empty rows -> 0
    out = (probs @ vf).to(q.dtype)
    return (out, lse) if return_lse else out
