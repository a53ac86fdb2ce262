"""Scoring one model of the experiment: the rows of its table, on the same held-out tokens as every other.

A row is one way of predicting: a plain model's prediction, or a thinking model's base prediction
or its thinking (mixed) prediction. Each row keeps, per held-out text (``generated``: the corpus's
held-out problems; ``other_style``: human-written math), the NLL of every scored token, so that the
summary can compare rows token by token against the untouched base; the paper's metric on the
held-out problems; and what one emitted token costs at inference.
"""

from __future__ import annotations

import torch

from ..evaluation.heldout import heldout_evaluation, text_windows
from ..evaluation.metric import paper_metric
from .config import ExperimentConfig, HeldoutConfig
from .inference_cost import inference_cost

BASE, THINKING = "base prediction", "thinking"


def score_text(model, tokenizer, text: str, cfg: HeldoutConfig, windows: int, thinking: bool):
    return heldout_evaluation(model, tokenizer, text, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seeds=cfg.seeds,
                              max_windows=windows, keep_per_token=True, thinking=thinking)


def curve_point(step: int, model, tokenizer, text: str, cfg: HeldoutConfig, thinking: bool) -> dict:
    """The held-out curve's point at ``step``, on the fixed subset of ``heldout.max_windows`` windows."""
    r = score_text(model, tokenizer, text, cfg, cfg.max_windows, thinking)
    return {"step": step, "nll_base": r.nll_base, "nll_thinking": r.nll_thinking, "hard_nll_base": r.hard["nll_base"],
            "hard_nll_thinking": r.hard["nll_thinking"], "reward_mean": r.reward_mean,
            "mixing_weight_mean": r.mixing_weight["mean"]}


def paper_metric_score(model, tokenizer, examples, use_thoughts: bool) -> float | None:
    if not examples:
        return None
    was_training = model.training
    model.eval()
    torch.manual_seed(0)  # thoughts sampled by the metric: reproducible
    try:
        return paper_metric(model, tokenizer, examples, "gsm8k", use_thoughts=use_thoughts)["score"]
    finally:
        model.train(was_training)


def cost_prompt(tokenizer, text: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the held-out text, ``[1, n]``: every row generates from the same prompt."""
    return torch.tensor([text_windows(tokenizer, text, n_tokens, max_windows=1)[0]])


def score_model(model, tokenizer, texts: dict[str, str], cfg: ExperimentConfig, examples, *, thinking: bool) -> dict[str, dict]:
    """The rows of one model: ``{"base prediction": row}``, plus ``"thinking"`` for a thinking model.

    row: ``per_token`` {text name: [NLL per token]}, ``metric`` (None without examples), ``cost``
    (:class:`~quietstar.experiment.inference_cost.InferenceCost` as a dict), ``thoughts`` (mixing
    weight and reward statistics of the generated text; thinking rows only).
    """
    reports = {name: score_text(model, tokenizer, text, cfg.heldout, cfg.heldout.final_max_windows, thinking)
               for name, text in texts.items()}
    prompt = cost_prompt(tokenizer, texts["generated"], cfg.cost.prompt_tokens)
    plain = model.base_lm if thinking else model
    rows = {BASE: {"per_token": {name: r.per_token["base"] for name, r in reports.items()},
                   "metric": paper_metric_score(model, tokenizer, examples, use_thoughts=False),
                   "cost": inference_cost(plain, prompt, cfg.cost.new_tokens, cfg.cost.repeats).to_dict()}}
    if thinking:
        generated = reports["generated"]
        rows[THINKING] = {"per_token": {name: r.per_token["thinking"] for name, r in reports.items()},
                          "metric": paper_metric_score(model, tokenizer, examples, use_thoughts=True),
                          "cost": inference_cost(model, prompt, cfg.cost.new_tokens, cfg.cost.repeats).to_dict(),
                          "thoughts": {"mixing_weight": generated.mixing_weight, "reward_mean": generated.reward_mean,
                                       "helped_share": generated.helped_share}}
    return rows
