"""The mixing head starts as the reference's does in a loaded Mistral: hidden layers N(0, 0.02) with
zero biases (the base model's ``_init_weights``), last layer zero (official ``modeling_mistral.py``)."""

import pytest
import torch
from torch import nn

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.mixing import MixingHead
from tiny_models import tiny_base, tiny_config

HIDDEN = 64  # Linear(128, 64) + Linear(64, 64): 12k weights, std estimated to about 1%


def reference_init_problems(head: MixingHead, std: float = 0.02) -> list[str]:
    """What differs from the reference's init; empty when it matches."""
    first, second, last = head.mlp[0], head.mlp[2], head.mlp[4]
    problems = []
    for name, layer in (("mlp.0", first), ("mlp.2", second)):
        w = layer.weight.detach().double()
        # 4 sigma of the sample std's spread for >= 4096 normal draws is < 5%; PyTorch's default
        # (uniform +-1/sqrt(fan_in)) gives 0.051 and 0.072 here.
        if abs(w.std().item() - std) > 0.1 * std:
            problems.append(f"{name}.weight std {w.std().item():.4f} != {std}")
        if abs(w.mean().item()) > 4 * std / w.numel() ** 0.5:
            problems.append(f"{name}.weight mean {w.mean().item():.5f} != 0")
        # A normal, not a uniform: excess kurtosis 0 (uniform: -1.2).
        kurtosis = (((w - w.mean()) / w.std()) ** 4).mean().item() - 3
        if abs(kurtosis) > 0.3:
            problems.append(f"{name}.weight excess kurtosis {kurtosis:.2f} (not normal)")
        if not torch.equal(layer.bias, torch.zeros_like(layer.bias)):
            problems.append(f"{name}.bias is not zero")
    if last.bias is not None or not torch.equal(last.weight, torch.zeros_like(last.weight)):
        problems.append("the last layer is not a zero Linear(H, 1, bias=False)")
    return problems


def test_from_base_gives_the_reference_init():
    model = QuietStarForCausalLM.from_base(tiny_base("mistral", hidden_size=HIDDEN), n_thought_tokens=2, n_talk_tokens=2)
    assert reference_init_problems(model.mixing_head) == []


def test_init_weights_and_config_construction_give_the_reference_init():
    torch.manual_seed(0)
    model = QuietStarForCausalLM(QuietStarConfig(base_config=tiny_config("llama", hidden_size=HIDDEN),
                                                 start_thought_token_id=96, end_thought_token_id=97))
    assert reference_init_problems(model.mixing_head) == []
    with torch.no_grad():  # as after training, then re-initialised by transformers' hook
        for p in model.mixing_head.parameters():
            p.uniform_(-1, 1)
    model._init_weights(model.mixing_head)
    assert reference_init_problems(model.mixing_head) == []


def test_init_std_follows_the_base_models_initializer_range():
    base = tiny_base("llama", hidden_size=HIDDEN, initializer_range=0.05)
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=2, n_talk_tokens=2)
    assert reference_init_problems(model.mixing_head, std=0.05) == []


def test_the_check_rejects_pytorchs_default_linear_init():
    head = MixingHead(HIDDEN)
    for layer in head.mlp[:-1]:
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()  # PyTorch's default
    problems = reference_init_problems(head)
    assert any("std" in p for p in problems) and any("bias" in p for p in problems)


@pytest.mark.parametrize("activation, w0", [("none", 0.0), ("sigmoid", 0.5)])
def test_the_model_starts_as_the_base_model(activation, w0):
    head = MixingHead(HIDDEN, activation)
    w = head(torch.randn(3, HIDDEN), torch.randn(3, HIDDEN))
    assert torch.equal(w, torch.full_like(w, w0))
