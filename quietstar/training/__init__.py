"""Quiet-STaR training: run config, data, checkpoints, the loop and the ``quietstar-train`` CLI."""

from .config import ConfigError, RunConfig, load_config, validate

__all__ = ["ConfigError", "RunConfig", "load_config", "validate", "train"]


def train(cfg: RunConfig) -> dict:
    from .loop import train as _train

    return _train(cfg)
