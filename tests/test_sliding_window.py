"""Sliding-window base models (Mistral): the window applies to positions, not to the flattened layout.

A tiny Mistral whose window W is smaller than the (1 + S) L rows of the thought layout but at
least L + S must think exactly as the same weights without a window (quietstar/window.py says why);
past L + S > W the forward refuses, and generation past W follows the base model's own window.
"""

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from quietstar import QuietStarForCausalLM
from quietstar.compat import with_cache
from quietstar.sampling import ban_tokens
from tiny_models import padded_batch, tiny_config

N, K = 3, 2
S = N + K + 1
L = 10
WINDOW = L + S  # the smallest legal window: 16 positions, against (1 + S) L = 70 layout rows


def thinking_mistral(window, seed=0, **kwargs):
    config = tiny_config("mistral")
    config.sliding_window = window
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(seed + 1)
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=N, n_talk_tokens=K, n_passes=2, **kwargs).eval()
    with torch.no_grad():  # a non-zero mixing head, so the talk logits matter
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    model.generation_config.eos_token_id = model.base_lm.generation_config.eos_token_id = None
    return model


def windowed_and_plain(**kwargs):
    windowed, plain = thinking_mistral(WINDOW, **kwargs), thinking_mistral(None, **kwargs)
    assert windowed.base_lm.config.sliding_window == WINDOW and plain.base_lm.config.sliding_window is None
    for a, b in zip(windowed.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    return windowed, plain


@pytest.mark.parametrize("side", ["none", "left"])
def test_sampling_and_replay_equal_the_unwindowed_model(side):
    windowed, plain = windowed_and_plain()
    ids, mask = padded_batch(2, L, "left", seed=2, n_pad=(3, 0) if side == "left" else (0,))
    outs = []
    for model in (windowed, plain):
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(5))
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (w_out, w_grads), (p_out, p_grads) = outs
    assert torch.equal(w_out.thought_ids, p_out.thought_ids)  # sampling through the KV cache
    torch.testing.assert_close(w_out.loss, p_out.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w_out.mixed_logits, p_out.mixed_logits, atol=1e-5, rtol=1e-5)
    assert w_grads.keys() == p_grads.keys() and len(w_grads) > 0
    for name in w_grads:
        torch.testing.assert_close(w_grads[name], p_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_generation_within_the_window_equals_the_unwindowed_model():
    windowed, plain = windowed_and_plain(thought_temperature=0.0)
    ids, mask = padded_batch(2, 5, "left", seed=3, n_pad=(2, 0))
    new = WINDOW - 5 - N - 1  # the last thought ends at position 5 + new + N = WINDOW - 1
    kwargs = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, return_thoughts=True, pad_token_id=0)
    runs = [windowed.generate(ids, **kwargs), plain.generate(ids, **kwargs),
            windowed.generate(ids, generation_attn_implementation=None, **kwargs)]  # the longest span a quietstar_* path may take
    for run in runs[1:]:
        assert torch.equal(runs[0].sequences, run.sequences)
        assert torch.equal(runs[0].thought_ids, run.thought_ids)
        torch.testing.assert_close(runs[0].mixing_weights, run.mixing_weights)


def test_generation_past_the_window_follows_the_base_models_window():
    model = thinking_mistral(WINDOW, thought_temperature=0.0)
    ids = torch.randint(1, 90, (2, WINDOW + 7), generator=torch.Generator().manual_seed(4))  # > W; no pad id (0)
    # Thinking off: exactly the base model's own windowed generation (its sliding-window cache and mask).
    with stock_attention(model):
        base = model.base_lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, think=False), base)
    # Thinking on: the thought at the last position equals a windowed recompute of prompt + thought.
    gen = model.generate(ids, max_new_tokens=1, do_sample=False, return_thoughts=True, output_logits=True, pad_token_id=0)
    thought, logits = windowed_thought_by_recompute(model, ids)
    assert torch.equal(gen.thought_ids[:, 0], thought)
    torch.testing.assert_close(gen.logits[0], logits, atol=1e-5, rtol=1e-5)


