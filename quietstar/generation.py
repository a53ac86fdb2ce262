"""Thinking at inference: one thought for the last position only, on top of the cached base prefix.

docs/ALGORITHM.md, "Inference": to emit a token, take the base hidden state of the last token, feed
``<|startthought|>, t_1..t_N, <|endthought|>`` as single-token steps on top of the base KV cache
(thoughts sampled exactly as in training, :func:`quietstar.sampling.pick_tokens`), mix the base and
post-thought predictions with the mixing head, then crop the thought's N + 2 entries off the cache.
The base cache grows by one entry per emitted token: the emitted token itself, fed as the next base
step. Cost per emitted token: N + 3 single-token decoder steps.

Thoughts at earlier positions never influence anything later (the visibility rule), so the prompt
needs no thoughts except at its last position, and one position thinks at a time: plain causal
attention over the cache is exact, so stock ``sdpa`` / ``flash_attention_2`` serve generation.

``QuietStarForCausalLM.generate`` routes greedy and sampling generation here (its ``_sample``
override); :func:`naive_generate` is the slow reference (full forward per new token) for tests
and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .attention import THOUGHT_ATTENTION_NAMES
from .compat import cache_of, kv_cache_kept, with_cache
from .layout import base_position_ids
from .sampling import ban_tokens, pick_tokens
from .static_decoding import StaticDecoding, static_decoding
from .window import full_kv_cache, sliding_window


@dataclass
class ThinkingOptions:
    """Per-call thinking settings of ``generate`` (defaults from the model config)."""

    n_thought_tokens: int  # 0 switches thinking off: the base model generates
    thought_temperature: float  # 0 = greedy thoughts; independent of the emitted tokens' temperature
    return_thoughts: bool = False
    generator: torch.Generator | None = None  # for thought sampling only
    decode: str = "dynamic"  # "dynamic" | "static" (preallocated cache) | "compiled" (static + torch.compile)


@dataclass
class ThinkingGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus the thought behind every emitted token.

    thought_ids ``[B, new, N]``: the thought sampled before emitted token j.
    mixing_weights ``[B, new]``: the mixing head's w for that token.
    """

    thought_ids: torch.Tensor | None = None
    mixing_weights: torch.Tensor | None = None


@dataclass
class Thought:
    """One thought at the last position of every row; tensors ``[B, ...]``."""

    logits: torch.Tensor  # [B, V]  mixed prediction of the next token
    base_logits: torch.Tensor  # [B, V]
    thought_ids: torch.Tensor  # [B, N]
    mixing_weight: torch.Tensor  # [B]


class BaseState:
    """The base (thought-free) prefix: KV cache, 2-D padding mask, last position id and hidden state."""

    def __init__(self, cache, attention_mask: torch.Tensor, static: "StaticDecoding | None" = None):
        self.cache = cache
        self.static = static  # a preallocated cache: masks span all its slots; crop = rewind
        self.attention_mask = attention_mask  # [B, T]  T = cache length
        # Without padding the decoder gets no mask: stock sdpa then takes its unmasked fast path
        # (on CPU a masked single-token step costs ~10x more); position ids stay explicit and
        # monotone per call, so transformers never infers packed sequences.
        self.padded = not bool(attention_mask.all())
        self.last_position: torch.Tensor | None = None  # [B]
        self.last_hidden: torch.Tensor | None = None  # [B, H]

    def mask_with(self, extra: int) -> torch.Tensor | None:
        """The 2-D mask of the prefix plus ``extra`` real tokens (None without padding)."""
        if not self.padded:
            return None
        if self.static is not None:  # every slot past the prompt holds a real token (stale slots: causal mask)
            return self.static.padded_mask(self.attention_mask)
        return torch.cat([self.attention_mask, self.attention_mask.new_ones(self.attention_mask.shape[0], extra)], dim=1)

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]


@torch.no_grad()
def prefill(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache=None) -> BaseState:
    """Run the prompt ``[B, L]`` through the base decoder (plain causal attention) into a KV cache.

    A cache that already holds a prefix of the prompt is extended with the rest; one that holds all
    of it is cropped by one token so that the last token's hidden state is recomputed.
    """
    static = getattr(cache, "quietstar_static", None)
    if cache is None:
        cache = full_kv_cache()
    cached = int(cache.get_seq_length())
    if cached > input_ids.shape[1]:
        raise ValueError(f"the cache holds {cached} tokens but the prompt has only {input_ids.shape[1]}")
    if cached == input_ids.shape[1]:
        cache.crop(-1)
        cached -= 1
    positions = base_position_ids(attention_mask)  # [B, L]
    state = BaseState(cache, attention_mask, static)
    hidden = decoder(
        input_ids=input_ids[:, cached:],
        attention_mask=state.mask_with(0),
        position_ids=positions[:, cached:],
        use_cache=True,
        **with_cache(cache),
    ).last_hidden_state
    state.last_position, state.last_hidden = positions[:, -1], hidden[:, -1]
    return state


