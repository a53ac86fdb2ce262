"""The training loop: one process of a (possibly distributed) Quiet-STaR run, in four phases.

    setup   launch (batch split, accelerator, sharding strategy) -> model, tokenizer -> data
            -> AdamW + warmup/cosine -> strategy.prepare
    resume  the newest (or the named) checkpoint, if any
    steps   for each optimiser step: [before_step] -> grad_accum x (batch -> objective -> backward)
            -> clip -> AdamW -> log -> [on_step] -> [thoughts] -> [checkpoint]
    export  the full model, save_pretrained into output_dir/final

Runs in-process on one device, or under ``accelerate launch`` / ``torchrun`` (DDP, FSDP2, DeepSpeed
ZeRO-3 through accelerate, FSDP2 on CPU processes): ``strategy.py`` owns how the model is held, so
nothing here depends on the launch.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import QuietStarForCausalLM
from ..lora import has_lora, merge_lora, save_lora
from .batch import apply_plan, batch_plan, check_budget
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig
from .config_checks import validate
from .config_loading import to_dict
from .data import build_dataset
from .objective_builtin import builtin_objective
from .optimizer import make_optimizer, make_scheduler, scheduled_lr
from .precision import PrecisionPolicy, cast_parameters
from .reporting import dump_thoughts, print_step, reduce_metrics, start_trackers
from .strategy import Replicated, check_launch, choose_strategy, launch_world_size, make_accelerator


@dataclasses.dataclass
class Run:
    """What setup builds and the later phases use."""

    cfg: RunConfig  # with the launch's batch split applied
    strategy: Replicated  # one of strategy.py's three
    policy: PrecisionPolicy
    model: torch.nn.Module  # as prepared
    tokenizer: object
    data: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    objective: object  # objective(model, input_ids, attention_mask) -> (loss, terms, thought_ids)
    out_dir: Path
    config_yaml: str
    step: int = 0

    @property
    def accelerator(self):
        return self.strategy.accelerator

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)


@dataclasses.dataclass
class StepResult:
    """What one optimiser step leaves for logging: per-micro-batch loss terms (0-d tensors, no host sync)."""

    terms: list[dict]
    sample_ids: list
    n_tokens: int  # real (unpadded) base tokens of this process
    grad_norm: torch.Tensor | None
    input_ids: torch.Tensor  # the last micro-batch, for thought dumps
    thought_ids: torch.Tensor | None  # its thoughts (None for an objective without)


@dataclasses.dataclass
class StepReport:
    """What ``on_step(report)`` gets after every optimiser step, on EVERY process: the callback decides
    what each process does (a full_tensor gather under FSDP needs them all; evaluation wants one)."""

    step: int
    model: torch.nn.Module  # unwrapped; under FSDP2 this process's shards. Leave it as found (train mode, weights)
    metrics: dict | None  # reduced over processes on logged steps, else None
    result: StepResult  # this process's micro-batches: sample ids, loss terms
    optimizer: torch.optim.Optimizer
    rank: int
    is_main_process: bool


def train(cfg: RunConfig, on_step=None, *, before_step=None, objective=None) -> dict:
    """Run (or resume) the training described by ``cfg``; returns a small summary.

    ``on_step(report)``: after every optimiser step, on every process (:class:`StepReport`).
    ``before_step(step, model)``: before optimiser step ``step`` (1-based), with the unwrapped model:
    where a schedule sets the thought settings of the coming step.
    ``objective``: the loss of a micro-batch (``objective_builtin.py`` says the contract); by default
    Quiet-STaR, or the plain causal LM when ``cfg.thinking`` is false.
    """
    run = setup(cfg, objective)
    resume(run)
    history = run_steps(run, on_step, before_step)
    export_dir = export_model(run) if run.cfg.checkpoint.export else None
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return {"step": run.step, "history": history, "export_dir": str(export_dir) if export_dir else None}


# ---------------------------------------------------------------------- setup


def launch(cfg: RunConfig) -> tuple:
    """The launch: config checks, the batch split over its processes, accelerator and strategy."""
    validate(cfg)
    check_launch()
    plan = batch_plan(cfg, launch_world_size())  # the step's documents over this launch's processes
    check_budget(cfg, plan)
    cfg = apply_plan(cfg, plan)
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    accelerator, policy = make_accelerator(cfg, plan)
    accelerator.print(f"{plan.describe()}; {policy.describe()}")  # the log's first line
    return cfg, plan, policy, choose_strategy(accelerator, cfg)


def build_run_model(cfg: RunConfig, policy: PrecisionPolicy):
    """(model, tokenizer) in the policy's dtype, checked against the window length; the control
    (``thinking: false``) trains the same base weights as a plain causal LM."""
    from .models import build_model  # looked up at call time: tests wrap it

    torch.manual_seed(cfg.seed)  # identical weights on every process (DDP also broadcasts rank 0's)
    model, tokenizer = build_model(cfg.model, cfg.thought, seed=cfg.seed)
    cast_parameters(model, policy)
    try:  # before any data is read: the model's own check (positions, sliding window)
        model.check_sequence_length(cfg.data.seq_len)
    except ValueError as err:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len}: {err}") from None
    return (model if cfg.thinking else model.base_lm), tokenizer


def setup(cfg: RunConfig, objective=None) -> Run:
    cfg, plan, policy, strategy = launch(cfg)
    accelerator = strategy.accelerator
    out_dir, config_yaml = Path(cfg.output_dir), yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    model, tokenizer = build_run_model(cfg, policy)
    data = build_dataset(cfg.data, tokenizer, batch_size=cfg.optim.batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, seed=cfg.seed)
    check_budget(cfg, plan, windows=len(data) if hasattr(data, "__len__") else None)
    model = strategy.shard(model)
    optimizer = make_optimizer(model, cfg, accelerator.device.type)
    scheduler = make_scheduler(optimizer, cfg)
    model, optimizer = strategy.prepare(model, optimizer)
    torch.manual_seed(cfg.seed + 1 + accelerator.process_index)  # thought sampling differs across processes
    return Run(cfg, strategy, policy, model, tokenizer, data, optimizer, scheduler, objective or builtin_objective(cfg),
               out_dir, config_yaml)


# ---------------------------------------------------------------------- resume


def resume(run: Run) -> None:
    """Continue from ``cfg.resume``: model, optimiser, scheduler, RNG and the data position."""
    cfg, accelerator = run.cfg, run.accelerator
    path = None if cfg.resume == "no" else (latest_checkpoint(run.out_dir) if cfg.resume == "auto" else Path(cfg.resume))
    if path is not None:
        state = load_checkpoint(run.strategy, path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
        run.data.load_state_dict({"world_size": state["world_size"], **state["data"]})
        run.step = state["step"]
        if state["world_size"] != accelerator.num_processes:
            resume_on_other_world_size(state, cfg, run.step, accelerator.process_index, accelerator.num_processes)
        data = run.data
        where = f"window {data.windows_consumed} of the global order" if hasattr(data, "windows_consumed") else f"micro-batch {data.position}"
        accelerator.print(f"resumed from {path} at step {run.step} (data: {where})")
    if run.step >= cfg.optim.steps:
        accelerator.print(f"nothing to do: already at step {run.step} of {cfg.optim.steps}")


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


# ---------------------------------------------------------------------- steps


def run_steps(run: Run, on_step, before_step) -> list[dict]:
    """Optimiser steps until ``optim.steps``; returns the logged metrics."""
    from tqdm.auto import tqdm

    cfg, accelerator = run.cfg, run.accelerator
    start_trackers(accelerator, cfg)
    bar = tqdm(total=cfg.optim.steps, initial=run.step, disable=not (accelerator.is_main_process and cfg.logging.progress_bar),
               dynamic_ncols=True, desc=cfg.name)
    history = []
    run.model.train()
    while run.step < cfg.optim.steps:
        if before_step is not None:
            before_step(run.step + 1, run.unwrapped)
        t0 = time.perf_counter()
        result = train_step(run)
        run.scheduler.step()
        run.step += 1
        metrics = log_step(run, bar, result, t0)
        if metrics is not None:
            history.append({"step": run.step, **metrics})
        bar.update(1)
        if on_step is not None:
            on_step(StepReport(run.step, run.unwrapped, metrics, result, run.optimizer, accelerator.process_index,
                               accelerator.is_main_process))
        write_thoughts_and_checkpoint(run, bar, result)
    bar.close()
    return history


def train_step(run: Run) -> StepResult:
    """One optimiser step: ``grad_accum`` x (batch -> objective -> backward), clip, AdamW."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    terms, sample_ids, n_tokens, grad_norm = [], [], 0, None
    for _ in range(cfg.optim.grad_accum):
        batch = run.data.next_batch()
        sample_ids.append(batch["sample_ids"])
        input_ids = batch["input_ids"].to(accelerator.device)
        mask = batch["attention_mask"].to(accelerator.device)
        n_tokens += int(batch["attention_mask"].sum())
        with run.strategy.accumulate(model):
            with run.policy.autocast(accelerator.device.type):  # ours on every launcher (precision.py says why)
                loss, micro_terms, thought_ids = run.objective(model, input_ids, mask)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            # Every micro-batch, as accelerate's accumulate() pattern wants: its prepared optimizer
            # skips step() and zero_grad() until the accumulation's last micro-batch (sync_gradients).
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        terms.append(micro_terms)
    return StepResult(terms, sample_ids, n_tokens, grad_norm, input_ids, thought_ids)


