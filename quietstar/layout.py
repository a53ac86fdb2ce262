"""The flattened, step-major thought layout: the ONE definition of sizes, position ids and visibility.

A batch of ``B`` sequences of ``L`` base tokens; every base position ``i`` carries ``S`` extra steps
(``<|startthought|>``, ``N`` thought tokens, ``<|endthought|>``, ``K - 1`` fed-back true tokens).
All ``(1 + S) * L`` tokens form one sequence, step-major::

    index(s, i) = s * L + i        s = 0: base block; s = 1..S: extra steps

Visibility rule: query ``(s, i)`` sees key ``(s', j)`` iff base position ``j`` is not padding and
either ``s' == 0 and j <= i`` (causal over the base prefix) or ``j == i and 1 <= s' <= s`` (its own
earlier extra tokens). Every attention path derives from :func:`is_visible`; the dense mask
(:func:`visibility_mask`) is built only by the reference path and tests.

A KV cache filled one step of ``L`` tokens at a time produces this same order, so a call may carry
queries for only the last ``n_query_steps`` of the ``n_key_steps`` steps held as keys.

This module imports nothing from transformers so that kernels and tests can share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ThoughtLayout",
    "n_extra_steps",
    "step_of",
    "base_position_ids",
    "is_visible",
    "visibility_mask",
    "useful_entries",
]


def n_extra_steps(n_thought_tokens: int, n_talk_tokens: int) -> int:
    """S = 1 (sot) + N (thought) + 1 (eot) + (K - 1) (fed-back true tokens)."""
    if n_thought_tokens < 1:
        raise ValueError(f"n_thought_tokens must be >= 1, got {n_thought_tokens}")
    if n_talk_tokens < 1:
        raise ValueError(f"n_talk_tokens must be >= 1, got {n_talk_tokens}")
    return n_thought_tokens + n_talk_tokens + 1


class step_of:  # noqa: N801 - a namespace of step indices, read like ``step_of.eot(N)``
    """Step index of each kind of extra token (docs/ALGORITHM.md, "Per position, what is fed")."""

    start_thought = 1

    @staticmethod
    def thought(j: int) -> int:
        """Step of thought token t_j, j = 1..N."""
        return 1 + j

    @staticmethod
    def end_thought(n_thought_tokens: int) -> int:
        return n_thought_tokens + 2

    @staticmethod
    def talk(n_thought_tokens: int, k: int) -> int:
        """Step whose hidden state predicts x_{i+1+k} after the thought (k = 0 is the eot step)."""
        return n_thought_tokens + 2 + k


def base_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Base position ids ``pos[i]`` from a 2-D padding mask: 0 at the first real token (left padding
    works); padding positions get 0. Step ``s`` at base position ``i`` has position id ``pos[i] + s``."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp_min(0) * mask


@dataclass(frozen=True)
class ThoughtLayout:
    """What an attention call needs to know about the flattened layout.

    ``key_padding_mask`` is ``[B, L]`` bool over the base positions (True = real token), or None.
    Passed to the base model's forward as the ``thought_layout`` keyword, it reaches the registered
    ``quietstar_*`` attention functions; without it they are plain causal attention.
    """

    base_len: int
    key_padding_mask: torch.Tensor | None = None

    def steps(self, q_len: int, kv_len: int) -> tuple[int, int]:
        """(first_query_step, n_key_steps) of a call with ``q_len`` query and ``kv_len`` key rows."""
        L = self.base_len
        if q_len % L or kv_len % L or q_len > kv_len:
            raise ValueError(
                f"thought layout with base_len={L} cannot hold {q_len} query rows and {kv_len} key "
                f"rows: both must be whole steps of {L} tokens and queries the last steps of keys"
            )
        return (kv_len - q_len) // L, kv_len // L


def is_visible(q_step, q_pos, k_step, k_pos, key_is_real=True):
    """The visibility rule on broadcastable index tensors (see the module docstring)."""
    base_causal = (k_step == 0) & (k_pos <= q_pos)
    own_extra = (k_pos == q_pos) & (k_step >= 1) & (k_step <= q_step)
    return (base_causal | own_extra) & key_is_real


def visibility_mask(
    base_len: int,
    n_key_steps: int,
    key_padding_mask: torch.Tensor | None = None,
    first_query_step: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense boolean mask ``[B or 1, n_query*L, n_key_steps*L]`` (True = may attend).

    O(L^2 S^2) memory: for the reference path and tests only.
    """
    L = base_len
    device = key_padding_mask.device if key_padding_mask is not None else device
    q_idx = torch.arange(first_query_step * L, n_key_steps * L, device=device)
    k_idx = torch.arange(n_key_steps * L, device=device)
    q_step, q_pos = (q_idx // L)[:, None], (q_idx % L)[:, None]
    k_step, k_pos = (k_idx // L)[None, :], (k_idx % L)[None, :]
    if key_padding_mask is None:
        return is_visible(q_step, q_pos, k_step, k_pos)[None]
    key_is_real = key_padding_mask.bool().repeat(1, n_key_steps)[:, None, :]  # [B, 1, nk*L]
    return is_visible(q_step[None], q_pos[None], k_step[None], k_pos[None], key_is_real)


def useful_entries(
    base_len: int,
    n_key_steps: int,
    n_query_steps: int | None = None,
    batch: int = 1,
    key_padding_mask: torch.Tensor | None = None,
) -> int:
    """Number of (query, key) pairs the visibility rule allows, summed over the batch, per head.

    Query ``(s, i)`` sees the real base keys ``j <= i`` and, when ``i`` is real, its ``s`` own extra
    keys. Without padding: sum over query steps s of ``L(L+1)/2 + s*L``.
    """
    L, nk = base_len, n_key_steps
    nq = nk if n_query_steps is None else n_query_steps
    steps = range(nk - nq, nk)
    if key_padding_mask is None:
        return batch * sum(L * (L + 1) // 2 + s * L for s in steps)
    real = key_padding_mask.bool().long()  # [B, L]
    base = int(real.cumsum(-1).sum())  # sum over rows i of #real keys j <= i
    return nq * base + sum(steps) * int(real.sum())
