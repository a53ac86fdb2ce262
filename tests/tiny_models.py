"""Tiny random base models of each supported architecture (offline, seconds to build)."""

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

VOCAB = 96
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def tiny_config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return _arch_config(arch, {**common, **overrides})


def _arch_config(arch, common):
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**{"head_dim": 8, **common})
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                          attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    raise ValueError(arch)


def tiny_base(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()


def padded_batch(batch: int, length: int, side: str, seed: int = 0, n_pad=(3, 0)):
    """Random ids with padding on ``side``; row b has ``n_pad[b % len(n_pad)]`` padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        p = n_pad[b % len(n_pad)]
        if p:
            if side == "left":
                mask[b, :p] = 0
            else:
                mask[b, length - p:] = 0
    return ids, mask
