"""The ``quietstar_*`` attention names, registered with transformers' attention and mask interfaces.

Each name gets an attention function (``AttentionInterface``) and a mask function
(``AttentionMaskInterface``; a name missing there silently receives no mask, padding included).
The mask function returns only the 2-D key padding mask ``[B, kv_len]``: the thought layout arrives
separately, as the ``thought_layout`` keyword of the base model's forward, so no ``(1+S)L x (1+S)L``
mask is ever built. Without a layout every name is plain causal attention, so ``model.base_lm``
called directly is the ordinary base model.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask

from .configuration import REFERENCE, THOUGHT_ATTENTION_NAMES, TORCH, TRITON  # noqa: F401  (re-exported)
from .layout import ThoughtLayout
from .ops import plain_causal_attention, thought_attention_reference, thought_attention_torch

logger = logging.getLogger(__name__)

THOUGHT_LAYOUT_KWARG = "thought_layout"

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


@functools.lru_cache(maxsize=1)
def _triton_op() -> Callable:
    """The Triton kernel where it can run, else the torch path -- with a warning, never silently."""
    try:
        import triton_kernels

        available, reason = triton_kernels.is_available()
    except ImportError as err:  # triton not installed
        available, reason = False, f"cannot import triton_kernels ({err})"
    if available:
        return triton_kernels.thought_attention
    _warn_once(f"{TRITON}: Triton cannot run here ({reason}); falling back to {TORCH}.")
    return thought_attention_torch


def _autocast_inputs(query, key, value):
    """Under autocast, compute in the autocast dtype, as SDPA does.

    Rotary embeddings (Llama, Mistral, Qwen) leave q/k in fp32 while v leaves its linear in bf16/fp16."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return query.to(dtype), key.to(dtype), value.to(dtype)
    return query, key, value


def _make_attention_forward(name: str, get_op: Callable[[], Callable]) -> Callable:
    def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """transformers attention signature: q/k/v ``[B, H, T, D]`` -> (``[B, Tq, H, D]``, None)."""
        layout: ThoughtLayout | None = kwargs.get(THOUGHT_LAYOUT_KWARG)
        query, key, value = _autocast_inputs(query, key, value)
        if dropout and module.training:
            _warn_once(f"{name}: attention dropout ({dropout}) is not applied by the thought attention paths.")
        if layout is None:
            out = plain_causal_attention(query, key, value, padding_mask=attention_mask, scale=scaling)
        else:
            out = get_op()(
                query, key, value, base_len=layout.base_len, key_padding_mask=layout.key_padding_mask, scale=scaling
            )
        return out.transpose(1, 2).contiguous(), None

    attention_forward.__name__ = f"{name}_attention_forward"
    return attention_forward


def padding_only_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """Mask function for the ``quietstar_*`` names: just the 2-D key padding mask (or None).

    Causality and the thought rule are applied inside the attention functions.
    """
    if attention_mask is None:
        return None
    return prepare_padding_mask(attention_mask, kv_length, kv_offset)


def register_attention_paths() -> None:
    """Register every ``quietstar_*`` name with both interfaces (idempotent)."""
    ops = {
        REFERENCE: lambda: thought_attention_reference,
        TORCH: lambda: thought_attention_torch,
        TRITON: _triton_op,
    }
    for name, get_op in ops.items():
        AttentionInterface.register(name, _make_attention_forward(name, get_op))
        AttentionMaskInterface.register(name, padding_only_mask)


def check_attention_name(name: str) -> str:
    if name not in THOUGHT_ATTENTION_NAMES:
        raise ValueError(
            f"attn_implementation={name!r} cannot compute thoughts; choose one of {', '.join(THOUGHT_ATTENTION_NAMES)}"
        )
    if name == TRITON and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        _triton_op()  # emits the fallback warning up front
    return name