def decode_step(decoder, state: BaseState, tokens, mask, positions) -> torch.Tensor:
    """One single-token decoder call on the state's cache: the last hidden state ``[B, H]``."""
    if state.static is not None:
        return state.static.step(tokens, mask, positions)
    return decoder(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                   **with_cache(state.cache)).last_hidden_state[:, -1]


def crop_cache(state: BaseState, n: int) -> None:
    if state.static is not None:
        state.static.rewind(n)
    else:
        state.cache.crop(-n)


@torch.no_grad()
def base_step(decoder, state: BaseState, tokens: torch.Tensor) -> None:
    """Append one emitted token per row ``[B]`` to the base prefix (the cache grows by one)."""
    state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(len(tokens), 1)], dim=1)
    state.last_position = state.last_position + 1
    state.last_hidden = decode_step(decoder, state, tokens[:, None], state.mask_with(0), state.last_position[:, None])


@torch.no_grad()
def think(model, state: BaseState, options: ThinkingOptions) -> Thought:
    """Sample a thought at the last position, mix, and leave the cache as it was.

    Step s (1-based) feeds ``<sot>`` (s = 1), ``t_{s-1}`` (s = 2..N+1) or ``<eot>`` (s = N+2) at
    position ``pos + s``; the logits after steps 1..N give t_1..t_N; the hidden state after the
    eot step is the post-thought state g that the mixing head weighs against the base state.
    """
    decoder, lm_head = model.base_lm.base_model, model.get_output_embeddings()
    base_hidden = state.last_hidden  # [B, H]
    base_logits = lm_head(base_hidden)  # [B, V]
    B, N = base_hidden.shape[0], options.n_thought_tokens
    if N == 0:  # thinking off: the base model
        return Thought(base_logits, base_logits, base_logits.new_zeros(B, 0, dtype=torch.long), base_logits.new_zeros(B))
    sot, eot = model.config.thought_token_ids
    banned = model.banned_token_ids
    tokens = torch.full((B, 1), sot, dtype=torch.long, device=base_hidden.device)
    thoughts = []
    for s in range(1, N + 3):
        hidden = decode_step(decoder, state, tokens, state.mask_with(s), (state.last_position + s)[:, None])  # [B, H]
        if s <= N:
            picked = pick_tokens(lm_head(hidden), options.thought_temperature, banned, options.generator)  # [B]
            thoughts.append(picked)
            tokens = picked[:, None]
        elif s == N + 1:
            tokens = torch.full_like(tokens, eot)
    crop_cache(state, N + 2)  # drop the thought: the base cache is the prefix again
    weight = model.mixing_head(base_hidden, hidden)  # [B]
    w = weight[:, None].to(base_logits.dtype)
    mixed = (1 - w) * base_logits + w * lm_head(hidden)  # same mix as the training forward (k = 0)
    return Thought(mixed, base_logits, torch.stack(thoughts, dim=-1), weight)


@torch.no_grad()
def thinking_sample(model, input_ids: torch.Tensor, logits_processor, stopping_criteria, generation_config,
                    options: ThinkingOptions, streamer=None, **model_kwargs):
    """The decoding loop behind ``QuietStarForCausalLM.generate`` for greedy search and sampling.

    Mirrors ``GenerationMixin._sample``: logits processors, stopping criteria, streamers,
    ``max_new_tokens``, pad-after-EOS, ``return_dict_in_generate`` with scores/logits; the
    delimiters are never emitted. Each iteration: think -> choose -> feed the chosen token.
    """
    decoder = model.base_lm.base_model
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:  # generate() drops an all-ones mask
        attention_mask = torch.ones_like(input_ids)
    cache = _decoding_cache(model, model_kwargs, generation_config, options, input_ids.shape[0])
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    return_dict = generation_config.return_dict_in_generate or options.return_thoughts
    output_scores, output_logits = generation_config.output_scores, generation_config.output_logits
    scores, raw_logits = (() if (return_dict and output_scores) else None), (() if (return_dict and output_logits) else None)
    banned = model.banned_token_ids

    state = prefill(decoder, input_ids, attention_mask, cache)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    thought_ids, weights = [], []
    while True:
        thought = think(model, state, options)
        next_logits = ban_tokens(thought.logits.to(dtype=torch.float32, device=input_ids.device), banned)
        next_scores = logits_processor(input_ids, next_logits)
        if scores is not None:
            scores += (next_scores,)
        if raw_logits is not None:
            raw_logits += (next_logits,)
        next_tokens = _choose(next_scores, generation_config.do_sample)
        if has_eos_stopping_criteria:  # finished rows keep emitting padding
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if options.return_thoughts:
            thought_ids.append(thought.thought_ids)
            weights.append(thought.mixing_weight)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        base_step(decoder, state, next_tokens)  # cache: prompt + emitted tokens
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        if unfinished.max() == 0:
            break
    if streamer is not None:
        streamer.end()

    if not return_dict:
        return input_ids
    extra = {}
    if options.return_thoughts:
        extra = dict(thought_ids=torch.stack(thought_ids, dim=1), mixing_weights=torch.stack(weights, dim=1))
    cache = state.cache if generation_config.use_cache is not False else None
    return ThinkingGenerateOutput(sequences=input_ids, scores=scores, logits=raw_logits, **with_cache(cache), **extra)


