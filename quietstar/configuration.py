"""``QuietStarConfig``: a nested base-model config plus every thought hyper-parameter.

Defaults are the reference training recipe (docs/ALGORITHM.md): N = 9 thought tokens (``n_ahead`` 12),
K = 4 talk tokens, P = 2 passes, REINFORCE temperature 3, 100x delimiter learning-rate trick.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from . import compat  # noqa: F401  (refuses a transformers older than the supported range)
from .layout import n_extra_steps

# The thought attention paths (registered by attention.py) and the memory-light forward's default
# chunk: the config names them, the modules that implement them read them from here.
REFERENCE, TORCH, TRITON = "quietstar_reference", "quietstar_torch", "quietstar_triton"
THOUGHT_ATTENTION_NAMES = (REFERENCE, TORCH, TRITON)
DEFAULT_LOGITS_CHUNK_ELEMENTS = 1 << 24
REINFORCE_TEMPERATURE = 3.0  # the reference's policy temperature (also the NTP stage's)

START_THOUGHT_TOKEN = "<|startthought|>"
END_THOUGHT_TOKEN = "<|endthought|>"


@strict
class QuietStarConfig(PreTrainedConfig):
    r"""Configuration of a :class:`QuietStarForCausalLM`.

    Args:
        base_config: config of the wrapped causal LM (any transformers v5 decoder using the attention interface).
        n_thought_tokens (N): tokens sampled between ``<|startthought|>`` and ``<|endthought|>``.
        n_talk_tokens (K): true future tokens each thought is scored on.
        n_passes (P): independent thoughts per position; the REINFORCE baseline group.
        thought_temperature: sampling temperature of thought tokens; 0 means greedy thoughts.
        reinforce_temperature: temperature of the policy log-probabilities (reference 3).
        base_loss_weight / talk_loss_weight: weights of NLL_base and NLL_talk in the LM loss.
        policy_loss_weight: weight of the REINFORCE term (reference 1e6).
        clip_negative_advantages: clamp advantages at 0 (reference default).
        mixing_head_activation: "none" (reference: raw MLP output) or "sigmoid".
        embedding_scale: delimiter vectors are stored divided by this and multiplied back when used,
            so under Adam their effective learning rate is this multiple of the optimiser's.
        start_thought_token_id / end_thought_token_id: the delimiter token ids.
        thought_attn_implementation: quietstar_torch (default), quietstar_triton or quietstar_reference.
        logits_chunk_elements: memory-light forward (``return_logits=False``): the LM head's outputs are
            computed and turned into log-probs this many logits elements at a time, and recomputed in
            backward (quietstar/chunked_log_probs.py). Smaller saves memory, larger runs the head's
            matmuls in fewer, larger pieces.
        thought_forward: how a forward that samples its thoughts computes the steps' hidden states.
            "replay" (default): sample without grad (cached, one step per call), then feed all
            (1+S)L tokens again with grad in ONE call, the large launch the Triton kernel is built for.
            "incremental": sample with grad into the KV cache and feed only the last K + 1 steps
            after it: no step is fed twice (about 18% fewer FLOPs at N 9, K 4), but N + 2 smaller
            calls, keys kept per call for backward, and no gradient checkpointing.
            Both give the same hidden states and loss to rounding; teacher-forced ``thought_ids``
            always replay. benchmarks/RESULTS.md ("Replay or incremental") measures both.
    """

    model_type = "quietstar"
    # The thought hyper-parameters a loader may be given, and the subset the weights depend on
    # (a saved model keeps those; quietstar/loading.py refuses a different value).
    THOUGHT_FIELDS = ("n_thought_tokens", "n_talk_tokens", "n_passes", "thought_temperature", "reinforce_temperature",
                      "base_loss_weight", "talk_loss_weight", "policy_loss_weight", "clip_negative_advantages",
                      "mixing_head_activation", "embedding_scale", "logits_chunk_elements", "thought_forward")
    WEIGHT_FIELDS = ("mixing_head_activation", "embedding_scale")
    # The plain ``sub_configs`` declaration (not 5.18's ``sub_configs_defaults``) is read by every
    # supported transformers version; ``__post_init__`` builds the nested config itself.
    sub_configs = {"base_config": AutoConfig}
    default_base_model_type = "llama"

    base_config: dict | PreTrainedConfig | None = None
    n_thought_tokens: int = 9
    n_talk_tokens: int = 4
    n_passes: int = 2
    thought_temperature: float = 1.0
    reinforce_temperature: float = REINFORCE_TEMPERATURE
    base_loss_weight: float = 0.5
    talk_loss_weight: float = 0.5
    policy_loss_weight: float = 1e6
    clip_negative_advantages: bool = True
    mixing_head_activation: Literal["none", "sigmoid"] = "none"
    embedding_scale: float = 100.0
    start_thought_token_id: int | None = None
    end_thought_token_id: int | None = None
    thought_attn_implementation: str = TORCH
    logits_chunk_elements: int = DEFAULT_LOGITS_CHUNK_ELEMENTS
    thought_forward: Literal["replay", "incremental"] = "replay"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.base_config is None:
            self.base_config = AutoConfig.for_model(self.default_base_model_type)
        elif isinstance(self.base_config, dict):  # from config.json: the base model's own config class
            settings = dict(self.base_config)
            model_type = settings.pop("model_type", self.default_base_model_type)
            self.base_config = AutoConfig.for_model(model_type, **settings)
        super().__post_init__(**kwargs)
        # The wrapper's own embeddings are the base model's; tying is the base config's business.
        self.tie_word_embeddings = False
        self._validate_thought_settings()

    def _validate_thought_settings(self) -> None:
        problems = []
        for name in ("n_thought_tokens", "n_talk_tokens", "n_passes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.thought_temperature < 0:
            problems.append(f"thought_temperature must be >= 0 (0 = greedy), got {self.thought_temperature}")
        if self.reinforce_temperature <= 0:
            problems.append(f"reinforce_temperature must be > 0, got {self.reinforce_temperature}")
        if self.embedding_scale <= 0:
            problems.append(f"embedding_scale must be > 0, got {self.embedding_scale}")
        if self.mixing_head_activation not in ("none", "sigmoid"):
            problems.append(f"mixing_head_activation must be 'none' or 'sigmoid', got {self.mixing_head_activation!r}")
        if self.thought_attn_implementation not in THOUGHT_ATTENTION_NAMES:
            problems.append(
                f"thought_attn_implementation must be one of {THOUGHT_ATTENTION_NAMES}, got {self.thought_attn_implementation!r}"
            )
        if self.logits_chunk_elements < 1:
            problems.append(f"logits_chunk_elements must be >= 1, got {self.logits_chunk_elements}")
        if self.thought_forward not in ("replay", "incremental"):
            problems.append(f"thought_forward must be 'replay' or 'incremental', got {self.thought_forward!r}")
        ids = (self.start_thought_token_id, self.end_thought_token_id)
        if None not in ids and ids[0] == ids[1]:
            problems.append(f"start and end thought token ids must differ, both are {ids[0]}")
        if problems:
            raise ValueError("invalid QuietStarConfig: " + "; ".join(problems))

    @property
    def n_extra_steps(self) -> int:
        """S = 1 + N + 1 + (K - 1)."""
        return n_extra_steps(self.n_thought_tokens, self.n_talk_tokens)

    @property
    def thought_token_ids(self) -> tuple[int, int]:
        if self.start_thought_token_id is None or self.end_thought_token_id is None:
            raise ValueError(
                "this config has no thought delimiter token ids; build the model with QuietStarForCausalLM.from_base"
            )
        return self.start_thought_token_id, self.end_thought_token_id


__all__ = ["QuietStarConfig", "START_THOUGHT_TOKEN", "END_THOUGHT_TOKEN"]
