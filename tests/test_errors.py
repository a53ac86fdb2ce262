"""Bad input gets a clear error naming the problem, never a shape error from deep inside."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig

from quietstar import QuietStarConfig, QuietStarForCausalLM
from tiny_models import tiny_base


@pytest.fixture(scope="module")
def model():
    return QuietStarForCausalLM.from_base(tiny_base("llama"), n_thought_tokens=2, n_talk_tokens=2, n_passes=2)


def test_base_model_without_attention_interface():
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=96, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(TypeError, match="AttentionInterface"):
        QuietStarForCausalLM.from_base(bloom)


def test_not_a_model_and_missing_path():
    with pytest.raises(TypeError, match="causal LM or a path"):
        QuietStarForCausalLM.from_base(42)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QuietStarForCausalLM.from_base("/no/such/model/dir")


@pytest.mark.parametrize("setting, match", [
    (dict(n_thought_tokens=0), "n_thought_tokens must be >= 1"),
    (dict(n_talk_tokens=0), "n_talk_tokens must be >= 1"),
    (dict(n_passes=0), "n_passes must be >= 1"),
    (dict(thought_temperature=-1.0), "thought_temperature"),
    (dict(mixing_head_activation="tanh"), "mixing_head_activation"),
    (dict(attn_implementation="sdpa"), "cannot compute thoughts"),
    (dict(n_thougth_tokens=3), "did you mean 'n_thought_tokens'"),
])
def test_bad_thought_settings(setting, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QuietStarForCausalLM.from_base(tiny_base("llama"), **setting)


def test_config_without_delimiters():
    with pytest.raises(ValueError, match="no thought delimiter token ids"):
        QuietStarForCausalLM(QuietStarConfig(base_config=tiny_base("llama").config))


def test_sequence_too_long_once_thought_steps_are_added(model):
    S = model.config.n_extra_steps  # 2 + 2 + 1
    ids = torch.randint(0, 90, (1, 128 - S + 1))
    with pytest.raises(ValueError, match=r"sequence too long: 124 tokens \+ 5 thought steps.*at most 123 tokens"):
        model(ids)
    model(ids[:, :-1])  # one fewer fits


def test_bad_shapes_and_ids(model):
    ids = torch.randint(0, 90, (2, 6))
    with pytest.raises(ValueError, match="labels shape"):
        model(ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, length\]"):
        model(ids[0])
    with pytest.raises(ValueError, match="integer token ids"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"thought_ids must be \[B, L, N\]"):
        model(ids, thought_ids=torch.randint(0, 90, (2, 6, 3)))
    with pytest.raises(ValueError, match=r"thought_ids must be \[B, L, N\]"):
        model(ids, thought_ids=torch.randint(0, 90, (3, 6, 2)))
    bad = torch.randint(0, 90, (2, 6, 2))
    bad[1, 3, 0] = model.config.start_thought_token_id
    with pytest.raises(ValueError, match="delimiter"):
        model(ids, thought_ids=bad)
    with pytest.raises(ValueError, match=r"token ids in \[0, 96\)"):
        model(ids, thought_ids=torch.full((2, 6, 2), 500))


def test_sliding_window_shorter_than_the_thought_sequence():
    from tiny_models import tiny_config

    config = tiny_config("mistral")
    config.sliding_window = 8
    base = AutoModelForCausalLM.from_config(config)
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=2, n_talk_tokens=2)
    with pytest.raises(ValueError, match=r"sliding window: 6 tokens \+ 5 thought steps .* span 11 positions, but the window is 8; use at most 3 tokens"):
        model(torch.randint(0, 90, (1, 6)))
    model(torch.randint(0, 90, (1, 3)))  # L + S == window: positions 0..7 all fit


@pytest.mark.parametrize("keyword", [
    "position_ids",  # the forward derives its own from the attention mask; packed sequences would be silently wrong
    "past_key_values",
    "cache_position",
    "use_cache",
    "output_attentions",
    "num_items_in_batch",
    "lables",  # a typo of labels: the loss would silently be None
])
def test_forward_refuses_keywords_it_does_not_use(model, keyword):
    ids = torch.randint(0, 90, (2, 6))
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{keyword}'"):
        model(ids, **{keyword: None})


def test_forward_return_dict(model):
    ids = torch.randint(0, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    thoughts = torch.randint(0, 90, (2, 6, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, labels=ids, thought_ids=thoughts, return_dict=True)
        as_tuple = model(ids, labels=ids, thought_ids=thoughts, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(out) == 12  # every field is set with labels
    assert torch.equal(as_tuple[0], out.loss)  # the same computation twice, thoughts given: bit equal
    assert torch.equal(as_tuple[1], out.logits)


def test_trainer_scales_the_loss_for_gradient_accumulation_itself(model, tmp_path):
    """HF Trainer passes num_items_in_batch (and then skips its own division by the accumulation
    steps) to a model whose forward takes **kwargs; this forward neither takes nor uses it."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, gradient_accumulation_steps=2)
    assert Trainer(model=model, args=args).model_accepts_loss_kwargs is False


def test_attention_paths_register_once_on_import():
    """Importing the package registers each quietstar_* path once with each interface; building and
    running models registers nothing more (a fresh interpreter, so earlier imports do not count)."""
    import subprocess
    import sys

    script = """
import collections
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
counts = collections.Counter()
for cls in (AttentionInterface, AttentionMaskInterface):
    original = cls.register.__func__
    def counting(c, name, fn, _original=original, _kind=cls.__name__):
        counts[(_kind, name)] += 1
        return _original(c, name, fn)
    cls.register = classmethod(counting)
import torch, quietstar
from transformers import LlamaConfig, AutoModelForCausalLM
base = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
for attn in ("quietstar_torch", "quietstar_reference"):
    m = quietstar.QuietStarForCausalLM.from_base(base, n_thought_tokens=1, n_talk_tokens=1, n_passes=1, attn_implementation=attn)
    m(torch.randint(0, 62, (1, 4)))
print(sorted((k, n, c) for (k, n), c in counts.items() if n.startswith("quietstar_")))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    names = ("quietstar_reference", "quietstar_torch", "quietstar_triton")
    want = sorted((kind, name, 1) for kind in ("AttentionInterface", "AttentionMaskInterface") for name in names)
    assert out.strip().splitlines()[-1] == str(want)