@contextlib.contextmanager
def stock_attention(model):
    """The base model with stock sdpa, which applies the window (the quietstar_* paths do not outside a layout)."""
    previous = model.base_lm.config._attn_implementation
    model.base_lm.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.base_lm.set_attn_implementation(previous)


@torch.no_grad()
def windowed_thought_by_recompute(model, ids):
    """Greedy thought at the last position by full recomputes of the windowed base model (no cache);
    returns (thought ids [B, N], mixed next-token logits [B, V])."""
    sot, eot = model.config.thought_token_ids
    lm_head, banned = model.get_output_embeddings(), model.banned_token_ids

    def last_hidden(seq):
        return model.base_lm.base_model(input_ids=seq, attention_mask=torch.ones_like(seq)).last_hidden_state[:, -1]

    with stock_attention(model):
        base_hidden = last_hidden(ids)
        seq, thought = torch.cat([ids, torch.full_like(ids[:, :1], sot)], 1), []
        for _ in range(N):
            token = ban_tokens(lm_head(last_hidden(seq)).float(), banned).argmax(-1)
            thought.append(token)
            seq = torch.cat([seq, token[:, None]], 1)
        post_hidden = last_hidden(torch.cat([seq, torch.full_like(ids[:, :1], eot)], 1))
    w = model.mixing_head(base_hidden, post_hidden)[:, None]
    logits = (1 - w) * lm_head(base_hidden) + w * lm_head(post_hidden)
    return torch.stack(thought, -1), ban_tokens(logits.float(), banned)


def test_too_long_for_the_window_is_refused_clearly():
    model = thinking_mistral(WINDOW)
    model(torch.randint(0, 90, (1, L)))  # L + S == W: allowed
    with pytest.raises(ValueError, match=rf"{L + 1} tokens \+ {S} thought steps .* window is {WINDOW}; use at most {L} tokens"):
        model(torch.randint(0, 90, (1, L + 1)))
    ids = torch.randint(0, 90, (1, 5))
    with pytest.raises(ValueError, match="beyond the base model's sliding window .* generation_attn_implementation='sdpa'"):
        model.generate(ids, max_new_tokens=WINDOW - 5 - N, generation_attn_implementation=None, pad_token_id=0)  # one too many
    model.generate(ids, max_new_tokens=WINDOW - 5 - N - 1, generation_attn_implementation=None, pad_token_id=0)  # fits
    windowed_cache = DynamicCache(config=model.base_lm.config)  # sliding layers: a cropped thought would take the prefix with it
    with pytest.raises(ValueError, match=r"needs a DynamicCache\(\) that keeps every key"):
        model.generate(ids, max_new_tokens=2, pad_token_id=0, **with_cache(windowed_cache))
    model.generate(ids, max_new_tokens=2, pad_token_id=0, **with_cache(DynamicCache()))


def test_which_configs_apply_a_window():
    from types import SimpleNamespace

    from transformers import MistralConfig, Qwen2Config, Qwen2MoeConfig

    from quietstar.window import sliding_window

    assert sliding_window(MistralConfig()) == 4096  # Mistral-7B-v0.1's default
    assert sliding_window(MistralConfig(sliding_window=None)) is None
    assert sliding_window(Qwen2Config(sliding_window=8)) is None  # use_sliding_window=False by default
    assert sliding_window(Qwen2Config(use_sliding_window=True, sliding_window=8, num_hidden_layers=2, max_window_layers=1)) == 8
    # Every layer below max_window_layers attends in full: no layer is windowed.
    assert sliding_window(Qwen2Config(use_sliding_window=True, sliding_window=8, num_hidden_layers=2, max_window_layers=2)) is None
    assert sliding_window(Qwen2MoeConfig()) is None  # stores sliding_window=0 when off
    assert sliding_window(SimpleNamespace(sliding_window=8, use_sliding_window=False)) is None  # a config without layer_types
    assert sliding_window(SimpleNamespace(sliding_window=8)) == 8
    assert sliding_window(SimpleNamespace(sliding_window=0)) is None
