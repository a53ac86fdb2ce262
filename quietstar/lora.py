"""LoRA through ``peft`` (``pip install 'quietstar[lora]'``): the base weights frozen, low-rank
adapters in the decoder's linear layers, the mixing head and the delimiter vectors fully trained.

    model = QuietStarForCausalLM.from_base(base, tokenizer, lora=LoraConfig(r=16, lora_alpha=32))
    save_lora(model, "run/adapter", tokenizer)        # adapters + mixing head + delimiters (MBs)
    model = load_lora("run/adapter", base)            # the same model again, exactly
    merge_lora(model).save_pretrained("run/merged")   # a plain QuietStarForCausalLM checkpoint

This module saves and loads adapters, so it stands above the model; injecting, detecting and
merging them (and how peft wraps, and why not ``get_peft_model``) is quietstar/adapters.py, whose
names are re-exported here: ``quietstar.lora`` is the one place to import LoRA from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .adapters import ALL_LINEAR, apply_lora, check_no_adapters, has_lora, merge_lora, require_peft, trained_parameters
from .configuration import QuietStarConfig
from .modeling import QuietStarForCausalLM

__all__ = [
    "ALL_LINEAR", "apply_lora", "check_no_adapters", "has_lora", "merge_lora", "require_peft", "trained_parameters",
    "save_lora", "load_lora", "trainable_state_dict", "frozen_state_keys",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's own file name and key format (PeftModel can read it)
HEAD_WEIGHTS = "quietstar_trained.safetensors"  # mixing head + delimiter vectors, under the model's own names


# ---------------------------------------------------------------------------------- save / load


def save_lora(model, directory, tokenizer=None) -> Path:
    """Write what a LoRA run trained: ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's
    format), the mixing head and delimiters (``quietstar_trained.safetensors``) and the model's
    ``config.json`` (thought settings and the base config); the tokenizer too when given."""
    peft = require_peft()
    from safetensors.torch import save_file

    if not has_lora(model):
        raise ValueError("save_lora: the model has no LoRA adapters; use model.save_pretrained(dir)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapters = peft.get_peft_model_state_dict(model.base_lm, save_embedding_layers=False)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    model.base_lm.peft_config["default"].save_pretrained(str(directory))
    trained = {k: p.detach().cpu().contiguous() for k, p in trained_parameters(model).items()}
    save_file(trained, str(directory / HEAD_WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def load_lora(directory, base_model_or_path, **from_pretrained_kwargs):
    """The model :func:`save_lora` wrote, on ``base_model_or_path`` (the same base model it was trained
    from: a model or a path/hub id; ``from_pretrained_kwargs`` such as ``dtype`` go to its loading)."""
    peft = require_peft()
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in ("config.json", "adapter_config.json", ADAPTER_WEIGHTS, HEAD_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} lacks {name}: not a folder written by quietstar.lora.save_lora")
    config = QuietStarConfig.from_pretrained(str(directory))
    if isinstance(base_model_or_path, PreTrainedModel):
        base = base_model_or_path
    else:
        base = AutoModelForCausalLM.from_pretrained(base_model_or_path, **from_pretrained_kwargs)
    _check_same_base(base.config, config.base_config, directory)
    model = QuietStarForCausalLM(config, base_lm=base)
    apply_lora(model, peft.LoraConfig.from_pretrained(str(directory)))

    adapters = load_file(str(directory / ADAPTER_WEIGHTS))
    result = peft.set_peft_model_state_dict(model.base_lm, adapters)
    unexpected = list(getattr(result, "unexpected_keys", []))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"{directory}: the adapters do not fit this base model (unexpected {unexpected[:3]}, missing {missing[:3]})")
    trained = load_file(str(directory / HEAD_WEIGHTS))
    expected = trained_parameters(model)
    if set(trained) != set(expected):
        raise ValueError(f"{directory}/{HEAD_WEIGHTS} holds {sorted(trained)}, expected {sorted(expected)}")
    with torch.no_grad():
        for name, value in trained.items():
            expected[name].copy_(value)
    return model


def _check_same_base(loaded, saved, directory) -> None:
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
    differ = {k: (getattr(loaded, k, None), getattr(saved, k, None)) for k in keys
              if getattr(loaded, k, None) != getattr(saved, k, None)}
    if differ:
        raise ValueError(f"{directory} was trained on another base model: {json.dumps(differ)} (given, saved); "
                         "pass the base model the adapters were trained from")


# ---------------------------------------------------------------------------------- checkpoints


def trainable_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """The entries of ``state_dict`` that a LoRA run changes (adapters, mixing head, delimiters): a
    checkpoint need not repeat the frozen base weights, which the run rebuilds from its model path."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trainable}


def frozen_state_keys(model: nn.Module) -> set[str]:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return set(model.state_dict()) - trainable
