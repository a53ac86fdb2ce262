"""The launch: processes vs devices, and the Accelerator built for the run's batch split and precision policy."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .batch import BatchPlan
from .config import ConfigError, RunConfig
from .precision import PrecisionPolicy, accelerate_mixed_precision, deepspeed_plugin, launch_kind, resolve_precision
from .sharding import cpu_fsdp_plan


def check_launch(accelerator_env: dict | None = None) -> None:
    """Processes vs devices and the sharding asked for, from the launcher's environment, before anything is loaded."""
    env = os.environ if accelerator_env is None else accelerator_env
    local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    if not torch.cuda.is_available() and env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # Accelerator(cpu=True) would ignore it and run plain data parallelism instead.
        raise ConfigError("a DeepSpeed launch needs CUDA devices; this machine has none "
                          "(on CPU use train/accelerate/fsdp2_cpu_2proc.yaml or cpu_2proc.yaml)")
    cpu_fsdp_plan(env)  # raises on FSDP settings that do not run on CPU
    if torch.cuda.is_available() and local > torch.cuda.device_count():
        raise ConfigError(
            f"{local} processes were started on this machine but it has {torch.cuda.device_count()} CUDA devices; "
            "launch at most one process per GPU (num_processes in the accelerate config)"
        )


def launch_world_size() -> int:
    """Processes of this launch, from the launcher's environment (torchrun and accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_precision(cfg: RunConfig) -> PrecisionPolicy:
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return resolve_precision(cfg.model.dtype, cfg.optim, cuda_bf16)


def make_accelerator(cfg: RunConfig, plan: BatchPlan):
    """The Accelerator for ``plan`` (its grad_accum) and the run's precision policy; returns (accelerator, policy)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cuda = torch.cuda.is_available()
    policy, launch = run_precision(cfg), launch_kind()
    extra = {}
    if launch == "deepspeed":
        extra["deepspeed_plugin"] = deepspeed_plugin(policy, plan.batch_size, plan.grad_accum, plan.world_size)
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=accelerate_mixed_precision(policy, launch),
        gradient_accumulation_steps=plan.grad_accum,
        log_with=list(cfg.logging.trackers) or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
        **extra,
    )
    if plan.world_size != accelerator.num_processes:
        raise RuntimeError(
            f"launched as {plan.world_size} processes but accelerate sees {accelerator.num_processes}; each would train alone. "
            "On CPU use torchrun or `accelerate launch --multi_gpu` (not --cpu) with train/accelerate/cpu_2proc.yaml"
        )
    return accelerator, policy
