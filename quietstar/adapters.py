"""LoRA adapters inside a model: inject (:func:`apply_lora`), detect (:func:`has_lora`), merge
(:func:`merge_lora`). They work on any module tree and know no model class, so the model itself can
use them (``from_base(lora=...)``, ``save_pretrained``); saving and loading adapters sits above the
model, in quietstar/lora.py, which also re-exports these names.

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
import re
import sys

from torch import nn

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


def apply_lora(model, lora_config):
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
