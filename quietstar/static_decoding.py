"""A preallocated KV cache and a compiled single-token step for thinking generation (gpt-fast's recipe).

``generate(..., decode="static")`` decodes on a ``StaticCache``; ``decode="compiled"`` also runs the
single-token decoder step under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on a GPU): per
emitted token, thinking makes N + 3 such steps, which on a GPU are bound by launches, not arithmetic.
"""

from __future__ import annotations

import torch

from .compat import with_cache
from .window import sliding_window


class StaticDecoding:
    """A preallocated (``StaticCache``) KV cache for the base decoder and its single-token step, eager or
    compiled (``torch.compile(mode="reduce-overhead")``: CUDA graphs on a GPU), as gpt-fast decodes.

    Slots past the current length are masked by the causal mask (positions come from the cache's own
    length counter), so cropping a thought is a rewind of that counter: the next step overwrites it.
    Kept on the model between ``generate`` calls of the same batch size and mode that fit its length,
    so the compiled step is built once (a longer call builds a new one)."""

    def __init__(self, decoder, batch: int, max_len: int, compiled: bool):
        from transformers import StaticCache

        if sliding_window(decoder.config) is not None:
            raise ValueError("static-cache decoding keeps every key; this base model has a sliding window: "
                             "generate with decode='dynamic'")
        self.key = (batch, compiled)
        self.max_len = max_len
        self.cache = StaticCache(config=decoder.config, max_cache_len=max_len)
        self.cache.quietstar_static = self

        def step(tokens, mask, positions):
            return decoder(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                           **with_cache(self.cache)).last_hidden_state[:, -1]

        self.compiled = compiled
        self._step = torch.compile(step, mode="reduce-overhead", dynamic=False) if compiled else step

    def step(self, tokens, mask, positions) -> torch.Tensor:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # a new replay: the last one's outputs are consumed
            return self._step(tokens, mask, positions).clone()  # graph outputs are overwritten by the next replay
        return self._step(tokens, mask, positions)

    def padded_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = self.max_len - attention_mask.shape[1]
        return torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], extra)], dim=1)

    def rewind(self, n: int) -> None:
        for layer in self.cache.layers:  # in place: compiled graphs hold the counter's address
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.sub_(n)

    def reset(self) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()


def static_decoding(model, batch: int, max_len: int, compiled: bool) -> StaticDecoding:
    """The model's ``StaticDecoding`` for this call, reused when batch and mode match and it is long enough."""
    held = getattr(model, "_quietstar_static_decoding", None)
    if held is None or held.key != (batch, compiled) or held.max_len < max_len:
        held = StaticDecoding(model.base_lm.base_model, batch, max_len, compiled)
        model._quietstar_static_decoding = held
    held.reset()
    return held
