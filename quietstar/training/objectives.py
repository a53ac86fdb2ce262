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

from ..loading import load_model as _load_model
from ..ntp.objectives import (
    distillation_loss_from_logits,
    forward_student,
    ntp_policy_loss_from_logits,
)
from ..ntp.teacher import check_frozen, check_student, freeze_teacher, make_student, teacher_log_probs
from .stage_config import KINDS, TEACHER_BASE, StageSettings, stage_run_problems  # noqa: F401  (re-exported)

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
