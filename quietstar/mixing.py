"""The mixing head: how much of the post-thought prediction to trust (ALGORITHM.md, "Mixing head")."""

from __future__ import annotations

import torch
from torch import nn


class MixingHead(nn.Module):
    """``w = MLP([h_base ; h_thought])``: Linear(2H, H), ReLU, Linear(H, H), ReLU, Linear(H, 1, no bias).

    The last layer is zero-initialised, so ``w = 0`` and the wrapped model starts as the base model.
    ``activation="sigmoid"`` squashes w into (0, 1) (then w = 0.5 at init); the reference uses the raw output.
    """

    def __init__(self, hidden_size: int, activation: str = "none"):
        super().__init__()
        self.activation = activation
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, 1, bias=False),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        nn.init.zeros_(self.mlp[-1].weight)

    def forward(self, base_hidden: torch.Tensor, thought_hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` x 2 -> ``[...]`` mixing weights."""
        x = torch.cat([base_hidden, thought_hidden], dim=-1).to(self.mlp[0].weight.dtype)
        w = self.mlp(x).squeeze(-1)
        return torch.sigmoid(w) if self.activation == "sigmoid" else w
