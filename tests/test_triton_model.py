"""The whole model with quietstar_triton (Triton interpreter on CPU) equals quietstar_torch:
same sampled-thought-free loss and gradients within fp32 tolerance."""

import os

import pytest
import torch

from quietstar import QuietStarForCausalLM
from tiny_models import padded_batch, tiny_base

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton needs a GPU or TRITON_INTERPRET=1 (set in conftest on CPU machines)",
)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on a CPU


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the Triton kernel, and fails if quietstar_triton fell back to the torch path
    (which would make these tests compare the torch path with itself)."""
    import triton_kernels

    import quietstar.attention as attention

    attention._triton_op.cache_clear()
    assert attention._triton_op() is triton_kernels.thought_attention, "quietstar_triton fell back to quietstar_torch"
    calls, kernel = [], triton_kernels.thought_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(triton_kernels, "thought_attention", counting)
    attention._triton_op.cache_clear()
    yield calls
    attention._triton_op.cache_clear()


# The kernel needs head dims that are powers of two >= 16.
HEAD_DIM_16 = {"llama": dict(hidden_size=64), "qwen3": dict(head_dim=16)}


@pytest.mark.parametrize("arch, side", [("llama", "left"), ("qwen3", "right")])
def test_model_loss_and_gradients_match_torch_path(arch, side, kernel_calls):
    model = QuietStarForCausalLM.from_base(tiny_base(arch, **HEAD_DIM_16[arch]), n_thought_tokens=2, n_talk_tokens=2, n_passes=2,
                                           policy_loss_weight=1.0)
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    model.to(DEVICE)
    ids, mask = (t.to(DEVICE) for t in padded_batch(2, 7, side, seed=21))
    thoughts = torch.randint(0, 90, (4, 7, 2), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    results = {}
    for name in ("quietstar_torch", "quietstar_triton"):
        model.set_attn_implementation(name)
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
        out.loss.backward()
        results[name] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss_t, grads_t), (loss_k, grads_k) = results["quietstar_torch"], results["quietstar_triton"]
    assert len(kernel_calls) >= model.base_lm.config.num_hidden_layers  # the kernel ran in every layer
    torch.testing.assert_close(loss_k, loss_t, atol=1e-5, rtol=1e-5)
    assert grads_t.keys() == grads_k.keys()
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_sampling_loop_runs_through_the_cached_kernel(kernel_calls):
    """The sampling loop's one-step-per-call queries (cached variant) give the same greedy thoughts."""
    model = QuietStarForCausalLM.from_base(tiny_base("llama", hidden_size=64), n_thought_tokens=3, n_talk_tokens=1, n_passes=1,
                                           thought_temperature=0.0).to(DEVICE)
    ids, mask = (t.to(DEVICE) for t in padded_batch(2, 6, "left", seed=22))
    thoughts = {}
    for name in ("quietstar_torch", "quietstar_triton"):
        model.set_attn_implementation(name)
        with torch.no_grad():
            thoughts[name] = model(ids, attention_mask=mask).thought_ids
    assert kernel_calls  # the cached sampling calls went through the kernel
    real = mask.bool()
    assert torch.equal(thoughts["quietstar_triton"][real], thoughts["quietstar_torch"][real])
