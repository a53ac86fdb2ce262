"""The held-out evaluation against a direct, loop-by-loop recomputation on a tiny model.

Greedy thoughts (temperature 0) make every seed's thoughts identical, so the recomputation can run
each window alone, unbatched and unpadded, and read the NLLs position by position.
"""

import math

import pytest
import torch

from char_tokenizer import char_tokenizer
from quietstar import QuietStarForCausalLM
from quietstar.evaluation.heldout import heldout_evaluation, text_windows
from tiny_models import tiny_base

TEXT = "12 + 30 = 42. So 42 - 2 = 40.\nTom had 7 apples and ate 3; 7 - 3 = 4 left.\n" * 2


@pytest.fixture(scope="module")
def model():
    m = QuietStarForCausalLM.from_base(tiny_base("llama", seed=3), n_thought_tokens=2, n_talk_tokens=2, n_passes=2,
                                       thought_temperature=0.0)
    with torch.no_grad():  # a large non-zero mixing head: thinking must change the prediction clearly
        g = torch.Generator().manual_seed(1)
        for layer in m.mixing_head.mlp:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.5, generator=g)
    return m.eval()


def _direct(model, tokenizer, seq_len):
    """Per-position base / thinking NLL, one window at a time, with explicit loops."""
    base, thinking = [], []
    for window in text_windows(tokenizer, TEXT, seq_len):
        ids = torch.tensor([window])
        with torch.no_grad():
            out = model(ids)
        for i in range(len(window) - 1):
            target = window[i + 1]
            base.append(-torch.log_softmax(out.base_logits[0, i].double(), -1)[target].item())
            per_pass = [-torch.log_softmax(out.logits[p, i].double(), -1)[target].item() for p in range(2)]
            thinking.append(sum(per_pass) / 2)
    return base, thinking


def test_matches_a_direct_recomputation(model):
    tokenizer = char_tokenizer()
    seq_len = 23  # windows of 23 chars + a short last one: padding in the last batch
    report = heldout_evaluation(model, tokenizer, TEXT, seq_len=seq_len, batch_size=3, seeds=(0, 5), keep_per_token=True)
    base, thinking = _direct(model, tokenizer, seq_len)
    assert report.n_tokens == len(base) == len(TEXT) - math.ceil(len(TEXT) / seq_len)
    torch.testing.assert_close(torch.tensor(report.per_token["base"]), torch.tensor(base), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(report.per_token["thinking"]), torch.tensor(thinking), atol=1e-5, rtol=1e-5)
    assert report.nll_base == pytest.approx(sum(base) / len(base), rel=1e-6)
    assert report.nll_thinking == pytest.approx(sum(thinking) / len(thinking), rel=1e-6)
    assert abs(report.nll_thinking - report.nll_base) > 1e-3  # the head is non-zero: thinking changes predictions
    helped = sum(t < b for t, b in zip(thinking, base)) / len(base)
    assert report.helped_share == pytest.approx(helped)
    # Deciles partition the tokens by base NLL: sizes add up, the last holds the hardest tokens.
    assert sum(d["n"] for d in report.deciles) == report.n_tokens and len(report.deciles) == 10
    hardest = sorted(base)[-report.hard["n"]:]
    assert report.hard["nll_base"] == pytest.approx(sum(hardest) / len(hardest), rel=1e-6)
    assert [d["nll_base"] for d in report.deciles] == sorted(d["nll_base"] for d in report.deciles)
    assert report.mixing_weight["p10"] <= report.mixing_weight["p50"] <= report.mixing_weight["p90"]
    assert "hardest 10%" in report.to_markdown()


def test_seeds_average_sampled_thoughts(model):
    """At temperature 1 the thinking NLL is the mean over seeds: two seeds = the mean of each alone."""
    tokenizer = char_tokenizer()
    model.config.thought_temperature = 1.0
    try:
        one = [heldout_evaluation(model, tokenizer, TEXT, seq_len=40, seeds=(s,), keep_per_token=True) for s in (0, 1)]
        both = heldout_evaluation(model, tokenizer, TEXT, seq_len=40, seeds=(0, 1), keep_per_token=True)
    finally:
        model.config.thought_temperature = 0.0
    assert one[0].per_token["thinking"] != one[1].per_token["thinking"]  # different thoughts, different NLLs
    mean = (torch.tensor(one[0].per_token["thinking"]) + torch.tensor(one[1].per_token["thinking"])) / 2
    torch.testing.assert_close(torch.tensor(both.per_token["thinking"]), mean, atol=1e-6, rtol=1e-6)
    assert both.per_token["base"] == one[0].per_token["base"]


def test_bad_input_is_refused_clearly(model):
    tokenizer = char_tokenizer()
    with pytest.raises(ValueError, match="too short"):
        heldout_evaluation(model, tokenizer, "1", seq_len=8)
    with pytest.raises(TypeError, match="from_base"):
        heldout_evaluation(model.base_lm, tokenizer, TEXT)


def test_base_only_scoring_equals_the_thinking_reports_base(model):
    """thinking=False (controls, untouched bases) gives the same base NLL without sampling thoughts."""
    tokenizer = char_tokenizer()
    full = heldout_evaluation(model, tokenizer, TEXT, seq_len=23, batch_size=3, keep_per_token=True)
    for lm in (model, model.base_lm):
        base_only = heldout_evaluation(lm, tokenizer, TEXT, seq_len=23, batch_size=2, keep_per_token=True, thinking=False)
        torch.testing.assert_close(torch.tensor(base_only.per_token["base"]), torch.tensor(full.per_token["base"]),
                                   atol=1e-5, rtol=1e-5)
        assert base_only.nll_thinking == base_only.nll_base and base_only.reward_mean == 0.0
