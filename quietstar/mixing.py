"""The mixing head: how much of the post-thought prediction to trust (docs/ALGORITHM.md, "Mixing head")."""

from __future__ import annotations

import torch
from torch import nn

# The reference's Mistral initialiser range (MistralConfig.initializer_range); used when the base
# config has none.
DEFAULT_INIT_STD = 0.02


class MixingHead(nn.Module):
    """``w = MLP([h_base ; h_thought])``: Linear(2H, H), ReLU, Linear(H, H), ReLU, Linear(H, 1, no bias).

    Initialised as the reference's head is in a loaded Mistral: the hidden layers get the base
    model's own init (weights N(0, ``init_std``), biases 0; ``MistralPreTrainedModel._init_weights``
    in the official ``modeling_mistral.py``) and the last layer is zero (its first forward zeroes
    it, ``rm_initialized``), so ``w = 0`` and the wrapped model starts as the base model.
    ``activation="sigmoid"`` squashes w into (0, 1) (then w = 0.5 at init); the reference uses the raw output.
    """

    def __init__(self, hidden_size: int, activation: str = "none", init_std: float = DEFAULT_INIT_STD):
        super().__init__()
        self.activation = activation
        self.init_std = float(init_std)
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, 1, bias=False),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Not PyTorch's default Linear init (uniform +-1/sqrt(fan_in), random biases): at H = 4096
        # that is 2-3x smaller weights (std 0.0064 and 0.0090 against 0.02) and gives the hidden layers random offsets, so w and the
        # reward would start slower than the reference's.
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, mean=0.0, std=self.init_std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.mlp[-1].weight)

    def forward(self, base_hidden: torch.Tensor, thought_hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` x 2 -> ``[...]`` mixing weights."""
        x = torch.cat([base_hidden, thought_hidden], dim=-1).to(self.mlp[0].weight.dtype)
        w = self.mlp(x).squeeze(-1)
        return torch.sigmoid(w) if self.activation == "sigmoid" else w


def mixing_weight_stats(mixing_weights: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and std of w over real positions, without a host sync."""
    real = attention_mask[:, :, None].expand_as(mixing_weights).float()
    count = real.sum().clamp_min(1)
    mean = (mixing_weights.float() * real).sum() / count
    std = (((mixing_weights.float() - mean) ** 2 * real).sum() / count).sqrt()
    return {"mixing_weight_mean": mean, "mixing_weight_std": std}
