"""Atomic, resumable checkpoints: ``<output_dir>/checkpoints/step-00000010/``.

A checkpoint is written into ``.tmp-step-XXXXXXXX/`` and renamed into place only when complete
(``os.replace`` of a directory is atomic on one filesystem), so a run killed mid-write leaves a
``.tmp-*`` folder that is never loaded. ``state.json`` is written last and lists every file with its
size; a ``step-*`` folder whose files do not match is ignored with a warning too.

Contents (data-parallel runs; written by the main process only):

    model.safetensors       full model state dict (tied/shared tensors stored once, aliases in state.json);
                            a LoRA run stores only what it trains (adapters, mixing head, delimiters:
                            "trainable_only" in state.json) and rebuilds the frozen base from model.path
    optimizer.safetensors   every tensor of the optimiser state ("state.<param index>.<name>")
    rng.safetensors         torch CPU (and CUDA) RNG state of every process ("rank<R>.cpu")
    state.json              step, data position, scheduler state, optimiser param groups and
                            non-tensor state, tensor aliases, world size, file manifest
    config.yaml             the resolved run config

FSDP / DeepSpeed runs shard the model and optimiser across processes; there every process writes
its shard into ``sharded/`` (the model and optimiser files above are left out): with
``torch.distributed.checkpoint`` for the launcher's own FSDP2 on CPU (``sharding.py``; it reshards
on load, so such a checkpoint resumes on another process count), with ``accelerator.save_state``
for accelerate's FSDP / DeepSpeed on GPUs. ``state.json`` records which (``sharded_with``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .sharding import load_sharded, save_sharded, sharded_here
from ..lora import frozen_state_keys, has_lora, trainable_state_dict

STATE_FILE = "state.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


class CheckpointWarning(UserWarning):
    pass


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _sharded_with(accelerator, model) -> str | None:
    """Who writes this run's model state in shards: "dcp" (own FSDP2), "accelerate", or None (one file)."""
    from accelerate.utils import DistributedType

    if sharded_here(accelerator, model):
        return "dcp"
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return "accelerate"
    return None


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


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _gather_objects(accelerator, obj) -> list:
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator, output_dir, *, step: int, model, optimizer, scheduler, data_state: dict,
                    config_yaml: str, keep: int = 0) -> Path | None:
    """Write the checkpoint of optimiser step ``step`` atomically; every process must call it."""
    root = checkpoint_dir(output_dir)
    name = f"{PREFIX}{step:08d}"
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    rng_states = _gather_objects(accelerator, {k: v.cpu() for k, v in _rng_state().items()})
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    sharded_with = _sharded_with(accelerator, model)
    sharded = sharded_with is not None
    if sharded_with == "dcp":
        save_sharded(tmp / "sharded", model, optimizer)
        model_state = None
    elif sharded_with == "accelerate":
        accelerator.save_state(str(tmp / "sharded"), safe_serialization=True)
        model_state = None
    else:
        model_state = accelerator.get_state_dict(model)
    trainable_only = has_lora(accelerator.unwrap_model(model))
    if trainable_only and model_state is not None:
        model_state = trainable_state_dict(accelerator.unwrap_model(model), model_state)

    if accelerator.is_main_process:
        state = {"format": FORMAT_VERSION, "step": step, "data": data_state, "world_size": accelerator.num_processes,
                 "sharded": sharded, "sharded_with": sharded_with, "scheduler": scheduler.state_dict(),
                 "trainable_only": trainable_only}
        if not sharded:
            tensors, state["aliases"] = _dedupe(model_state)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            opt_tensors, state["optimizer"] = _split_optimizer_state(optimizer.state_dict())
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({f"rank{r}.{k}": v for r, s in enumerate(rng_states) for k, v in s.items()}, str(tmp / "rng.safetensors"))
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        state["files"] = {str(p.relative_to(tmp)): p.stat().st_size for p in files}
        for p in files:  # data on disk before the rename makes the checkpoint visible (every process's shards too)
            with open(p, "rb+") as handle:
                os.fsync(handle.fileno())
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():  # the same step written again (a resumed run re-reaching it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        from tqdm.auto import tqdm

        tqdm.write(f"saved checkpoint {final} (rank {accelerator.process_index})")  # keeps the progress bar intact
        sys.stdout.flush()
        if keep:
            for old in complete_checkpoints(output_dir, warn=False)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def check_checkpoint(path: Path) -> str | None:
    """None for a complete checkpoint, else why it is not one."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"{STATE_FILE} is missing"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        return f"{STATE_FILE} is unreadable ({error})"
    for rel, size in state.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, expected {size}"
    return None


def complete_checkpoints(output_dir, warn: bool = True) -> list[Path]:
    """Complete checkpoints, oldest first; partial ones are skipped (with a warning)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(TMP_PREFIX):
            if warn:
                warnings.warn(f"ignoring partially written checkpoint {path} (never renamed into place)", CheckpointWarning, stacklevel=2)
            continue
        if not path.name.startswith(PREFIX) or not path.name[len(PREFIX):].isdigit():
            continue
        problem = check_checkpoint(path)
        if problem:
            if warn:
                warnings.warn(f"ignoring incomplete checkpoint {path}: {problem}", CheckpointWarning, stacklevel=2)
            continue
        found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def load_checkpoint(accelerator, path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore model, optimiser, scheduler and this process's RNG; returns ``state.json``."""
    problem = check_checkpoint(path)
    if problem:
        raise FileNotFoundError(f"checkpoint {path} is incomplete ({problem}); pick another or use resume: auto")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    written_with = state.get("sharded_with", "accelerate" if state["sharded"] else None)
    if written_with != _sharded_with(accelerator, model):
        kinds = {None: "an unsharded state", "dcp": "FSDP2-on-CPU shards (torch.distributed.checkpoint)",
                 "accelerate": "accelerate FSDP / DeepSpeed shards"}
        raise ValueError(f"checkpoint {path} holds {kinds[written_with]}, this run needs "
                         f"{kinds[_sharded_with(accelerator, model)]}; resume with the same kind of launch (accelerate config)")
    if written_with == "dcp":
        load_sharded(path / "sharded", model, optimizer)
    elif written_with == "accelerate":
        accelerator.load_state(str(path / "sharded"))
    else:
        tensors = load_file(str(path / "model.safetensors"))
        result = accelerator.unwrap_model(model).load_state_dict(tensors, strict=False)
        missing = set(result.missing_keys) - set(state["aliases"])
        if state.get("trainable_only"):  # LoRA: the frozen base weights come from the rebuilt model
            missing -= frozen_state_keys(accelerator.unwrap_model(model))
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(result.unexpected_keys)[:5]}")
        optimizer.load_state_dict(_join_optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    rank = accelerator.process_index
    if state["world_size"] == accelerator.num_processes:
        torch.set_rng_state(rng[f"rank{rank}.cpu"])
        if torch.cuda.is_available() and f"rank{rank}.cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{rank}.cuda"])
    else:
        # Per-process RNG streams cannot be mapped onto another process count; the loop re-seeds.
        warnings.warn(f"checkpoint written by {state['world_size']} processes, resumed by {accelerator.num_processes}: "
                      "the data continues at the same window of the global order, but thought sampling is re-seeded "
                      "from (seed, step, rank), so the run is not bit-identical", CheckpointWarning, stacklevel=2)
    return state
