"""AdamW with one parameter group per part of the model, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch

from .config import RunConfig


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_scheduler(optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # Not prepared by accelerate: its scheduler wrapper steps num_processes times per optimiser step.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.optim.steps, cfg.optim.min_lr_ratio))


def scheduled_lr(cfg: RunConfig, scheduler) -> float:
    """optim.lr on the schedule, as logged (each group's lr is that times its part's scale)."""
    return cfg.optim.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)


def parameter_part(name: str) -> str:
    """Which part of a QuietStarForCausalLM a parameter belongs to: "mixing_head", "delimiters" or "base"."""
    if name.startswith("mixing_head.") or ".mixing_head." in name:
        return "mixing_head"
    if name.endswith("delimiter_embeddings"):
        return "delimiters"
    return "base"


def make_optimizer(model, cfg: RunConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW with one group per (part, decayed or not); each part's lr is optim.lr times its scale."""
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
