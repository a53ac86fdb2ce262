"""What the model accepts, checked at its boundary: the base model it wraps, the thought settings
``from_base`` takes by name, the tensors of a forward, the sequence length the base model's
positions and window allow, and a tokenizer's thought delimiters. Each check names the problem and
the fix; inside the model the inputs are then assumed valid."""

from __future__ import annotations

import difflib

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration import END_THOUGHT_TOKEN, START_THOUGHT_TOKEN, QuietStarConfig
from .delimiters import ThoughtDelimiterEmbedding
from .window import sliding_window


def check_base_model(base) -> None:
    if not isinstance(base, PreTrainedModel) or base.get_output_embeddings() is None:
        raise TypeError(f"the base model must be a transformers causal LM with an LM head, got {type(base).__name__}")
    if not getattr(base, "_supports_attention_backend", False):
        raise TypeError(
            f"{type(base).__name__} does not route its attention through transformers' AttentionInterface, "
            "so thoughts cannot be injected; Quiet-STaR needs a v5 decoder that does (Llama, Mistral, Qwen2/3, GPT-2, ...)"
        )
    embedding = base.get_input_embeddings()
    if type(embedding) not in (nn.Embedding, ThoughtDelimiterEmbedding):
        raise TypeError(
            f"{type(base).__name__} uses a {type(embedding).__name__} input embedding; only plain nn.Embedding is supported"
        )


def check_thought_settings(names, allowed) -> None:
    """Refuse a ``from_base`` keyword that is no thought setting, with the closest one as a hint."""
    for key in names:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"from_base() got an unknown thought setting {key!r}{hint}")


def check_length_fits(base_config, n_extra_steps: int, L: int) -> None:
    """Refuse ``L`` base tokens whose thought steps need positions past the base model's limit or window."""
    S = n_extra_steps
    max_positions = getattr(base_config, "max_position_embeddings", None)
    if max_positions is not None and L + S > max_positions:
        raise ValueError(
            f"sequence too long: {L} tokens + {S} thought steps (S = N + K + 1) need position ids up to "
            f"{L + S - 1}, but the base model allows {max_positions} positions; use at most {max_positions - S} tokens"
        )
    window = sliding_window(base_config)
    if window is not None and L + S > window:  # L + S <= window: no visible key is out of the window (window.py)
        raise ValueError(
            f"sequence too long for the base model's sliding window: {L} tokens + {S} thought steps (S = N + K + 1) "
            f"span {L + S} positions, but the window is {window}; use at most {window - S} tokens per sequence or fewer thought/talk tokens"
        )


def check_forward_inputs(model, input_ids, attention_mask, labels, thought_ids) -> torch.Tensor:
    """Check a forward's tensors against ``model`` (a ``QuietStarForCausalLM``); returns the attention
    mask (all ones when none was given)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, length] tensor of token ids, got {got}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids has length 0")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}; "
            "labels are unshifted token ids (the model shifts them), -100 to ignore"
        )
    check_length_fits(model.base_lm.config, model.config.n_extra_steps, input_ids.shape[1])
    if thought_ids is not None:
        _check_thought_ids(thought_ids, model.config, input_ids.shape, model.get_output_embeddings().out_features)
    return attention_mask


def _check_thought_ids(thought_ids, config: QuietStarConfig, input_shape, vocab: int) -> None:
    (B, L), P, N = input_shape, config.n_passes, config.n_thought_tokens
    if thought_ids.dim() != 3 or thought_ids.shape[0] not in (B, B * P) or thought_ids.shape[1:] != (L, N):
        raise ValueError(
            f"thought_ids must be [B, L, N] = [{B}, {L}, {N}] or [B * n_passes, L, N] = [{B * P}, {L}, {N}], "
            f"got {tuple(thought_ids.shape)}"
        )
    start_id, end_id = config.thought_token_ids
    if ((thought_ids == start_id) | (thought_ids == end_id)).any():
        raise ValueError(f"thought_ids contain a thought delimiter id ({start_id} or {end_id}); delimiters are not thought tokens")
    if (thought_ids < 0).any() or (thought_ids >= vocab).any():
        raise ValueError(f"thought_ids must be token ids in [0, {vocab})")


# ---------------------------------------------------------------------------------- tokenizer


def add_thought_tokens(tokenizer) -> tuple[int, int]:
    """Add ``<|startthought|>`` / ``<|endthought|>`` as special tokens (if absent); return their ids."""
    tokenizer.add_tokens([START_THOUGHT_TOKEN, END_THOUGHT_TOKEN], special_tokens=True)
    return check_thought_tokens(tokenizer)


def check_thought_tokens(tokenizer, config: QuietStarConfig | None = None) -> tuple[int, int]:
    """Ids of the two delimiters in ``tokenizer``; a clear error if it lacks them (or disagrees with ``config``)."""
    ids = []
    for token in (START_THOUGHT_TOKEN, END_THOUGHT_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(
                f"tokenizer lacks the thought delimiter {token!r}; build the model with "
                "QuietStarForCausalLM.from_base(base, tokenizer=tokenizer), which adds it, or save that tokenizer"
            )
        ids.append(int(token_id))
    if config is not None and tuple(ids) != config.thought_token_ids:
        raise ValueError(f"tokenizer delimiter ids {tuple(ids)} differ from the model's {config.thought_token_ids}")
    return ids[0], ids[1]
