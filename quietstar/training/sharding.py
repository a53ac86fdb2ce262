"""FSDP2 on CPU processes (gloo): the launcher's own ``torch.distributed.fsdp.fully_shard`` path.

Why not accelerate's FSDP: accelerate (checked on 1.15) enters FSDP only for accelerator devices.
With ``Accelerator(cpu=True)`` the launch is MULTI_CPU and the FSDP request (the
``ACCELERATE_USE_FSDP`` environment that ``accelerate launch`` sets from an FSDP config, or even an
explicit ``fsdp_plugin``) is dropped without a word: ``prepare`` would wrap the model in DDP and
every process would hold all of it. Without ``cpu=True`` a CUDA-less launch gets no process group.
So on CPU the loop keeps ``Accelerator(cpu=True)`` for the gloo process group, the optimiser
wrapper, ``backward`` and the metric reductions, and shards the model here instead of preparing it.
With CUDA, accelerate's own FSDP2 path is used unchanged (see ``train/accelerate/fsdp2.yaml``).

Units: every decoder layer (the base model's ``_no_split_modules`` classes) is its own unit, then
the root holds the rest: the input embedding with its thought-delimiter wrapper (one Parameter
shared with a tied ``lm_head``, so they must stay in one unit), the final norm and the mixing head.

Checkpoints of such a run are ``torch.distributed.checkpoint`` folders: every process writes its
own shards, and loading reshards, so a checkpoint resumes on a different process count.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError

# accelerate config keys (``fsdp_config``) as they reach the processes: ``FSDP_<KEY>`` variables.
SUPPORTED_ON_CPU = {
    "fsdp_version": ("2",),
    "fsdp_auto_wrap_policy": ("transformer_based_wrap",),
    "fsdp_state_dict_type": ("sharded_state_dict",),
    "fsdp_offload_params": ("false",),
    "fsdp_activation_checkpointing": ("false",),
    "fsdp_cpu_ram_efficient_loading": ("false",),
    "fsdp_reshard_after_forward": ("true", "false"),
}
WHY_NOT = {
    "fsdp_version": "FSDP1 on CPU is untested here; use fsdp_version: 2 (fully_shard)",
    "fsdp_auto_wrap_policy": "on CPU every decoder layer is its own unit; use TRANSFORMER_BASED_WRAP",
    "fsdp_state_dict_type": "checkpoints of a CPU FSDP2 run are always sharded (torch.distributed.checkpoint)",
    "fsdp_offload_params": "the parameters already live in CPU memory",
    "fsdp_activation_checkpointing": "use the run config's model.gradient_checkpointing: true instead",
    "fsdp_cpu_ram_efficient_loading": "on CPU every process builds the model, then rank 0's weights are broadcast",
    "fsdp_reshard_after_forward": "use true or false",
}
DEFAULTS = {"fsdp_version": "1", "fsdp_auto_wrap_policy": "transformer_based_wrap",
            "fsdp_state_dict_type": "sharded_state_dict", "fsdp_reshard_after_forward": "true"}


@dataclasses.dataclass(frozen=True)
class CpuFsdpPlan:
    reshard_after_forward: bool


def check_cpu_fsdp_settings(settings: dict, where: str) -> CpuFsdpPlan:
    """An accelerate ``fsdp_config`` (lower-case keys) checked against what runs on CPU."""
    values = {key: str(settings.get(key, DEFAULTS.get(key, "false"))).lower() for key in SUPPORTED_ON_CPU}
    for key, allowed in SUPPORTED_ON_CPU.items():
        if values[key] not in allowed:
            raise ConfigError(f"{where}: {key} {values[key]!r} is not supported without CUDA ({WHY_NOT[key]}); "
                              "see train/accelerate/fsdp2_cpu_2proc.yaml")
    return CpuFsdpPlan(reshard_after_forward=values["fsdp_reshard_after_forward"] == "true")


def cpu_fsdp_plan(env=None) -> CpuFsdpPlan | None:
    """The FSDP request of this launch when it must run on CPU (no CUDA); None when there is none."""
    env = os.environ if env is None else env
    if torch.cuda.is_available() or env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    settings = {key.lower(): value for key, value in env.items() if key.startswith("FSDP_")}
    return check_cpu_fsdp_settings(settings, "the FSDP launch (FSDP_* environment from accelerate launch)")


def decoder_layer_classes(model) -> set[str]:
    base = getattr(model, "base_lm", model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    if not names:
        raise ConfigError(f"{type(base).__name__} names no decoder layer class (_no_split_modules); "
                          "FSDP2 on CPU needs one to make each layer a unit")
    return names


def shard_model(model, plan: CpuFsdpPlan) -> None:
    """Rank 0's weights to every process, then ``fully_shard`` each decoder layer and the root.

    Call before building the optimiser: fully_shard replaces the parameters by DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():  # as DDP does: the model every process starts from is rank 0's
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    classes = decoder_layer_classes(model)
    layers = [(name, module) for name, module in model.named_modules() if type(module).__name__ in classes]
    if not layers:
        raise ConfigError(f"no module of classes {sorted(classes)} in {type(model).__name__}; nothing to shard per layer")
    for _, layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)


def is_fully_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_summary(model) -> dict:
    """The FSDP units as the model has them ("" is the root), parameter elements this process holds
    vs the model's, and any parameter left unsharded."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    local = total = 0
    replicated = []
    for name, p in model.named_parameters():
        total += p.numel()
        if isinstance(p, DTensor):
            local += p.to_local().numel()
        else:
            local += p.numel()
            replicated.append(name)
    return {"units": units, "local_numel": local, "numel": total, "replicated": replicated}


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a DTensor shard: every process must call it)."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Gathered full state dict on rank 0 (CPU tensors), empty elsewhere; every process must call it.

    A tied parameter (``lm_head.weight`` is the embedding's) is gathered under each of its names as
    separate tensors; only its first name is kept, as ``save_pretrained`` writes an unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state


def _plain_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def save_sharded(folder: Path, model, optimizer) -> None:
    """Every process writes its shards of model and optimiser state into ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, _plain_optimizer(optimizer))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model, optimizer) -> None:
    """Load ``folder`` into this run's shards; the writing run may have had another process count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer = _plain_optimizer(optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