def log_step(run: Run, bar, result: StepResult, t0: float) -> dict | None:
    """Metrics of a logged step (every ``logging.every`` and the last), to trackers and console; else None."""
    cfg, step, accelerator = run.cfg, run.step, run.accelerator
    if step % cfg.logging.every and step != cfg.optim.steps:
        return None
    metrics = reduce_metrics(accelerator, result, lr=scheduled_lr(cfg, run.scheduler), elapsed=time.perf_counter() - t0)
    accelerator.log(metrics, step=step)
    print_step(bar, step, cfg.optim.steps, metrics, accelerator.is_main_process)
    return metrics


def write_thoughts_and_checkpoint(run: Run, bar, result: StepResult) -> None:
    cfg, step, accelerator = run.cfg, run.step, run.accelerator
    every = cfg.logging.thoughts_every
    if result.thought_ids is not None and every and step % every == 0 and accelerator.is_main_process:
        dump_thoughts(accelerator, bar, run.tokenizer, result, step, run.out_dir, cfg.logging.n_thoughts,
                      run.unwrapped.config.n_passes)
    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
        save_checkpoint(run.strategy, run.out_dir, step=step, model=run.model, optimizer=run.optimizer,
                        scheduler=run.scheduler, data_state={**run.data.state_dict(), "grad_accum": cfg.optim.grad_accum},
                        config_yaml=run.config_yaml, keep=cfg.checkpoint.keep)


