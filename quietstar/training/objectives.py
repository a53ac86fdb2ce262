"""The thought-free stage in a training run: the ``stage`` section, the two models, the objective.

After a thinking run (a curriculum's last stage, say), Fast Quiet-STaR trains a model that predicts
WITHOUT thoughts toward the thinking one (quietstar/ntp/objectives.py says what the paper and its
code do, and what is chosen here). A run config's ``stage`` section switches a run to it::

    stage:
      kind: ntp_policy              # or distill: KL(teacher || student) (+ nll_weight x NLL)
      teacher: runs/curriculum/final
      student_init: teacher_base    # or a base-model spec: the paper starts from the original base

    student, teacher, tokenizer, objective = build_stage(settings)
    loss, terms, _ = objective(student, input_ids, attention_mask)   # the loop's calling convention

The student is a plain causal LM of the base architecture (``quietstar.ntp.make_student``); the
teacher is loaded once, frozen (eval, no grads) and never trained or checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..loading import load_model as _load_model
from ..ntp.objectives import (
    DEFAULT_REINFORCE_TEMPERATURE,
    distillation_loss_from_logits,
    forward_student,
    ntp_policy_loss_from_logits,
)
from ..ntp.teacher import check_frozen, check_student, freeze_teacher, make_student, teacher_log_probs

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


def _unwrapped(model):
    from accelerate.utils import extract_model_from_parallel  # what the loop's accelerator.unwrap_model runs

    return extract_model_from_parallel(model, keep_torch_compile=False)


def loss_settings(kind: str, settings: StageSettings) -> dict:
    """The keyword arguments of ``kind``'s loss in quietstar.ntp, from the stage section."""
    if kind == "ntp_policy":
        return {"reinforce_temperature": settings.reinforce_temperature, "clip_negative_rewards": settings.clip_negative_rewards,
                "policy_loss_weight": settings.policy_loss_weight, "nll_weight": settings.nll_weight}
    if kind == "distill":
        return {"kl_weight": settings.kl_weight, "nll_weight": settings.nll_weight}
    raise ValueError(f"unknown stage kind {kind!r}; use one of {list(KINDS)}")


def make_ntp_objective(kind: str, teacher, settings: StageSettings | None = None, *, generator=None):
    """``objective(model, input_ids, attention_mask) -> (loss, terms, None)`` for ``kind``.

    ``model``: the student, possibly wrapped (DDP, FSDP, compile): it is called as given, so the
    wrapper's hooks run. Labels are the inputs. ``terms``: detached 0-d tensors (loss, kl, nll, ...).
    The third value stands where a thinking forward returns its output (for thought dumps): none here.
    ``generator`` drives the teacher's thoughts and the sampled actions (None: torch's global RNG,
    which the run's checkpoints save). Computes exactly ``quietstar.ntp.ntp_policy_loss`` /
    ``distillation_loss``: the teacher first, then the student, from the same generator.
    """
    kwargs = loss_settings(kind, settings if settings is not None else StageSettings(kind=kind))
    check_frozen(teacher)  # a teacher in train mode would think with dropout: quietstar.ntp.freeze_teacher

    def objective(model, input_ids, attention_mask):
        check_student(_unwrapped(model), teacher)
        teacher_lp = teacher_log_probs(teacher, input_ids, attention_mask, generator=generator)  # [B, L, V], no grad
        logits = forward_student(model, input_ids, attention_mask)  # [B, L, V]
        if kind == "ntp_policy":
            loss, terms = ntp_policy_loss_from_logits(logits, teacher_lp, attention_mask, input_ids, generator=generator, **kwargs)
        else:
            loss, terms = distillation_loss_from_logits(logits, teacher_lp, attention_mask, input_ids, **kwargs)
        return loss, terms, None

    return objective


def build_stage(settings: StageSettings, load_model=_load_model, *, dtype=None, attn_implementation: str | None = None,
                seed: int = 0):
    """``(student, teacher, tokenizer, objective)`` for a ``stage`` section, on the CPU.

    The teacher is loaded once through ``load_model`` (quietstar.loading's by default) with the
    stage's thought settings and frozen; ``attn_implementation`` is its thought attention path. The
    student (train mode) is a copy of the teacher's base LM or of ``settings.student_init``'s base.
    The tokenizer is the teacher's (its delimiters are removed on export: ``quietstar.ntp.export_student``).
    """
    settings.validate()
    load_kwargs = {} if dtype is None else {"dtype": dtype}
    teacher, tokenizer = load_model(settings.teacher, thought=settings.teacher_thought(), seed=seed,
                                    attn_implementation=attn_implementation, **load_kwargs)
    freeze_teacher(teacher)
    if settings.student_init == TEACHER_BASE:
        student = make_student(teacher)
    else:  # a wrapper around the base is built and dropped: make_student copies its base LM
        student = make_student(load_model(settings.student_init, seed=seed, **load_kwargs)[0])
    check_student(student, teacher)
    return student.train(), teacher, tokenizer, make_ntp_objective(settings.kind, teacher, settings)


__all__ = ["KINDS", "StageSettings", "build_stage", "loss_settings", "make_ntp_objective", "stage_run_problems"]
