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
