"""``model.path`` -> (QuietStarForCausalLM, tokenizer) for training.

The model is loaded by :func:`quietstar.loading.load_model`, the one loader of every command (its
docstring lists the specs). What is training's own is added here: the dtype from ``model.dtype``,
LoRA adapters from a ``model.lora`` section (quietstar/lora.py), gradient checkpointing.
"""

from __future__ import annotations

import torch

from ..loading import ModelSpecError, is_saved_quietstar, load_model
from .config import ConfigError, LoraSettings, ModelConfig, RunConfig, ThoughtConfig, model_thought_settings, runtime_thought_fields
from .precision import PrecisionPolicy, cast_parameters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_run_model(cfg: RunConfig, policy: PrecisionPolicy):
    """(model, tokenizer) of a run in the policy's dtype, checked against the window length; the control
    (``thinking: false``) trains the same base weights as a plain causal LM."""
    torch.manual_seed(cfg.seed)  # identical weights on every process (DDP also broadcasts rank 0's)
    model, tokenizer = build_model(cfg.model, cfg.thought, seed=cfg.seed)  # a module global: tests wrap it
    cast_parameters(model, policy)
    try:  # before any data is read: the model's own check (positions, sliding window)
        model.check_sequence_length(cfg.data.seq_len)
        if cfg.thought.schedule is not None:  # the longest stage's thoughts must fit too
            cfg.thought.schedule.check_fits(model, cfg.data.seq_len)
    except ValueError as err:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len}: {err}") from None
    return (model if cfg.thinking else model.base_lm), tokenizer


def build_stage_run(cfg: RunConfig, policy: PrecisionPolicy, device):
    """(student, tokenizer, objective) of a ``stage`` run: the frozen teacher lives inside the objective,
    on ``device``, outside the optimiser, the strategy's wrapping and the checkpoints."""
    from .objectives import build_stage

    torch.manual_seed(cfg.seed)
    try:
        student, teacher, tokenizer, objective = build_stage(
            cfg.stage, dtype=DTYPES[cfg.model.dtype], attn_implementation=cfg.model.attn_implementation, seed=cfg.seed)
        teacher.to(device).check_sequence_length(cfg.data.seq_len)
    except ValueError as err:
        raise ConfigError(f"stage: {err}") from None
    cast_parameters(student, policy)
    if cfg.model.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student, tokenizer, objective


def build_model(cfg: ModelConfig, thought: ThoughtConfig, seed: int = 0):
    try:
        model, tokenizer = load_model(cfg.path, thought=thought_settings(cfg.path, thought), dtype=DTYPES[cfg.dtype],
                                      attn_implementation=cfg.attn_implementation, seed=seed)
    except ModelSpecError as err:
        raise ConfigError(f"model.path: {err}") from None
    if cfg.lora is not None:
        from ..lora import apply_lora

        try:
            apply_lora(model, peft_lora_config(cfg.lora))
        except ValueError as err:
            raise ConfigError(f"model.lora: {err}") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), tokenizer


def thought_settings(path: str, thought: ThoughtConfig) -> dict:
    """All the run's thought settings for a model built from a base; only the runtime ones for a saved
    Quiet-STaR folder, which keeps the settings its weights were trained with."""
    settings = model_thought_settings(thought)
    if is_saved_quietstar(path):
        return {name: settings[name] for name in runtime_thought_fields()}
    return settings


def peft_lora_config(settings: LoraSettings):
    """The run config's ``model.lora`` section as a ``peft.LoraConfig``."""
    from ..lora import ALL_LINEAR, require_peft

    targets = settings.target_modules
    return require_peft().LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias=settings.bias,
        use_rslora=settings.use_rslora, target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
    )
