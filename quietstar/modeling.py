"""``QuietStarForCausalLM``: any transformers-v5 causal LM that thinks before every token.

The base model's modeling code is untouched: thoughts work through the attention interface
(``quietstar_*`` names), position ids and the ``thought_layout`` keyword. One forward is::

    sample thoughts (no grad, cached)  ->  replay (one forward with grad over (1+S)L tokens)
    ->  base / talk logits  ->  mixing head  ->  NLL terms, rewards, REINFORCE  ->  loss

(``config.thought_forward="incremental"`` replaces the first two stages by sampling with grad
into the KV cache; the rest is the same.)
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .attention import TORCH, check_attention_name, register_attention_paths
from .chunked_log_probs import target_log_probs_chunked, thought_log_probs_chunked, thought_token_log_probs
from .compat import checkpointed_modules, with_cache
from .configuration import END_THOUGHT_TOKEN, START_THOUGHT_TOKEN, QuietStarConfig
from .delimiters import ThoughtDelimiterEmbedding
from .generation import ThinkingGenerationMixin
from .layout import ThoughtLayout, base_position_ids, step_of
from .losses import mix_logits, quietstar_loss, shift_ahead, talk_targets, target_log_probs, thought_rewards
from .mixing import DEFAULT_INIT_STD, MixingHead
from .sampling import think_step_by_step
from .window import full_kv_cache, sliding_window

register_attention_paths()


@dataclass
class QuietStarOutput(ModelOutput):
    """Outputs of :meth:`QuietStarForCausalLM.forward`; batch is ``B * n_passes`` (passes adjacent).

    The four logits tensors are ``None`` under ``forward(..., return_logits=False)``; the per-target
    log-probs are there either way.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, L, V]     mixed prediction of x_{i+1}
    base_logits: torch.Tensor | None = None  # [B, L, V]     base prediction of x_{i+1}
    talk_logits: torch.Tensor | None = None  # [B, L, K, V]  post-thought prediction of x_{i+1+k}
    mixed_logits: torch.Tensor | None = None  # [B, L, K, V]  mixed prediction of x_{i+1+k}
    base_log_probs: torch.Tensor | None = None  # [B, L]     log p_base(x_{i+1}); 0 where no target
    mixed_log_probs: torch.Tensor | None = None  # [B, L, K]  log p_mixed(x_{i+1+k}); 0 where no target
    mixing_weights: torch.Tensor | None = None  # [B, L, K]
    thought_ids: torch.Tensor | None = None  # [B, L, N]
    rewards: torch.Tensor | None = None  # [B, L]  r_i before the baseline
    advantages: torch.Tensor | None = None  # [B, L]  after baseline and clamp (with labels only)
    loss_terms: dict | None = None  # detached 0-d tensors: nll_base, nll_talk, policy_loss, ...