def _choose(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(-1)


def _decoding_cache(model, model_kwargs, generation_config, options: ThinkingOptions, batch: int):
    """The base model's KV cache for thinking generation: the caller's DynamicCache, a preallocated
    one (``decode`` static or compiled), or None (prefill builds a DynamicCache)."""
    cache = cache_of(model_kwargs)
    if cache is not None and not getattr(cache, "_is_user_defined", False):
        cache = None  # generate() sized its default cache for the wrapper's config; build one for the base model
    if cache is not None and (not hasattr(cache, "crop") or any(getattr(cache, "is_sliding", ()))):
        raise ValueError(
            f"thinking generation crops every thought off the cache, so it needs a DynamicCache() that keeps every key "
            f"(built without a config: sliding-window layers drop the keys a cropped thought overwrote), got {type(cache).__name__}"
        )
    _check_window(model.base_lm.base_model.config, generation_config.max_length, options.n_thought_tokens)
    if options.decode not in ("dynamic", "static", "compiled"):
        raise ValueError(f"decode must be 'dynamic', 'static' or 'compiled', got {options.decode!r}")
    if options.decode == "dynamic":
        return cache
    if cache is not None:
        raise ValueError(f"decode={options.decode!r} preallocates its own cache; pass no past_key_values")
    # prompt + new tokens + the last thought's sot, N tokens and eot
    max_len = generation_config.max_length + options.n_thought_tokens + 2
    return static_decoding(model, batch, max_len, options.decode == "compiled").cache


THINKING_OPTIONS_KWARG = "thinking_options"  # generate() -> _sample, through GenerationMixin's model kwargs


class ThinkingGenerationMixin:
    """``generate()`` for ``QuietStarForCausalLM`` (listed before ``GenerationMixin`` in its bases).

    ``generate()`` is GenerationMixin's own (GenerationConfig, logits processors, stopping criteria,
    streamers, max_new_tokens); only its greedy/sampling loop ``_sample`` is replaced, by
    :func:`thinking_sample`, which thinks at the last position before every emitted token on top of
    the cached base prefix. The training forward (thoughts at all positions) is never called by
    generate(). Beam search and assisted decoding are refused.
    """

    def generate(
        self,
        *args,
        return_thoughts: bool = False,
        thought_temperature: float | None = None,
        n_thought_tokens: int | None = None,
        think: bool = True,
        thought_generator: torch.Generator | None = None,
        generation_attn_implementation: str | None = "sdpa",
        decode: str = "dynamic",
        **kwargs,
    ):
        """``GenerationMixin.generate`` that thinks before every emitted token (greedy or sampling).

        Thinking options (all optional): ``thought_temperature`` (default: the config's; 0 = greedy
        thoughts, independent of ``temperature`` for emitted tokens), ``n_thought_tokens`` (shorten
        or lengthen thoughts at inference; 0 or ``think=False`` = the base model),
        ``return_thoughts=True`` (returns a ``ThinkingGenerateOutput`` with ``thought_ids``
        ``[B, new, N]`` and ``mixing_weights`` ``[B, new]``), ``thought_generator`` (a
        ``torch.Generator`` for thought sampling). ``generation_attn_implementation`` is the attention
        the base model uses while generating (default ``sdpa``; ``flash_attention_2`` where
        installed; None keeps the current ``quietstar_*`` path): one position thinks at a time, so
        plain causal attention over the cache is exact. ``decode``: ``"dynamic"`` (a growing cache,
        the default), ``"static"`` (a preallocated cache; a thought is cropped by rewinding it) or
        ``"compiled"`` (static, and the single-token step under ``torch.compile(mode="reduce-overhead")``,
        CUDA graphs on a GPU: the first call compiles; later calls of the same batch size and length reuse it).
        """
        cfg = self.config
        n = cfg.n_thought_tokens if n_thought_tokens is None else int(n_thought_tokens)
        temperature = cfg.thought_temperature if thought_temperature is None else float(thought_temperature)
        if n < 0:
            raise ValueError(f"n_thought_tokens must be >= 0 (0 = no thinking), got {n}")
        if temperature < 0:
            raise ValueError(f"thought_temperature must be >= 0 (0 = greedy thoughts), got {temperature}")
        options = ThinkingOptions(
            n_thought_tokens=n if think else 0,
            thought_temperature=temperature,
            return_thoughts=return_thoughts,
            generator=thought_generator,
            decode=decode,
        )
        if return_thoughts:
            kwargs["return_dict_in_generate"] = True
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the wrapper speaks the base model's tokens
            if getattr(self.generation_config, name, None) is None:
                setattr(self.generation_config, name, getattr(self.base_lm.generation_config, name, None))

        previous_attn = self.base_lm.config._attn_implementation
        switch = generation_attn_implementation is not None and generation_attn_implementation != previous_attn
        if switch:
            self.base_lm.set_attn_implementation(generation_attn_implementation)
        try:  # the options travel with this call, through generate()'s model kwargs, to _sample
            return super().generate(*args, **kwargs, **{THINKING_OPTIONS_KWARG: options})
        finally:
            if switch:
                self.base_lm.set_attn_implementation(previous_attn)

    def _validate_model_kwargs(self, model_kwargs):
        model_kwargs = {k: v for k, v in model_kwargs.items() if k != THINKING_OPTIONS_KWARG}  # ours, not the model's
        return super()._validate_model_kwargs(model_kwargs)

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False, streamer=None, **model_kwargs):
        options = model_kwargs.pop(THINKING_OPTIONS_KWARG, None) or ThinkingOptions(
            self.config.n_thought_tokens, self.config.thought_temperature
        )
        with kv_cache_kept(self.base_lm):  # generate() runs without grad; 5.17 would drop the cache under checkpointing
            return thinking_sample(
                self, input_ids, logits_processor, stopping_criteria, generation_config, options, streamer=streamer, **model_kwargs
            )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # The thinking loop builds a DynamicCache for the base model (the wrapper's config has no layers);
        # a cache the caller passes in is used as it is (it must support crop()).
        if cache_of(model_kwargs) is not None:
            cache_of(model_kwargs)._is_user_defined = True

    def _beam_search(self, *args, **kwargs):
        raise NotImplementedError("beam search is not supported with thoughts; use greedy search or sampling (num_beams=1)")

    def _assisted_decoding(self, *args, **kwargs):
        raise NotImplementedError("assisted decoding is not supported with thoughts; generate without an assistant model")


