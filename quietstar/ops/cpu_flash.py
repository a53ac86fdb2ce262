"""``quietstar_torch`` on CPU: both halves of the visibility rule as calls of torch's CPU flash attention.

The rule splits every query row's keys into two disjoint sets (``quietstar.layout``), and each set
is an ordinary attention problem that ``aten::_scaled_dot_product_flash_attention_for_cpu`` solves
without materialising scores:

* base part: the queries of every step at position ``i`` attend the causal base prefix ``j <= i``.
  Viewing the query steps as extra heads, ``q [B, Hq, nq*L, D]`` is ``[B, Hq*nq, L, D]``: plain
  causal attention over the ``L`` base keys, with GQA mapping head ``hq*nq + s`` to kv head
  ``hq // (Hq/Hkv)``, exactly the kernel's own head grouping;
* extra part: at each position ``i`` the query steps attend the extra keys ``(s', i), s' <= s``:
  a causal attention of length <= S with ``B*L`` batch rows (``[B*L, Hq, steps, D]``).

The two partial softmaxes are merged by their log-sum-exp, which the kernel returns.

Backward. Let ``O`` and ``lse`` be the MERGED output and log-sum-exp. Calling the kernel's backward
for one part with ``out = O`` and ``logsumexp = lse`` (instead of that part's own) makes it recompute
``p = exp(s - lse)``, the merged softmax restricted to that part's keys, and ``delta = rowsum(dO * O)``,
the merged softmax's delta; its ``dS = p (dP - delta)``, ``dV = p^T dO``, ``dQ = dS K``, ``dK = dS^T Q``
are then exactly that part's share of the merged gradient (FlashAttention-2's backward applied to
the union of the two key sets). So no correction term is needed, and the gradients of the two parts
simply add. Math in fp32 (fp64 inputs stay fp64, for the oracles).
"""

from __future__ import annotations

import torch

from ..layout import ThoughtLayout, is_visible
from .lse_merge import finite_or_zero, merge_by_lse, non_differentiable_lse

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Problem:
    """The two flash-attention problems of one call: shapes, kernel views of q/k/v and masks."""

    def __init__(self, q, k, v, key_padding_mask, base_len):
        self.B, self.Hq, Tq, self.D = q.shape
        self.Hkv, self.L = k.shape[1], base_len
        first_query_step, self.nk = ThoughtLayout(base_len).steps(Tq, k.shape[2])
        self.nq = self.nk - first_query_step
        # Query step 0 (the base block) sees no extra key: the extra part starts at step >= 1.
        self.skip = 1 if first_query_step == 0 else 0  # leading query steps with no extra keys
        self.ne = self.nk - 1  # extra key steps 1..nk-1
        self.n_extra_q = self.nq - self.skip
        self.key_padding_mask = key_padding_mask
        dtype = _compute_dtype(q)
        self.q = q.to(dtype).reshape(self.B, self.Hq, self.nq, self.L, self.D)
        self.k = k.to(dtype).reshape(self.B, self.Hkv, self.nk, self.L, self.D)
        self.v = v.to(dtype).reshape(self.B, self.Hkv, self.nk, self.L, self.D)

    # ---- base part: [B, Hq*nq, L, D] queries, causal over [B, Hkv, L, D] base keys
    def base_qkv(self):
        B, L, D = self.B, self.L, self.D
        return self.q.reshape(B, self.Hq * self.nq, L, D), self.k[:, :, 0], self.v[:, :, 0]

    def base_mask(self):
        """Additive key padding mask ``[B, 1, 1, L]`` (None without padding)."""
        if self.key_padding_mask is None:
            return None
        zeros = torch.zeros(self.B, 1, 1, self.L, dtype=self.q.dtype)
        return zeros.masked_fill(~self.key_padding_mask[:, None, None, :], float("-inf"))

    def base_rows_see_nothing(self):
        """``[B, 1, 1, L]``: rows with no real base key ``j <= i`` (the kernel gives them lse 0, not -inf)."""
        return (self.key_padding_mask.cumsum(-1) == 0)[:, None, None, :]

    # ---- extra part: position i becomes a batch row, steps its sequence
    def to_extra(self, x):
        """``[B, H, steps, L(, D)]`` -> ``[B*L, H, steps(, D)]``: the position axis becomes the batch."""
        x = x.permute(0, 3, 1, 2, *range(4, x.dim()))
        return x.reshape(self.B * self.L, *x.shape[2:])

    def from_extra(self, x):
        """Inverse of :meth:`to_extra` for outputs ``[B*L, H, steps, D]`` or lse ``[B*L, H, steps]``."""
        x = x.view(self.B, self.L, *x.shape[1:])
        return x.permute(0, 2, 3, 1, 4) if x.dim() == 5 else x.permute(0, 2, 3, 1)

    def extra_qkv(self):
        q = self.to_extra(self.q[:, :, self.skip :])
        return q, self.to_extra(self.k[:, :, 1:]), self.to_extra(self.v[:, :, 1:])

    def extra_mask(self):
        """Causal flag and additive mask of the extra part.

        Extra query step ``s`` sees extra keys ``1..s``: with queries the last ``n_extra_q`` of the ``ne``
        key steps this is bottom-right-aligned causal, which is the kernel's ``is_causal`` only when
        ``n_extra_q == ne`` (training replay); one query step (cached sampling) sees every key.
        """
        nq, ne = self.n_extra_q, self.ne
        causal, mask = nq == ne, None
        if nq not in (1, ne):
            q_step = torch.arange(ne - nq + 1, ne + 1)[:, None]
            k_step = torch.arange(1, ne + 1)[None, :]
            allowed = is_visible(q_step, 0, k_step, 0)[None, None]  # [1, 1, nq, ne]: own extra keys
            mask = torch.zeros(allowed.shape, dtype=self.q.dtype).masked_fill(~allowed, float("-inf"))
        if self.key_padding_mask is not None:  # a padded position's extra keys are padding too
            pad = torch.zeros(self.B * self.L, 1, 1, 1, dtype=self.q.dtype)
            pad = pad.masked_fill(~self.key_padding_mask.reshape(-1, 1, 1, 1), float("-inf"))
            mask = pad if mask is None else pad + mask
            mask = mask.expand(self.B * self.L, 1, nq, ne)
        return causal, mask


