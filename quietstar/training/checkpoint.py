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
its shard into ``sharded/`` (the model and optimiser files above are left out). The run's strategy
(``strategy.py``) writes and reads the model and optimiser part; this module owns the folder, its
atomic rename, the manifest, the RNG and the scheduler. ``state.json`` records which strategy wrote
it (``sharded_with``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import QuietStarForCausalLM
from ..lora import has_lora, merge_lora, save_lora

STATE_FILE = "state.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
# What each strategy's checkpoint_kind ("sharded_with") holds, for the refusal to mix them.
KIND_NAMES = {None: "an unsharded state", "dcp": "FSDP2-on-CPU shards (torch.distributed.checkpoint)",
              "accelerate": "accelerate FSDP / DeepSpeed shards"}


class CheckpointWarning(UserWarning):
    pass


class Checkpointer:
    """What a run reads from and writes to disk, as the loop calls it: ``resume()`` once after setup,
    ``save(step)`` after every step (it writes every ``checkpoint.every``), ``export()`` at the end.
    The strategy writes and reads the model and optimiser; this class the rest of the run's state."""

    def __init__(self, strategy, cfg, *, model, optimizer, scheduler, data, tokenizer, config_yaml: str):
        self.strategy, self.cfg, self.out_dir, self.config_yaml = strategy, cfg, Path(cfg.output_dir), config_yaml
        self.model, self.optimizer, self.scheduler, self.data, self.tokenizer = model, optimizer, scheduler, data, tokenizer

    def resume(self) -> int:
        """Continue from ``cfg.resume``: model, optimiser, scheduler, RNG, data position; returns the step."""
        cfg, accelerator, step = self.cfg, self.strategy.accelerator, 0
        path = None if cfg.resume == "no" else (latest_checkpoint(self.out_dir) if cfg.resume == "auto" else Path(cfg.resume))
        if path is not None:
            state = load_checkpoint(self.strategy, path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            self.data.load_state_dict({"world_size": state["world_size"], **state["data"]})
            step = state["step"]
            if state["world_size"] != accelerator.num_processes:
                resume_on_other_world_size(state, cfg, step, accelerator.process_index, accelerator.num_processes)
            data = self.data
            where = f"window {data.windows_consumed} of the global order" if hasattr(data, "windows_consumed") else f"micro-batch {data.position}"
            accelerator.print(f"resumed from {path} at step {step} (data: {where})")
        if step >= cfg.optim.steps:
            accelerator.print(f"nothing to do: already at step {step} of {cfg.optim.steps}")
        return step

    def save(self, step: int) -> None:
        every = self.cfg.checkpoint.every
        if every and step % every == 0:
            save_checkpoint(self.strategy, self.out_dir, step=step, model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, data_state={**self.data.state_dict(), "grad_accum": self.cfg.optim.grad_accum},
                            config_yaml=self.config_yaml, keep=self.cfg.checkpoint.keep)

    def export(self) -> Path:
        """``save_pretrained`` the FULL model (gathered under FSDP / ZeRO-3) into ``output_dir/final``.

        A LoRA run first saves its adapters, head and delimiters to ``output_dir/final_lora``, then merges
        the adapters into the base weights in place (export is the run's last use of the model), so
        ``final`` is a plain checkpoint either way."""
        from tqdm.auto import tqdm

        accelerator, export_dir = self.strategy.accelerator, self.out_dir / "final"
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(self.model)
        if has_lora(unwrapped):
            if accelerator.is_main_process and isinstance(unwrapped, QuietStarForCausalLM):
                save_lora(unwrapped, self.out_dir / "final_lora", self.tokenizer)
            merge_lora(unwrapped)  # every process: the replicas stay identical
        state_dict = self.strategy.full_state_dict(self.model)
        if accelerator.is_main_process:
            accelerator.unwrap_model(self.model).save_pretrained(export_dir, state_dict=state_dict, safe_serialization=True)
            if self.cfg.stage is not None:  # a plain student: the teacher's thought delimiters are not its tokens
                from ..ntp import save_tokenizer_without_delimiters

                save_tokenizer_without_delimiters(self.tokenizer, export_dir, unwrapped.get_input_embeddings().num_embeddings)
            else:
                self.tokenizer.save_pretrained(export_dir)
            (export_dir / "quietstar_train.yaml").write_text(self.config_yaml, encoding="utf-8")
            tqdm.write(f"exported {export_dir} (rank {accelerator.process_index})")
            sys.stdout.flush()
        return export_dir


def resume_on_other_world_size(state: dict, cfg, step: int, rank: int, world: int) -> None:
    """A checkpoint of another process count: the data continues at the same window of the global
    order (data.py); per-process RNG streams cannot be mapped, so thought sampling is re-seeded from
    (seed, step, rank) -- not from the run's start, which would replay its first steps' draws."""
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, step, rank]).generate_state(1)[0]))
    written = state["data"]
    if "grad_accum" in written and "batch_size" in written:
        before = written["batch_size"] * state["world_size"] * written["grad_accum"]
        now = cfg.optim.batch_size * world * cfg.optim.grad_accum
        if before != now:
            warnings.warn(f"windows per optimiser step (batch_size x processes x grad_accum) were {before}, now {now}: "
                          f"the windows come in the same order but are grouped into other steps; keep the product at {before} "
                          "(e.g. double optim.grad_accum when halving the processes) to keep the steps", UserWarning, stacklevel=3)


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


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


