"""The ``stage`` section of a run config: train a plain student toward a frozen thinking teacher
(Fast Quiet-STaR's NTP stage, or distillation); ``objectives.py`` builds and runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..configuration import REINFORCE_TEMPERATURE as DEFAULT_REINFORCE_TEMPERATURE

KINDS = ("ntp_policy", "distill")
TEACHER_BASE = "teacher_base"


@dataclass
class StageSettings:
    """The ``stage`` section of a run config; defaults are the released Fast Quiet-STaR NTP stage's."""

    kind: Literal["ntp_policy", "distill"] = "ntp_policy"
    teacher: str | None = None  # the thinking model: a saved Quiet-STaR folder (a quietstar-train run's final/)
    # "teacher_base": a copy of the teacher's own base LM; else a model spec (quietstar.loading) of the
    # base to start from, as the paper does (its student is the original base model, not the teacher's).
    student_init: str = TEACHER_BASE
    # kind ntp_policy: REINFORCE on the student's sampled next tokens, rewarded where it beats the teacher.
    reinforce_temperature: float = DEFAULT_REINFORCE_TEMPERATURE
    clip_negative_rewards: bool = True
    policy_loss_weight: float = 1.0
    # kind distill: KL(teacher || student) at every real position.
    kl_weight: float = 1.0
    nll_weight: float = 0.0  # either kind: + this x the student's token NLL
    # The teacher's thoughts: near-greedy (theirs: Gumbel temperature 0.001), one pass.
    teacher_thought_temperature: float = 0.0
    teacher_n_passes: int = 1

    def problems(self, where: str = "stage") -> list[str]:
        """What is wrong with the section, one message per problem naming the fix; [] when valid."""
        problems = []
        if self.kind not in KINDS:
            problems.append(f"{where}.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if not self.teacher:
            problems.append(f"{where}.teacher must name the thinking model to learn from, e.g. the final/ folder of a "
                            "quietstar-train run")
        if not self.student_init:
            problems.append(f"{where}.student_init must be {TEACHER_BASE!r} or a base-model spec (folder, hub id, 'smollm2')")
        if self.reinforce_temperature <= 0:
            problems.append(f"{where}.reinforce_temperature must be > 0 (the paper's is 3), got {self.reinforce_temperature}")
        for name in ("policy_loss_weight", "kl_weight", "nll_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{where}.{name} must be >= 0, got {getattr(self, name)}")
        main = {"ntp_policy": "policy_loss_weight", "distill": "kl_weight"}.get(self.kind)
        if main is not None and getattr(self, main) == 0 and self.nll_weight == 0:
            problems.append(f"{where}.{main} and {where}.nll_weight are both 0: nothing would be trained; set {main} > 0")
        if self.teacher_thought_temperature < 0:
            problems.append(f"{where}.teacher_thought_temperature must be >= 0 (0: greedy), got {self.teacher_thought_temperature}")
        if self.teacher_n_passes < 1:
            problems.append(f"{where}.teacher_n_passes must be >= 1, got {self.teacher_n_passes}")
        elif self.teacher_n_passes > 1 and self.teacher_thought_temperature == 0:
            problems.append(f"{where}.teacher_n_passes {self.teacher_n_passes} with greedy thoughts "
                            f"(teacher_thought_temperature 0) repeats one thought; set {where}.teacher_n_passes: 1 "
                            "or a teacher_thought_temperature > 0")
        return problems

    def validate(self, where: str = "stage") -> StageSettings:
        problems = self.problems(where)
        if problems:
            raise ValueError("invalid NTP stage settings:\n  - " + "\n  - ".join(problems))
        return self

    def teacher_thought(self) -> dict:
        """The thought settings the teacher is loaded with (``load_model(thought=...)``)."""
        return {"thought_temperature": self.teacher_thought_temperature, "n_passes": self.teacher_n_passes}


def stage_run_problems(cfg) -> list[str]:
    """Run-config sections a ``stage`` run cannot combine with (``cfg``: the run config)."""
    problems = []
    if cfg.model.lora is not None:
        problems.append("stage trains the whole student; remove model.lora (LoRA is for thinking runs)")
    if getattr(cfg.thought, "schedule", None) is not None:
        problems.append("stage trains a student without thoughts; remove thought.schedule (a curriculum is for thinking runs)")
    return problems
