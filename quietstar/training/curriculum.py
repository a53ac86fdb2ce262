"""A thought-length curriculum: ``n_thought_tokens`` as a function of the optimiser step.

Fast Quiet-STaR (Huang et al. 2025, arXiv 2505.17746) trains with long thoughts first and shortens
them in stages, each starting from the previous one's weights. Their released script
(``run_sh/fast_quiet_star_mistral.sh``) runs three trainings with the official ``n_ahead`` 16, 12, 8
(N = n_ahead - 3 = 13, 9, 5 here, docs/ALGORITHM.md), K 8, 4, 4, lr 2e-6, 1e-6, 1e-6. Here the
stages of N are one run whose config lists them::

    thought:
      schedule:
        stages:
          - {from_step: 0, n_thought_tokens: 13}
          - {from_step: 400, n_thought_tokens: 9}
          - {from_step: 800, n_thought_tokens: 5}

    schedule = ThoughtSchedule([ThoughtStage(0, 13), ThoughtStage(400, 9), ThoughtStage(800, 5)])
    n = schedule.before_step(step, model)   # every optimiser step, before its first forward; log n

N is a pure function of the step (no state), so a resumed run thinks with the N its step calls for.
Nothing in the model depends on N but ``model.config.n_thought_tokens``, which every forward reads
afresh: the layout, the torch and CPU attention paths, the chunked log-probs and the sampling loop
size themselves per call, and the Triton launcher's remembered launch configs are keyed by
power-of-two buckets of the base length and the query rows, so a new N at most re-benchmarks once
(tests/test_curriculum.py runs one model through several N against fresh models).
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field

from ..inputs import check_length_fits
from ..layout import n_extra_steps

EXAMPLE = "[{from_step: 0, n_thought_tokens: 13}, {from_step: 400, n_thought_tokens: 9}]"


@dataclass
class ThoughtStage:
    """From optimiser step ``from_step`` on (0-based: the step about to run), thoughts have
    ``n_thought_tokens`` tokens. Both are required; None only so that a missing key is reported."""

    from_step: int | None = None
    n_thought_tokens: int | None = None


@dataclass
class ThoughtSchedule:
    """The stages of a thought-length curriculum (module docstring), ordered by ``from_step``.

    Lengths may only shrink from stage to stage (the curriculum's direction) unless
    ``allow_increase`` is true. Stages may be given as mappings (``{"from_step": 0, ...}``).
    """

    stages: list[ThoughtStage] = field(default_factory=list)
    allow_increase: bool = False

    def __post_init__(self):
        self.stages = [ThoughtStage(**stage) if isinstance(stage, dict) else stage for stage in self.stages]

    def problems(self, where: str = "thought.schedule") -> list[str]:
        """What is wrong with the schedule, one message per problem naming the fix; [] when valid."""
        if not self.stages:
            return [f"{where}.stages is empty; list at least one stage, e.g. {EXAMPLE}"]
        problems = []
        for i, stage in enumerate(self.stages):
            for name in ("from_step", "n_thought_tokens"):
                value = getattr(stage, name)
                if value is None:
                    problems.append(f"{where}.stages[{i}] has no {name}; each stage needs both, e.g. {EXAMPLE}")
                elif isinstance(value, bool) or not isinstance(value, int):
                    problems.append(f"{where}.stages[{i}].{name} must be an integer, got {value!r}")
        if problems:
            return problems
        first = self.stages[0].from_step
        if first != 0:
            problems.append(f"{where}.stages[0].from_step must be 0 (the schedule must give the first step's N), got {first}")
        for i, stage in enumerate(self.stages):
            if stage.n_thought_tokens < 1:
                problems.append(f"{where}.stages[{i}].n_thought_tokens must be >= 1, got {stage.n_thought_tokens}")
        for i, (before, stage) in enumerate(zip(self.stages, self.stages[1:]), start=1):
            if stage.from_step <= before.from_step:
                problems.append(f"{where}.stages[{i}].from_step {stage.from_step} must be greater than stages[{i - 1}]'s "
                                f"{before.from_step}: list the stages in the order they start, at most one per step")
            if stage.n_thought_tokens > before.n_thought_tokens and not self.allow_increase:
                problems.append(f"{where}.stages[{i}].n_thought_tokens {stage.n_thought_tokens} is longer than stages[{i - 1}]'s "
                                f"{before.n_thought_tokens}: a curriculum shortens thoughts (Fast Quiet-STaR: 13 -> 9 -> 5); "
                                f"set {where}.allow_increase: true to lengthen them on purpose")
        return problems

    def validate(self, where: str = "thought.schedule") -> ThoughtSchedule:
        """Raise ValueError listing every problem (see :meth:`problems`); returns the schedule."""
        problems = self.problems(where)
        if problems:
            raise ValueError("invalid thought schedule:\n  - " + "\n  - ".join(problems))
        return self

    def n_thought_tokens_at(self, step: int) -> int:
        """N for optimiser step ``step`` (0-based): the last stage with ``from_step <= step``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0 (0-based optimiser step), got {step!r}")
        self.validate()
        starts = [stage.from_step for stage in self.stages]
        return self.stages[bisect.bisect_right(starts, step) - 1].n_thought_tokens

    @property
    def max_n_thought_tokens(self) -> int:
        """The longest thought of the run: what sequence-length checks must allow for."""
        return max(stage.n_thought_tokens for stage in self.validate().stages)

    def check_fits(self, model, seq_len: int) -> None:
        """Refuse ``seq_len`` if the schedule's longest thought would need positions the base model lacks."""
        inner = thinking_model(model)
        n = self.max_n_thought_tokens
        try:
            check_length_fits(inner.base_lm.config, n_extra_steps(n, inner.config.n_talk_tokens), seq_len)
        except ValueError as err:
            raise ValueError(f"thought.schedule's longest stage (N = {n}): {err}") from None

    def before_step(self, step: int, model) -> int:
        """Set the (possibly wrapped) model's N for optimiser step ``step``; returns N, for the log."""
        n = self.n_thought_tokens_at(step)
        set_n_thought_tokens(model, n)
        return n

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def thinking_model(model):
    """The QuietStarForCausalLM inside DDP / DeepSpeed / FSDP1 / torch.compile wrappers, found as the
    loop's ``accelerator.unwrap_model`` finds it. FSDP2's ``fully_shard`` wraps nothing."""
    from accelerate.utils import extract_model_from_parallel

    from ..modeling import QuietStarForCausalLM

    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    if not isinstance(inner, QuietStarForCausalLM):
        raise TypeError(f"thought.schedule needs a thinking model (QuietStarForCausalLM), got {type(inner).__name__}; "
                        "a run with thinking: false trains the plain base LM, which has no thoughts to schedule")
    return inner


def set_n_thought_tokens(model, n: int) -> None:
    """``model.config.n_thought_tokens = n`` on the thinking model inside any wrapper."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n_thought_tokens must be an integer >= 1, got {n!r}")
    thinking_model(model).config.n_thought_tokens = n


__all__ = ["ThoughtSchedule", "ThoughtStage", "set_n_thought_tokens", "thinking_model"]
