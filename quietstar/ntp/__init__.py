"""The thought-free stage: train a plain student toward a frozen thinking teacher, export it as the
base model. See objectives.py for the Fast Quiet-STaR NTP objective and the distillation baseline."""

from .export import export_student, save_tokenizer_without_delimiters
from .objectives import (
    distillation_loss,
    distillation_loss_from_logits,
    forward_student,
    kl_per_position,
    next_token_targets,
    ntp_policy_loss,
    ntp_policy_loss_from_logits,
    sample_actions,
)
from .teacher import check_student, freeze_teacher, make_student, teacher_log_probs

__all__ = [
    "check_student",
    "distillation_loss",
    "distillation_loss_from_logits",
    "export_student",
    "forward_student",
    "freeze_teacher",
    "kl_per_position",
    "make_student",
    "next_token_targets",
    "ntp_policy_loss",
    "ntp_policy_loss_from_logits",
    "sample_actions",
    "save_tokenizer_without_delimiters",
    "teacher_log_probs",
]
