"""``validate(cfg)``: everything checkable before a model or a dataset is loaded.

Each ``*_problems`` function checks one concern and returns what is wrong, each message naming the
fix; ``validate`` gathers them into one :class:`ConfigError`. Some look outside the config: the
model's own thought checks, the file system (model and data paths), the hub cache (offline), the
installed packages (trackers, peft).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..configuration import QuietStarConfig
from .config import ConfigError, LoraSettings, OptimConfig, RunConfig, model_thought_settings
from .precision import POLICY_COMPUTE
from .stage_config import stage_run_problems

SPECIAL_MODELS = ("smollm2", "tiny-random-llama")
DATA_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def validate(cfg: RunConfig) -> None:
    """Raise one ConfigError listing every problem of ``cfg`` that shows before any loading."""
    problems = [*thought_problems(cfg), *optim_problems(cfg), *logging_problems(cfg), *run_problems(cfg),
                *model_problems(cfg), *model_path_problems(cfg.model.path), *data_path_problems(cfg.data.path)]
    if problems:
        raise ConfigError("invalid run config:\n  - " + "\n  - ".join(problems))


def thought_problems(cfg: RunConfig) -> list[str]:
    problems, t, d = [], cfg.thought, cfg.data
    try:  # the model config's own checks (sizes, temperatures, activation), before any model exists
        QuietStarConfig(**model_thought_settings(t))
    except ValueError as err:
        problems.append(f"thought: {err}")
    if d.seq_len < t.n_talk_tokens + 2:
        problems.append(
            f"data.seq_len = {d.seq_len} is shorter than n_talk_tokens + 2 = {t.n_talk_tokens + 2}: no position "
            f"would have all {t.n_talk_tokens} talk targets; raise data.seq_len or lower thought.n_talk_tokens"
        )
    if t.schedule is not None:
        problems += t.schedule.problems("thought.schedule")
        if not cfg.thinking:
            problems.append("thought.schedule shortens thoughts, but thinking is false (the plain-LM control): remove it")
    if cfg.stage is not None:
        problems += cfg.stage.problems("stage") + stage_run_problems(cfg)
    if d.max_documents is not None and d.max_documents < 1:
        problems.append(f"data.max_documents must be >= 1 (or null for all), got {d.max_documents}")
    return problems


def optim_problems(cfg: RunConfig) -> list[str]:
    o, problems = cfg.optim, []
    for name in ("steps", "batch_size", "grad_accum", "global_batch"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            problems.append(f"optim.{name} must be >= 1, got {getattr(o, name)}")
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
    return problems


def precision_problems(optim: OptimConfig) -> list[str]:
    """Contradictions between ``optim.precision`` and ``optim.mixed_precision`` (config validation)."""
    allowed = POLICY_COMPUTE.get(optim.precision)
    if allowed is None or optim.mixed_precision in ("auto", *allowed):
        return []
    return [f"optim.precision {optim.precision} computes in {' or '.join(allowed)}, but optim.mixed_precision is "
            f"{optim.mixed_precision!r}; set optim.mixed_precision to {allowed[0]!r} (or 'auto')"]


def logging_problems(cfg: RunConfig) -> list[str]:
    log, problems = cfg.logging, []
    if log.every < 1 or min(log.thoughts_every, log.n_thoughts) < 0:
        problems.append("logging.every must be >= 1, logging.thoughts_every and logging.n_thoughts >= 0")
    unknown_trackers = set(log.trackers) - {"tensorboard", "wandb", "all"}
    if unknown_trackers:
        problems.append(f"logging.trackers: unknown {sorted(unknown_trackers)}; use tensorboard and/or wandb")
    for tracker in log.trackers:
        modules = TRACKER_MODULES.get(tracker, ())
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            problems.append(f"logging.trackers names {tracker!r}, which is not installed: pip install {modules[0]} "
                            "(or --set logging.trackers=[])")
    return problems


def run_problems(cfg: RunConfig) -> list[str]:
    problems = []
    if cfg.cpu_threads < 0:
        problems.append(f"cpu_threads must be >= 0 (0: torch's default), got {cfg.cpu_threads}")
    if min(cfg.checkpoint.every, cfg.checkpoint.keep) < 0:
        problems.append("checkpoint.every and checkpoint.keep must be >= 0")
    if cfg.resume not in ("no", "auto") and not Path(cfg.resume).is_dir():
        problems.append(f"resume = {cfg.resume!r}: use 'no', 'auto' or an existing checkpoint folder")
    return problems


def model_problems(cfg: RunConfig) -> list[str]:
    from ..attention import THOUGHT_ATTENTION_NAMES

    problems = lora_problems(cfg.model.lora) if cfg.model.lora is not None else []
    if cfg.thought.thought_forward == "incremental" and cfg.model.gradient_checkpointing:
        problems.append("thought.thought_forward = 'incremental' keeps the KV cache in autograd, which gradient "
                        "checkpointing cannot recompute; use thought_forward: replay or model.gradient_checkpointing: false")
    if cfg.model.attn_implementation not in THOUGHT_ATTENTION_NAMES:
        problems.append(
            f"model.attn_implementation {cfg.model.attn_implementation!r} is not a thought attention path; "
            f"use one of {list(THOUGHT_ATTENTION_NAMES)}"
        )
    return problems


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


def model_path_problems(m: str) -> list[str]:
    """A model folder must hold config.json; a hub id must be cached when the hub is offline."""
    if m in SPECIAL_MODELS:
        return []
    if Path(m).expanduser().exists():
        if not (Path(m).expanduser() / "config.json").is_file():
            return [f"model.path {m!r} is a folder without config.json; point it at a save_pretrained folder"]
    elif _looks_local(m):
        return [f"model.path {m!r} does not exist; give a local model folder, a hub id, 'smollm2' or 'tiny-random-llama'"]
    elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(m, "config.json"), str):
            return [f"model.path {m!r} is not a local folder and not in the hub cache (HF_HUB_OFFLINE is set)"]
    return []


def data_path_problems(path: str) -> list[str]:
    """A local data file or folder must exist and hold text; anything else is taken for a hub dataset."""
    if path == "bundled":
        return []
    try:
        local = data_files(path)
    except ConfigError as error:
        return [str(error)]
    if local is not None:
        if all(os.path.getsize(f) == 0 for f in local[1]):
            return [f"data.path {path!r} is empty (0 bytes); give a file with text"]
    elif _looks_local(path):
        return [f"data.path {path!r} does not exist; give a .txt/.jsonl/.parquet file or folder, a hub dataset name, or 'bundled'"]
    return []


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