class QuietStarForCausalLM(ThinkingGenerationMixin, PreTrainedModel, GenerationMixin):
    config_class = QuietStarConfig
    supports_gradient_checkpointing = True
    _supports_attention_backend = True

    def __init__(self, config: QuietStarConfig, base_lm: PreTrainedModel | None = None):
        super().__init__(config)
        register_attention_paths()
        attn = check_attention_name(config.thought_attn_implementation)
        if base_lm is None:
            base_lm = AutoModelForCausalLM.from_config(copy.deepcopy(config.base_config), attn_implementation=attn)
        _check_base_model(base_lm)
        base_lm.set_attn_implementation(attn)
        self.base_lm = base_lm
        self.config.base_config = base_lm.config  # one object: the base config the base model runs with
        start_id, end_id = config.thought_token_ids
        embedding = base_lm.get_input_embeddings()
        if not isinstance(embedding, ThoughtDelimiterEmbedding):
            wrapped = ThoughtDelimiterEmbedding(embedding, start_id, end_id, config.embedding_scale)
            wrapped._is_hf_initialized = True  # holds the base model's own table: post_init must not re-initialise it
            base_lm.set_input_embeddings(wrapped)
        hidden = embedding.embedding_dim
        init_std = getattr(base_lm.config, "initializer_range", None) or DEFAULT_INIT_STD  # the base model's own init
        self.mixing_head = MixingHead(hidden, config.mixing_head_activation, init_std).to(
            device=embedding.weight.device, dtype=embedding.weight.dtype
        )
        self.post_init()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(cls, base_model_or_path, tokenizer=None, **thought_kwargs) -> "QuietStarForCausalLM":
        """Wrap a causal LM (a model or a path/hub id) with Quiet-STaR; base weights are kept as they are.

        ``thought_kwargs`` are :class:`QuietStarConfig` fields by name (``n_thought_tokens``,
        ``n_talk_tokens``, ``n_passes``, ...); ``attn_implementation`` picks the thought attention path;
        ``lora=peft.LoraConfig(...)`` freezes the base weights and trains adapters (quietstar/lora.py).
        With a ``tokenizer`` the two delimiter tokens are added to it and their ids used; without,
        the ids are the two rows past the embedding table.
        """
        attn = check_attention_name(thought_kwargs.pop("attn_implementation", TORCH))
        lora = thought_kwargs.pop("lora", None)
        allowed = {f.name for f in fields(QuietStarConfig)} - {"base_config", "start_thought_token_id", "end_thought_token_id"}
        for key in thought_kwargs:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"from_base() got an unknown thought setting {key!r}{hint}")
        if isinstance(base_model_or_path, (str, os.PathLike)):
            if os.path.sep in str(base_model_or_path) and not os.path.exists(base_model_or_path):
                raise FileNotFoundError(f"base model path {str(base_model_or_path)!r} does not exist")
            base = AutoModelForCausalLM.from_pretrained(base_model_or_path, attn_implementation=attn)
        elif isinstance(base_model_or_path, PreTrainedModel):
            base = base_model_or_path
        else:
            raise TypeError(f"from_base expects a transformers causal LM or a path, got {type(base_model_or_path).__name__}")
        _check_base_model(base)
        embedding = base.get_input_embeddings()
        if tokenizer is not None:
            start_id, end_id = add_thought_tokens(tokenizer)
            init_ids = tokenizer("---", add_special_tokens=False)["input_ids"]
            init_ids = [i for i in init_ids if i < embedding.num_embeddings] or list(range(embedding.num_embeddings))
        else:
            start_id, end_id = embedding.num_embeddings, embedding.num_embeddings + 1
            init_ids = list(range(embedding.num_embeddings))
        config = QuietStarConfig(
            base_config=base.config,
            start_thought_token_id=start_id,
            end_thought_token_id=end_id,
            thought_attn_implementation=attn,
            **thought_kwargs,
        )
        model = cls(config, base_lm=base)
        with torch.no_grad():  # delimiters start as the embedding of "---" (docs/ALGORITHM.md)
            init = embedding.weight[torch.tensor(init_ids, device=embedding.weight.device)].mean(0)
            model.delimiter_embedding.init_delimiters(init)
        if lora is not None:
            from .lora import apply_lora

            apply_lora(model, lora)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        from .lora import check_no_adapters  # adapter layers rename the base weights: not a loadable checkpoint

        check_no_adapters(self, "save_pretrained")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        # Only our own head; the base model's modules are initialised (or loaded) by the base model.
        if isinstance(module, MixingHead):
            module.reset_parameters()

    @property
    def delimiter_embedding(self) -> ThoughtDelimiterEmbedding:
        return self.base_lm.get_input_embeddings()

    def get_input_embeddings(self):
        return self.base_lm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.base_lm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.base_lm.get_output_embeddings()

    def set_attn_implementation(self, attn_implementation, **kwargs):
        """Switch the thought attention path (``quietstar_torch``, ``quietstar_triton``, ``quietstar_reference``)."""
        name = check_attention_name(attn_implementation)
        self.base_lm.set_attn_implementation(name)
        self.config.thought_attn_implementation = name

    @property
    def banned_token_ids(self) -> tuple[int, ...]:
        """Delimiter ids that the LM head can produce (ids past the head's width cannot be emitted)."""
        vocab = self.get_output_embeddings().out_features
        return tuple(i for i in self.config.thought_token_ids if i < vocab)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        thought_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> QuietStarOutput:
        """Think at every position of ``input_ids`` ``[B, L]``; see :class:`QuietStarOutput`.

        ``labels`` ``[B, L]`` (HF convention: the model shifts; -100 ignored) switch on the loss.
        ``thought_ids`` ``[B, L, N]`` or ``[B * n_passes, L, N]`` replace sampling.
        ``return_logits=False`` is the memory-light forward for training and scoring: no ``[B, L, V]``
        or ``[B, L, K, V]`` logits are kept or returned (the four logits fields are ``None``); the
        loss, rewards and ``base_log_probs`` / ``mixed_log_probs`` are computed from the hidden states
        ``config.logits_chunk_elements`` logits at a time, the same values to fp32 rounding.
        The log-probs (like the rewards) are detached when no ``labels`` are given.
        """
        cfg = self.config
        P, N, K = cfg.n_passes, cfg.n_thought_tokens, cfg.n_talk_tokens
        attention_mask = self._check_inputs(input_ids, attention_mask, labels, thought_ids)
        input_ids, attention_mask = input_ids.repeat_interleave(P, 0), attention_mask.repeat_interleave(P, 0)
        position_ids = base_position_ids(attention_mask)
        lm_head = self.get_output_embeddings()

        if thought_ids is None and cfg.thought_forward == "incremental":
            hidden, thought_ids = self.incremental(input_ids, attention_mask, position_ids, generator)
        else:
            if thought_ids is None:
                with torch.no_grad():  # the replay feeds every step again with grad (DESIGN.md section 4)
                    cache = full_kv_cache()
                    thought_ids = self._think_step_by_step(input_ids, attention_mask, position_ids, cache, generator)[0]
            elif thought_ids.shape[0] != input_ids.shape[0]:
                thought_ids = thought_ids.repeat_interleave(P, 0)
            thought_ids = thought_ids.to(input_ids.device)
            hidden = self.replay(input_ids, attention_mask, position_ids, thought_ids)  # [B, 1+S, L, H]
        base_hidden = hidden[:, 0]  # [B, L, H]
        talk_hidden = hidden[:, step_of.talk(N, 0) : step_of.talk(N, K - 1) + 1].transpose(1, 2)  # [B, L, K, H]
        # w for (i, k) mixes the post-thought state with the base state at i+k, which predicts the same token.
        mixing_weights = self.mixing_head(shift_ahead(base_hidden, K), talk_hidden)  # [B, L, K]
        targets = talk_targets(input_ids if labels is None else labels.repeat_interleave(P, 0), attention_mask, K)

        base_logits = talk_logits = mixed_logits = None
        if return_logits:
            base_logits = lm_head(base_hidden)  # [B, L, V]
            talk_logits = lm_head(talk_hidden)  # [B, L, K, V]
            mixed_logits = mix_logits(base_logits, talk_logits, mixing_weights)  # [B, L, K, V]
        with torch.set_grad_enabled(torch.is_grad_enabled() and labels is not None):  # scores only, without labels
            if return_logits:
                base_lp, mixed_lp = target_log_probs(base_logits, mixed_logits, targets)
            else:
                base_lp, mixed_lp = target_log_probs_chunked(
                    lm_head, base_hidden, talk_hidden, mixing_weights, targets, cfg.logits_chunk_elements
                )

        loss = advantages = loss_terms = None
        if labels is not None:
            loss, rewards, advantages, loss_terms = quietstar_loss(
                base_log_probs=base_lp,
                mixed_log_probs=mixed_lp,
                thought_log_probs=self.thought_log_probs(hidden, thought_ids, chunked=not return_logits),
                targets=targets,
                n_passes=P,
                base_loss_weight=cfg.base_loss_weight,
                talk_loss_weight=cfg.talk_loss_weight,
                policy_loss_weight=cfg.policy_loss_weight,
                clip_negative_advantages=cfg.clip_negative_advantages,
            )
            loss_terms.update(mixing_weight_stats(mixing_weights.detach(), attention_mask))
        else:  # rewards of the thoughts against the input's own next tokens
            rewards = thought_rewards(base_lp, mixed_lp, targets)[0]

        return QuietStarOutput(
            loss=loss,
            logits=None if mixed_logits is None else mixed_logits[:, :, 0],
            base_logits=base_logits,
            talk_logits=talk_logits,
            mixed_logits=mixed_logits,
            base_log_probs=base_lp,
            mixed_log_probs=mixed_lp,
            mixing_weights=mixing_weights,
            thought_ids=thought_ids,
            rewards=rewards,
            advantages=advantages,
            loss_terms=loss_terms,
        )

    def replay(self, input_ids, attention_mask, position_ids, thought_ids) -> torch.Tensor:
        """One forward with grad over the flattened ``(1+S)L`` sequence -> hidden states ``[B, 1+S, L, H]``.

        Steps: x, sot, t_1..t_N, eot, x_{i+1}..x_{i+K-1} (tokens past the end are placeholders that
        only feed predictions without targets).
        """
        B, L = input_ids.shape
        steps = self._step_tokens(input_ids, thought_ids)
        n_steps = len(steps)  # 1 + S
        hidden = self.base_lm.base_model(
            input_ids=torch.cat(steps, dim=1),
            attention_mask=attention_mask.repeat(1, n_steps),
            position_ids=torch.cat([position_ids + s for s in range(n_steps)], dim=1),
            use_cache=False,
            thought_layout=ThoughtLayout(L, attention_mask.bool()),
        ).last_hidden_state
        return hidden.view(B, n_steps, L, hidden.shape[-1])

    def incremental(self, input_ids, attention_mask, position_ids, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``incremental`` thought forward: sample WITH grad into a KV cache, no replay.

        Steps 0..N are fed one call each (sampling t_1..t_N on the way, as the replay's no-grad
        sampling does), then t_N, eot and the K - 1 fed-back tokens in one call over the cache. Same hidden
        states as :meth:`replay` on the sampled thoughts (to rounding), without feeding the N + 1
        sampling steps twice; the cost is N + 2 smaller calls in forward and backward, and every
        call's keys so far kept for backward. Returns (hidden ``[B, 1+S, L, H]``, thought ids ``[B, L, N]``).
        """
        cfg, decoder = self.config, self.base_lm.base_model
        if torch.is_grad_enabled() and checkpointed_modules(decoder):
            raise ValueError(
                "thought_forward='incremental' keeps the KV cache in autograd, which gradient checkpointing "
                "cannot recompute; set thought_forward='replay' (the default) or turn gradient checkpointing off"
            )
        B, L = input_ids.shape
        N, n_steps = cfg.n_thought_tokens, 1 + cfg.n_extra_steps
        cache = full_kv_cache()
        thought_ids, sampled_hidden = self._think_step_by_step(input_ids, attention_mask, position_ids, cache, generator)
        rest = self._step_tokens(input_ids, thought_ids)[N + 1 :]  # t_N, eot, x_{i+1}..x_{i+K-1}
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

    def _think_step_by_step(self, input_ids, attention_mask, position_ids, cache, generator):
        """:func:`think_step_by_step` with this model's decoder, head and thought settings."""
        cfg = self.config
        return think_step_by_step(
            self.base_lm.base_model,
            self.get_output_embeddings(),
            input_ids,
            attention_mask,
            position_ids,
            cache,
            n_thought_tokens=cfg.n_thought_tokens,
            start_thought_id=cfg.start_thought_token_id,
            temperature=cfg.thought_temperature,
            banned_ids=self.banned_token_ids,
            generator=generator,
        )

    def _step_tokens(self, input_ids, thought_ids) -> list[torch.Tensor]:
        """The 1 + S steps' tokens, each ``[B, L]``: x, sot, t_1..t_N, eot, x_{i+1}..x_{i+K-1}."""
        cfg = self.config
        start = torch.full_like(input_ids, cfg.start_thought_token_id)
        end = torch.full_like(input_ids, cfg.end_thought_token_id)
        future = shift_ahead(input_ids, cfg.n_talk_tokens, fill=0)[:, :, 1:].unbind(-1)  # x_{i+k}, k = 1..K-1
        return [input_ids, start, *thought_ids.unbind(-1), end, *future]

    def thought_log_probs(self, hidden: torch.Tensor, thought_ids: torch.Tensor, chunked: bool = False) -> torch.Tensor:
        """log pi(t_j) at the REINFORCE temperature, delimiters excluded: ``[B, L, N]``.

        The hidden state at step j (sot for j = 1) predicts t_j. Unchunked, one step at a time: each
        step's ``[B, L, V]`` logits stay in autograd's saved tensors; ``chunked``, nothing V wide is
        saved (``config.logits_chunk_elements`` logits at a time, recomputed in backward).
        """
        cfg, lm_head, banned = self.config, self.get_output_embeddings(), self.banned_token_ids
        N, first = cfg.n_thought_tokens, step_of.start_thought
        if chunked:
            return thought_log_probs_chunked(lm_head, hidden[:, first : first + N], thought_ids,
                                             cfg.reinforce_temperature, banned, cfg.logits_chunk_elements)
        log_probs = [
            thought_token_log_probs(lm_head(hidden[:, first + j]), thought_ids[..., j], cfg.reinforce_temperature, banned)
            for j in range(N)
        ]
        return torch.stack(log_probs, dim=-1)

    # ------------------------------------------------------------------ validation

    def check_sequence_length(self, L: int) -> None:
        """Refuse ``L`` base tokens whose thought steps need positions past the base model's limit or window."""
        base_cfg, S = self.base_lm.config, self.config.n_extra_steps
        max_positions = getattr(base_cfg, "max_position_embeddings", None)
        if max_positions is not None and L + S > max_positions:
            raise ValueError(
                f"sequence too long: {L} tokens + {S} thought steps (S = N + K + 1) need position ids up to "
                f"{L + S - 1}, but the base model allows {max_positions} positions; use at most {max_positions - S} tokens"
            )
        window = sliding_window(base_cfg)
        if window is not None and L + S > window:  # L + S <= window: no visible key is out of the window (window.py)
            raise ValueError(
                f"sequence too long for the base model's sliding window: {L} tokens + {S} thought steps (S = N + K + 1) "
                f"span {L + S} positions, but the window is {window}; use at most {window - S} tokens per sequence or fewer thought/talk tokens"
            )

    def _check_inputs(self, input_ids, attention_mask, labels, thought_ids) -> torch.Tensor:
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, length] tensor of token ids, got {got}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        B, L = input_ids.shape
        if L < 1:
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
        self.check_sequence_length(L)
        vocab = self.get_output_embeddings().out_features
        if thought_ids is not None:
            P, N = cfg.n_passes, cfg.n_thought_tokens
            if thought_ids.dim() != 3 or thought_ids.shape[0] not in (B, B * P) or thought_ids.shape[1:] != (L, N):
                raise ValueError(
                    f"thought_ids must be [B, L, N] = [{B}, {L}, {N}] or [B * n_passes, L, N] = [{B * P}, {L}, {N}], "
                    f"got {tuple(thought_ids.shape)}"
                )
            start_id, end_id = cfg.thought_token_ids
            if ((thought_ids == start_id) | (thought_ids == end_id)).any():
                raise ValueError(f"thought_ids contain a thought delimiter id ({start_id} or {end_id}); delimiters are not thought tokens")
            if (thought_ids < 0).any() or (thought_ids >= vocab).any():
                raise ValueError(f"thought_ids must be token ids in [0, {vocab})")
        return attention_mask

    # ------------------------------------------------------------------ generation (thinking generate())

def mixing_weight_stats(mixing_weights: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and std of w over real positions, without a host sync."""
    real = attention_mask[:, :, None].expand_as(mixing_weights).float()
    count = real.sum().clamp_min(1)
    mean = (mixing_weights.float() * real).sum() / count
    std = (((mixing_weights.float() - mean) ** 2 * real).sum() / count).sqrt()
    return {"mixing_weight_mean": mean, "mixing_weight_std": std}


def _check_base_model(base) -> None:
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
