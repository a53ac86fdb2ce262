"""Loss terms against a direct re-computation of ALGORITHM.md's formulas from the returned logits."""

import pytest
import torch

from quietstar import QuietStarForCausalLM
from quietstar.thought_forward import replay
from tiny_models import padded_batch, tiny_base

N, K, P = 2, 3, 2


def _model(**kwargs):
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), n_thought_tokens=N, n_talk_tokens=K, n_passes=P, **kwargs)
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    return model


def _recompute(out, ids, mask, labels, cfg):
    """ALGORITHM.md "Losses", written with explicit loops over positions."""
    logp_base = torch.log_softmax(out.base_logits.double(), -1)
    logp_mixed = torch.log_softmax(out.mixed_logits.double(), -1)
    B, L = out.base_logits.shape[:2]
    ids, mask, labels = (t.repeat_interleave(P, 0) for t in (ids, mask, labels))

    def target(b, i, k):
        j = i + 1 + k
        if j >= L or not mask[b, i] or not mask[b, j] or labels[b, j] == -100:
            return None
        return int(labels[b, j])

    base_terms, talk_terms = [], [[] for _ in range(K)]
    rewards = torch.zeros(B, L, dtype=torch.float64)
    rewarded = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            ys = [target(b, i, k) for k in range(K)]
            if ys[0] is not None:
                base_terms.append(-logp_base[b, i, ys[0]])
            for k, y in enumerate(ys):
                if y is not None:
                    talk_terms[k].append(-logp_mixed[b, i, k, y])
            if all(y is not None for y in ys):
                rewarded[b, i] = True
                rewards[b, i] = sum(logp_mixed[b, i, k, y] - logp_base[b, i + k, y] for k, y in enumerate(ys))
    nll_base = torch.stack(base_terms).mean()
    nll_talk = torch.stack([torch.stack(t).mean() for t in talk_terms]).mean()
    grouped = rewards.view(-1, P, L)
    advantages = (grouped - grouped.mean(1, keepdim=True)).view(B, L)
    if cfg.clip_negative_advantages:
        advantages = advantages.clamp_min(0)
    advantages = advantages * rewarded
    return nll_base, nll_talk, rewards, advantages, rewarded


@pytest.mark.parametrize("clip", [True, False])
def test_loss_terms_equal_direct_recomputation(clip):
    model = _model(clip_negative_advantages=clip, policy_loss_weight=10.0, base_loss_weight=0.3, talk_loss_weight=0.7)
    ids, mask = padded_batch(2, 10, "right", seed=4)
    labels = ids.clone()
    labels[0, 4] = -100
    thoughts = torch.randint(0, 90, (2 * P, 10, N), generator=torch.Generator().manual_seed(1))  # differ per pass
    out = model(ids, attention_mask=mask, labels=labels, thought_ids=thoughts)
    nll_base, nll_talk, rewards, advantages, rewarded = _recompute(out, ids, mask, labels, model.config)

    terms = out.loss_terms
    torch.testing.assert_close(terms["nll_base"].double(), nll_base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["nll_talk"].double(), nll_talk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.rewards.double(), rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.advantages.double(), advantages, atol=1e-5, rtol=1e-5)
    assert rewards.abs().sum() > 0 and (advantages != 0).any()
    if clip:
        assert (out.advantages >= 0).all()

    # policy: -A_i * log pi(t_j) at the REINFORCE temperature (delimiters excluded), averaged
    logits = model.base_lm.lm_head(replay(
        model, ids.repeat_interleave(P, 0), mask.repeat_interleave(P, 0),
        __import__("quietstar").layout.base_position_ids(mask.repeat_interleave(P, 0)), out.thought_ids,
    )[:, 1 : N + 1]).double() / model.config.reinforce_temperature  # [B, N, L, V]
    log_pi = torch.log_softmax(logits, -1).gather(-1, out.thought_ids.transpose(1, 2)[..., None]).squeeze(-1)  # [B, N, L]
    policy = -(advantages[:, None, :] * log_pi).sum() / (rewarded.sum() * N)
    torch.testing.assert_close(terms["policy_loss"].double(), policy, atol=1e-5, rtol=1e-5)

    total = 0.3 * nll_base + 0.7 * nll_talk + 10.0 * policy
    torch.testing.assert_close(out.loss.double(), total, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(terms["loss"], out.loss.detach())


def test_mixing_head_at_init_gives_the_base_model():
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), n_thought_tokens=N, n_talk_tokens=K, n_passes=P)
    ids, mask = padded_batch(2, 8, "left", seed=5)
    out = model(ids, attention_mask=mask, labels=ids)
    assert torch.equal(out.mixing_weights, torch.zeros_like(out.mixing_weights))
    torch.testing.assert_close(out.logits, out.base_logits)
    assert out.rewards.abs().max() < 1e-5  # the thought changes nothing yet
    assert not torch.allclose(out.talk_logits[:, :, 0], out.base_logits)  # but the thought does see its tokens


def test_all_padding_row_gives_no_loss_and_no_nan():
    model = _model()
    ids, mask = padded_batch(2, 6, "right", seed=6)
    mask[1] = 0
    out = model(ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(v) for v in out.loss_terms.values())
    assert (out.rewards[P:] == 0).all() and (out.advantages[P:] == 0).all()
    # the padded row contributes nothing: same loss as the real row alone, with the same thoughts
    alone = model(ids[:1], attention_mask=mask[:1], labels=ids[:1], thought_ids=out.thought_ids[:P])
    torch.testing.assert_close(alone.loss, out.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    everything_padded = model(ids, attention_mask=torch.zeros_like(mask), labels=ids)
    assert everything_padded.loss.item() == 0.0


def test_greedy_thoughts_are_deterministic_and_sampled_ones_vary():
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), n_thought_tokens=4, n_talk_tokens=2, n_passes=1,
                                           thought_temperature=0.0)
    ids, _ = padded_batch(2, 12, "right", seed=7)
    a, b = model(ids).thought_ids, model(ids).thought_ids
    assert torch.equal(a, b)
    model.config.thought_temperature = 1.0
    c = model(ids, generator=torch.Generator().manual_seed(0)).thought_ids
    d = model(ids, generator=torch.Generator().manual_seed(1)).thought_ids
    assert not torch.equal(c, d)
    sot, eot = model.config.thought_token_ids
    assert not ((c == sot) | (c == eot)).any()
