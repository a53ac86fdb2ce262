"""LoRA through ``peft`` (``pip install 'quietstar[lora]'``): the base weights frozen, low-rank
adapters in the decoder's linear layers, the mixing head and the delimiter vectors fully trained.

    model = QuietStarForCausalLM.from_base(base, tokenizer, lora=LoraConfig(r=16, lora_alpha=32))
    save_lora(model, "run/adapter", tokenizer)        # adapters + mixing head + delimiters (MBs)
    model = load_lora("run/adapter", base)            # the same model again, exactly
    merge_lora(model).save_pretrained("run/merged")   # a plain QuietStarForCausalLM checkpoint

How peft wraps, and why so. The adapters are injected IN PLACE into ``model.base_lm`` with
``peft.inject_adapter_in_model`` (peft's API for integrations): each targeted ``nn.Linear`` becomes
a ``lora.Linear`` holding the original layer, nothing else changes. ``model.base_lm`` stays the
transformers causal LM and ``model.base_lm.base_model`` its decoder stack, which the sampling loop
and the replay call with the ``thought_layout`` keyword; the attention modules, and so every
``quietstar_*`` attention path, are untouched (only their projections gain a low-rank term).
``get_peft_model`` would instead wrap the LM in a ``PeftModel`` whose own ``.base_model`` is a
``LoraModel`` (the whole LM, head included): the replay would receive logits where it expects the
decoder's hidden states. transformers' ``add_adapter`` injects the same way but also switches the
base LM's ``save_pretrained`` to adapter-only files, which the exports here do not want.

peft freezes every non-adapter parameter of the module it adapts, the delimiter vectors included
(they live in the base LM's input embedding); they are switched back on here. Their stored value is
``vector / embedding_scale`` (quietstar/delimiters.py), so under Adam they keep moving
``embedding_scale`` times faster than the adapters, exactly as in full fine-tuning.

The input embedding (which serves the delimiter ids) and the LM head (tied to it in most small
models) cannot be adapter targets: a LoRA embedding would look up the delimiter ids past the table,
and merging into a tied head would untie it.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's own file name and key format (PeftModel can read it)
HEAD_WEIGHTS = "quietstar_trained.safetensors"  # mixing head + delimiter vectors, under the model's own names
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output head


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the peft package: pip install 'quietstar[lora]' (or pip install peft)") from None
    return peft


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds peft adapter layers (never true when peft was not even imported)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def check_no_adapters(model: nn.Module, action: str) -> None:
    if has_lora(model):
        raise ValueError(
            f"{action}: this model carries LoRA adapters, whose weights are not a plain checkpoint; use "
            "quietstar.lora.save_lora(model, dir) for adapters + mixing head + delimiters, or "
            "quietstar.lora.merge_lora(model) first (in place) for a plain QuietStarForCausalLM"
        )


def trained_parameters(model) -> dict[str, nn.Parameter]:
    """What a LoRA model trains besides the adapters: the mixing head and the delimiter vectors."""
    params = {f"mixing_head.{name}": p for name, p in model.mixing_head.named_parameters()}
    for name, p in model.named_parameters():
        if p is model.delimiter_embedding.delimiter_embeddings:
            params[name] = p
    return params


# ---------------------------------------------------------------------------------- apply


def apply_lora(model, lora_config) -> "QuietStarForCausalLM":  # noqa: F821
    """Inject LoRA adapters described by ``lora_config`` (a ``peft.LoraConfig``) into ``model.base_lm``
    in place; freeze the base weights, keep the mixing head and delimiters trainable. Returns ``model``.

    At init the adapters' B matrices are zero (peft's default), so the model computes exactly what it
    did before. ``lora_config`` is copied (peft expands its target names in place).
    """
    peft = require_peft()
    if not isinstance(lora_config, peft.LoraConfig):
        raise TypeError(f"lora must be a peft.LoraConfig, got {type(lora_config).__name__}")
    if has_lora(model):
        raise ValueError("the model already carries LoRA adapters; merge_lora(model) first to add new ones on top")
    if lora_config.modules_to_save:
        raise ValueError(
            f"LoraConfig.modules_to_save={lora_config.modules_to_save!r} is not supported: the mixing head and the "
            "delimiter vectors are trained in full already, and the base model's other weights stay frozen; drop it"
        )
    config = copy.deepcopy(lora_config)
    _check_targets(model.base_lm, config)
    peft.inject_adapter_in_model(config, model.base_lm)
    # Adapters in fp32 over bf16/fp16 base weights, as get_peft_model does (inject_adapter_in_model
    # keeps the base dtype): Adam's small updates survive, and peft casts the inputs per layer.
    from peft.functional import cast_adapter_dtype

    cast_adapter_dtype(model.base_lm, "default", autocast_adapter_dtype=True)
    for p in trained_parameters(model).values():
        p.requires_grad_(True)
    return model


def _check_targets(base_lm: nn.Module, config) -> None:
    """Refuse target names that match nothing, or that would adapt the input embedding or the LM head."""
    targets = config.target_modules
    if targets is None:
        raise ValueError("LoraConfig.target_modules is not set; use e.g. target_modules='all-linear' "
                         "or the decoder's projection names (q_proj, v_proj, ...)")
    names = [name for name, _ in base_lm.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in base_lm.named_modules() if _is_linear(m)})
    forbidden = {id(base_lm.get_input_embeddings()): "the input embedding", id(base_lm.get_output_embeddings()): "the LM head"}
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return  # peft leaves the output head out of all-linear; the embedding is not linear
        matched = [n for n in names if re.fullmatch(targets, n)]
        if not matched:
            raise ValueError(f"LoraConfig.target_modules regex {targets!r} matches no module of the base model; "
                             f"its linear layers are named {linear} (or use 'all-linear')")
    else:
        missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            raise ValueError(f"LoraConfig.target_modules {sorted(missing)} name no module of the base model "
                             f"({type(base_lm).__name__}); its linear layers are named {linear} (or use 'all-linear')")
        matched = [n for n in names if any(n == t or n.endswith(f".{t}") for t in targets)]
    modules = dict(base_lm.named_modules())
    for name in matched:
        what = forbidden.get(id(modules[name]))
        if what is not None:
            raise ValueError(f"LoraConfig.target_modules selects {name!r}, {what}: it cannot take an adapter here "
                             "(the delimiter vectors are trained in full instead); target the decoder's linear layers")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed linear


# ---------------------------------------------------------------------------------- merge


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, IN PLACE, and drop the adapter layers; returns ``model``.

    Afterwards the model is a plain one (every parameter trainable again), so ``save_pretrained``
    writes an ordinary checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads.
    """
    require_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer as tuner
    outermost = [(name, m) for name, m in model.named_modules() if isinstance(m, tuner)]
    outermost = [(name, m) for name, m in outermost if not any(name.startswith(f"{o}.") for o, _ in outermost)]
    for name, layer in outermost:
        layer.merge(safe_merge=True)  # safe_merge: refuses adapters that would put NaNs in the weights
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    for module in model.modules():  # peft's bookkeeping; transformers would read it as an adapter config
        if "peft_config" in module.__dict__:
            del module.peft_config
    model.requires_grad_(True)
    return model


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
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from .configuration import QuietStarConfig
    from .modeling import QuietStarForCausalLM

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
