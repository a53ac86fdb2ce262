"""save_pretrained / AutoModelForCausalLM round trip, and the tokenizer with the two delimiters."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import quietstar  # noqa: F401  (registers the Auto classes)
from quietstar import END_THOUGHT_TOKEN, START_THOUGHT_TOKEN, QuietStarConfig, QuietStarForCausalLM, check_thought_tokens
from quietstar.assets import gpt2_tokenizer
from tiny_models import padded_batch, tiny_base

SETTINGS = dict(n_thought_tokens=2, n_talk_tokens=3, n_passes=2, thought_temperature=0.7, reinforce_temperature=2.5,
                base_loss_weight=0.25, talk_loss_weight=0.75, policy_loss_weight=3.0, clip_negative_advantages=False,
                embedding_scale=10.0, mixing_head_activation="sigmoid")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2 ties lm_head to the input embedding
def test_save_and_auto_load_round_trip(arch, tmp_path):
    model = QuietStarForCausalLM.from_base(tiny_base(arch), **SETTINGS)
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_()
        model.delimiter_embedding.delimiter_embeddings.normal_()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, QuietStarConfig)
    for key, value in SETTINGS.items():
        assert getattr(config, key) == value, key
    assert config.thought_token_ids == model.config.thought_token_ids
    assert type(config.base_config) is type(model.base_lm.config)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, QuietStarForCausalLM)
    assert loaded.base_lm.config._attn_implementation == "quietstar_torch"
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    if arch == "gpt2":
        assert loaded.base_lm.lm_head.weight is loaded.get_input_embeddings().weight

    ids, mask = padded_batch(2, 6, "left")
    thoughts = torch.randint(0, 90, (2 * SETTINGS["n_passes"], 6, 2), generator=torch.Generator().manual_seed(0))
    a = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
    b = loaded(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.talk_logits, b.talk_logits) and torch.equal(a.loss, b.loss)


def test_tokenizer_round_trips_with_delimiters(tmp_path):
    tokenizer = gpt2_tokenizer()
    n_before = len(tokenizer)
    base = tiny_base("gpt2")
    model = QuietStarForCausalLM.from_base(base, tokenizer=tokenizer, n_thought_tokens=2, n_talk_tokens=2)
    start_id, end_id = model.config.thought_token_ids
    assert (start_id, end_id) == (n_before, n_before + 1)
    text = f"2 + 2 {START_THOUGHT_TOKEN}{END_THOUGHT_TOKEN} = 4"
    ids = tokenizer(text)["input_ids"]
    assert start_id in ids and end_id in ids  # each delimiter is one token

    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert check_thought_tokens(reloaded, AutoConfig.from_pretrained(tmp_path)) == (start_id, end_id)
    # delimiters initialised from the embedding of "---"
    dash = tokenizer("---", add_special_tokens=False)["input_ids"]
    dash = [i for i in dash if i < base.config.vocab_size] or list(range(base.config.vocab_size))
    expected = base.get_input_embeddings().weight[dash].mean(0)
    torch.testing.assert_close(model.delimiter_embedding.effective_delimiters()[0], expected)


def test_tokenizer_lacking_delimiters_is_rejected():
    with pytest.raises(ValueError, match="lacks the thought delimiter"):
        check_thought_tokens(gpt2_tokenizer())


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), n_thought_tokens=1, n_talk_tokens=1)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ|incomplete|corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
