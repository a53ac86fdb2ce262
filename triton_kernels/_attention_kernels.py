"""The @triton.jit kernels of the fused thought attention, forward (``_attention_fwd.py``) and
backward (``_attention_bwd.py``); launchers and autograd live in attention.py."""

from ._attention_bwd import _attn_bwd_dkdv_base, _attn_bwd_dkdv_extra, _attn_bwd_dq, _bwd_preprocess
from ._attention_fwd import _attn_fwd

__all__ = ["_attn_fwd", "_bwd_preprocess", "_attn_bwd_dkdv_base", "_attn_bwd_dkdv_extra", "_attn_bwd_dq"]
