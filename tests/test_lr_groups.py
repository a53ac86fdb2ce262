"""Per-part learning rates: optim.lr times base / mixing-head / delimiter scales, one AdamW group each."""

from pathlib import Path

import pytest
import torch

from quietstar import QuietStarForCausalLM
from quietstar.training.config import ConfigError
from quietstar.training.config_checks import validate
from quietstar.training.config_loading import load_config
from quietstar.training.optimizer import make_optimizer, parameter_part
from tests.tiny_models import VOCAB, tiny_base

TINY = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_test.yaml"


def _model():
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), n_thought_tokens=2, n_talk_tokens=2, policy_loss_weight=1.0)
    torch.nn.init.normal_(model.mixing_head.mlp[-1].weight, std=0.1)  # non-zero head: every part gets a gradient
    return model


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _moved(model, before):
    parts = {}
    for name, p in model.named_parameters():
        part = parameter_part(name)
        parts[part] = parts.get(part, False) or not torch.equal(p.detach(), before[name])
    return parts


def test_every_parameter_is_in_exactly_one_part():
    model = _model()
    parts = {name: parameter_part(name) for name, _ in model.named_parameters()}
    assert {n for n, part in parts.items() if part == "mixing_head"} == {f"mixing_head.{n}" for n, _ in model.mixing_head.named_parameters()}
    assert [n for n, part in parts.items() if part == "delimiters"] == ["base_lm.model.embed_tokens.delimiter_embeddings"]
    assert sum(part == "base" for part in parts.values()) == len(list(model.base_lm.parameters())) - 1


@pytest.mark.parametrize("frozen", ["base", "mixing_head", "delimiters"])
def test_a_zero_scale_freezes_exactly_that_part(frozen):
    option = {"base": "base_lr_scale", "mixing_head": "mixing_head_lr_scale", "delimiters": "delimiter_lr_scale"}[frozen]
    cfg = load_config(TINY, ["optim.lr=1e-2", f"optim.{option}=0", "optim.mixing_head_lr_scale=3" if frozen != "mixing_head" else "optim.base_lr_scale=2"])
    model = _model()
    optimizer = make_optimizer(model, cfg, "cpu")
    lrs = {group["part"]: group["lr"] for group in optimizer.param_groups}
    assert lrs[frozen] == 0.0
    assert lrs["mixing_head" if frozen != "mixing_head" else "base"] == pytest.approx(cfg.optim.lr * (3 if frozen != "mixing_head" else 2))

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _snapshot(model)
    model(ids, labels=ids, generator=torch.Generator().manual_seed(1)).loss.backward()
    grads = {parameter_part(n) for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"base", "mixing_head", "delimiters"}  # every part has a gradient; only the lr stops one
    optimizer.step()
    moved = _moved(model, before)
    assert moved == {part: part != frozen for part in ("base", "mixing_head", "delimiters")}


def test_negative_scale_is_refused():
    with pytest.raises(ConfigError, match="optim.mixing_head_lr_scale must be >= 0"):
        validate(load_config(TINY, ["optim.mixing_head_lr_scale=-1"]))
