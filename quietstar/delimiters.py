"""Learned ``<|startthought|>`` / ``<|endthought|>`` vectors served through the base model's own input
embedding, so the delimiters are ordinary token ids to everything (tokenizer, a plain sequential run
of ``model.base_lm``, generation).

The vectors are stored divided by ``embedding_scale`` and multiplied back when used: Adam's update
size is set by the learning rate, not the gradient, so this gives the delimiters an effective
learning rate ``embedding_scale`` times the optimiser's (the reference's 100x trick).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ThoughtDelimiterEmbedding(nn.Embedding):
    """``nn.Embedding`` whose two delimiter ids read from ``delimiter_embeddings``.

    Shares the original embedding's ``weight`` Parameter (so tying with ``lm_head`` and state-dict
    names are unchanged); the delimiter ids may lie inside or beyond the table.
    """

    def __init__(self, base: nn.Embedding, start_id: int, end_id: int, embedding_scale: float):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight
        self.start_id, self.end_id, self.embedding_scale = int(start_id), int(end_id), float(embedding_scale)
        # Row 0: start of thought, row 1: end of thought; stored / embedding_scale.
        self.delimiter_embeddings = nn.Parameter(
            torch.zeros(2, base.embedding_dim, dtype=base.weight.dtype, device=base.weight.device)
        )

    def init_delimiters(self, vector: torch.Tensor) -> None:
        with torch.no_grad():
            self.delimiter_embeddings.copy_((vector / self.embedding_scale).expand_as(self.delimiter_embeddings))

    def effective_delimiters(self) -> torch.Tensor:
        return self.delimiter_embeddings * self.embedding_scale  # [2, H]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_start, is_end = input_ids == self.start_id, input_ids == self.end_id
        safe_ids = input_ids.masked_fill(is_start | is_end, 0)  # the ids may lie beyond the table
        embeds = F.embedding(
            safe_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        delimiters = self.effective_delimiters().to(embeds.dtype)
        embeds = torch.where(is_start[..., None], delimiters[0], embeds)
        return torch.where(is_end[..., None], delimiters[1], embeds)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, thought delimiters=({self.start_id}, {self.end_id}) x{self.embedding_scale:g}"
