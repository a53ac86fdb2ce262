"""What a run reports: metrics reduced over processes, the console line, trackers, decoded thoughts."""

from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path

import torch

from ..thought_text import sample_thoughts_text
from .config import RunConfig
from .config_loading import to_dict
from .sharding import full_tensor

CONSOLE_TERMS = ("loss", "nll_base", "nll_talk", "policy_loss", "reward_mean", "advantage_mean", "mixing_weight_mean",
                 "n_thought_tokens", "kl", "nll", "teacher_nll", "grad_norm", "lr", "tokens_per_s", "peak_memory_mb")


class Reporter:
    """The run's reports as the loop calls them: ``log(step, ...)`` after every step (it logs every
    ``logging.every`` and the last), ``thoughts(step, ...)`` (every ``logging.thoughts_every``), ``close()``."""

    def __init__(self, accelerator, cfg: RunConfig, tokenizer, first_step: int):
        from tqdm.auto import tqdm

        self.accelerator, self.cfg, self.tokenizer, self.out_dir = accelerator, cfg, tokenizer, Path(cfg.output_dir)
        start_trackers(accelerator, cfg)
        self.bar = tqdm(total=cfg.optim.steps, initial=first_step, dynamic_ncols=True, desc=cfg.name,
                        disable=not (accelerator.is_main_process and cfg.logging.progress_bar))

    def log(self, step: int, result, lr: float, t0: float) -> dict | None:
        """Metrics of a logged step, to trackers and console; None on the other steps."""
        cfg, accelerator, metrics = self.cfg, self.accelerator, None
        if step % cfg.logging.every == 0 or step == cfg.optim.steps:
            metrics = reduce_metrics(accelerator, result, lr=lr, elapsed=time.perf_counter() - t0)
            accelerator.log(metrics, step=step)
            print_step(self.bar, step, cfg.optim.steps, metrics, accelerator.is_main_process)
        self.bar.update(1)
        return metrics

    def thoughts(self, step: int, result, model) -> None:
        """A few decoded thoughts of the step (``model``: the unwrapped model, for its n_passes)."""
        every = self.cfg.logging.thoughts_every
        if result.thought_ids is not None and every and step % every == 0 and self.accelerator.is_main_process:
            dump_thoughts(self.accelerator, self.bar, self.tokenizer, result, step, self.out_dir, self.cfg.logging.n_thoughts,
                          model.config.n_passes)

    def close(self) -> None:
        self.bar.close()


def start_trackers(accelerator, cfg: RunConfig) -> None:
    """accelerate's trackers (tensorboard, wandb) with the run config flattened into scalars."""
    if cfg.logging.trackers:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in _flatten(to_dict(cfg)).items()}
        accelerator.init_trackers(cfg.logging.project, config=flat)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


def reduce_metrics(accelerator, result, lr: float, elapsed: float) -> dict:
    """A step's loss terms averaged over micro-batches and processes, grad norm, lr, throughput: one host sync."""
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


def print_step(bar, step: int, total: int, metrics: dict, main_process: bool) -> None:
    """Progress-bar summary and one console line per logged step (every term goes to the trackers)."""
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", base=f"{metrics.get('nll_base', float('nan')):.3f}",
                    talk=f"{metrics.get('nll_talk', float('nan')):.3f}", tok_s=f"{metrics['tokens_per_s']:.3g}")
    if main_process:
        bar.write(f"step {step}/{total} " + " ".join(f"{k} {metrics[k]:.4g}" for k in CONSOLE_TERMS if k in metrics))


def dump_thoughts(accelerator, bar, tokenizer, result, step: int, out_dir: Path, n: int, n_passes: int) -> None:
    """A few decoded thoughts of the step's last micro-batch: console, output_dir/thoughts.txt, tensorboard."""
    lines = sample_thoughts_text(tokenizer, result.input_ids.cpu(), result.thought_ids.cpu(), n, n_passes)
    text = f"step {step}\n" + "\n".join(lines)
    bar.write(text)
    with open(out_dir / "thoughts.txt", "a", encoding="utf-8") as handle:
        handle.write(text + "\n")
    with contextlib.suppress(Exception):  # a tracker without text support just skips it
        accelerator.get_tracker("tensorboard", unwrap=True).add_text("thoughts", "\n\n".join(lines), step)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
