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
import os
from dataclasses import dataclass, fields

import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .adapters import apply_lora, check_no_adapters
from .attention import TORCH, check_attention_name
from .chunked_log_probs import target_log_probs_chunked
from .configuration import QuietStarConfig
from .delimiters import ThoughtDelimiterEmbedding
from .generation import ThinkingGenerationMixin
from .inputs import add_thought_tokens, check_base_model, check_forward_inputs, check_length_fits, check_thought_settings
from .inputs import check_thought_tokens  # noqa: F401  (re-exported: callers import the tokenizer helpers from here too)
from .layout import base_position_ids, step_of
from .losses import mix_logits, quietstar_loss, shift_ahead, talk_targets, target_log_probs, thought_rewards
from .mixing import DEFAULT_INIT_STD, MixingHead, mixing_weight_stats
from .thought_forward import thought_hidden_states, thought_log_probs


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
        attn = check_attention_name(config.thought_attn_implementation)
        if base_lm is None:
            base_lm = AutoModelForCausalLM.from_config(copy.deepcopy(config.base_config), attn_implementation=attn)
        check_base_model(base_lm)
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
        check_thought_settings(thought_kwargs, allowed)
        if isinstance(base_model_or_path, (str, os.PathLike)):
            if os.path.sep in str(base_model_or_path) and not os.path.exists(base_model_or_path):
                raise FileNotFoundError(f"base model path {str(base_model_or_path)!r} does not exist")
            base = AutoModelForCausalLM.from_pretrained(base_model_or_path, attn_implementation=attn)
        elif isinstance(base_model_or_path, PreTrainedModel):
            base = base_model_or_path
        else:
            raise TypeError(f"from_base expects a transformers causal LM or a path, got {type(base_model_or_path).__name__}")
        check_base_model(base)
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
            apply_lora(model, lora)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Adapter layers rename the base weights: not a loadable checkpoint (quietstar.lora.save_lora is).
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

    def check_sequence_length(self, L: int) -> None:
        """Refuse ``L`` base tokens whose thought steps need positions past the base model's limit or window."""
        check_length_fits(self.base_lm.config, self.config.n_extra_steps, L)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        thought_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_logits: bool = True,
        return_dict: bool | None = None,
    ) -> QuietStarOutput | tuple:
        """Think at every position of ``input_ids`` ``[B, L]``; see :class:`QuietStarOutput`.

        ``labels`` ``[B, L]`` (HF convention: the model shifts; -100 ignored) switch on the loss.
        ``thought_ids`` ``[B, L, N]`` or ``[B * n_passes, L, N]`` replace sampling.
        ``return_logits=False`` is the memory-light forward for training and scoring: no ``[B, L, V]``
        or ``[B, L, K, V]`` logits are kept or returned (the four logits fields are ``None``); the
        loss, rewards and ``base_log_probs`` / ``mixed_log_probs`` are computed from the hidden states
        ``config.logits_chunk_elements`` logits at a time, the same values to fp32 rounding.
        The log-probs (like the rewards) are detached when no ``labels`` are given.
        ``return_dict=False`` returns the output's non-``None`` fields as a tuple (transformers' convention).

        There is no ``**kwargs``: a keyword this forward does not use (``position_ids``,
        ``past_key_values``, ``output_attentions``, ...) is a TypeError rather than silently dropped,
        and HF ``Trainer`` (which passes ``num_items_in_batch`` only to a forward that takes
        ``**kwargs``) scales the loss for gradient accumulation itself.
        """
        cfg = self.config
        P, N, K = cfg.n_passes, cfg.n_thought_tokens, cfg.n_talk_tokens
        attention_mask = check_forward_inputs(self, input_ids, attention_mask, labels, thought_ids)
        input_ids, attention_mask = input_ids.repeat_interleave(P, 0), attention_mask.repeat_interleave(P, 0)
        position_ids = base_position_ids(attention_mask)
        hidden, thought_ids = thought_hidden_states(self, input_ids, attention_mask, position_ids, thought_ids, generator)
        base_hidden = hidden[:, 0]  # [B, L, H]
        talk_hidden = hidden[:, step_of.talk(N, 0) : step_of.talk(N, K - 1) + 1].transpose(1, 2)  # [B, L, K, H]
        # w for (i, k) mixes the post-thought state with the base state at i+k, which predicts the same token.
        mixing_weights = self.mixing_head(shift_ahead(base_hidden, K), talk_hidden)  # [B, L, K]
        targets = talk_targets(input_ids if labels is None else labels.repeat_interleave(P, 0), attention_mask, K)
        predictions = self._predictions(base_hidden, talk_hidden, mixing_weights, targets, return_logits, labels is not None)
        base_lp, mixed_lp = predictions["base_log_probs"], predictions["mixed_log_probs"]
        loss = advantages = loss_terms = None
        if labels is not None:
            loss, rewards, advantages, loss_terms = quietstar_loss(
                base_log_probs=base_lp,
                mixed_log_probs=mixed_lp,
                thought_log_probs=thought_log_probs(self, hidden, thought_ids, chunked=not return_logits),
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
        out = QuietStarOutput(loss=loss, mixing_weights=mixing_weights, thought_ids=thought_ids, rewards=rewards,
                              advantages=advantages, loss_terms=loss_terms, **predictions)
        return out if return_dict is not False else out.to_tuple()

    def _predictions(self, base_hidden, talk_hidden, mixing_weights, targets, return_logits, with_grad) -> dict:
        """The logits (``None`` unless ``return_logits``) and the targets' log-probs, by output field name."""
        lm_head = self.get_output_embeddings()
        base_logits = talk_logits = mixed_logits = None
        if return_logits:
            base_logits = lm_head(base_hidden)  # [B, L, V]
            talk_logits = lm_head(talk_hidden)  # [B, L, K, V]
            mixed_logits = mix_logits(base_logits, talk_logits, mixing_weights)  # [B, L, K, V]
        with torch.set_grad_enabled(torch.is_grad_enabled() and with_grad):  # scores only, without labels
            if return_logits:
                base_lp, mixed_lp = target_log_probs(base_logits, mixed_logits, targets)
            else:
                base_lp, mixed_lp = target_log_probs_chunked(
                    lm_head, base_hidden, talk_hidden, mixing_weights, targets, self.config.logits_chunk_elements
                )
        return dict(
            logits=None if mixed_logits is None else mixed_logits[:, :, 0],
            base_logits=base_logits,
            talk_logits=talk_logits,
            mixed_logits=mixed_logits,
            base_log_probs=base_lp,
            mixed_log_probs=mixed_lp,
        )
