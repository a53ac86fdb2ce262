"""The two training objectives that ship with the loop, and the choice between them.

An objective is ``objective(model, input_ids, attention_mask) -> (loss, terms, thought_ids)``: the
loss to back-propagate, its logged terms (a dict of 0-d tensors, detached; ``loss`` and ``nll_base``
always among them) and the sampled thoughts (or None). ``train_step`` calls it once per micro-batch
inside the precision policy's autocast.
"""

from __future__ import annotations

from .config import RunConfig


def quietstar_objective(model, input_ids, attention_mask):
    """Quiet-STaR: 0.5 NLL_base + 0.5 NLL_talk + w_policy REINFORCE, the model's own loss.

    Training reads the loss, its terms and the thoughts, never the logits: ``return_logits=False``
    is the memory-light forward, which never holds the [B, L, K, V] talk logits at once."""
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids, return_logits=False)
    n_thought_tokens = out.loss.new_tensor(float(out.thought_ids.shape[-1]))  # logged: a schedule changes it
    return out.loss, {**out.loss_terms, "n_thought_tokens": n_thought_tokens}, out.thought_ids


def plain_lm_objective(model, input_ids, attention_mask):
    """The control (``thinking: false``, the model is the plain base LM): the causal-LM loss."""
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    loss = out.loss.detach()
    return out.loss, {"loss": loss, "nll_base": loss}, None


def builtin_objective(cfg: RunConfig):
    return quietstar_objective if cfg.thinking else plain_lm_objective


def scheduled(cfg: RunConfig, before_step=None):
    """``before_step(step, model)`` (1-based step) with the run's thought schedule applied first."""
    schedule = cfg.thought.schedule
    if schedule is None:
        return before_step

    def set_n_then_call(step: int, model) -> None:
        schedule.before_step(step - 1, model)  # the schedule counts steps from 0
        if before_step is not None:
            before_step(step, model)

    return set_n_then_call
