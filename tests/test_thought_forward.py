"""``thought_forward="incremental"`` (sample with grad into the KV cache) against the default replay.

Given the same generator, both designs must sample the same thoughts and produce the same hidden
states, loss terms and gradients: incremental is a different schedule of the same computation
(benchmarks/step_settings.py --compare thought-forward measures which is faster where).
"""

import pytest
import torch

from quietstar import QuietStarConfig, QuietStarForCausalLM, thought_forward
from tiny_models import padded_batch, tiny_base

N, K, P = 3, 3, 2


def _model(arch, **kwargs):
    model = QuietStarForCausalLM.from_base(tiny_base(arch), n_thought_tokens=N, n_talk_tokens=K, n_passes=P,
                                           policy_loss_weight=10.0, **kwargs).train()
    with torch.no_grad():  # a non-zero mixing head: the talk states reach the loss
        for p in model.mixing_head.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    return model


def _step(model, design, ids, mask, thought_ids=None, return_logits=False):
    model.config.thought_forward = design
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids, thought_ids=thought_ids, return_logits=return_logits,
                generator=torch.Generator().manual_seed(11))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_incremental_equals_replay_values_and_gradients(arch, side):
    model = _model(arch)
    ids, mask = padded_batch(2, 10, side, seed=4)
    inc, inc_grads = _step(model, "incremental", ids, mask)
    rep, rep_grads = _step(model, "replay", ids, mask)
    # the same generator draws the same thoughts from the same logits
    assert torch.equal(inc.thought_ids, rep.thought_ids)
    assert (inc.thought_ids != inc.thought_ids[..., :1]).any(), "thoughts should vary"
    for name in ("nll_base", "nll_talk", "policy_loss"):
        torch.testing.assert_close(inc.loss_terms[name], rep.loss_terms[name], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(inc.loss, rep.loss, atol=1e-6, rtol=1e-5)
    for field in ("base_log_probs", "mixed_log_probs", "mixing_weights", "rewards"):
        torch.testing.assert_close(getattr(inc, field), getattr(rep, field), atol=1e-5, rtol=1e-5)
    assert inc_grads.keys() == rep_grads.keys() and len(rep_grads) > 10
    for name, grad in rep_grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        err = (inc_grads[name] - grad).abs().max().item()
        assert err <= 1e-5 * scale + 1e-7, f"{name}: {err:.3g} vs max {scale:.3g}"


def test_incremental_full_logits_and_scoring_without_labels():
    model = _model("mistral")
    ids, mask = padded_batch(2, 9, "left", seed=5)
    inc, _ = _step(model, "incremental", ids, mask, return_logits=True)
    rep, _ = _step(model, "replay", ids, mask, return_logits=True)
    torch.testing.assert_close(inc.talk_logits, rep.talk_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inc.logits, rep.logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # scoring: no labels, no grad
        scores = {}
        for design in ("incremental", "replay"):
            model.config.thought_forward = design
            scores[design] = model(ids, attention_mask=mask, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(scores["incremental"].rewards, scores["replay"].rewards, atol=1e-5, rtol=1e-5)


def test_given_thoughts_always_replay(monkeypatch):
    model = _model("llama", thought_forward="incremental")
    ids, mask = padded_batch(1, 8, "right", seed=6)
    called = []
    monkeypatch.setattr(thought_forward, "incremental", lambda *a, **k: called.append(1))
    thoughts = torch.randint(0, 90, (1, 8, N))
    out = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
    assert not called and torch.equal(out.thought_ids, thoughts.repeat_interleave(P, 0))


def test_incremental_refuses_gradient_checkpointing_with_grad_only():
    model = _model("llama", thought_forward="incremental")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = padded_batch(1, 8, "right", seed=7)
    with pytest.raises(ValueError, match="gradient checkpointing cannot recompute.*thought_forward='replay'"):
        model(ids, attention_mask=mask, labels=ids)
    with torch.no_grad():  # no backward to replay: sampling with the cache works as usual
        out = model(ids, attention_mask=mask)
    assert out.thought_ids.shape == (P, 8, N)


def test_bad_thought_forward_is_refused():
    with pytest.raises(ValueError, match="thought_forward must be 'replay' or 'incremental'"):
        QuietStarConfig(thought_forward="cached")