# ---------------------------------------------------------------------- export


def export_model(run: Run) -> Path:
    """``save_pretrained`` the FULL model (gathered under FSDP / ZeRO-3) into ``output_dir/final``.

    A LoRA run first saves its adapters, head and delimiters to ``output_dir/final_lora``, then merges
    the adapters into the base weights in place (export is the run's last use of the model), so
    ``final`` is a plain checkpoint either way."""
    from tqdm.auto import tqdm

    accelerator, export_dir = run.accelerator, run.out_dir / "final"
    accelerator.wait_for_everyone()
    unwrapped = run.unwrapped
    if has_lora(unwrapped):
        if accelerator.is_main_process and isinstance(unwrapped, QuietStarForCausalLM):
            save_lora(unwrapped, run.out_dir / "final_lora", run.tokenizer)
        merge_lora(unwrapped)  # every process: the replicas stay identical
    state_dict = run.strategy.full_state_dict(run.model)
    if accelerator.is_main_process:
        run.unwrapped.save_pretrained(export_dir, state_dict=state_dict, safe_serialization=True)
        run.tokenizer.save_pretrained(export_dir)
        (export_dir / "quietstar_train.yaml").write_text(run.config_yaml, encoding="utf-8")
        tqdm.write(f"exported {export_dir} (rank {accelerator.process_index})")
        sys.stdout.flush()
    return export_dir
