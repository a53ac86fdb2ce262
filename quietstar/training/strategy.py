"""The launch and its sharding strategy, chosen once from the launcher's state.

    accelerator, policy = make_accelerator(cfg, plan)
    strategy = choose_strategy(accelerator)      # the one place that asks which kind of launch this is
    model = strategy.shard(model)                # before the optimiser
    model, optimizer = strategy.prepare(model, optimizer)
    with strategy.accumulate(model): ...         # every micro-batch
    strategy.save_state / load_state             # the model and optimiser part of a checkpoint
    strategy.full_state_dict(model)              # the export

Three strategies, so that the loop and the checkpoints never branch on the launch:

- :class:`Replicated`: one process, or data parallel through accelerate (DDP); checkpoints hold one
  ``model.safetensors`` and one ``optimizer.safetensors``, which any process count can load.
- :class:`AccelerateSharded`: accelerate's FSDP2 or DeepSpeed ZeRO-3 on GPUs; accelerate prepares,
  saves (``save_state`` into ``sharded/``) and gathers.
- :class:`CpuFullyShard`: an FSDP2 launch without CUDA, sharded with ``fully_shard`` here
  (``sharding.py`` says why); checkpoints are ``torch.distributed.checkpoint`` folders, which
  reshard on load, so they resume on another process count.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..lora import frozen_state_keys, has_lora, trainable_state_dict
from .batch import BatchPlan
from .config import ConfigError, RunConfig
from .precision import accelerate_mixed_precision, deepspeed_plugin, launch_kind, resolve_precision
from .sharding import CpuFsdpPlan, cpu_fsdp_plan, full_state_dict, load_sharded, save_sharded, shard_model, shard_summary


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


def make_accelerator(cfg: RunConfig, plan: BatchPlan) -> tuple:
    """The Accelerator for ``plan`` (its grad_accum) and the run's precision policy; returns (accelerator, policy)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cuda = torch.cuda.is_available()
    policy = resolve_precision(cfg.model.dtype, cfg.optim, cuda and torch.cuda.is_bf16_supported())
    launch = launch_kind()
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


def choose_strategy(accelerator, cfg: RunConfig) -> Replicated:
    """The strategy of this launch; refuses a run config it cannot train (LoRA under sharding)."""
    from accelerate.utils import DistributedType

    fsdp_on_cpu = cpu_fsdp_plan()  # accelerate reports MULTI_CPU there: the launcher's environment says FSDP
    if fsdp_on_cpu is not None:
        strategy = CpuFullyShard(accelerator, fsdp_on_cpu)
    elif accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        strategy = AccelerateSharded(accelerator)
    else:
        strategy = Replicated(accelerator)
    if cfg.model.lora is not None and not strategy.trains_lora:
        raise ConfigError("model.lora is for one process (or data parallel): LoRA under FSDP / DeepSpeed is not supported; "
                          "launch without --accelerate-config, or with a DDP one, or remove model.lora")
    return strategy


class Replicated:
    """Every process holds the whole model (one process, or DDP through accelerate)."""

    checkpoint_kind: str | None = None  # "sharded_with" in a checkpoint's state.json
    trains_lora = True

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def shard(self, model):
        """The model as the optimiser must see it (called before the optimiser is built)."""
        return model

    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def accumulate(self, model):
        """The context of one micro-batch: gradients are synchronised on the accumulation's last one."""
        return self.accelerator.accumulate(model)

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The whole model's state on the main process (every process must call it)."""
        return self.accelerator.get_state_dict(model)

    def save_state(self, folder: Path, model, optimizer) -> dict:
        """Model and optimiser state into checkpoint ``folder`` (every process calls it); returns the
        entries its state.json needs. A LoRA run stores only what it trains."""
        model_state = self.accelerator.get_state_dict(model)
        unwrapped = self.accelerator.unwrap_model(model)
        if has_lora(unwrapped):
            model_state = trainable_state_dict(unwrapped, model_state)
        if not self.accelerator.is_main_process:
            return {}
        tensors, aliases = _dedupe(model_state)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, str(folder / "optimizer.safetensors"))
        return {"aliases": aliases, "optimizer": opt_meta}

    def load_state(self, folder: Path, model, optimizer, state: dict) -> None:
        unwrapped = self.accelerator.unwrap_model(model)
        result = unwrapped.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        missing = set(result.missing_keys) - set(state["aliases"])
        if state.get("trainable_only"):  # LoRA: the frozen base weights come from the rebuilt model
            missing -= frozen_state_keys(unwrapped)
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint {folder} does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(result.unexpected_keys)[:5]}")
        optimizer.load_state_dict(_join_optimizer_state(load_file(str(folder / "optimizer.safetensors")), state["optimizer"]))


class AccelerateSharded(Replicated):
    """accelerate's FSDP2 or DeepSpeed (GPUs): accelerate shards, saves and gathers."""

    checkpoint_kind = "accelerate"
    trains_lora = False

    def save_state(self, folder: Path, model, optimizer) -> dict:
        self.accelerator.save_state(str(folder / "sharded"), safe_serialization=True)
        return {}

    def load_state(self, folder: Path, model, optimizer, state: dict) -> None:
        self.accelerator.load_state(str(folder / "sharded"))


class CpuFullyShard(Replicated):
    """FSDP2 on CPU processes: ``fully_shard`` per decoder layer and root, DCP checkpoints."""

    checkpoint_kind = "dcp"
    trains_lora = False

    def __init__(self, accelerator, plan: CpuFsdpPlan):
        super().__init__(accelerator)
        self.plan = plan

    def shard(self, model):
        import warnings

        if not torch.distributed.is_initialized():
            raise ConfigError("an FSDP run needs a distributed launch: quietstar-train --accelerate-config FILE, "
                              "accelerate launch or torchrun")
        shard_model(model, self.plan)  # before the optimiser: fully_shard swaps the parameters for DTensor shards
        # The root returns views (logits slices); the loop only reads the outputs, never writes them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
        shards = shard_summary(model)
        self.accelerator.print(f"FSDP2 on CPU (fully_shard, {self.accelerator.num_processes} processes): "
                               f"{len(shards['units'])} units {shards['units']}; "
                               f"rank 0 holds {shards['local_numel']} of {shards['numel']} parameter elements")
        return model

    def prepare(self, model, optimizer):
        return model, self.accelerator.prepare(optimizer)  # accelerate would wrap the sharded model in DDP

    @contextlib.contextmanager
    def accumulate(self, model):
        with self.accelerator.accumulate(model):
            # As accelerate's FSDP2 does: one reduce-scatter per optimiser step.
            model.set_requires_gradient_sync(self.accelerator.sync_gradients)
            yield

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        return full_state_dict(model)

    def save_state(self, folder: Path, model, optimizer) -> dict:
        save_sharded(folder / "sharded", model, optimizer)
        return {}

    def load_state(self, folder: Path, model, optimizer, state: dict) -> None:
        load_sharded(folder / "sharded", model, optimizer)


def _dedupe(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors sharing storage (tied embeddings) stored once; ``aliases[key] = stored key``."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for key, value in state_dict.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype, value.device)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = value.detach().to("cpu").contiguous()
    return tensors, aliases


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                meta["state"].setdefault(str(index), {})[name] = value
    return tensors, meta


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["state"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}
