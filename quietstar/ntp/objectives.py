"""Objectives that train a thought-free student toward a frozen thinking teacher.

Two objectives, one API: ``(loss, terms)`` from a batch, with the teacher's log-distribution either
computed here (``*_loss(teacher, student, input_ids, ...)``) or given (``*_loss_from_logits``, for a
loop that caches teacher outputs, as the authors did).

1. The Fast Quiet-STaR NTP stage (:func:`ntp_policy_loss`)
-----------------------------------------------------------
Source: Huang et al., "Fast Quiet-STaR: Thinking Without Thought Tokens" (EMNLP Findings 2025,
arXiv 2505.17746). What the paper says about this stage, in the text available to us (the abstract;
the method section was not in the stored copies we could read): "We further extend this approach
to the standard Next Token Prediction (NTP) setting through reinforcement learning-based
fine-tuning, resulting in Fast Quiet-STaR NTP, which eliminates the need for explicit thought token
generation during inference." Everything else below is read from the authors' released code
(github.com/huangwei200012/Fast-Quiet-STaR at 7c035a9: ``make_quiet_infer_data.py``,
``run_sh/mistral_last.sh``, ``quiet-star-train.py --mode last_rl``, ``model_file/modeling_mistral_last.py``):

- Teacher: a checkpoint of the thought-length curriculum (the released run script reads the outputs
  of the 12-token stage), run once over the training text in eval mode with one
  talk token (K = 1), one pass, thoughts sampled at Gumbel temperature 0.001 (nearly greedy); its
  mixed next-token logits are saved to disk and read back as ``labels_kl``.
- Policy (student): the ORIGINAL base model (``--model_name Mistral-7B-v0.1``) run with
  ``n_ahead = 1``: plain next-token prediction, no thought.
- Reward at position i: r_i = CE_teacher(x_{i+1}) - CE_student(x_{i+1})
  = log p_student(x_{i+1}) - log p_teacher(x_{i+1}), detached, clamped at 0.
- Action: a_i sampled from the student's own next-token distribution (hard Gumbel-softmax, tau 1);
  its log-probability taken at ``reinforce_temperature`` 3.
- Loss: mean over positions of -max(r_i, 0) * log pi_3(a_i), times ``policy_loss_beta`` (1e6); the
  token NLL is computed but replaced by this policy loss in training. AdamW lr 1e-6, batch 8.
- Tokens: every shifted position; pad (= EOS) targets ignored.
(As released the collator passes the teacher logits as ``labels`` and drops the token labels, so the
script does not run unchanged; the forward's intent is unambiguous and is what is implemented.)

Choices made here where that is vague or tied to their files:
- The teacher runs live (or its log-probs are passed in): ``teacher_log_probs``, the mixed
  prediction with thoughts at ``teacher.config.thought_temperature`` (set 0 for their near-greedy
  thoughts), delimiter ids removed, P > 1 passes averaged in probability.
- Rewards, advantages and both means cover the positions with a next-token target: position i and
  i+1 real (attention mask) and ``labels[i+1] != -100``; the mean divides by that count (theirs by
  all B(L-1) shifted positions: the same without padding). Padding by the attention mask, as in
  quietstar/losses.py, so real EOS targets count.
- The student gets the teacher's position ids (``base_position_ids``), so left padding agrees.
- ``clip_negative_rewards`` (their clamp) is on by default; off keeps negative rewards.
- ``policy_loss_weight`` defaults to 1 and ``nll_weight`` to 0 (their effective weights up to the
  1e6 scale, which under Adam only matters against eps and other terms).
- Actions are sampled from the full softmax at temperature 1, delimiter rows included, as theirs.
Note on what this objective does: the reward does not depend on the action, so in expectation the
gradient with respect to the student's logits z_i is max(r_i, 0) * (softmax(z_i / T) - softmax(z_i)) / T,
which, for T > 1, sharpens the student's distribution at the positions where it already predicts
the true token better than the teacher (tests/test_ntp_objectives.py checks both facts).

2. Distillation (:func:`distillation_loss`), the baseline
---------------------------------------------------------
KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)) at every real position (attention
mask), mean over those positions, + ``nll_weight`` x the student's token NLL on the labels (0 by
default: pure distillation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..configuration import REINFORCE_TEMPERATURE
from ..layout import base_position_ids
from ..losses import IGNORE, talk_targets
from .teacher import check_student, teacher_log_probs

DEFAULT_REINFORCE_TEMPERATURE = REINFORCE_TEMPERATURE  # the released NTP code's, as Quiet-STaR's


def next_token_targets(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: the target of position i is ``labels[i+1]``; -100 where absent, ignored or padding."""
    return talk_targets(labels, attention_mask, 1)[:, :, 0]


