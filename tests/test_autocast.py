"""Mixed-precision training (the usual GPU recipe): a full step under bf16 autocast.

Llama-style rotary embeddings leave q/k in fp32 while v comes out of its linear in bf16; SDPA casts
them to the autocast dtype, and the thought attention paths must do the same instead of refusing the
mixed dtypes (seen first on an H200, where bf16 autocast training crashed in thought sampling).
"""

import pytest
import torch

from quietstar import QuietStarForCausalLM
from tiny_models import padded_batch, tiny_base


@pytest.mark.parametrize("attn", ["quietstar_torch", "quietstar_reference"])
def test_training_step_under_bf16_autocast_matches_fp32(attn):
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), n_thought_tokens=2, n_talk_tokens=2, n_passes=2,
                                           policy_loss_weight=1.0, attn_implementation=attn)
    ids, mask = padded_batch(2, 9, "left", seed=4)
    fp32 = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(0))
    mixed.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # Thoughts are sampled in bf16 there, so they may differ; the NLL of the base prediction does not
    # depend on them: it must agree with fp32 to bf16 accuracy.
    base_fp32, base_bf16 = fp32.loss_terms["nll_base"].item(), mixed.loss_terms["nll_base"].item()
    assert abs(base_bf16 - base_fp32) <= 2e-2 * abs(base_fp32), (base_bf16, base_fp32)


# Unit roundoff of the autocast dtype: 8 significand bits for bf16, 11 for fp16.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("attn", ["quietstar_torch", "quietstar_reference"])
def test_thought_terms_and_gradients_under_autocast_match_fp32(attn, dtype):
    """With the thoughts given (the same in both runs), everything the thoughts feed -- nll_talk, the
    rewards and the policy term, every gradient -- agrees with fp32 to the autocast dtype's accuracy."""
    # Weights at std 0.2 (not 0.02) and a non-zero mixing head: the talk prediction and the rewards then
    # depend on the thoughts by O(1) nats, so a thought path that goes wrong under autocast shows.
    model = QuietStarForCausalLM.from_base(tiny_base("llama", initializer_range=0.2), n_thought_tokens=2,
                                           n_talk_tokens=2, n_passes=2, policy_loss_weight=1.0, attn_implementation=attn)
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    ids, mask = padded_batch(2, 9, "left", seed=4)
    thoughts = torch.randint(0, 94, (2 * 2, 9, 2), generator=torch.Generator().manual_seed(5))  # [B P, L, N]

    def step(autocast: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return {k: v.detach().float() for k, v in out.loss_terms.items()}, grads

    (fp32, grad_fp32), (mixed, grad_mixed) = step(False), step(True)
    u = UNIT_ROUNDOFF[dtype]
    # Each term is built from log-probs of magnitude <= ~|nll| (6 nats here); each rounded op on the way
    # (2 layers of matmuls, softmax, log-softmax, the reward difference) adds ~u of that: 8 u |nll| covers
    # them (measured: <= 0.04 in bf16, 0.01 in fp16; breaking the thought attention under autocast moves
    # nll_talk by 0.4 and the rewards by 1).
    scale = 8 * u * max(fp32["nll_base"].item(), 1.0)
    for term in ("nll_base", "nll_talk", "policy_loss", "reward_mean", "reward_std"):
        error = (mixed[term] - fp32[term]).abs().max().item()
        assert error <= scale, (term, error, scale)
    # Gradients: relative norm of the difference; the policy term multiplies rewards (each off by ~u |nll|)
    # into the thought log-probs' gradients, so ~16 rounded ops compound: 32 u (measured: 13 u bf16, 9 u fp16).
    # The dense reference materialises scores and probabilities in the autocast dtype and its softmax
    # backward subtracts nearly equal products of them: 4x that (measured 62 u in bf16).
    bound = (32 if attn == "quietstar_torch" else 128) * u
    rel = ((grad_mixed - grad_fp32).norm() / grad_fp32.norm()).item()
    assert rel <= bound, (rel, bound)
