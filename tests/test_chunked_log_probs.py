"""The memory-light forward (``return_logits=False``) against the full-logits forward.

Same thoughts, same weights: loss terms, rewards, advantages, per-target log-probs and the
gradient of every parameter must agree to fp32 rounding, for chunk sizes that do and do not divide
the rows, with padding, K > 1, a non-zero mixing head and a non-zero policy weight (so gradients
flow through every term). fp32 tolerance: 1e-6 absolute + 1e-5 relative for values; for gradients
1e-5 x the tensor's largest entry (measured: under 1e-6 x; the head's matmuls run over different row
counts, so only the summation order differs).
"""

import pytest
import torch

from quietstar import QuietStarConfig, QuietStarForCausalLM
from tiny_models import VOCAB, padded_batch, tiny_base

N, K, P, B, L = 3, 3, 2, 2, 10  # (1 + S) L = 80 != V: the probe below looks for V-wide tensors


def _model(arch="llama"):
    model = QuietStarForCausalLM.from_base(tiny_base(arch, seed=2), n_thought_tokens=N, n_talk_tokens=K, n_passes=P,
                                           policy_loss_weight=10.0, clip_negative_advantages=False,
                                           base_loss_weight=0.3, talk_loss_weight=0.7)
    with torch.no_grad():  # every layer of the head random: w non-zero and different per (i, k)
        g = torch.Generator().manual_seed(3)
        for layer in model.mixing_head.mlp:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.3, generator=g)
    return model


def _inputs(side):
    ids, mask = padded_batch(B, L, side, seed=8, n_pad=(3, 1))
    labels = ids.clone()
    labels[0, 6] = -100
    thoughts = torch.randint(0, VOCAB - 4, (B * P, L, N), generator=torch.Generator().manual_seed(9))
    return ids, mask, labels, thoughts


def _step(model, inputs, return_logits):
    ids, mask, labels, thoughts = inputs
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels, thought_ids=thoughts, return_logits=return_logits)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _close_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        atol = 1e-5 * want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=name)


# positions per chunk 1, 2 (divides L = 10), 3 (does not), 10 (all); thought rows per chunk B P K x that
# (12, 24, 36, 120 of B P N L = 120 rows: 12, 24 divide, 36 does not), plus a budget under one mixed
# position (7 thought rows, 1 position).
@pytest.mark.parametrize("chunk", [B * P * K * VOCAB * c for c in (1, 2, 3, 10)] + [7 * VOCAB])
@pytest.mark.parametrize("side", ["right", "left"])
def test_chunked_loss_equals_the_full_logits_loss(chunk, side):
    model, inputs = _model(), _inputs(side)
    full, full_grads = _step(model, inputs, return_logits=True)
    model.config.logits_chunk_elements = chunk
    light, light_grads = _step(model, inputs, return_logits=False)

    assert (full.advantages != 0).any() and full.mixing_weights.abs().min() > 0
    assert full.loss_terms.keys() == light.loss_terms.keys()
    for name, value in full.loss_terms.items():
        torch.testing.assert_close(light.loss_terms[name], value, atol=1e-6, rtol=1e-5, msg=name)
    for name in ("loss", "rewards", "advantages", "base_log_probs", "mixed_log_probs", "mixing_weights"):
        torch.testing.assert_close(getattr(light, name), getattr(full, name), atol=1e-6, rtol=1e-5, msg=name)
    _close_grads(light_grads, full_grads)
    # gradients flow through every term: the head, both delimiters, the LM head
    named = dict(model.named_parameters())
    for name in ("mixing_head.mlp.0.weight", "base_lm.lm_head.weight", "base_lm.model.layers.0.self_attn.q_proj.weight"):
        assert light_grads[name].abs().sum() > 0, name
    assert (light_grads["base_lm.model.embed_tokens.delimiter_embeddings"].abs().sum(-1) > 0).all()
    assert named["base_lm.model.embed_tokens.delimiter_embeddings"].grad is not None


def test_tied_lm_head_gpt2():
    """Tied input/output embeddings: the chunked head's gradient adds into the shared table."""
    model, inputs = _model("gpt2"), _inputs("right")
    full, full_grads = _step(model, inputs, return_logits=True)
    model.config.logits_chunk_elements = B * P * K * VOCAB * 3
    light, light_grads = _step(model, inputs, return_logits=False)
    torch.testing.assert_close(light.loss, full.loss, atol=1e-6, rtol=1e-5)
    _close_grads(light_grads, full_grads)


