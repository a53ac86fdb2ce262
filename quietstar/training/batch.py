"""Batch arithmetic: documents (windows) per optimiser step over all processes, and the data budget.

``optim.global_batch`` states the step's documents for the whole run; each launch derives its split:
per process ``global_batch / processes`` documents, as ``grad_accum`` micro-batches of the largest
size <= ``optim.batch_size`` that divides it (``optim.grad_accum`` is then not read). Without it a
step is ``batch_size x grad_accum`` per process, so it grows with the process count.

``data.max_documents`` is a budget: a run that needs more windows than those documents give stops
(at start when the count is known, else when they run out) instead of repeating them.
"""

from __future__ import annotations

import dataclasses

from .config import ConfigError, RunConfig


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # documents (windows) per optimiser step, all processes
    world_size: int
    batch_size: int  # per process per micro-batch
    grad_accum: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def split(self) -> str:
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        return f"{processes} x {self.batch_size} per micro-batch x {self.grad_accum} accumulated"

    def describe(self) -> str:
        return (f"global batch {self.global_batch} documents per optimiser step ({self.split()}), "
                f"{self.tokens_per_step} tokens per step ({self.global_batch} x L {self.seq_len}, padding included)")


def batch_plan(cfg: RunConfig, world_size: int) -> BatchPlan:
    """The split of one optimiser step over ``world_size`` processes; ConfigError if none gives optim.global_batch."""
    o, L = cfg.optim, cfg.data.seq_len
    if o.global_batch is None:
        return BatchPlan(o.batch_size * o.grad_accum * world_size, world_size, o.batch_size, o.grad_accum, L)
    if o.global_batch % world_size:
        fits = [w for w in range(1, o.global_batch + 1) if o.global_batch % w == 0]
        raise ConfigError(f"optim.global_batch {o.global_batch} documents per optimiser step cannot be split evenly over "
                          f"{world_size} processes; launch {', '.join(map(str, fits))} processes, or set optim.global_batch "
                          f"to a multiple of {world_size}")
    per_process = o.global_batch // world_size
    micro = max(b for b in range(1, min(o.batch_size, per_process) + 1) if per_process % b == 0)
    return BatchPlan(o.global_batch, world_size, micro, per_process // micro, L)


def apply_plan(cfg: RunConfig, plan: BatchPlan) -> RunConfig:
    """``cfg`` with the launch's micro-batch and accumulation, which the rest of the run reads."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=plan.batch_size, grad_accum=plan.grad_accum))


def check_budget(cfg: RunConfig, plan: BatchPlan, windows: int | None = None) -> None:
    """Refuse a run that needs more windows than ``data.max_documents`` gives: ``windows`` once the data is
    built, else the documents themselves when each is one window (``data.windows: document``)."""
    d, steps = cfg.data, cfg.optim.steps
    if d.max_documents is None:
        return
    if windows is None and d.windows != "document":
        return  # packed windows are counted once the data is built
    available = d.max_documents if windows is None else windows
    needed = steps * plan.global_batch
    if needed > available:
        what = f"{available} windows of the first {d.max_documents} documents" if windows is not None and d.windows != "document" \
            else f"{available} documents (data.max_documents {d.max_documents}, one window each)"
        raise ConfigError(
            f"optim.steps {steps} x {plan.global_batch} documents per step ({plan.split()}) "
            f"= {needed} windows, but the data budget is {what}; the run would repeat them. Lower optim.steps to "
            f"{available // plan.global_batch}, set optim.global_batch (documents per step, whatever the process count), "
            "or raise data.max_documents")
