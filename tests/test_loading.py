"""quietstar.loading.load_model: every kind of spec, the one override rule, and the errors."""

import pytest
import torch

from quietstar.loading import ModelSpecError, load_model

THOUGHT = dict(n_thought_tokens=2, n_talk_tokens=2, n_passes=1)


def test_tiny_random_llama_is_seeded_and_takes_every_thought_setting():
    a, tok = load_model("tiny-random-llama", thought={**THOUGHT, "embedding_scale": 10.0}, seed=3)
    b, _ = load_model("tiny-random-llama", thought=THOUGHT, seed=3)
    c, _ = load_model("tiny-random-llama", thought=THOUGHT, seed=4)
    assert a.config.n_thought_tokens == 2 and a.config.embedding_scale == 10.0 and a.training
    assert len(tok) == 259 and a.config.thought_token_ids == (257, 258)
    weight = "base_lm.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])  # the same seed, the same code path
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_a_saved_model_keeps_its_weight_settings_and_takes_the_others(tmp_path):
    model, tok = load_model("tiny-random-llama", thought={**THOUGHT, "mixing_head_activation": "sigmoid"})
    model.save_pretrained(tmp_path / "qs")
    tok.save_pretrained(tmp_path / "qs")
    loaded, _ = load_model(str(tmp_path / "qs"), thought={"n_thought_tokens": 5, "thought_temperature": 0.0,
                                                          "mixing_head_activation": "sigmoid"},
                           attn_implementation="quietstar_reference")
    assert loaded.config.n_thought_tokens == 5 and loaded.config.thought_temperature == 0.0
    assert loaded.config.thought_attn_implementation == "quietstar_reference"
    with pytest.raises(ModelSpecError, match="mixing_head_activation.*cannot be changed at load"):
        load_model(str(tmp_path / "qs"), thought={"mixing_head_activation": "none"})
    with pytest.raises(ValueError, match="n_passes must be >= 1"):
        load_model(str(tmp_path / "qs"), thought={"n_passes": 0})


def test_a_base_model_folder_is_wrapped(tmp_path):
    model, tok = load_model("tiny-random-llama", thought=THOUGHT)
    model.base_lm.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    wrapped, _ = load_model(str(tmp_path / "base"), thought=THOUGHT)
    assert type(wrapped).__name__ == "QuietStarForCausalLM" and wrapped.config.n_talk_tokens == 2
    key = "base_lm.model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(wrapped.state_dict()[key], model.state_dict()[key])  # copied through a file


@pytest.mark.parametrize("spec", ["./missing", "missing/", "a/b/c", "not a model"])
def test_a_spec_that_is_neither_a_folder_nor_a_hub_id_is_named(spec):
    with pytest.raises(ModelSpecError, match="neither a folder nor a hub id; accepted: a saved Quiet-STaR folder"):
        load_model(spec)


@pytest.mark.parametrize("spec", ["gpt2", "org/name"])
def test_hub_ids_with_and_without_an_org_pass_the_spec_check(spec):
    from quietstar.loading import _local_path

    assert _local_path(spec) is None  # a hub id: handed to from_pretrained, not refused


def test_bad_settings_and_folders_are_refused(tmp_path):
    with pytest.raises(ModelSpecError, match=r"unknown thought setting\(s\) \['n_thoughts'\]"):
        load_model("tiny-random-llama", thought={"n_thoughts": 3})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))


def test_a_lora_adapter_folder_loads_on_its_base(tmp_path):
    peft = pytest.importorskip("peft")
    from quietstar.lora import apply_lora, save_lora

    model, tok = load_model("tiny-random-llama", thought=THOUGHT, seed=1)
    apply_lora(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_lora(model, tmp_path / "adapter", tok)
    with pytest.raises(ModelSpecError, match="LoRA adapter folder: give the base model"):
        load_model(str(tmp_path / "adapter"))
    loaded, _ = load_model(str(tmp_path / "adapter"), base_model="tiny-random-llama", seed=1)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    thoughts = torch.randint(0, 256, (1, 6, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.eval()(ids, thought_ids=thoughts).logits
        got = loaded.eval()(ids, thought_ids=thoughts).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # same weights, same code path up to fp32 rounding
