"""The two thought forwards: the hidden states of every step of every thought, ``[B, 1+S, L, H]``.

Step 0 is the base token x_i; steps 1..S are sot, t_1..t_N, eot and the K - 1 fed-back tokens
x_{i+1}..x_{i+K-1} (docs/ALGORITHM.md). ``config.thought_forward`` picks how they are computed:

- ``replay`` (default): sample the thoughts without grad into a KV cache, then feed all 1 + S steps
  again in ONE forward with grad over the flattened ``(1+S)L`` sequence (docs/DESIGN.md, "One training step").
- ``incremental``: sample WITH grad into the KV cache and feed only the remaining steps on top of it.

Both call the base model's decoder (``model.base_lm.base_model``) with the ``thought_layout``
keyword, which the ``quietstar_*`` attention paths read. ``model`` is a ``QuietStarForCausalLM``.
"""

from __future__ import annotations

import torch

from .chunked_log_probs import thought_log_probs_chunked, thought_token_log_probs
from .compat import checkpointed_modules, with_cache
from .layout import ThoughtLayout, step_of
from .losses import shift_ahead
from .sampling import think_step_by_step
from .window import full_kv_cache


def thought_hidden_states(model, input_ids, attention_mask, position_ids, thought_ids=None, generator=None):
    """Hidden states ``[B, 1+S, L, H]`` and the thoughts behind them ``[B, L, N]``: sampled by the
    configured thought forward, or the given ``thought_ids`` replayed (one per row of ``input_ids``,
    or one per row before the ``n_passes`` repeat, then repeated alike)."""
    if thought_ids is None and model.config.thought_forward == "incremental":
        return incremental(model, input_ids, attention_mask, position_ids, generator)
    if thought_ids is None:
        with torch.no_grad():  # the replay feeds every step again with grad
            thought_ids = sample_thoughts(model, input_ids, attention_mask, position_ids, full_kv_cache(), generator)[0]
    elif thought_ids.shape[0] != input_ids.shape[0]:
        thought_ids = thought_ids.repeat_interleave(model.config.n_passes, 0)
    thought_ids = thought_ids.to(input_ids.device)
    return replay(model, input_ids, attention_mask, position_ids, thought_ids), thought_ids


def replay(model, input_ids, attention_mask, position_ids, thought_ids) -> torch.Tensor:
    """One forward with grad over the flattened ``(1+S)L`` sequence -> hidden states ``[B, 1+S, L, H]``.

    Steps: x, sot, t_1..t_N, eot, x_{i+1}..x_{i+K-1} (tokens past the end are placeholders that
    only feed predictions without targets).
    """
    B, L = input_ids.shape
    steps = step_tokens(model.config, input_ids, thought_ids)
    n_steps = len(steps)  # 1 + S
    hidden = model.base_lm.base_model(
        input_ids=torch.cat(steps, dim=1),
        attention_mask=attention_mask.repeat(1, n_steps),
        position_ids=torch.cat([position_ids + s for s in range(n_steps)], dim=1),
        use_cache=False,
        thought_layout=ThoughtLayout(L, attention_mask.bool()),
    ).last_hidden_state
    return hidden.view(B, n_steps, L, hidden.shape[-1])


def incremental(model, input_ids, attention_mask, position_ids, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``incremental`` thought forward: sample WITH grad into a KV cache, no replay.

    Steps 0..N are fed one call each (sampling t_1..t_N on the way, as the replay's no-grad
    sampling does), then t_N, eot and the K - 1 fed-back tokens in one call over the cache. Same hidden
    states as :func:`replay` on the sampled thoughts (to rounding), without feeding the N + 1
    sampling steps twice; the cost is N + 2 smaller calls in forward and backward, and every
    call's keys so far kept for backward. Returns (hidden ``[B, 1+S, L, H]``, thought ids ``[B, L, N]``).
    """
    cfg, decoder = model.config, model.base_lm.base_model
    if torch.is_grad_enabled() and checkpointed_modules(decoder):
        raise ValueError(
            "thought_forward='incremental' keeps the KV cache in autograd, which gradient checkpointing "
            "cannot recompute; set thought_forward='replay' (the default) or turn gradient checkpointing off"
        )
    B, L = input_ids.shape
    N, n_steps = cfg.n_thought_tokens, 1 + cfg.n_extra_steps
    cache = full_kv_cache()
    thought_ids, sampled_hidden = sample_thoughts(model, input_ids, attention_mask, position_ids, cache, generator)
    rest = step_tokens(cfg, input_ids, thought_ids)[N + 1 :]  # t_N, eot, x_{i+1}..x_{i+K-1}
    rest_hidden = decoder(
        input_ids=torch.cat(rest, dim=1),
        attention_mask=attention_mask.repeat(1, n_steps),
        position_ids=torch.cat([position_ids + s for s in range(N + 1, n_steps)], dim=1),
        use_cache=True,
        thought_layout=ThoughtLayout(L, attention_mask.bool()),
        **with_cache(cache),
    ).last_hidden_state
    hidden = torch.cat([torch.stack(sampled_hidden, dim=1), rest_hidden.view(B, len(rest), L, -1)], dim=1)
    return hidden, thought_ids


def sample_thoughts(model, input_ids, attention_mask, position_ids, cache, generator):
    """:func:`think_step_by_step` with ``model``'s decoder, head and thought settings."""
    cfg = model.config
    return think_step_by_step(
        model.base_lm.base_model,
        model.get_output_embeddings(),
        input_ids,
        attention_mask,
        position_ids,
        cache,
        n_thought_tokens=cfg.n_thought_tokens,
        start_thought_id=cfg.start_thought_token_id,
        temperature=cfg.thought_temperature,
        banned_ids=model.banned_token_ids,
        generator=generator,
    )


def step_tokens(config, input_ids, thought_ids) -> list[torch.Tensor]:
    """The 1 + S steps' tokens, each ``[B, L]``: x, sot, t_1..t_N, eot, x_{i+1}..x_{i+K-1}."""
    start = torch.full_like(input_ids, config.start_thought_token_id)
    end = torch.full_like(input_ids, config.end_thought_token_id)
    future = shift_ahead(input_ids, config.n_talk_tokens, fill=0)[:, :, 1:].unbind(-1)  # x_{i+k}, k = 1..K-1
    return [input_ids, start, *thought_ids.unbind(-1), end, *future]


def thought_log_probs(model, hidden: torch.Tensor, thought_ids: torch.Tensor, chunked: bool = False) -> torch.Tensor:
    """log pi(t_j) at the REINFORCE temperature, delimiters excluded: ``[B, L, N]``.

    The hidden state at step j (sot for j = 1) predicts t_j. Unchunked, one step at a time: each
    step's ``[B, L, V]`` logits stay in autograd's saved tensors; ``chunked``, nothing V wide is
    saved (``config.logits_chunk_elements`` logits at a time, recomputed in backward).
    """
    cfg, lm_head, banned = model.config, model.get_output_embeddings(), model.banned_token_ids
    N, first = cfg.n_thought_tokens, step_of.start_thought
    if chunked:
        return thought_log_probs_chunked(lm_head, hidden[:, first : first + N], thought_ids,
                                         cfg.reinforce_temperature, banned, cfg.logits_chunk_elements)
    log_probs = [
        thought_token_log_probs(lm_head(hidden[:, first + j]), thought_ids[..., j], cfg.reinforce_temperature, banned)
        for j in range(N)
    ]
    return torch.stack(log_probs, dim=-1)
