"""``quietstar-train`` with a ``model.lora`` section on the tiny random model: the run config
section, a run that exports a merged model, trainable-only checkpoints and exact resume."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from transformers import AutoModelForCausalLM  # noqa: E402

import quietstar  # noqa: E402,F401
from quietstar.assets import tiny_random_llama  # noqa: E402
from quietstar.lora import has_lora, load_lora  # noqa: E402
from quietstar.training.cli import main as quietstar_train  # noqa: E402
from quietstar.training.config import ConfigError, LoraSettings  # noqa: E402
from quietstar.training.config_checks import validate  # noqa: E402
from quietstar.training.config_loading import load_config  # noqa: E402
from quietstar.training.loop import train  # noqa: E402
from quietstar.training.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_test.yaml"


def _sets(out, *extra):
    return [f"output_dir={out}", "logging.progress_bar=false", "model.lora.r=4", "model.lora.alpha=8", *extra]


def test_lora_section_in_the_run_config(tmp_path):
    assert load_config(TINY).model.lora is None  # absent: full fine-tuning
    cfg = load_config(TINY, ["model.lora={}"])
    assert cfg.model.lora == LoraSettings()
    cfg = load_config(TINY, ["model.lora.r=8", "model.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(TINY, ["model.lora.r=8", "model.lora=null"]).model.lora is None
    recipe = tmp_path / "lora.yaml"
    recipe.write_text("model:\n  path: tiny-random-llama\n  lora:\n    r: 2\n    dropout: 0.1\n")
    assert load_config(recipe).model.lora == LoraSettings(r=2, dropout=0.1)
    with pytest.raises(ConfigError, match="unknown config key 'model.lora.rank'.*known keys: alpha, bias, dropout, r,"):
        load_config(TINY, ["model.lora.rank=8"])
    with pytest.raises(ConfigError, match="model.lora.alpha must be a number"):
        load_config(TINY, ["model.lora.alpha=big"])


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.r=0"], "model.lora.r must be >= 1"),
    (["model.lora.dropout=1.0"], r"model.lora.dropout must be in \[0, 1\)"),
    (["model.lora.target_modules=[]"], "model.lora.target_modules must list module names"),
    (["model.lora.target_modules=[all-linear, q_proj]"], "use it alone"),
])
def test_bad_lora_sections_fail_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(TINY, overrides))


def test_unknown_target_modules_fail_at_build_with_the_names_to_use():
    cfg = load_config(TINY, ["model.lora.target_modules=[q_proj, query_key_value]"])
    with pytest.raises(ConfigError, match=r"model.lora: .*\['query_key_value'\] name no module.*'k_proj'.*'v_proj'"):
        build_model(cfg.model, cfg.thought)


def test_quietstar_train_with_lora_trains_exports_merged_and_resumes(tmp_path):
    out = tmp_path / "run"
    steps = ["optim.steps=4", "checkpoint.every=2", "checkpoint.keep=0"]
    assert quietstar_train(["--config", str(TINY), *sum((["--set", s] for s in _sets(out, *steps)), [])]) == 0

    # Checkpoints hold only what LoRA trains; the optimiser state only those tensors too.
    ckpt = out / "checkpoints" / "step-00000002"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all("lora_" in k or k.startswith("mixing_head.") or k.endswith("delimiter_embeddings") for k in saved)
    assert any("lora_B" in k for k in saved) and "base_lm.model.embed_tokens.delimiter_embeddings" in saved

    # The export is a plain, merged model; the adapters are kept beside it.
    exported = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert type(exported).__name__ == "QuietStarForCausalLM" and not has_lora(exported)
    assert not any("lora_" in k or "base_layer" in k for k in load_file(str(out / "final" / "model.safetensors")))
    base = tiny_random_llama(257, seed=0)  # the run's base model (seed 0): the adapters' starting point
    initial_q = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    adapted = load_lora(out / "final_lora", base).eval()
    assert not torch.equal(exported.base_lm.model.layers[0].self_attn.q_proj.weight, initial_q)  # the adapters were merged
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    thoughts = torch.randint(0, 256, (2, 12, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = adapted(ids, thought_ids=thoughts), exported(ids, thought_ids=thoughts)
    torch.testing.assert_close(b.logits, a.logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.mixing_weights, a.mixing_weights, atol=2e-5, rtol=1e-5)

    # Resume from step 2 in a new folder: the same final weights as the uninterrupted run.
    resumed = tmp_path / "resumed"
    train(load_config(TINY, _sets(resumed, *steps, f"resume={ckpt}")))
    final, again = load_file(str(out / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert final.keys() == again.keys()
    for key in final:
        assert torch.equal(final[key], again[key]), key


def test_lora_control_run_exports_a_merged_plain_lm(tmp_path):
    """thinking: false with LoRA trains adapters on the plain LM and exports it merged."""
    out = tmp_path / "control"
    train(load_config(TINY, _sets(out, "thinking=false", "optim.steps=1", "checkpoint.every=0")))
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model).__name__ == "LlamaForCausalLM" and not has_lora(model)
    saved = load_file(str(out / "final" / "model.safetensors"))
    plain = tiny_random_llama(257, seed=0)
    assert not any("lora_" in k or "base_layer" in k for k in saved)  # merged: the plain LM's own names
    assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], plain.model.layers[0].self_attn.q_proj.weight)


def _count_layer_calls_with_grad(model) -> list[int]:
    """A one-element counter of the calls, made with grad, of the modules inside each decoder layer:
    checkpointing recomputes each in backward. (The layer's own hooks would not show it: transformers
    >= 5.25 checkpoints the layer's forward, not its __call__.)"""
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = [0]
    for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        for child in layer.children():
            child.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + torch.is_grad_enabled()))
    return calls


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients():
    """The recipe's LoRA + gradient checkpointing: frozen base layers recomputed, the same gradients."""
    grads, layer_calls = {}, {}
    for checkpointing in ("false", "true"):
        cfg = load_config(TINY, ["model.lora.r=4", f"model.gradient_checkpointing={checkpointing}"])
        torch.manual_seed(0)  # the adapters' A matrices
        model, _ = build_model(cfg.model, cfg.thought, seed=0)
        assert model.base_lm.is_gradient_checkpointing == (checkpointing == "true")
        layer_calls[checkpointing] = _count_layer_calls_with_grad(model)
        with torch.no_grad():
            for i, (name, p) in enumerate(n_p for n_p in model.named_parameters() if "lora_B" in n_p[0]):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        thoughts = torch.randint(0, 256, (2, 16, 3), generator=torch.Generator().manual_seed(1))
        model(ids, labels=ids, thought_ids=thoughts).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # Checkpointing really ran: every layer call with grad was recomputed once in backward.
    assert layer_calls["false"][0] > 0 and layer_calls["true"][0] == 2 * layer_calls["false"][0], layer_calls
    assert all(g is not None for g in grads["true"].values()) and grads["true"].keys() == grads["false"].keys()
    for name, grad in grads["false"].items():
        torch.testing.assert_close(grads["true"][name], grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_lora_under_cpu_fsdp_is_refused_before_any_model(tmp_path, monkeypatch):
    """The launcher's own CPU FSDP2 path (accelerate reports MULTI_CPU there) refuses LoRA like accelerate's FSDP."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="LoRA under FSDP / DeepSpeed is not supported"):
        train(load_config(TINY, _sets(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