def test_policy_term_alone_matches():
    """Only the REINFORCE term: the chunked thought log-probs (temperature, banned delimiters) carry the gradient."""
    model, inputs = _model(), _inputs("right")
    model.config.base_loss_weight = model.config.talk_loss_weight = 0.0
    model.config.reinforce_temperature = 2.5
    full, full_grads = _step(model, inputs, return_logits=True)
    model.config.logits_chunk_elements = 7 * VOCAB
    light, light_grads = _step(model, inputs, return_logits=False)
    assert full.loss_terms["policy_loss"] != 0
    torch.testing.assert_close(light.loss_terms["thought_log_prob_mean"], full.loss_terms["thought_log_prob_mean"],
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(light.loss, full.loss, atol=1e-6, rtol=1e-5)
    _close_grads(light_grads, full_grads)


def test_memory_light_forward_keeps_no_vocabulary_wide_tensor():
    """No [.., V] tensor is returned or saved for backward (the probe sees them on the full path)."""
    model, (ids, mask, labels, thoughts) = _model(), _inputs("right")
    model.config.logits_chunk_elements = B * P * K * VOCAB * 3

    def saved_vocab_wide(return_logits):
        shapes = []

        def pack(t):
            if t.dim() and t.shape[-1] == VOCAB:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, attention_mask=mask, labels=labels, thought_ids=thoughts, return_logits=return_logits)
        return out, shapes

    full, full_shapes = saved_vocab_wide(True)
    light, light_shapes = saved_vocab_wide(False)
    assert any(shape[:3] == (B * P, L, K) for shape in full_shapes)  # the probe sees [B, L, K, V] tensors
    assert light_shapes == []
    assert light.logits is None and light.base_logits is None and light.talk_logits is None and light.mixed_logits is None
    light.loss.backward()


def test_scores_without_labels_match_the_logits():
    """Without labels: the same rewards, and the log-probs are those of the returned logits, detached."""
    model, (ids, mask, _, thoughts) = _model(), _inputs("left")
    model.config.logits_chunk_elements = B * P * K * VOCAB * 3
    full = model(ids, attention_mask=mask, thought_ids=thoughts)
    light = model(ids, attention_mask=mask, thought_ids=thoughts, return_logits=False)
    assert light.logits is None and light.loss is None and light.advantages is None
    assert not light.base_log_probs.requires_grad and not light.mixed_log_probs.requires_grad
    torch.testing.assert_close(light.rewards, full.rewards, atol=1e-6, rtol=1e-5)
    target = ids.repeat_interleave(P, 0)[:, 1:]  # real next token of every real (i, i+1) pair
    real = (mask[:, :-1] * mask[:, 1:]).bool().repeat_interleave(P, 0)
    want = torch.log_softmax(full.logits[:, :-1].double(), -1).gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(light.mixed_log_probs[:, :-1, 0].double()[real], want[real], atol=1e-5, rtol=1e-5)
    want_base = torch.log_softmax(full.base_logits[:, :-1].double(), -1).gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(light.base_log_probs[:, :-1].double()[real], want_base[real], atol=1e-5, rtol=1e-5)
    assert (light.mixed_log_probs[:, -1] == 0).all()  # no target past the end


def test_chunk_size_is_validated():
    with pytest.raises(ValueError, match="logits_chunk_elements"):
        QuietStarConfig(logits_chunk_elements=0)


def test_under_bf16_autocast_and_gradient_checkpointing():
    """The GPU recipe: bf16 autocast (the chunks' recompute in backward must run under it too) and the base
    model's own gradient checkpointing around ours."""
    model, (ids, mask, labels, thoughts) = _model(), _inputs("left")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    results = {}
    for return_logits in (True, False):
        model.config.logits_chunk_elements = B * P * K * VOCAB * 3
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask, labels=labels, thought_ids=thoughts, return_logits=return_logits)
        out.loss.backward()
        results[return_logits] = out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (full, full_grads), (light, light_grads) = results[True], results[False]
    # bf16 logits rounded the same way row by row: only the matmuls' summation order may differ
    torch.testing.assert_close(light.loss, full.loss, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(light.rewards, full.rewards, atol=2e-2, rtol=0)
    assert full_grads.keys() == light_grads.keys()
    for name, want in full_grads.items():
        rel = (light_grads[name] - want).norm() / want.norm().clamp_min(1e-12)
        assert rel < 2e-2, (name, rel.item())
