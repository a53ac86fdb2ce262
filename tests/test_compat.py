"""The supported transformers range: one declared lower bound, and the version differences in quietstar/compat.py.

CI runs these and the core tests under both the newest transformers and the lower bound (.ci/run).
"""

import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.compat import CACHE_KWARG, MIN_TRANSFORMERS, cache_of, check_transformers_version
from quietstar.thought_forward import replay
from tiny_models import tiny_base, tiny_config

ROOT = Path(__file__).resolve().parent.parent


def test_one_lower_bound_declared_and_tested():
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'"transformers>=([\d.]+),<6"', pyproject)
    assert declared, "pyproject.toml must declare transformers>=LOWER,<6"
    assert Version(declared.group(1)) == Version(MIN_TRANSFORMERS)
    assert f"transformers=={MIN_TRANSFORMERS}" in (ROOT / ".ci" / "run").read_text()  # the CI leg that keeps the claim true


def test_older_transformers_refused_with_the_fix():
    with pytest.raises(ImportError, match=rf"needs transformers >= {MIN_TRANSFORMERS}, found 5.16.2; upgrade with: pip install"):
        check_transformers_version("5.16.2")
    for ok in (MIN_TRANSFORMERS, MIN_TRANSFORMERS + ".dev0", "5.24.0", transformers.__version__):
        check_transformers_version(ok)


def test_cache_keyword_is_the_installed_versions():
    decoder = tiny_base("llama").base_model
    assert CACHE_KWARG in inspect.signature(decoder.forward).parameters
    out = decoder(input_ids=torch.ones(1, 3, dtype=torch.long), use_cache=True)
    assert cache_of(out) is not None and cache_of(out).get_seq_length() == 3
    assert cache_of({CACHE_KWARG: "c"}) == "c" and cache_of({}) is None


def test_nested_config_from_dict_none_and_instance():
    mistral = tiny_config("mistral")
    from_dict = QuietStarConfig(base_config=mistral.to_dict(), start_thought_token_id=96, end_thought_token_id=97)
    assert isinstance(from_dict.base_config, MistralConfig) and from_dict.base_config.hidden_size == 32
    assert isinstance(QuietStarConfig().base_config, LlamaConfig)  # the default base, as before
    no_type = {k: v for k, v in mistral.to_dict().items() if k != "model_type"}
    assert isinstance(QuietStarConfig(base_config=no_type).base_config, LlamaConfig)
    assert QuietStarConfig(base_config=mistral).base_config is mistral
    again = QuietStarConfig.from_dict(from_dict.to_dict())
    assert again.base_config.to_dict() == from_dict.base_config.to_dict()
    assert QuietStarConfig.sub_configs == {"base_config": transformers.AutoConfig}


def test_attention_choice_reaches_the_nested_config(tmp_path):
    model = QuietStarForCausalLM.from_base(tiny_base("mistral"), n_thought_tokens=2, n_talk_tokens=2)
    model.config._attn_implementation = "quietstar_reference"  # transformers propagates through sub_configs
    assert model.config.base_config._attn_implementation == "quietstar_reference"
    model.set_attn_implementation("quietstar_torch")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, QuietStarForCausalLM) and isinstance(loaded.config.base_config, MistralConfig)
    assert loaded.base_lm.config._attn_implementation == "quietstar_torch"


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")  # deprecated after 5.17, kept until v6
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "train-mode-checkpointing"])
def test_greedy_thoughts_sampled_through_the_cache_are_the_replays_argmax(checkpointing):
    """Sampling must feed its KV cache under the installed version's keyword (a keyword the decoder
    does not know is swallowed by its **kwargs) and keep it under gradient checkpointing in training
    mode (5.17 drops it even without grad); either way every step would silently run without it."""
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), n_thought_tokens=3, n_talk_tokens=2, n_passes=1,
                                           thought_temperature=0.0).eval()
    if checkpointing:
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as quietstar-train
    ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        thoughts = model(ids).thought_ids  # [B, L, N]
        hidden = replay(model, ids, mask, torch.arange(7).expand(2, 7), thoughts)  # [B, 1+S, L, H]
        logits = model.get_output_embeddings()(hidden[:, 1 : 1 + 3])  # steps sot, t_1, t_2 predict t_1..t_3
    assert torch.equal(logits.argmax(-1).permute(0, 2, 1), thoughts)
    if checkpointing:  # and thinking generation keeps its cache too: the greedy thought at the last position
        gen = model.generate(ids, max_new_tokens=1, do_sample=False, return_thoughts=True, pad_token_id=95)
        assert torch.equal(gen.thought_ids[:, 0], thoughts[:, -1])
        assert all(m.gradient_checkpointing for m in model.base_lm.base_model.layers)  # switched back on
