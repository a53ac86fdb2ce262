"""Gradients reach the base weights, the delimiter embeddings and the mixing head; the delimiters'
effective learning rate under Adam is ``embedding_scale`` times the optimiser's."""

import torch

from quietstar import QuietStarForCausalLM
from tiny_models import padded_batch, tiny_base


def _trained_model(scale=100.0):
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), n_thought_tokens=2, n_talk_tokens=2, n_passes=2,
                                           embedding_scale=scale, policy_loss_weight=1.0)
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    return model


def test_gradients_reach_every_trainable_part():
    model = _trained_model()
    ids, mask = padded_batch(2, 10, "right", seed=11)
    out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    named = dict(model.named_parameters())
    for name in ("base_lm.model.layers.0.self_attn.q_proj.weight", "base_lm.model.layers.1.mlp.down_proj.weight",
                 "base_lm.model.embed_tokens.weight", "base_lm.lm_head.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    delimiters = model.delimiter_embedding.delimiter_embeddings
    assert delimiters.grad is not None and (delimiters.grad.abs().sum(-1) > 0).all()  # both sot and eot rows
    for p in model.mixing_head.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_policy_gradient_reaches_the_start_delimiter():
    """Only the REINFORCE term differentiates log pi(t_1), which depends on <|startthought|>."""
    model = _trained_model()
    model.config.base_loss_weight = model.config.talk_loss_weight = 0.0
    ids, mask = padded_batch(2, 10, "right", seed=12)
    out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(1))
    assert out.loss_terms["advantage_mean"] > 0
    out.loss.backward()
    assert model.delimiter_embedding.delimiter_embeddings.grad[0].abs().sum() > 0


def test_delimiter_effective_learning_rate_is_the_configured_multiple():
    lr = 1e-4
    for scale in (100.0, 10.0):
        model = _trained_model(scale)
        ids, mask = padded_batch(2, 10, "right", seed=13)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        before_delim = model.delimiter_embedding.effective_delimiters().detach().clone()
        before_weight = model.base_lm.model.layers[0].self_attn.q_proj.weight.detach().clone()
        model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(2)).loss.backward()
        optimizer.step()
        # Adam's first step moves every coordinate with a non-negligible gradient by ~lr (sign(g) * lr).
        step_delim = (model.delimiter_embedding.effective_delimiters().detach() - before_delim).abs()
        step_weight = (model.base_lm.model.layers[0].self_attn.q_proj.weight.detach() - before_weight).abs()
        ratio = step_delim.median() / step_weight.median()
        assert abs(ratio.item() / scale - 1) < 0.05, (scale, ratio.item())
