"""What one emitted token costs at inference: decoder forward calls (counted) and seconds (timed).

    cost = inference_cost(model, prompt_ids, new_tokens=8, repeats=3)   # plain causal LM or thinking model
    cost.forward_steps_per_token, cost.seconds_per_token

Greedy generation, batch 1, from one prompt. A plain model takes one decoder call per emitted token;
a thinking model (``QuietStarForCausalLM.generate``) takes N + 3 (the start delimiter, N thought
tokens, the end delimiter, then the emitted token appended to the base cache). The calls are counted
with a forward hook on the decoder that every step goes through, not assumed from N.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class InferenceCost:
    forward_steps_per_token: float  # decoder calls per extra emitted token (generating G vs 1 token)
    seconds_per_token: float  # median over the timed generations, prefill included, / new_tokens
    new_tokens: int
    prompt_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _decoder(model):
    """The module every generation step calls: the base transformer (LlamaModel, ...)."""
    base = model.base_lm if hasattr(model, "base_lm") else model
    return base.base_model


@torch.no_grad()
def inference_cost(model, prompt_ids: torch.Tensor, new_tokens: int = 8, repeats: int = 3) -> InferenceCost:
    """Cost per emitted token of ``model.generate`` (greedy, ``new_tokens`` exactly) from ``prompt_ids [1, L]``."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (the step count is G tokens' calls minus 1 token's), got {new_tokens}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be one prompt [1, L], got shape {tuple(prompt_ids.shape)}")
    was_training = model.training
    model.eval()
    calls = []
    hook = _decoder(model).register_forward_pre_hook(lambda *_: calls.append(1))

    def generate(n: int) -> int:
        """Decoder calls of one greedy generation of exactly ``n`` tokens."""
        before = len(calls)
        model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        return len(calls) - before

    try:
        # The marginal count (G tokens vs 1) leaves out the prefill and any first- or last-token special case.
        steps = (generate(new_tokens) - generate(1)) / (new_tokens - 1)  # also the warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate(new_tokens)
            times.append(time.perf_counter() - t0)
    finally:
        hook.remove()
        model.train(was_training)
    return InferenceCost(forward_steps_per_token=steps,
                         seconds_per_token=statistics.median(times) / new_tokens,
                         new_tokens=new_tokens, prompt_tokens=prompt_ids.shape[1])
