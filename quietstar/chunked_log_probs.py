"""Target and thought log-probabilities straight from hidden states, a chunk of rows at a time.

At a real vocabulary the LM head's outputs dominate a training step's memory: the talk, shifted
base and mixed logits are each ``[B, L, K, V]`` (plus the fp32 log-softmax copies autograd keeps),
and the N thought steps each keep a ``[B, L, V]`` logits tensor for backward. Here every chunk of
rows runs hidden -> ``lm_head`` -> (mix) -> log-softmax -> gather inside
``torch.utils.checkpoint``: autograd keeps only the chunk's inputs (hidden states, H wide instead
of V) and recomputes the chunk's logits in backward, so at most one chunk's logits are live.

Each row goes through the same functions as the full-tensor path in ``modeling.py``
(``mix_logits``, ``target_log_probs``, ``thought_token_log_probs``), so the two agree to fp32
rounding (tests/test_chunked_log_probs.py).

Why checkpoint rather than a hand-written ``autograd.Function`` with the gradient formula written
out (Liger-Kernel's fused linear cross-entropy): ``lm_head`` stays a module call, so a bias, tied
weights, LoRA adapters and FSDP / ZeRO-3 parameter hooks keep working. A Liger-style backward
would also recompute each chunk's logits here: Liger avoids that by computing the gradient during
the forward, which needs each log-prob's loss coefficient up front, and the policy term's
coefficients (the advantages) exist only once every chunk's rewards are known.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from .configuration import DEFAULT_LOGITS_CHUNK_ELEMENTS
from .losses import mix_logits, target_log_probs
from .sampling import ban_tokens

# DEFAULT_LOGITS_CHUNK_ELEMENTS (configuration.py), elements of the largest per-chunk logits tensor:
# 16M = 64 MiB in fp32. A chunk keeps a handful of such tensors live (logits, mix, fp32 log-softmax,
# their gradients), so a few hundred MiB at any vocabulary, against GBs for the full tensors; 341
# rows per LM-head matmul at V = 49152, 110 at V = 152k: large enough that the head's matmuls stay
# efficient.


def thought_token_log_probs(logits: torch.Tensor, thought_ids: torch.Tensor, temperature: float, banned_ids) -> torch.Tensor:
    """log pi(t) for logits ``[..., V]`` and ids ``[...]``: log-softmax of ``logits / temperature`` in
    fp32, delimiters excluded (ALGORITHM.md, "Policy loss")."""
    logits = ban_tokens(logits.float() / temperature, banned_ids)
    return torch.log_softmax(logits, -1).gather(-1, thought_ids[..., None]).squeeze(-1)


def target_log_probs_chunked(
    lm_head,
    base_hidden: torch.Tensor,
    talk_hidden: torch.Tensor,
    mixing_weights: torch.Tensor,
    targets: torch.Tensor,
    chunk_elements: int = DEFAULT_LOGITS_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~quietstar.losses.target_log_probs` of the base and mixed predictions, chunked over positions.

    base_hidden ``[B, L, H]``, talk_hidden ``[B, L, K, H]``, mixing_weights ``[B, L, K]``, targets
    ``[B, L, K]`` -> ``(base_lp [B, L], mixed_lp [B, L, K])``. A chunk holds C positions of all B rows
    (its talk and mixed logits are ``[B, C, K, V]``, at most ``chunk_elements``) plus the base logits of
    the K-1 positions after it, which its mixed predictions need (recomputed: K-1 rows per chunk).
    """
    B, L, K = targets.shape
    vocab = _vocab_size(lm_head)
    positions = max(1, chunk_elements // (B * K * vocab))
    chunk = functools.partial(_target_chunk, lm_head)
    base_lp, mixed_lp = [], []
    for start in range(0, L, positions):
        end = min(L, start + positions)
        ahead = min(L, end + K - 1)  # base positions i+k, k < K, of the chunk's last i
        base, mixed = _run(chunk, base_hidden[:, start:ahead], talk_hidden[:, start:end],
                           mixing_weights[:, start:end], targets[:, start:end])
        base_lp.append(base)
        mixed_lp.append(mixed)
    return torch.cat(base_lp, dim=1), torch.cat(mixed_lp, dim=1)


def thought_log_probs_chunked(
    lm_head,
    step_hidden: torch.Tensor,
    thought_ids: torch.Tensor,
    temperature: float,
    banned_ids,
    chunk_elements: int = DEFAULT_LOGITS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """log pi(t_j) of every thought token, chunked over rows: ``[B, L, N]``.

    step_hidden ``[B, N, L, H]``: the hidden states of the steps that predict t_1..t_N (sot, t_1, ...,
    t_{N-1}; step-major as the replay returns them); thought_ids ``[B, L, N]``. A chunk is at most
    ``chunk_elements // V`` of the ``B N L`` rows.
    """
    B, N, L, H = step_hidden.shape
    rows = step_hidden.reshape(B * N * L, H)  # a copy (the steps are a slice of the replay): H wide, cheap
    ids = thought_ids.transpose(1, 2).reshape(B * N * L)
    per_chunk = max(1, chunk_elements // _vocab_size(lm_head))
    chunk = functools.partial(_thought_chunk, lm_head, temperature, tuple(banned_ids))
    log_probs = [_run(chunk, rows[start : start + per_chunk], ids[start : start + per_chunk])
                 for start in range(0, rows.shape[0], per_chunk)]
    return torch.cat(log_probs).view(B, N, L).transpose(1, 2)


def _target_chunk(lm_head, base_hidden_ahead, talk_hidden, mixing_weights, targets):
    positions = talk_hidden.shape[1]
    base_logits = lm_head(base_hidden_ahead)  # [B, C + K - 1 (fewer at the end), V]
    mixed_logits = mix_logits(base_logits, lm_head(talk_hidden), mixing_weights)  # [B, C, K, V]
    return target_log_probs(base_logits[:, :positions], mixed_logits, targets)


def _thought_chunk(lm_head, temperature, banned_ids, hidden_rows, thought_ids):
    return thought_token_log_probs(lm_head(hidden_rows), thought_ids, temperature, banned_ids)


def _run(chunk_fn, *inputs):
    """``chunk_fn(*inputs)``, keeping only ``inputs`` for backward when autograd records (the logits
    are recomputed there). Nothing inside draws random numbers, so no RNG state is saved."""
    if not torch.is_grad_enabled():
        return chunk_fn(*inputs)
    return checkpoint(chunk_fn, *inputs, use_reentrant=False, preserve_rng_state=False)


def _vocab_size(lm_head) -> int:
    return lm_head.weight.shape[0]
