"""Differences between the supported transformers versions (5.17 <= v < 6), in one place.

- The KV cache's name: newer versions call it ``cache`` everywhere (the decoder's forward keyword,
  the field of its outputs, the ``generate()`` model kwarg, ``GenerateDecoderOnlyOutput``); 5.17
  calls it ``past_key_values``. Newer versions still accept the old keyword with a deprecation
  warning, but an unknown keyword is silently swallowed by a decoder's ``**kwargs``, so quietstar
  always uses the name the installed version defines (:data:`CACHE_KWARG`).
- Gradient checkpointing: 5.17 drops the KV cache of a checkpointed module in training mode even
  when no gradient is being recorded (newer versions check ``torch.is_grad_enabled()``), which
  would make the sampling loop run without its cache: :func:`kv_cache_kept`.
- The nested base config is declared with the plain ``sub_configs`` class attribute, which every
  supported version reads (newer ones also offer ``sub_configs_defaults``/``SubConfigSpec``, absent
  from 5.17); ``QuietStarConfig.__post_init__`` builds the nested config itself.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import transformers
from packaging.version import Version
from transformers.modeling_outputs import BaseModelOutputWithPast

MIN_TRANSFORMERS = "5.17.0"

# Decided from what the installed version defines, not from its version string.
CACHE_KWARG = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


def with_cache(cache) -> dict:
    """The keyword arguments that hand ``cache`` to a decoder's forward: ``decoder(..., **with_cache(c))``."""
    return {CACHE_KWARG: cache}


def cache_of(outputs_or_kwargs):
    """The KV cache held by a model output or a ``generate()`` ``model_kwargs`` dict (None if absent)."""
    if isinstance(outputs_or_kwargs, dict):
        return outputs_or_kwargs.get(CACHE_KWARG)
    return getattr(outputs_or_kwargs, CACHE_KWARG, None)


def checkpointed_modules(model) -> list:
    """The modules of ``model`` with gradient checkpointing switched on (the flag every version sets)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextlib.contextmanager
def kv_cache_kept(model):
    """Keep the KV cache of ``model`` working without grad while gradient checkpointing is on.

    Without grad there is no backward to replay, so checkpointing has nothing to do; it is switched
    off on every module for the duration (and restored), which newer versions do by themselves.
    """
    switched = []
    if not torch.is_grad_enabled():
        switched = checkpointed_modules(model)
    for module in switched:
        module.gradient_checkpointing = False
    try:
        yield model
    finally:
        for module in switched:
            module.gradient_checkpointing = True


def check_transformers_version(version: str = transformers.__version__) -> None:
    """A clear error on a transformers older than the tested lower bound (import-time guard)."""
    if Version(version).release < Version(MIN_TRANSFORMERS).release:  # 5.17.0.dev0 counts as 5.17
        raise ImportError(
            f"quietstar needs transformers >= {MIN_TRANSFORMERS}, found {version}; "
            f"upgrade with: pip install 'transformers>={MIN_TRANSFORMERS},<6'"
        )


check_transformers_version()

__all__ = ["CACHE_KWARG", "MIN_TRANSFORMERS", "with_cache", "cache_of", "checkpointed_modules", "kv_cache_kept", "check_transformers_version"]