def _check_window(base_config, max_length: int, n_thought_tokens: int) -> None:
    """Refuse what the ``quietstar_*`` paths cannot window: outside the thought layout they attend to
    the whole cache, so a windowed base model must generate with a stock attention past its window."""
    window, attn = sliding_window(base_config), base_config._attn_implementation
    span = max_length + n_thought_tokens + 1  # the last thought's eot sits at position max_length + N
    if window is not None and attn in THOUGHT_ATTENTION_NAMES and span > window:
        raise ValueError(
            f"generating up to {max_length} tokens with {n_thought_tokens}-token thoughts spans {span} positions, beyond "
            f"the base model's sliding window ({window}), which {attn} does not apply; generate with "
            "generation_attn_implementation='sdpa' (the default) or fewer new tokens"
        )


@torch.no_grad()
def naive_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20):
    """Greedy reference: re-run the full training forward (thoughts at every position) per new token.

    With greedy thoughts (``thought_temperature = 0``) and ``n_passes = 1`` it must agree with
    ``generate``: the forward's ``logits[:, -1]`` is the mixed prediction with the thought at the
    last position, and thoughts at earlier positions do not influence it. ``[B, L] -> [B, L + new]``.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    P, banned = model.config.n_passes, model.banned_token_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids, attention_mask=attention_mask).logits[::P, -1].float()  # pass 0 of each row
        logits = ban_tokens(logits, banned)
        next_tokens = logits.argmax(-1)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(next_tokens), 1)], dim=1)
    return input_ids
