"""``quietstar_torch``: exact thought attention in plain torch, without a dense mask.

On CPU it runs as two calls of torch's CPU flash-attention kernel (``quietstar.ops.cpu_flash``);
elsewhere (and in tests, as a second implementation) as the chunked decomposition below.

The visibility rule (``quietstar.layout``) splits every query row's keys into two disjoint sets:

* the causal base prefix ``(0, j), j <= i`` -- shared by all steps of base position ``i``, so the
  queries of all steps at ``i`` are stacked and attend a causal slice of the ``L`` base keys; done
  in chunks of query positions, so the largest score tensor is ``[rows_in_chunk, L]``;
* the row's own extra keys ``(s', i), 1 <= s' <= s`` -- a per-position attention over <= S keys.

The two partial softmaxes are merged by their log-sum-exp. Forward and backward are one
``autograd.Function`` in the FlashAttention-2 style: the forward saves only the output and the
log-sum-exp, the backward recomputes scores chunk by chunk. Peak memory is O(T*D + chunk*L), never
O(L^2 * S). Math is in fp32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..layout import ThoughtLayout, is_visible
from .cpu_flash import CpuFlashThoughtAttention
from .lse_merge import finite_or_zero, merge_by_lse, non_differentiable_lse
from .reference import _check_qkv

# Elements of fp32 scores per chunk (all batch x head slices together), by device. CPU (where this
# path runs only with USE_CPU_FLASH off): 2M, so the chunks skip most of the masked upper triangle
# of the L x L square even at L = 256 (16M made the chunk the whole L up to L = 546: 10-13% slower,
# 190-350 MiB more peak). GPU: 16M, fewer and larger launches (2M made the replay 3.9x
# slower on an H100, benchmarks/step_settings.py --compare chunks).
_CHUNK_SCORE_ELEMENTS = 1 << 21
_CHUNK_SCORE_ELEMENTS_ACCELERATOR = 1 << 24

# On CPU, use torch's flash-attention kernel (cpu_flash.py); tests switch it off to check the chunked path.
USE_CPU_FLASH = True


def _chunk_len(batch_heads_rows: int, base_len: int, device_type: str = "cpu") -> int:
    budget = _CHUNK_SCORE_ELEMENTS if device_type == "cpu" else _CHUNK_SCORE_ELEMENTS_ACCELERATOR
    return max(1, min(base_len, budget // max(1, batch_heads_rows * base_len)))


def _base_scores(q_chunk, k_base, start, end, key_padding_mask, scale):
    """Masked scores of queries at base positions [start, end) against base keys [0, end).

    q_chunk ``[B, Hkv, R, C, D]`` (R = query heads per kv head x query steps); returns ``[B, Hkv, R, C, end]``.
    """
    B, Hkv, R, C, D = q_chunk.shape
    scores = (q_chunk.reshape(B, Hkv, R * C, D) @ k_base[:, :, :end].transpose(-1, -2)).view(B, Hkv, R, C, end)
    scores = scores * scale
    q_pos = torch.arange(start, end, device=q_chunk.device)[:, None]
    allowed = is_visible(0, q_pos, 0, torch.arange(end, device=q_chunk.device)[None, :])  # [C, end]: base keys
    if key_padding_mask is not None:
        allowed = allowed[None] & key_padding_mask[:, None, :end]  # [B, C, end]
        allowed = allowed[:, None, None]
    return scores.masked_fill(~allowed, float("-inf"))


def _extra_scores(q_steps, k_extra, first_query_step, key_padding_mask, scale):
    """Masked scores of every query row against its own position's extra keys.

    q_steps ``[B, Hkv, G, nq, L, D]``, k_extra ``[B, Hkv, ne, L, D]``; returns ``[B, Hkv, G, nq, L, ne]``.
    """
    nq, ne = q_steps.shape[3], k_extra.shape[2]
    scores = torch.einsum("bhgsid,bheid->bhgsie", q_steps, k_extra) * scale
    q_step = torch.arange(first_query_step, first_query_step + nq, device=q_steps.device)[:, None]
    k_step = torch.arange(1, ne + 1, device=q_steps.device)[None, :]
    allowed = is_visible(q_step, 0, k_step, 0)[:, None, :]  # [nq, 1, ne]: own extra keys (same position)
    if key_padding_mask is not None:
        allowed = allowed[None] & key_padding_mask[:, None, :, None]  # [B, nq, L, ne]
        allowed = allowed[:, None, None]
    return scores.masked_fill(~allowed, float("-inf"))


class _ThoughtAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, base_len, scale):
        B, Hq, Tq, D = q.shape
        Hkv, L = k.shape[1], base_len
        first_query_step, n_key_steps = ThoughtLayout(L).steps(Tq, k.shape[2])
        G, nq, ne = Hq // Hkv, n_key_steps - first_query_step, n_key_steps - 1
        R = G * nq

        q_rows = q.float().reshape(B, Hkv, R, L, D)
        k_base, v_base = k[:, :, :L].float(), v[:, :, :L].float()

        # Base part: causal over base keys, chunked over query positions.
        out_base = q_rows.new_empty(B, Hkv, R, L, D)
        lse_base = q_rows.new_empty(B, Hkv, R, L)
        chunk = _chunk_len(B * Hkv * R, L, q.device.type)
        for start in range(0, L, chunk):
            end = min(start + chunk, L)
            scores = _base_scores(q_rows[:, :, :, start:end], k_base, start, end, key_padding_mask, scale)
            row_max = finite_or_zero(scores.amax(-1, keepdim=True))
            probs = torch.exp(scores - row_max)
            denom = probs.sum(-1)
            acc = (probs.reshape(B, Hkv, R * (end - start), end) @ v_base[:, :, :end]).view(B, Hkv, R, end - start, D)
            out_base[:, :, :, start:end] = acc / denom.clamp_min(1e-30)[..., None]
            lse_base[:, :, :, start:end] = row_max.squeeze(-1) + torch.log(denom)

        out = out_base.view(B, Hkv, G, nq, L, D)
        lse = lse_base.view(B, Hkv, G, nq, L)
        if ne > 0:
            # Extra part: each row's own earlier extra steps (<= S keys), merged by log-sum-exp.
            k_extra = k[:, :, L:].float().reshape(B, Hkv, ne, L, D)
            v_extra = v[:, :, L:].float().reshape(B, Hkv, ne, L, D)
            scores = _extra_scores(q_rows.view(B, Hkv, G, nq, L, D), k_extra, first_query_step, key_padding_mask, scale)
            lse_extra = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - finite_or_zero(lse_extra)[..., None])
            out_extra = torch.einsum("bhgsie,bheid->bhgsid", probs, v_extra)
            out, lse = merge_by_lse(out, lse, out_extra, lse_extra)

        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
        ctx.base_len, ctx.scale = L, scale
        return out.reshape(B, Hq, Tq, D).to(q.dtype), non_differentiable_lse(ctx, lse.reshape(B, Hq, Tq))

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
        L, scale = ctx.base_len, ctx.scale
        B, Hq, Tq, D = q.shape
        Hkv = k.shape[1]
        first_query_step, n_key_steps = ThoughtLayout(L).steps(Tq, k.shape[2])
        G, nq, ne = Hq // Hkv, n_key_steps - first_query_step, n_key_steps - 1
        R = G * nq
        if grad_out is None:  # the output was not used
            return None, None, None, None, None, None

        q_rows = q.float().reshape(B, Hkv, R, L, D)
        k_base, v_base = k[:, :, :L].float(), v[:, :, :L].float()
        d_out = grad_out.float().reshape(B, Hkv, R, L, D)
        out_rows = out.view(B, Hkv, R, L, D)
        lse_rows = finite_or_zero(lse).view(B, Hkv, R, L)
        delta = (d_out * out_rows).sum(-1)  # [B, Hkv, R, L]: rowsum(dO * O), as in FlashAttention-2

        d_q = torch.zeros_like(q_rows)
        d_k_base = torch.zeros_like(k_base)
        d_v_base = torch.zeros_like(v_base)
        chunk = _chunk_len(B * Hkv * R, L, q.device.type)
        for start in range(0, L, chunk):
            end, C = min(start + chunk, L), min(chunk, L - start)
            q_chunk = q_rows[:, :, :, start:end]
            scores = _base_scores(q_chunk, k_base, start, end, key_padding_mask, scale)
            probs = torch.exp(scores - lse_rows[:, :, :, start:end, None])  # [B, Hkv, R, C, end]
            d_out_chunk = d_out[:, :, :, start:end]
            probs_flat = probs.reshape(B, Hkv, R * C, end)
            d_v_base[:, :, :end] += probs_flat.transpose(-1, -2) @ d_out_chunk.reshape(B, Hkv, R * C, D)
            d_probs = (d_out_chunk.reshape(B, Hkv, R * C, D) @ v_base[:, :, :end].transpose(-1, -2)).view_as(probs)
            d_scores = (probs * (d_probs - delta[:, :, :, start:end, None])).reshape(B, Hkv, R * C, end)
            d_q[:, :, :, start:end] = (d_scores @ k_base[:, :, :end]).view(B, Hkv, R, C, D) * scale
            d_k_base[:, :, :end] += d_scores.transpose(-1, -2) @ q_chunk.reshape(B, Hkv, R * C, D) * scale

        d_k, d_v = d_k_base[:, :, None], d_v_base[:, :, None]
        if ne > 0:
            q_steps = q_rows.view(B, Hkv, G, nq, L, D)
            d_out_steps = d_out.view(B, Hkv, G, nq, L, D)
            k_extra = k[:, :, L:].float().reshape(B, Hkv, ne, L, D)
            v_extra = v[:, :, L:].float().reshape(B, Hkv, ne, L, D)
            scores = _extra_scores(q_steps, k_extra, first_query_step, key_padding_mask, scale)
            probs = torch.exp(scores - lse_rows.view(B, Hkv, G, nq, L)[..., None])
            d_v_extra = torch.einsum("bhgsie,bhgsid->bheid", probs, d_out_steps)
            d_probs = torch.einsum("bhgsid,bheid->bhgsie", d_out_steps, v_extra)
            d_scores = probs * (d_probs - delta.view(B, Hkv, G, nq, L)[..., None])
            d_q += torch.einsum("bhgsie,bheid->bhgsid", d_scores, k_extra).reshape_as(d_q) * scale
            d_k_extra = torch.einsum("bhgsie,bhgsid->bheid", d_scores, q_steps) * scale
            d_k = torch.cat([d_k, d_k_extra], dim=2)
            d_v = torch.cat([d_v, d_v_extra], dim=2)

        return (
            d_q.reshape(q.shape).to(q.dtype),
            d_k.reshape(k.shape).to(k.dtype),
            d_v.reshape(v.shape).to(v.dtype),
            None,
            None,
            None,
        )


def thought_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    base_len: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Thought attention by decomposition (see module docstring).

    q ``[B, Hq, nq*L, D]``, k/v ``[B, Hkv, nk*L, D]`` with the queries being the last ``nq`` of the
    ``nk`` steps (``nq == nk`` in the training replay, ``nq == 1`` in the cached sampling loop).
    ``key_padding_mask`` ``[B, L]`` bool, True for a real token. Rows that see nothing give 0.
    """
    _check_qkv(q, k, v)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (q.shape[0], base_len):
            raise ValueError(f"key_padding_mask must be [B, L] = [{q.shape[0]}, {base_len}], got {tuple(key_padding_mask.shape)}")
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.device.type == "cpu" and USE_CPU_FLASH:
        if key_padding_mask is not None and key_padding_mask.all():
            key_padding_mask = None  # no padding: no masks to build or apply (a host check is free on CPU)
        out, lse = CpuFlashThoughtAttention.apply(q, k, v, key_padding_mask, base_len, scale)
    else:
        out, lse = _ThoughtAttention.apply(q, k, v, key_padding_mask, base_len, scale)
    return (out, lse) if return_lse else out


def plain_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Ordinary causal attention (queries are the last ``Tq`` of ``Tk`` positions, as with a KV cache).

    ``padding_mask`` ``[B, >= Tk]`` bool over keys. Used by every ``quietstar_*`` name when a call
    carries no thought layout, i.e. when the wrapped model runs as the plain base model.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if padding_mask is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=gqa)
    key_pos = torch.arange(Tk, device=q.device)
    allowed = key_pos[None, :] <= torch.arange(Tk - Tq, Tk, device=q.device)[:, None]  # [Tq, Tk]
    if padding_mask is not None:
        allowed = allowed[None] & padding_mask[:, None, -Tk:].to(device=q.device, dtype=torch.bool)
    else:
        allowed = allowed[None]
    # A padded query row sees nothing; let it see everything instead so its (unused) output stays finite.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed[:, None], scale=scale, dropout_p=dropout, enable_gqa=gqa
    )
