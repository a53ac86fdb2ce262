"""Sliding-window base models (Mistral: ``sliding_window=4096``) under the thought layout.

A windowed model lets a token attend to the keys at most ``window - 1`` POSITIONS back. Under
Quiet-STaR every query ``(s, i)`` reads a virtual sequence of its own: the base tokens ``0..i``
then its own extra tokens at positions ``pos[i] + 1 .. pos[i] + s``. The window therefore applies
to position ids, never to indices in the flattened ``(1 + S) L`` layout or in a KV cache filled
one step of ``L`` tokens at a time.

Why the thought attention needs no window mask: the visible keys of query ``(s, i)`` are base
keys ``j <= i`` at distance ``pos[i] + s - pos[j] <= (L - 1) + S`` and its own extra keys at
distance ``< s <= S``. So when ``L + S <= window`` (the forward's input check) no visible key is
ever out of the window and the windowed attention equals the full one; left padding only shortens
distances. Longer inputs are refused, not silently attended in full.

What must change is the KV cache: ``DynamicCache(config=...)`` gives a windowed model
sliding-window layers that keep only the last ``window - 1`` keys along the cache, which drops the
flattened layout's keys (sampling) and cannot restore a prefix once a thought is cropped off it
(generation). :func:`full_kv_cache` keeps every key; in generation (one position thinks at a
time, so cache index and position id advance together) the window is then applied by the base
model's own stock attention mask.
"""

from __future__ import annotations

from transformers import DynamicCache


def sliding_window(base_config) -> int | None:
    """The window (in positions) the base model applies, or None for full causal attention."""
    window = getattr(base_config, "sliding_window", None)
    if not window or not getattr(base_config, "use_sliding_window", True):
        return None  # Qwen2-MoE stores sliding_window=0 when use_sliding_window is off
    layer_types = getattr(base_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None  # e.g. Qwen2 with max_window_layers >= num_hidden_layers: no layer is windowed
    return int(window)


def full_kv_cache() -> DynamicCache:
    """A KV cache that keeps every key (plain ``DynamicLayer`` per layer, whatever the config says)."""
    return DynamicCache()


__all__ = ["sliding_window", "full_kv_cache"]
