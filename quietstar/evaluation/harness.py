"""lm-evaluation-harness integration.

- ``QuietStarLM`` (registered as the lm-eval model ``quietstar``): lm-eval's own HF wrapper
  (``HFLM``) around a ``QuietStarForCausalLM``. Loglikelihood tasks use the mixed (thinking)
  prediction at every position with one thought per position (or the base prediction with
  ``use_thoughts=False``); generation tasks go through the thinking ``generate()``.
- ``tasks_dir()``: task YAMLs for the paper's metric, to pass as ``include_path``:
  ``quietstar_commonsense_qa`` (hub) and ``quietstar_commonsense_qa_sample`` (the bundled sample).
  They give ``quietstar-eval``'s commonsense_qa score (letter and end-of-answer newline, each
  renormalised over A-E and the newline; see ``tasks/utils.py`` for when that is exact). Leave
  ``add_bos_token`` unset: lm-eval then encodes with the tokenizer's own special tokens, BOS for
  Mistral/Llama, as the reference and ``paper_metric`` do.

Usage::

    lm_eval --model quietstar --model_args pretrained=PATH,thought_temperature=1.0 \\
        --tasks commonsense_qa,gsm8k_cot_zeroshot,quietstar_commonsense_qa --include_path $(python -c \\
        "import quietstar.evaluation.harness as h; print(h.tasks_dir())")

(``lm_eval`` must import this module to know the ``quietstar`` model: the CLI does so through
``--include_path`` only for tasks, so from Python call ``simple_evaluate(model=QuietStarLM(...))``,
or run ``python -m quietstar.evaluation.harness`` with the same arguments as ``lm_eval``.)
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-eval integration needs lm-evaluation-harness: pip install 'quietstar[eval]'") from err

import quietstar  # noqa: F401  (registers the quietstar model type with the Auto classes)

from .metric import single_pass


def tasks_dir() -> str:
    return os.path.join(os.path.dirname(__file__), "tasks")


@register_model("quietstar")
class QuietStarLM(HFLM):
    """``HFLM`` for ``QuietStarForCausalLM`` (a path, hub id or model instance)."""

    def __init__(self, pretrained, thought_temperature: float | None = None, n_thought_tokens: int | None = None,
                 use_thoughts: bool = True, **kwargs):
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=pretrained, **kwargs)
        if getattr(self.model.config, "model_type", None) != "quietstar":
            raise TypeError(f"QuietStarLM needs a QuietStarForCausalLM, got {type(self.model).__name__}; use lm-eval's 'hf' model for plain LMs")
        self.thought_temperature = None if thought_temperature is None else float(thought_temperature)
        self.n_thought_tokens = None if n_thought_tokens is None else int(n_thought_tokens)
        self.use_thoughts = str(use_thoughts).lower() not in ("false", "0", "no")

    @contextlib.contextmanager
    def _thought_settings(self):
        config, saved = self.model.config, self.model.config.thought_temperature
        if self.thought_temperature is not None:
            config.thought_temperature = self.thought_temperature
        try:
            with single_pass(self.model):
                yield
        finally:
            config.thought_temperature = saved

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        # lm-eval right-pads without a mask: causal thoughts at real positions never see the padding.
        with torch.no_grad(), self._thought_settings():
            out = self.model(inps, attention_mask=torch.ones_like(inps))
        return out.logits if self.use_thoughts else out.base_logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.thought_temperature is not None:
            generation_kwargs.setdefault("thought_temperature", self.thought_temperature)
        if self.n_thought_tokens is not None:
            generation_kwargs.setdefault("n_thought_tokens", self.n_thought_tokens)
        if not self.use_thoughts:
            generation_kwargs.setdefault("think", False)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def main() -> None:  # pragma: no cover - thin wrapper over lm-eval's CLI
    """``lm_eval`` with the ``quietstar`` model registered and the paper-metric tasks included."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", tasks_dir()]
    cli_evaluate()


if __name__ == "__main__":
    main()
