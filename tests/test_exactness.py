"""The exactness oracle: the parallel thought layout equals running each thought as a plain sequence.

For every position i, ``model.base_lm`` run as an ordinary causal LM on
``x_0..x_i, <sot>, t_1..t_N, <eot>, x_{i+1}..x_{i+K-1}`` (ordinary position ids, the same thought
ids) must reproduce ``out.base_logits[:, i]`` and ``out.talk_logits[:, i]``.
"""

import pytest
import torch

from quietstar import QuietStarForCausalLM
from tiny_models import ARCHITECTURES, padded_batch, tiny_base

N, K, P = 3, 3, 2
TOL = 1e-4  # fp32


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parallel_thoughts_equal_sequential_runs(arch, side):
    model = QuietStarForCausalLM.from_base(tiny_base(arch), n_thought_tokens=N, n_talk_tokens=K, n_passes=P).eval()
    with torch.no_grad():  # a non-zero mixing head, so the mix is not trivially the base
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    ids, mask = padded_batch(2, 9, side, seed=1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    sot, eot = model.config.thought_token_ids
    assert out.thought_ids.shape == (2 * P, 9, N)
    assert out.base_logits.shape[:2] == (2 * P, 9) and out.talk_logits.shape[:3] == (2 * P, 9, K)

    worst_base = worst_talk = 0.0
    checked = 0
    for row in range(2 * P):
        real = mask[row // P].bool()
        x, offset = ids[row // P][real], int((~real).sum()) if side == "left" else 0
        for i in range(len(x)):
            pos = offset + i
            thought = out.thought_ids[row, pos]
            seq = torch.cat([x[: i + 1], torch.tensor([sot]), thought, torch.tensor([eot]), x[i + 1 : i + K]])
            with torch.no_grad():
                logits = model.base_lm(seq[None]).logits[0]
            worst_base = max(worst_base, (logits[i] - out.base_logits[row, pos]).abs().max().item())
            for k in range(min(K, len(x) - i)):  # the fed-back tokens x_{i+1..i+k} must exist
                got = out.talk_logits[row, pos, k]
                worst_talk = max(worst_talk, (logits[i + N + 2 + k] - got).abs().max().item())
                checked += 1
    assert checked > 20
    assert worst_base <= TOL, worst_base
    assert worst_talk <= TOL, worst_talk

    # out.logits is the mix of base and talk logits by the mixing weights (k = 0)
    w = out.mixing_weights[:, :, 0, None]
    torch.testing.assert_close(out.logits, (1 - w) * out.base_logits + w * out.talk_logits[:, :, 0], atol=1e-5, rtol=1e-5)
    # and for k > 0 it mixes with the base prediction at i + k
    w1 = out.mixing_weights[:, :-1, 1, None]
    torch.testing.assert_close(
        out.mixed_logits[:, :-1, 1], (1 - w1) * out.base_logits[:, 1:] + w1 * out.talk_logits[:, :-1, 1], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reference_and_torch_paths_agree_in_the_model(arch):
    base = tiny_base(arch)
    # A non-zero head and policy weight, two passes: gradients flow through the thought rows (the talk
    # loss through w, REINFORCE through the thought log-probs), so a wrong dK/dV of thought keys shows.
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=2, n_talk_tokens=2, n_passes=2, policy_loss_weight=1.0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for layer in model.mixing_head.mlp:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.5, generator=g)
    ids, mask = padded_batch(2, 7, "left", seed=2)
    thoughts = torch.randint(0, 90, (4, 7, 2), generator=torch.Generator().manual_seed(0))
    outs = {}
    for name in ("quietstar_reference", "quietstar_torch"):
        model.set_attn_implementation(name)
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
        out.loss.backward()
        assert out.loss_terms["policy_loss"].abs() > 0 and out.mixing_weights.abs().max() > 1e-3
        outs[name] = (out.talk_logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    ref, fast = outs["quietstar_reference"], outs["quietstar_torch"]
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-5)
    assert fast[1].keys() == ref[1].keys() and any("mixing_head" in n for n in ref[1])
    for name in ref[1]:
        # Absolute tolerance on each gradient's own scale: the delimiter gradients reach ~600 (the x100
        # embedding_scale), where fp32 rounding alone is ~1e-4 absolute on either path (against an fp64
        # run, both paths are off by ~3e-7 of the largest entry).
        atol = 1e-5 * max(1.0, ref[1][name].abs().max().item())
        torch.testing.assert_close(fast[1][name], ref[1][name], atol=atol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_base_lm_alone_is_the_plain_base_model():
    """With no layout, the quietstar attention names are ordinary causal attention (padding included)."""
    reference = tiny_base("qwen2")
    model = QuietStarForCausalLM.from_base(tiny_base("qwen2"), n_thought_tokens=2, n_talk_tokens=2)
    ids, mask = padded_batch(2, 8, "left", seed=3)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
        got = model.base_lm(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
