"""LoRA through peft (quietstar/lora.py) on tiny random models: what trains, exactness at init, the
thought attention paths through the adapters, the delimiters' effective learning rate, save/load,
the merged export, and the errors for bad adapter configs."""

import os

import pytest
import torch

peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM  # noqa: E402

import quietstar  # noqa: E402,F401
from quietstar import QuietStarForCausalLM  # noqa: E402
from quietstar.lora import apply_lora, has_lora, load_lora, merge_lora, save_lora  # noqa: E402
from tiny_models import VOCAB, padded_batch, tiny_base  # noqa: E402

THOUGHTS = dict(n_thought_tokens=2, n_talk_tokens=2, n_passes=2, policy_loss_weight=1.0)


def lora_model(arch="llama", seed=0, r=4, targets="all-linear", base=None, **kwargs):
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
    base = tiny_base(arch, seed=seed, **(base or {}))
    torch.manual_seed(seed + 100)  # the adapters' A matrices
    return QuietStarForCausalLM.from_base(base, lora=config, **{**THOUGHTS, **kwargs})


def full_model(arch="llama", seed=0, **kwargs):
    return QuietStarForCausalLM.from_base(tiny_base(arch, seed=seed), **{**THOUGHTS, **kwargs})


def perturb(model, std=0.3, seed=1):
    """Non-zero adapters B and a mixing head that mixes, so every trained tensor shapes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name or name.startswith("mixing_head.mlp.4"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def batch(L=7, seed=5):
    ids, mask = padded_batch(2, L, "left", seed=seed)
    thoughts = torch.randint(0, VOCAB - 2, (2, L, THOUGHTS["n_thought_tokens"]), generator=torch.Generator().manual_seed(seed))
    return ids, mask, thoughts


def is_trained(name: str) -> bool:
    return "lora_" in name or name.startswith("mixing_head.") or name.endswith("delimiter_embeddings")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_adapters_head_and_delimiters_train(arch):
    model = lora_model(arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if is_trained(n)}
    assert any("lora_A" in n for n in trainable) and any(n.endswith("delimiter_embeddings") for n in trainable)
    assert not any(".base_layer." in n for n in trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids, mask, thoughts = batch()
    for _ in range(3):  # B = 0 and a zero last mixing layer at init: A, the hidden head layers and the delimiters move from step 2 on
        model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == is_trained(name), f"{name}: changed={changed}, but it is {'' if is_trained(name) else 'not '}trained"


@pytest.mark.parametrize("attn", ["quietstar_torch", "quietstar_reference"])
def test_outputs_equal_the_unadapted_model_at_init(attn):
    """peft starts B at zero: the adapted model computes exactly what the base did, sampled thoughts too."""
    plain, adapted = full_model(attn_implementation=attn), lora_model(attn_implementation=attn)
    for m in (plain, adapted):
        with torch.no_grad():  # the same mixing head in both (it is random per build)
            m.mixing_head.load_state_dict(plain.mixing_head.state_dict())
    ids, mask, thoughts = batch()
    outs = []
    for model in (plain, adapted):
        model.train()
        outs.append(model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(9)))
    # The sampled thoughts are token ids: equal. The floats come from another code path (the adapted
    # projections run x @ W + (x @ A) @ B with B = 0 through other kernels), so they agree to fp32
    # rounding, not bit for bit: a few ulps of the largest value per layer (2 layers, 4 ops each).
    # An adapter that did not start at zero moves them by ~1e-2 or more.
    assert torch.equal(outs[0].thought_ids, outs[1].thought_ids)
    for field in ("logits", "base_logits", "talk_logits", "mixing_weights", "loss"):
        want, got = getattr(outs[0], field), getattr(outs[1], field)
        atol = 64 * torch.finfo(torch.float32).eps * max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"{field}: {m}")


def test_thought_attention_paths_agree_through_the_adapters():
    """The attention paths see the adapted projections: torch and reference paths (and Triton where it
    runs) give the same loss and adapter gradients with non-zero adapters."""
    model = perturb(lora_model(base=dict(hidden_size=64), n_passes=1))  # head dim 16: what the Triton kernel needs
    ids, mask, thoughts = batch(L=5)  # small: the Triton interpreter is slow
    paths = ["quietstar_torch", "quietstar_reference"]
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        import triton_kernels

        from quietstar.attention import _triton_op

        assert _triton_op() is triton_kernels.thought_attention, "quietstar_triton would fall back to quietstar_torch"
        paths.append("quietstar_triton")
    results = {}
    for name in paths:
        model.set_attn_implementation(name)
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
        out.loss.backward()
        results[name] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n})
    loss_ref, grads_ref = results["quietstar_reference"]
    assert all(g.abs().sum() > 0 for n, g in grads_ref.items() if "lora_A" in n)  # gradients reach every adapter
    for name in paths[:1] + paths[2:]:
        loss, grads = results[name]
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
        for n in grads_ref:
            torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} {n}: {m}")


def test_delimiters_keep_their_effective_learning_rate():
    """The delimiter rows get the same gradient as in full fine-tuning and, under Adam, move
    embedding_scale times the learning rate per step in effect (the adapters move by the lr)."""
    lr, models = 1e-3, {"full": full_model(), "lora": lora_model()}
    with torch.no_grad():  # the same mixing head, one that mixes, so the talk path reaches the delimiters
        head = perturb(models["full"]).mixing_head.state_dict()
        models["lora"].mixing_head.load_state_dict(head)
    ids, mask, thoughts = batch()
    grads, steps = {}, {}
    for kind, model in models.items():
        delimiters = model.delimiter_embedding.delimiter_embeddings
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts).loss.backward()
        grads[kind] = delimiters.grad.clone()
        before = model.delimiter_embedding.effective_delimiters().detach().clone()
        lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        opt.step()
        steps[kind] = (model.delimiter_embedding.effective_delimiters().detach() - before).abs()
        if kind == "lora":
            moved = [(p.detach() - lora_b[n]).abs().max() for n, p in model.named_parameters() if "lora_B" in n]
            torch.testing.assert_close(max(moved), torch.tensor(lr), rtol=1e-3, atol=0)  # Adam's first step: lr per entry
    scale = models["lora"].config.embedding_scale
    assert scale == 100 and grads["full"].abs().sum() > 0
    # Two code paths (adapted vs plain projections) give the same gradient up to fp32 rounding
    # accumulated through the backward: relative 1e-4 of the largest entry. A lost embedding_scale
    # (a factor 100) or frozen delimiters are off by orders of magnitude.
    grad_atol = 1e-4 * grads["full"].abs().max().item()
    torch.testing.assert_close(grads["lora"], grads["full"], rtol=1e-4, atol=grad_atol)
    # Adam's first step is scale * lr * g / (|g| + eps): a relative change d in g moves it by at most
    # scale * lr * d / 4, so the steps agree to 1e-4 of scale * lr.
    torch.testing.assert_close(steps["lora"], steps["full"], rtol=1e-4, atol=1e-4 * scale * lr)
    moving = grads["lora"].abs() > 1e-6  # Adam's first step moves each entry by lr * g / (|g| + eps)
    torch.testing.assert_close(steps["lora"][moving], torch.full_like(steps["lora"][moving], scale * lr), rtol=1e-2, atol=0)


def test_save_load_round_trip_is_exact(tmp_path):
    model = perturb(lora_model())
    with torch.no_grad():
        model.delimiter_embedding.delimiter_embeddings.add_(0.01)
    save_lora(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "config.json", "quietstar_trained.safetensors"]
    loaded = load_lora(tmp_path / "adapter", tiny_base("llama", seed=0))
    assert has_lora(loaded)
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}
    ids, mask, thoughts = batch()
    model.eval(), loaded.eval()
    a = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
    b = loaded(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


def test_load_lora_refuses_another_base(tmp_path):
    save_lora(lora_model(), tmp_path / "adapter")
    with pytest.raises(ValueError, match="another base model"):
        load_lora(tmp_path / "adapter", tiny_base("llama", hidden_size=64))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_export_loads_with_auto_and_matches(arch, tmp_path):
    model = perturb(lora_model(arch)).eval()
    ids, mask, thoughts = batch()
    with torch.no_grad():
        adapted = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
    with pytest.raises(ValueError, match="merge_lora"):  # unmerged adapter weights are no plain checkpoint
        model.save_pretrained(tmp_path / "unmerged")
    merge_lora(model).save_pretrained(tmp_path / "merged")
    assert not has_lora(model)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(loaded) is QuietStarForCausalLM
    assert loaded.state_dict().keys() == full_model(arch).state_dict().keys()  # a plain model: no adapter names
    with torch.no_grad():
        merged = loaded(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
    for field in ("logits", "talk_logits", "mixing_weights", "loss"):
        torch.testing.assert_close(getattr(merged, field), getattr(adapted, field), atol=2e-5, rtol=1e-5)


def test_bad_lora_configs_are_refused_with_the_fix():
    base = lambda: full_model()  # noqa: E731
    with pytest.raises(ValueError, match=r"\['q_projj'\] name no module.*'q_proj'.*all-linear"):
        apply_lora(base(), peft.LoraConfig(target_modules=["q_projj", "v_proj"]))
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(base(), peft.LoraConfig(target_modules=r".*\.attention\.query"))
    with pytest.raises(ValueError, match="the input embedding"):
        apply_lora(base(), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="the LM head"):
        apply_lora(base(), peft.LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        apply_lora(base(), peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["mixing_head"]))
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        QuietStarForCausalLM.from_base(tiny_base(), lora={"r": 8})
    model = lora_model()
    with pytest.raises(ValueError, match="already carries"):
        apply_lora(model, peft.LoraConfig(target_modules=["q_proj"]))


def test_named_targets_adapt_only_those_layers():
    model = lora_model(targets=["q_proj", "v_proj"])
    adapted = {n.rsplit(".", 3)[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}


def test_adapters_train_in_fp32_over_a_bf16_base():
    """As get_peft_model does: fp32 adapters (Adam's small steps survive), the base and head stay bf16."""
    model = QuietStarForCausalLM.from_base(tiny_base().to(torch.bfloat16), lora=peft.LoraConfig(r=4, target_modules="all-linear"),
                                           **THOUGHTS)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    ids, mask, thoughts = batch()
    out = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
