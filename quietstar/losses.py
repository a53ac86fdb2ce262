"""Quiet-STaR losses (docs/ALGORITHM.md, "Losses"): NLL on the true future tokens and REINFORCE on thoughts.

Conventions (all chosen here, tested in tests/test_losses.py):
* ``targets[b, i, k] = labels[b, i+1+k]``, or -100 when that token does not exist, its label is
  -100, or position i or i+1+k is padding (padding is ignored by the attention mask, so real EOS
  targets are kept).
* NLL terms are token means over the valid targets of the whole batch (passes included).
* Rewards, advantages and the policy term exist only at positions whose K targets are all valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_ahead(x: torch.Tensor, n_ahead: int, fill=0) -> torch.Tensor:
    """``[B, L, ...]`` -> ``[B, L, n_ahead, ...]`` with ``out[:, i, k] = x[:, i + k]`` (``fill`` past the end)."""
    L = x.shape[1]
    shifted = []
    for k in range(n_ahead):
        tail = x.new_full((x.shape[0], min(k, L), *x.shape[2:]), fill)
        shifted.append(torch.cat([x[:, k:], tail], dim=1))
    return torch.stack(shifted, dim=2)


def talk_targets(labels: torch.Tensor, attention_mask: torch.Tensor, n_talk_tokens: int) -> torch.Tensor:
    """``[B, L]`` labels -> ``[B, L, K]`` targets of the predictions at each position (see module doc)."""
    real = attention_mask.bool()
    next_labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)
    next_real = torch.cat([real[:, 1:], real.new_zeros((real.shape[0], 1))], dim=1)
    targets = shift_ahead(next_labels, n_talk_tokens, fill=IGNORE)  # [B, L, K]
    ok = shift_ahead(next_real, n_talk_tokens, fill=False) & real[:, :, None] & (targets != IGNORE)
    return targets.masked_fill(~ok, IGNORE)


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for logits ``[..., V]`` and targets ``[...]``; 0 where the target is ignored. fp32."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    return -nll.view(targets.shape)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def mix_logits(base_logits: torch.Tensor, talk_logits: torch.Tensor, mixing_weights: torch.Tensor) -> torch.Tensor:
    """Mixed prediction of x_{i+1+k}: ``(1 - w) * base logits at i+k + w * talk logits`` (ALGORITHM.md, "Predictions").

    talk_logits ``[B, C, K, V]`` and mixing_weights ``[B, C, K]`` for positions i = a..a+C-1;
    base_logits ``[B, C', V]`` for positions a..a+C'-1 with C' >= C (the K-1 positions past the
    last i, where they exist, are the ones mixed in; past the end the base logits count as 0).
    Returns ``[B, C, K, V]``. The full-tensor path passes a = 0, C' = C = L; the chunked path a chunk.
    """
    C, K = talk_logits.shape[1], talk_logits.shape[2]
    w = mixing_weights[..., None].to(talk_logits.dtype)
    return (1 - w) * shift_ahead(base_logits, K)[:, :C] + w * talk_logits


def target_log_probs(base_logits: torch.Tensor, mixed_logits: torch.Tensor, targets: torch.Tensor):
    """``(base_lp [B, L], mixed_lp [B, L, K])``: log p_base(x_{i+1}) and log p_mixed(x_{i+1+k} | thought at i).

    0 where the target is ignored; fp32.
    """
    return token_log_probs(base_logits, targets[:, :, 0]), token_log_probs(mixed_logits, targets)


def thought_rewards(base_lp: torch.Tensor, mixed_lp: torch.Tensor, targets: torch.Tensor):
    """REINFORCE rewards of the thoughts, ``(rewards [B, L], rewarded [B, L])``, from :func:`target_log_probs`.

    r_i = sum_k [log p_mixed(x_{i+1+k} | thought at i) - log p_base at position i+k (x_{i+1+k})], detached;
    only positions whose K targets all exist are rewarded (0 elsewhere).
    """
    valid = targets != IGNORE  # [B, L, K]
    K = targets.shape[-1]
    rewarded = valid.all(-1)  # [B, L]
    base_lp_ahead = shift_ahead(base_lp.detach(), K)  # [B, L, K]
    rewards = ((mixed_lp.detach() - base_lp_ahead) * valid).sum(-1) * rewarded
    return rewards, rewarded


def quietstar_loss(
    *,
    base_log_probs: torch.Tensor,
    mixed_log_probs: torch.Tensor,
    thought_log_probs: torch.Tensor,
    targets: torch.Tensor,
    n_passes: int,
    base_loss_weight: float,
    talk_loss_weight: float,
    policy_loss_weight: float,
    clip_negative_advantages: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss, rewards ``[B, L]``, advantages ``[B, L]`` and the detached loss terms.

    base_log_probs ``[B, L]`` and mixed_log_probs ``[B, L, K]`` of the targets (:func:`target_log_probs`
    or its chunked twin, quietstar/chunked_log_probs.py); thought_log_probs ``[B, L, N]`` (log pi of
    each sampled thought token, at the REINFORCE temperature); targets ``[B, L, K]``; passes of one
    sequence adjacent in B.
    """
    valid = targets != IGNORE  # [B, L, K]
    K = targets.shape[-1]
    base_lp, mixed_lp = base_log_probs, mixed_log_probs
    rewards, rewarded = thought_rewards(base_lp, mixed_lp, targets)

    nll_base = -_masked_mean(base_lp, valid[:, :, 0])
    nll_talk = -torch.stack([_masked_mean(mixed_lp[:, :, k], valid[:, :, k]) for k in range(K)]).mean()
    lm_loss = base_loss_weight * nll_base + talk_loss_weight * nll_talk

    advantages = rewards
    if n_passes > 1:  # baseline: the mean reward of the P thoughts at the same position
        grouped = rewards.view(-1, n_passes, rewards.shape[-1])
        advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view_as(rewards)
    if clip_negative_advantages:
        advantages = advantages.clamp_min(0)
    advantages = advantages * rewarded

    n_actions = (rewarded.sum() * thought_log_probs.shape[-1]).clamp_min(1)
    policy_loss = -(advantages[:, :, None] * thought_log_probs).sum() / n_actions
    loss = lm_loss + policy_loss_weight * policy_loss

    rewarded_f = rewarded.float()
    reward_mean = _masked_mean(rewards, rewarded_f)
    terms = {
        "loss": loss,
        "lm_loss": lm_loss,
        "nll_base": nll_base,
        "nll_talk": nll_talk,
        "policy_loss": policy_loss,
        "reward_mean": reward_mean,
        "reward_std": _masked_mean((rewards - reward_mean) ** 2, rewarded_f).sqrt(),
        "advantage_mean": _masked_mean(advantages, rewarded_f),
        "advantage_positive_fraction": _masked_mean((advantages > 0).float(), rewarded_f),
        "thought_log_prob_mean": _masked_mean(thought_log_probs.mean(-1), rewarded_f),
        "rewarded_positions": rewarded_f.sum(),
    }
    for k in range(K):
        terms[f"nll_talk_{k}"] = -_masked_mean(mixed_lp[:, :, k], valid[:, :, k])
    return loss, rewards, advantages, {name: value.detach() for name, value in terms.items()}
