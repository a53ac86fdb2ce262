"""Thinking generate(): one thought at the last position per emitted token, on the cached base prefix.

The oracle is the training forward: with greedy thoughts its ``logits[:, -1]`` is the mixed
prediction with the thought at the last position, so generate's first token is its argmax, and a
greedy generation equals a loop that re-runs the full forward for every new token.
"""

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.compat import cache_of
from quietstar.generation import naive_generate
from tiny_models import padded_batch, tiny_base

N = 3


def thinking_model(arch="llama", n_thought_tokens=N, seed=0, **kwargs):
    model = QuietStarForCausalLM.from_base(
        tiny_base(arch, seed=seed), n_thought_tokens=n_thought_tokens, n_talk_tokens=2, n_passes=1, thought_temperature=0.0, **kwargs
    ).eval()
    with torch.no_grad():  # a non-zero mixing head, so the mix is not trivially the base model
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    model.generation_config.eos_token_id = model.base_lm.generation_config.eos_token_id = None  # run the full length
    return model


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_first_token_is_the_forward_argmax_and_greedy_matches_full_recompute(arch, padded):
    model = thinking_model(arch)
    ids, mask = padded_batch(3, 9, "left", seed=1, n_pad=(3, 0, 5) if padded else (0,))
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, return_thoughts=True, pad_token_id=0)
    assert torch.equal(gen.sequences[:, 9], out.logits[:, -1].argmax(-1))
    assert torch.equal(gen.thought_ids[:, 0], out.thought_ids[:, -1])  # the same greedy thought at the last position
    torch.testing.assert_close(gen.mixing_weights[:, 0], out.mixing_weights[:, -1, 0], atol=1e-5, rtol=1e-5)

    reference = naive_generate(model, ids, mask, max_new_tokens=20)
    assert torch.equal(gen.sequences, reference)
    assert gen.thought_ids.shape == (3, 20, N)
    assert cache_of(gen).get_seq_length() == 9 + 20  # the base cache: prompt + emitted tokens, no thought entries


def test_thoughts_off_or_shortened():
    model = thinking_model("llama")
    ids, mask = padded_batch(2, 7, "left", seed=3)
    base = model.base_lm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for off in (dict(think=False), dict(n_thought_tokens=0)):
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, **off), base)
    short = model.generate(ids, attention_mask=mask, max_new_tokens=5, n_thought_tokens=1, return_thoughts=True, pad_token_id=0)
    assert short.thought_ids.shape == (2, 5, 1)
    model.config.n_thought_tokens = 1  # the same as a model trained with N = 1
    assert torch.equal(short.sequences, naive_generate(model, ids, mask, max_new_tokens=5))


def test_delimiters_never_emitted_nor_thought_with_sampling():
    base = tiny_base("llama")
    config = QuietStarConfig(  # delimiter ids inside the LM head's vocabulary, so they could be sampled
        base_config=base.config, start_thought_token_id=5, end_thought_token_id=6, n_thought_tokens=N, n_passes=1
    )
    model = QuietStarForCausalLM(config, base_lm=base).eval()
    assert model.banned_token_ids == (5, 6)
    ids, mask = padded_batch(2, 6, "left", seed=4)
    torch.manual_seed(0)
    gen = model.generate(
        ids, attention_mask=mask, do_sample=True, temperature=50.0, top_k=0, max_new_tokens=40, min_new_tokens=40,
        thought_temperature=50.0, return_thoughts=True, pad_token_id=0, thought_generator=torch.Generator().manual_seed(1),
    )
    new = gen.sequences[:, 6:]
    assert new.shape == (2, 40) and gen.thought_ids.shape == (2, 40, N)
    for banned in (5, 6):
        assert not (new == banned).any() and not (gen.thought_ids == banned).any()
    assert len(set(new.flatten().tolist())) > 20  # really sampling near-uniformly (so an unbanned delimiter would show)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value)

    def end(self):
        self.ended = True


class StopAtLength(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_streamer_stopping_criteria_eos_and_sampling_temperature():
    model = thinking_model("qwen2")
    ids = padded_batch(1, 5, "left", seed=5, n_pad=(0,))[0]
    streamer = Collect()
    gen = model.generate(ids, max_new_tokens=50, stopping_criteria=StoppingCriteriaList([StopAtLength(12)]), streamer=streamer, pad_token_id=0)
    assert gen.shape == (1, 12) and streamer.ended
    assert torch.equal(torch.cat([c.reshape(1, -1) for c in streamer.chunks], dim=1), gen)

    # EOS: the first emitted token as EOS stops a single row after one token
    first = int(gen[0, 5])
    stopped = model.generate(ids, max_new_tokens=10, eos_token_id=first, pad_token_id=0)
    assert stopped.shape == (1, 6)

    # thoughts sampled at temperature 1 vary with the thought generator; emitted tokens stay greedy
    a = model.generate(ids, max_new_tokens=4, thought_temperature=1.0, return_thoughts=True, pad_token_id=0,
                       thought_generator=torch.Generator().manual_seed(0))
    b = model.generate(ids, max_new_tokens=4, thought_temperature=1.0, return_thoughts=True, pad_token_id=0,
                       thought_generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.thought_ids, b.thought_ids)


def test_beam_search_is_refused():
    model = thinking_model("llama")
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(torch.tensor([[1, 2, 3]]), num_beams=2, max_new_tokens=2, pad_token_id=0)
