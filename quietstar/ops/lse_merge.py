"""Merging two partial softmax attentions over disjoint key sets by their log-sum-exp.

Both ``quietstar_torch`` implementations (chunked torch ops, CPU flash-attention calls) split a row's
visible keys into the causal base prefix and the row's own extra keys, attend each set alone, and
merge here: ``lse = logaddexp(lse_a, lse_b)``, ``out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b``.
"""

from __future__ import annotations

import torch


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """-inf (a row that sees no key) -> 0, so exponentials of differences stay finite."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def merge_by_lse(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [..., D]``, ``lse [...]`` of attention over the union of the two key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = finite_or_zero(lse)
    return torch.exp(lse_a - safe)[..., None] * out_a + torch.exp(lse_b - safe)[..., None] * out_b, lse


def non_differentiable_lse(ctx, lse: torch.Tensor) -> torch.Tensor:
    """Return ``lse`` from an autograd Function's forward as an output callers read but do not
    differentiate: backward then gets ``None`` for it, with no host-side check of a zero gradient."""
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    return lse
