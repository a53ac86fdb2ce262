"""The training loop: one process of a (possibly distributed) Quiet-STaR run.

    validate config -> accelerator -> model, tokenizer -> data -> AdamW + warmup/cosine
    -> [resume] -> for each optimiser step: grad_accum x (batch -> model(labels) -> backward)
       -> clip -> step -> log -> [thoughts] -> [checkpoint]  -> export (save_pretrained)

Runs in-process on one device, or under ``accelerate launch`` / ``torchrun`` (DDP, FSDP2,
DeepSpeed ZeRO-3 through accelerate). Without CUDA it uses ``Accelerator(cpu=True)``: a plain
``Accelerator()`` on CPU processes started by torchrun trains each process alone. An FSDP2 launch
without CUDA shards the model with the launcher's own ``fully_shard`` (``sharding.py`` says why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import QuietStarForCausalLM
from ..inspection import thought_in_context
from ..lora import has_lora, merge_lora, save_lora
from .batch import apply_plan, batch_plan, check_budget
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, to_dict, validate
from .data import build_dataset
from .launch import check_launch, launch_world_size, make_accelerator  # noqa: F401  (check_launch: tests import it here)
from .precision import PrecisionPolicy, cast_parameters, state_dtypes
from .sharding import cpu_fsdp_plan, full_state_dict, full_tensor, shard_model, shard_summary, sharded_here


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def parameter_part(name: str) -> str:
    """Which part of a QuietStarForCausalLM a parameter belongs to: "mixing_head", "delimiters" or "base"."""
    if name.startswith("mixing_head.") or ".mixing_head." in name:
        return "mixing_head"
    if name.endswith("delimiter_embeddings"):
        return "delimiters"
    return "base"


def make_optimizer(model, cfg: RunConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW with one group per (part, decayed or not); each part's lr is optim.lr times its scale.

    The logged lr is optim.lr on the schedule (each group's lr is that times its part's scale).
    """
    o = cfg.optim
    scales = {"base": o.base_lr_scale, "mixing_head": o.mixing_head_lr_scale, "delimiters": o.delimiter_lr_scale}
    params = {(part, decay): [] for part in scales for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[parameter_part(name), p.dim() >= 2].append(p)  # norms and biases are not decayed
    groups = [
        {"params": ps, "lr": o.lr * scales[part], "weight_decay": o.weight_decay if decay else 0.0, "part": part}
        for (part, decay), ps in params.items()
        if ps
    ]
    kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if cfg.optim.fused and device_type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # dtype/device without a fused kernel
            pass
    return torch.optim.AdamW(groups, **kwargs)


def param_hash(model) -> str:
    """Hash of the full parameters (gathered when sharded: every process must call it)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(full_tensor(p.detach()).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


def decode_thoughts(tokenizer, batch_ids, thought_ids, n: int, n_passes: int) -> list[str]:
    """A few thoughts of one batch in their text, at evenly spaced positions (first pass of each row)."""
    L, rows = batch_ids.shape[1], batch_ids.repeat_interleave(n_passes, 0)
    return [thought_in_context(tokenizer, rows, thought_ids, (j % batch_ids.shape[0]) * n_passes, (L * (j + 1)) // (n + 1))
            for j in range(n)]


@dataclasses.dataclass
class StepResult:
    """What one optimiser step leaves for logging: per-micro-batch loss terms (0-d tensors, no host sync)."""

    terms: list[dict]
    sample_ids: list
    n_tokens: int  # real (unpadded) base tokens of this process
    grad_norm: torch.Tensor | None
    input_ids: torch.Tensor  # the last micro-batch, for thought dumps
    output: object  # its model output


def train_step(model, data, accelerator, optimizer, cfg: RunConfig, policy: PrecisionPolicy) -> StepResult:
    """One optimiser step: ``grad_accum`` x (batch -> forward with labels -> backward), clip, AdamW.

    Quiet-STaR: the loss is the model's (0.5 NLL_base + 0.5 NLL_talk + w_policy REINFORCE); the
    control (``cfg.thinking`` false, the model is the plain base LM): the causal-LM loss."""
    terms, sample_ids, n_tokens, grad_norm = [], [], 0, None
    for _ in range(cfg.optim.grad_accum):
        batch = data.next_batch()
        sample_ids.append(batch["sample_ids"])
        input_ids = batch["input_ids"].to(accelerator.device)
        mask = batch["attention_mask"].to(accelerator.device)
        n_tokens += int(batch["attention_mask"].sum())
        with accelerator.accumulate(model):
            if sharded_here(accelerator, model):  # as accelerate's FSDP2 does: one reduce-scatter per optimiser step
                model.set_requires_gradient_sync(accelerator.sync_gradients)
            # Training reads the loss, its terms and the thoughts, never the logits: the memory-light
            # forward keeps no [B, L, K, V] tensor (issue 10). The control is a plain causal LM.
            light = {"return_logits": False} if cfg.thinking else {}
            with policy.autocast(accelerator.device.type):  # ours on every launcher (precision.py says why)
                out = model(input_ids, attention_mask=mask, labels=input_ids, **light)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            # Every micro-batch, as accelerate's accumulate() pattern wants: its prepared optimizer
            # skips step() and zero_grad() until the accumulation's last micro-batch (sync_gradients).
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        terms.append(out.loss_terms if cfg.thinking else {"loss": out.loss.detach(), "nll_base": out.loss.detach()})
    return StepResult(terms, sample_ids, n_tokens, grad_norm, input_ids, out)


def reduce_metrics(accelerator, result: StepResult, lr: float, elapsed: float) -> dict:
    """Loss terms averaged over micro-batches and processes, grad norm, lr, throughput: one host sync."""
    names = sorted(result.terms[0])
    local = torch.stack([torch.stack([t[n].float() for n in names]) for t in result.terms]).mean(0)
    # Under FSDP2 the clipped norm is a replicated DTensor; its local value is the whole norm.
    grad_norm = full_tensor(result.grad_norm) if result.grad_norm is not None else torch.zeros((), device=local.device)
    extra = torch.stack([grad_norm.float().to(local.device), torch.tensor(float(result.n_tokens), device=local.device)])
    values = accelerator.reduce(torch.cat([local, extra]), "mean").tolist()
    metrics = dict(zip(names, values[: len(names)]))
    metrics.update(grad_norm=values[len(names)], lr=lr, tokens_per_s=values[len(names) + 1] * accelerator.num_processes / elapsed,
                   step_time_s=elapsed, peak_memory_mb=peak_memory_mb(accelerator.device))
    return metrics


CONSOLE_TERMS = ("loss", "nll_base", "nll_talk", "policy_loss", "reward_mean", "advantage_mean", "mixing_weight_mean",
                 "grad_norm", "lr", "tokens_per_s", "peak_memory_mb")


def print_step(bar, step: int, total: int, metrics: dict, main_process: bool) -> None:
    """Progress-bar summary and one console line per logged step (every term goes to the trackers)."""
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", base=f"{metrics['nll_base']:.3f}",
                    talk=f"{metrics.get('nll_talk', float('nan')):.3f}", tok_s=f"{metrics['tokens_per_s']:.3g}")
    if main_process:
        bar.write(f"step {step}/{total} " + " ".join(f"{k} {metrics[k]:.4g}" for k in CONSOLE_TERMS if k in metrics))


def dump_thoughts(accelerator, bar, tokenizer, result: StepResult, step: int, out_dir: Path, n: int, n_passes: int) -> None:
    """A few decoded thoughts of the last micro-batch: console, output_dir/thoughts.txt, tensorboard."""
    lines = decode_thoughts(tokenizer, result.input_ids.cpu(), result.output.thought_ids.cpu(), n, n_passes)
    text = f"step {step}\n" + "\n".join(lines)
    bar.write(text)
    with open(out_dir / "thoughts.txt", "a", encoding="utf-8") as handle:
        handle.write(text + "\n")
    with contextlib.suppress(Exception):  # a tracker without text support just skips it
        accelerator.get_tracker("tensorboard", unwrap=True).add_text("thoughts", "\n\n".join(lines), step)


def export_model(accelerator, model, tokenizer, out_dir: Path, config_yaml: str, bar) -> Path:
    """``save_pretrained`` the FULL model (gathered under FSDP / ZeRO-3) into ``output_dir/final``.

    A LoRA run first saves its adapters, head and delimiters to ``output_dir/final_lora``, then merges
    the adapters into the base weights in place (export is the run's last use of the model), so
    ``final`` is a plain checkpoint either way."""
    export_dir = out_dir / "final"
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if has_lora(unwrapped):
        if accelerator.is_main_process and isinstance(unwrapped, QuietStarForCausalLM):
            save_lora(unwrapped, out_dir / "final_lora", tokenizer)
        merge_lora(unwrapped)  # every process: the replicas stay identical
    state_dict = full_state_dict(model) if sharded_here(accelerator, model) else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(export_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(export_dir)
        (export_dir / "quietstar_train.yaml").write_text(config_yaml, encoding="utf-8")
        bar.write(f"exported {export_dir} (rank {accelerator.process_index})")
        sys.stdout.flush()
    return export_dir


def resume_on_other_world_size(state: dict, cfg: RunConfig, step: int, rank: int, world: int) -> None:
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
                          "(e.g. double optim.grad_accum when halving the processes) to keep the steps", UserWarning, stacklevel=2)


def train(cfg: RunConfig, on_step=None) -> dict:
    """Run (or resume) the training described by ``cfg``; returns a small summary (main process).

    ``on_step(step, model, metrics)`` runs on the main process after every optimiser step, with the
    unwrapped model and the step's logged metrics (None on steps that are not logged): periodic
    held-out evaluation in experiments. It must leave the model as it found it (train mode, weights).
    """
    validate(cfg)
    check_launch()
    plan = batch_plan(cfg, launch_world_size())  # the step's documents over this launch's processes
    check_budget(cfg, plan)
    cfg = apply_plan(cfg, plan)
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    accelerator, policy = make_accelerator(cfg, plan)
    accelerator.print(f"{plan.describe()}; {policy.describe()}")  # the log's first line
    fsdp_plan = cpu_fsdp_plan()  # FSDP2 on CPU: sharded by this loop, accelerate reports MULTI_CPU
    if cfg.model.lora is not None and (accelerator.distributed_type.name in ("FSDP", "DEEPSPEED") or fsdp_plan is not None):
        raise ConfigError("model.lora is for one process (or data parallel): LoRA under FSDP / DeepSpeed is not supported; "
                          "launch without --accelerate-config, or with a DDP one, or remove model.lora")
    from .models import build_model

    out_dir = Path(cfg.output_dir)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    rank, world = accelerator.process_index, accelerator.num_processes

    torch.manual_seed(cfg.seed)  # identical weights on every process (DDP also broadcasts rank 0's)
    model, tokenizer = build_model(cfg.model, cfg.thought, seed=cfg.seed)
    cast_parameters(model, policy)
    try:  # before any data is read: the model's own check (positions, sliding window)
        model.check_sequence_length(cfg.data.seq_len)
    except ValueError as err:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len}: {err}") from None
    if not cfg.thinking:  # the control: the same base weights, trained as a plain causal LM
        model = model.base_lm
    data = build_dataset(cfg.data, tokenizer, batch_size=cfg.optim.batch_size, rank=rank, world_size=world, seed=cfg.seed)
    check_budget(cfg, plan, windows=len(data) if hasattr(data, "__len__") else None)

    shards = None
    if fsdp_plan is not None:  # before the optimiser: fully_shard swaps the parameters for DTensor shards
        if not torch.distributed.is_initialized():
            raise ConfigError("an FSDP run needs a distributed launch: quietstar-train --accelerate-config FILE, "
                              "accelerate launch or torchrun")
        if on_step is not None:  # it runs the model on the main process alone: the others would never all-gather
            raise ConfigError("periodic evaluation (on_step) needs every process's shards; run experiments without FSDP")
        shard_model(model, fsdp_plan)
        # The root returns views (logits slices); the loop only reads the outputs, never writes them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
        shards = shard_summary(model)
        accelerator.print(f"FSDP2 on CPU (fully_shard, {world} processes): {len(shards['units'])} units {shards['units']}; "
                          f"rank 0 holds {shards['local_numel']} of {shards['numel']} parameter elements")

    optimizer = make_optimizer(model, cfg, accelerator.device.type)
    # Not prepared by accelerate: its scheduler wrapper steps num_processes times per optimiser step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.optim.steps, cfg.optim.min_lr_ratio)
    )
    if fsdp_plan is not None:  # the model is already sharded; accelerate would wrap it in DDP
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    step = 0
    resume = None if cfg.resume == "no" else (latest_checkpoint(out_dir) if cfg.resume == "auto" else Path(cfg.resume))
    torch.manual_seed(cfg.seed + 1 + rank)  # thought sampling differs across processes
    if resume is not None:
        state = load_checkpoint(accelerator, resume, model=model, optimizer=optimizer, scheduler=scheduler)
        data.load_state_dict({"world_size": state["world_size"], **state["data"]})
        step = state["step"]
        if state["world_size"] != world:
            resume_on_other_world_size(state, cfg, step, rank, world)
        where = f"window {data.windows_consumed} of the global order" if hasattr(data, "windows_consumed") else f"micro-batch {data.position}"
        accelerator.print(f"resumed from {resume} at step {step} (data: {where})")
    if step >= cfg.optim.steps:
        accelerator.print(f"nothing to do: already at step {step} of {cfg.optim.steps}")

    flat_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in _flatten(to_dict(cfg)).items()}
    if cfg.logging.trackers:
        accelerator.init_trackers(cfg.logging.project, config=flat_config)
    trace = None
    if cfg.logging.trace_file:
        trace = open(f"{cfg.logging.trace_file}.rank{rank}.jsonl", "a", encoding="utf-8")

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.optim.steps, initial=step, disable=not (accelerator.is_main_process and cfg.logging.progress_bar),
               dynamic_ncols=True, desc=cfg.name)
    history = []
    model.train()
    while step < cfg.optim.steps:
        t0 = time.perf_counter()
        result = train_step(model, data, accelerator, optimizer, cfg, policy)
        scheduler.step()
        step += 1

        log_now = step % cfg.logging.every == 0 or step == cfg.optim.steps
        metrics = None
        if log_now or trace is not None:
            metrics = reduce_metrics(accelerator, result, lr=cfg.optim.lr * scheduler.lr_lambdas[0](scheduler.last_epoch), elapsed=time.perf_counter() - t0)
            history.append({"step": step, **metrics})
            if log_now:
                accelerator.log(metrics, step=step)
                print_step(bar, step, cfg.optim.steps, metrics, accelerator.is_main_process)
            if trace is not None:
                record = {"step": step, "rank": rank, "sample_ids": result.sample_ids,
                          "loss": float(result.terms[-1]["loss"]), "param_hash": param_hash(unwrapped), "metrics": metrics,
                          "dtypes": state_dtypes(model, optimizer)}
                if shards is not None:  # what this process holds: tests check the model is really sharded
                    record["shards"] = shard_summary(model)
                trace.write(json.dumps(record) + "\n")
                trace.flush()
        bar.update(1)
        if on_step is not None and accelerator.is_main_process:
            on_step(step, unwrapped, metrics if log_now else None)
        if cfg.thinking and cfg.logging.thoughts_every and step % cfg.logging.thoughts_every == 0 and accelerator.is_main_process:
            dump_thoughts(accelerator, bar, tokenizer, result, step, out_dir, cfg.logging.n_thoughts, unwrapped.config.n_passes)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            save_checkpoint(accelerator, out_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                            data_state={**data.state_dict(), "grad_accum": cfg.optim.grad_accum},
                            config_yaml=config_yaml, keep=cfg.checkpoint.keep)
    bar.close()
    if trace is not None:
        trace.close()

    export_dir = export_model(accelerator, model, tokenizer, out_dir, config_yaml, bar) if cfg.checkpoint.export else None
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "history": history, "export_dir": str(export_dir) if export_dir else None}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
