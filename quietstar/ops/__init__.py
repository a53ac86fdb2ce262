"""Tensor-level attention ops for the thought layout (no transformers import).

``thought_attention_reference`` is the dense oracle; ``thought_attention_torch`` the exact,
memory-light decomposition. Both take ``q [B, Hq, nq*L, D]``, ``k/v [B, Hkv, nk*L, D]``.
"""

from .reference import thought_attention_reference
from .torch_path import plain_causal_attention, thought_attention_torch

__all__ = ["thought_attention_reference", "thought_attention_torch", "plain_causal_attention"]
