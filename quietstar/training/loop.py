"""The training loop: one process of a (possibly distributed) Quiet-STaR run, in four phases.

    setup   launch (batch split, accelerator, sharding strategy) -> model, tokenizer -> data
            -> AdamW + warmup/cosine -> strategy.prepare
    resume  the newest (or the named) checkpoint, if any (checkpoint.Checkpointer)
    steps   for each optimiser step: [before_step] -> grad_accum x (batch -> objective -> backward)
            -> clip -> AdamW -> log -> [on_step] -> [thoughts] -> [checkpoint]
    export  the full model, save_pretrained into output_dir/final (checkpoint.Checkpointer)

Runs in-process on one device, or under ``accelerate launch`` / ``torchrun`` (DDP, FSDP2, DeepSpeed
ZeRO-3 through accelerate, FSDP2 on CPU processes): ``strategy.py`` owns how the model is held, so
nothing here depends on the launch.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import yaml

from .batch import apply_plan, batch_plan, check_budget
from .checkpoint import Checkpointer
from .config import RunConfig
from .config_checks import validate
from .config_loading import to_dict
from .data import build_dataset
from .models import build_run_model, build_stage_run
from .objective_builtin import builtin_objective, scheduled
from .optimizer import make_optimizer, make_scheduler, scheduled_lr
from .precision import PrecisionPolicy
from .reporting import Reporter
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
    checkpointer: Checkpointer
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
    run.step = run.checkpointer.resume()
    before_step = scheduled(run.cfg, before_step)
    history = run_steps(run, on_step, before_step)
    if run.cfg.thought.schedule is not None:  # the export carries the last stage's N, even after a no-op resume
        run.cfg.thought.schedule.before_step(run.cfg.optim.steps - 1, run.unwrapped)
    export_dir = run.checkpointer.export() if run.cfg.checkpoint.export else None
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


def setup(cfg: RunConfig, objective=None) -> Run:
    """Launch, model, data, optimiser and schedule, prepared by the strategy; the output folder."""
    cfg, plan, policy, strategy = launch(cfg)
    accelerator = strategy.accelerator
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "config.yaml").write_text(config_yaml, encoding="utf-8")
    if cfg.stage is not None:  # a plain student; the frozen teacher lives in the objective
        model, tokenizer, objective = build_stage_run(cfg, policy, accelerator.device)
    else:
        model, tokenizer = build_run_model(cfg, policy)
    data = build_dataset(cfg.data, tokenizer, batch_size=cfg.optim.batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, seed=cfg.seed)
    check_budget(cfg, plan, windows=len(data) if hasattr(data, "__len__") else None)
    model = strategy.shard(model)
    optimizer = make_optimizer(model, cfg, accelerator.device.type)
    scheduler = make_scheduler(optimizer, cfg)
    model, optimizer = strategy.prepare(model, optimizer)
    torch.manual_seed(cfg.seed + 1 + accelerator.process_index)  # thought sampling differs across processes
    checkpointer = Checkpointer(strategy, cfg, model=model, optimizer=optimizer, scheduler=scheduler, data=data,
                                tokenizer=tokenizer, config_yaml=config_yaml)
    return Run(cfg, strategy, policy, model, tokenizer, data, optimizer, scheduler, objective or builtin_objective(cfg),
               checkpointer)


# ---------------------------------------------------------------------- steps


def run_steps(run: Run, on_step, before_step) -> list[dict]:
    """Optimiser steps until ``optim.steps``; returns the logged metrics."""
    cfg, accelerator = run.cfg, run.accelerator
    reporter = Reporter(accelerator, cfg, run.tokenizer, first_step=run.step)
    history = []
    run.model.train()
    while run.step < cfg.optim.steps:
        if before_step is not None:
            before_step(run.step + 1, run.unwrapped)
        t0 = time.perf_counter()
        result = train_step(run)
        run.scheduler.step()
        run.step += 1
        metrics = reporter.log(run.step, result, scheduled_lr(cfg, run.scheduler), t0)
        if metrics is not None:
            history.append({"step": run.step, **metrics})
        if on_step is not None:
            on_step(StepReport(run.step, run.unwrapped, metrics, result, run.optimizer, accelerator.process_index,
                               accelerator.is_main_process))
        reporter.thoughts(run.step, result, run.unwrapped)
        run.checkpointer.save(run.step)
    reporter.close()
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