def save_checkpoint(strategy, output_dir, *, step: int, model, optimizer, scheduler, data_state: dict,
                    config_yaml: str, keep: int = 0) -> Path | None:
    """Write the checkpoint of optimiser step ``step`` atomically; every process must call it."""
    accelerator = strategy.accelerator
    root = checkpoint_dir(output_dir)
    name = f"{PREFIX}{step:08d}"
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    rng_states = _gather_objects(accelerator, {k: v.cpu() for k, v in _rng_state().items()})
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    written = strategy.save_state(tmp, model, optimizer)  # collective

    if accelerator.is_main_process:
        state = {"format": FORMAT_VERSION, "step": step, "data": data_state, "world_size": accelerator.num_processes,
                 "sharded": strategy.checkpoint_kind is not None, "sharded_with": strategy.checkpoint_kind,
                 "scheduler": scheduler.state_dict(), "trainable_only": has_lora(accelerator.unwrap_model(model)), **written}
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


def load_checkpoint(strategy, path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore model, optimiser, scheduler and this process's RNG; returns ``state.json``."""
    accelerator = strategy.accelerator
    problem = check_checkpoint(path)
    if problem:
        raise FileNotFoundError(f"checkpoint {path} is incomplete ({problem}); pick another or use resume: auto")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    written_with = state.get("sharded_with", "accelerate" if state["sharded"] else None)
    if written_with != strategy.checkpoint_kind:
        raise ValueError(f"checkpoint {path} holds {KIND_NAMES[written_with]}, this run needs "
                         f"{KIND_NAMES[strategy.checkpoint_kind]}; resume with the same kind of launch (accelerate config)")
    strategy.load_state(path, model, optimizer, state)
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(path, state, accelerator.process_index, accelerator.num_processes)
    return state


def _restore_rng(path: Path, state: dict, rank: int, world: int) -> None:
    rng = load_file(str(path / "rng.safetensors"))
    if state["world_size"] == world:
        torch.set_rng_state(rng[f"rank{rank}.cpu"])
        if torch.cuda.is_available() and f"rank{rank}.cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{rank}.cuda"])
    else:
        # Per-process RNG streams cannot be mapped onto another process count; the loop re-seeds.
        warnings.warn(f"checkpoint written by {state['world_size']} processes, resumed by {world}: "
                      "the data continues at the same window of the global order, but thought sampling is re-seeded "
                      "from (seed, step, rank), so the run is not bit-identical", CheckpointWarning, stacklevel=3)
