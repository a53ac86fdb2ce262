"""Quiet-STaR training: run config, data, checkpoints, the loop and the ``quietstar-train`` CLI."""

from .config import ConfigError, RunConfig
from .config_checks import validate
from .config_loading import load_config

__all__ = ["ConfigError", "RunConfig", "load_config", "validate", "train"]


def train(cfg: RunConfig, on_step=None, **hooks) -> dict:
    """``loop.train`` (imported on first use: the loop pulls in accelerate)."""
    from .loop import train as _train

    return _train(cfg, on_step, **hooks)
