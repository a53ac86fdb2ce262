"""Triton kernels for quietstar. Knows nothing of transformers or of the quietstar package.

``thought_attention`` is the fused thought-attention kernel (forward + backward; the function -- its
module is ``triton_kernels.attention``); ``is_available`` says, without compiling anything, whether it
can run in this process. ``python -m triton_kernels.compile_check`` builds the kernels for Hopper on a
machine without a GPU and reports registers, spills, shared memory and wgmma use.

Triton decides at *decoration* time whether a kernel is compiled or interpreted, so
``TRITON_INTERPRET=1`` (CPU runs) must be set before this package is first imported.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["is_available", "thought_attention"]


def is_available() -> tuple[bool, str]:
    """(ok, reason): can the Triton kernels run here? Cheap: imports neither triton nor the kernels."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'quietstar[triton]' or pip install triton)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "TRITON_INTERPRET=1: kernels run in the Triton interpreter (slow; for tests)"
    import torch

    if not torch.cuda.is_available():
        return False, (
            "no CUDA device: the Triton kernels need a GPU (or TRITON_INTERPRET=1 set before "
            "triton is imported, for slow CPU tests); use attn_implementation='quietstar_torch'"
        )
    return True, f"CUDA device {torch.cuda.get_device_name()}"


try:
    from .attention import thought_attention
except ImportError as _err:  # triton missing: keep is_available importable, fail on use
    _import_error = _err

    def thought_attention(*args, **kwargs):  # type: ignore[no-redef]
        raise ImportError(f"triton_kernels.thought_attention needs triton: {_import_error}")