def _gather(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log_probs[..., ids]`` with ignored ids (-100) read as id 0 (callers mask them)."""
    return log_probs.gather(-1, ids.clamp_min(0)[..., None])[..., 0]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1)


def kl_per_position(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at each position, ``[B, L]``, from two ``[B, L, V]`` log-distributions."""
    p_teacher = teacher_log_probs.exp()
    return (p_teacher * (teacher_log_probs - student_log_probs)).sum(-1)


def sample_actions(student_logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One next token per position from the student's softmax at temperature 1: ``[B, L]``."""
    probs = F.softmax(student_logits.detach().float(), dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(probs.shape[:-1])


def _check_shapes(student_logits, teacher_log_probs, attention_mask, labels) -> None:
    if student_logits.dim() != 3 or student_logits.shape != teacher_log_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher log-probs "
                         f"{tuple(teacher_log_probs.shape)} must both be [B, L, V]")
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is not None and tensor.shape != student_logits.shape[:2]:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != [B, L] = {tuple(student_logits.shape[:2])}")


def ntp_policy_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    actions: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reinforce_temperature: float = DEFAULT_REINFORCE_TEMPERATURE,
    clip_negative_rewards: bool = True,
    policy_loss_weight: float = 1.0,
    nll_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The NTP stage's loss (module docstring, part 1) from the student's logits ``[B, L, V]``.

    ``teacher_log_probs`` ``[B, L, V]`` (:func:`teacher_log_probs`); ``labels`` ``[B, L]`` unshifted,
    -100 ignored; ``actions`` ``[B, L]`` replace sampling from the student (tests, replays).
    Returns the loss and detached terms.
    """
    _check_shapes(student_logits, teacher_log_probs, attention_mask, labels)
    if reinforce_temperature <= 0:
        raise ValueError(f"reinforce_temperature must be > 0, got {reinforce_temperature}")
    teacher_log_probs = teacher_log_probs.detach().float()  # a fixed target: no gradient into the teacher
    targets = next_token_targets(labels, attention_mask)  # [B, L]
    valid = targets != IGNORE
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)  # [B, L, V]
    student_target_lp = _gather(student_log_probs, targets)
    teacher_target_lp = _gather(teacher_log_probs, targets)
    rewards = (student_target_lp.detach() - teacher_target_lp) * valid  # [B, L], no grad: a reward
    advantages = rewards.clamp_min(0) if clip_negative_rewards else rewards
    if actions is None:
        actions = sample_actions(student_logits, generator)
    elif actions.shape != targets.shape:
        raise ValueError(f"actions shape {tuple(actions.shape)} != [B, L] = {tuple(targets.shape)}")
    action_lp = _gather(F.log_softmax(student_logits.float() / reinforce_temperature, dim=-1), actions)
    policy_loss = -_masked_mean(advantages * action_lp, valid)
    nll = -_masked_mean(student_target_lp, valid)
    loss = policy_loss_weight * policy_loss + nll_weight * nll
    terms = {
        "loss": loss,
        "policy_loss": policy_loss,
        "nll": nll,
        "teacher_nll": -_masked_mean(teacher_target_lp, valid),
        "reward_mean": _masked_mean(rewards, valid),
        "advantage_positive_fraction": _masked_mean((advantages > 0).float(), valid),
        "kl": _masked_mean(kl_per_position(teacher_log_probs, student_log_probs), attention_mask.bool()),
        "positions": valid.sum().float(),
    }
    return loss, {name: value.detach() for name, value in terms.items()}


def distillation_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    kl_weight: float = 1.0,
    nll_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation (module docstring, part 2): kl_weight x mean KL(teacher || student) over real
    positions + nll_weight x token NLL on ``labels`` (needed only when ``nll_weight`` is not 0)."""
    _check_shapes(student_logits, teacher_log_probs, attention_mask, labels)
    if nll_weight and labels is None:
        raise ValueError("nll_weight > 0 needs labels")
    real = attention_mask.bool()
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
    kl = _masked_mean(kl_per_position(teacher_log_probs.detach().float(), student_log_probs), real)
    nll = torch.zeros((), device=kl.device)
    if labels is not None:
        targets = next_token_targets(labels, attention_mask)
        nll = -_masked_mean(_gather(student_log_probs, targets), targets != IGNORE)
    loss = kl_weight * kl + nll_weight * nll
    terms = {"loss": loss, "kl": kl, "nll": nll, "positions": real.sum().float()}
    return loss, {name: value.detach() for name, value in terms.items()}


def forward_student(student, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The student's next-token logits ``[B, L, V]``, at the teacher's position ids (left padding agrees)."""
    return student(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=base_position_ids(attention_mask), use_cache=False).logits


def _batch(teacher, student, input_ids, attention_mask, labels, generator):
    check_student(student, teacher)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = input_ids if labels is None else labels
    teacher_lp = teacher_log_probs(teacher, input_ids, attention_mask, generator=generator)
    return forward_student(student, input_ids, attention_mask), teacher_lp, attention_mask, labels


def ntp_policy_loss(teacher, student, input_ids, attention_mask=None, labels=None, *,
                    generator: torch.Generator | None = None, **settings):
    """:func:`ntp_policy_loss_from_logits` on a batch: the teacher thinks (no grad), the student does not.

    ``labels`` default to ``input_ids``; ``settings``: ``reinforce_temperature``,
    ``clip_negative_rewards``, ``policy_loss_weight``, ``nll_weight``, ``actions``.
    ``generator`` drives the teacher's thoughts and the student's actions.
    """
    logits, teacher_lp, attention_mask, labels = _batch(teacher, student, input_ids, attention_mask, labels, generator)
    return ntp_policy_loss_from_logits(logits, teacher_lp, attention_mask, labels, generator=generator, **settings)


def distillation_loss(teacher, student, input_ids, attention_mask=None, labels=None, *,
                      generator: torch.Generator | None = None, **settings):
    """:func:`distillation_loss_from_logits` on a batch; ``settings``: ``kl_weight``, ``nll_weight``."""
    logits, teacher_lp, attention_mask, labels = _batch(teacher, student, input_ids, attention_mask, labels, generator)
    return distillation_loss_from_logits(logits, teacher_lp, attention_mask, labels, **settings)