class CpuFlashThoughtAttention(torch.autograd.Function):
    """q ``[B, Hq, nq*L, D]``, k/v ``[B, Hkv, nk*L, D]`` -> (out like q, lse ``[B, Hq, nq*L]``)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, base_len, scale):
        p = _Problem(q, k, v, key_padding_mask, base_len)
        B, Hq, nq, L, D = p.B, p.Hq, p.nq, p.L, p.D
        out, lse = _flash(*p.base_qkv(), 0.0, True, attn_mask=p.base_mask(), scale=scale)
        out, lse = out.reshape(B, Hq, nq, L, D), lse.reshape(B, Hq, nq, L)
        if key_padding_mask is not None:
            lse = lse.masked_fill(p.base_rows_see_nothing(), float("-inf"))
        if p.ne > 0 and p.n_extra_q > 0:
            causal, mask = p.extra_mask()
            out_e, lse_e = _flash(*p.extra_qkv(), 0.0, causal, attn_mask=mask, scale=scale)
            out_e, lse_e = p.from_extra(out_e), p.from_extra(lse_e)  # [B, Hq, nq', L, (D)]
            if key_padding_mask is not None:
                lse_e = lse_e.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
            s = p.skip
            out[:, :, s:], lse[:, :, s:] = merge_by_lse(out[:, :, s:], lse[:, :, s:], out_e, lse_e)
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
        ctx.base_len, ctx.scale = base_len, scale
        return out.reshape(q.shape).to(q.dtype), non_differentiable_lse(ctx, lse.reshape(B, Hq, nq * L))

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
        if grad_out is None:  # the output was not used
            return None, None, None, None, None, None
        p = _Problem(q, k, v, key_padding_mask, ctx.base_len)
        B, Hq, nq, L, D = p.B, p.Hq, p.nq, p.L, p.D
        d_out = grad_out.to(p.q.dtype).reshape(B, Hq, nq, L, D)
        lse = finite_or_zero(lse)  # rows that see nothing: every score is -inf, so p = 0 whatever lse is
        # The merged out and lse on both calls: see the module docstring for why that is exact.
        d_q, d_k_base, d_v_base = _flash_backward(
            d_out.reshape(B, Hq * nq, L, D), *p.base_qkv(), out.reshape(B, Hq * nq, L, D),
            lse.reshape(B, Hq * nq, L), 0.0, True, attn_mask=p.base_mask(), scale=ctx.scale,
        )
        d_q = d_q.reshape(B, Hq, nq, L, D)
        d_k, d_v = d_k_base[:, :, None], d_v_base[:, :, None]
        if p.ne > 0 and p.n_extra_q > 0:
            causal, mask = p.extra_mask()
            s = p.skip
            d_q_e, d_k_e, d_v_e = _flash_backward(
                p.to_extra(d_out[:, :, s:]), *p.extra_qkv(), p.to_extra(out[:, :, s:]),
                p.to_extra(lse[:, :, s:]), 0.0, causal, attn_mask=mask, scale=ctx.scale,
            )
            d_q[:, :, s:] += p.from_extra(d_q_e)
            d_k = torch.cat([d_k, p.from_extra(d_k_e)], dim=2)
            d_v = torch.cat([d_v, p.from_extra(d_v_e)], dim=2)
        return (
            d_q.reshape(q.shape).to(q.dtype),
            d_k.reshape(k.shape).to(k.dtype),
            d_v.reshape(v.shape).to(v.dtype),
            None,
            None,
            None,
        )
