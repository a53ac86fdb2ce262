"""Differences between the supported transformers versions (5.17 <= v < 6), in one place.

transformers 5.18+ renamed the KV cache everywhere from ``past_key_values`` to ``cache``: the
decoder's forward keyword, the field of its outputs, the ``generate()`` model kwarg and the field of
``GenerateDecoderOnlyOutput``. Newer versions still accept ``past_key_values=`` with a deprecation
warning, older ones know only that name, so quietstar always uses the name the installed version
defines (:data:`CACHE_KWARG`). Everything else quietstar uses has the same spelling from 5.17 on;
the nested config is declared with the ``sub_configs`` class attribute that both versions read
(see ``quietstar/configuration.py``).
"""

from __future__ import annotations

import dataclasses

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


def check_transformers_version(version: str = transformers.__version__) -> None:
    """A clear error on a transformers older than the tested lower bound (import-time guard)."""
    if Version(version).release < Version(MIN_TRANSFORMERS).release:  # 5.17.0.dev0 counts as 5.17
        raise ImportError(
            f"quietstar needs transformers >= {MIN_TRANSFORMERS}, found {version}; "
            f"upgrade with: pip install 'transformers>={MIN_TRANSFORMERS},<6'"
        )


check_transformers_version()

__all__ = ["CACHE_KWARG", "MIN_TRANSFORMERS", "with_cache", "cache_of", "check_transformers_version"]
