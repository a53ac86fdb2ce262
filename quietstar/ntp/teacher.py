"""The two models of the thought-free stage: a frozen thinking teacher and a plain student.

    teacher = freeze_teacher(QuietStarForCausalLM.from_pretrained(run_dir))  # eval, no grads
    student = make_student(teacher)              # a copy of teacher.base_lm, the base class, no thoughts
    log_p_teacher = teacher_log_probs(teacher, input_ids, attention_mask)   # [B, L, V], no grad

The student is the base architecture as transformers ships it (``LlamaForCausalLM``, ...): the
delimiter embedding wrapper is replaced by a plain ``nn.Embedding`` over the same weight tensor, and
the attention path is set back to a stock one, so it runs, trains, generates and saves as the base
model does.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..delimiters import ThoughtDelimiterEmbedding
from ..lora import check_no_adapters
from ..modeling import QuietStarForCausalLM


def freeze_teacher(teacher: QuietStarForCausalLM) -> QuietStarForCausalLM:
    """Eval mode (no dropout) and ``requires_grad=False`` on every parameter, in place; returns it."""
    if not isinstance(teacher, QuietStarForCausalLM):
        raise TypeError(f"the teacher must be a QuietStarForCausalLM (a thinking model), got {type(teacher).__name__}")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def check_frozen(teacher) -> None:
    if not isinstance(teacher, QuietStarForCausalLM):
        raise TypeError(f"the teacher must be a QuietStarForCausalLM (a thinking model), got {type(teacher).__name__}")
    if teacher.training:
        raise ValueError("the teacher is in train mode (dropout on); call quietstar.ntp.freeze_teacher(teacher) first")


@torch.no_grad()
def teacher_log_probs(teacher: QuietStarForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The thinking teacher's next-token log-distribution ``[B, L, V]`` (fp32, no grad).

    Position i holds log p_teacher(. | x_0..x_i, thought at i): the mixed prediction (``out.logits``)
    with thoughts sampled at ``teacher.config.thought_temperature`` (0 = greedy). The delimiter ids
    the head can produce are removed (the teacher never emits them; generation bans them too). With
    ``n_passes`` P > 1 the P thoughts' distributions are averaged: log of the mean probability.
    """
    check_frozen(teacher)
    out = teacher(input_ids, attention_mask=attention_mask, generator=generator)
    logits = out.logits.float()  # [B * P, L, V], the P passes of a row adjacent
    banned = list(teacher.banned_token_ids)
    if banned:  # a finite floor, not -inf: p * log p stays 0 * finite = 0 in the KL
        logits[..., banned] = torch.finfo(logits.dtype).min
    log_probs = F.log_softmax(logits, dim=-1)
    P = teacher.config.n_passes
    if P == 1:
        return log_probs
    B = input_ids.shape[0]
    return torch.logsumexp(log_probs.view(B, P, *log_probs.shape[1:]), dim=1) - math.log(P)


def make_student(teacher: QuietStarForCausalLM, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A deep copy of ``teacher.base_lm`` as a plain transformers causal LM (the teacher is not touched).

    The copy's input embedding becomes a plain ``nn.Embedding`` over the copied table (tying with
    the LM head is kept: it is the same Parameter); the learned delimiter vectors are dropped, since
    a model that never thinks never reads them. ``attn_implementation`` replaces the ``quietstar_*``
    attention path (any of the base model's own: "sdpa", "eager", ...). The copy keeps the teacher's
    mode; the training loop sets ``.train()``.
    """
    if not isinstance(teacher, QuietStarForCausalLM):
        raise TypeError(f"make_student expects a QuietStarForCausalLM, got {type(teacher).__name__}")
    check_no_adapters(teacher, "make_student")
    student = copy.deepcopy(teacher.base_lm)
    embedding = student.get_input_embeddings()
    if isinstance(embedding, ThoughtDelimiterEmbedding):
        plain = nn.Embedding(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                             max_norm=embedding.max_norm, norm_type=embedding.norm_type,
                             scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse,
                             device=embedding.weight.device, dtype=embedding.weight.dtype)
        plain.weight = embedding.weight  # the copied table itself: tying with lm_head survives
        student.set_input_embeddings(plain)
    student.set_attn_implementation(attn_implementation)
    student.requires_grad_(True)
    return student


def check_student(student, teacher=None) -> None:
    """A plain causal LM (not a thinking model, no delimiter wrapper) as wide as the teacher's head."""
    if isinstance(student, QuietStarForCausalLM) or not isinstance(student, PreTrainedModel):
        raise TypeError(
            f"the student must be a plain transformers causal LM, got {type(student).__name__}; "
            "build one with quietstar.ntp.make_student(teacher)"
        )
    if isinstance(student.get_input_embeddings(), ThoughtDelimiterEmbedding):
        raise TypeError("the student still carries the thought delimiter embedding; build it with quietstar.ntp.make_student(teacher)")
    if teacher is not None:
        width = student.get_output_embeddings().out_features
        teacher_width = teacher.get_output_embeddings().out_features
        if width != teacher_width:
            raise ValueError(f"the student predicts {width} token ids but the teacher {teacher_width}; "
                             "both must share one tokenizer and head width")
