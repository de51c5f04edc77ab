"""Normalisation on ``Tensor[B, C, H, W]``."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

__all__ = ["LayerNormProxy"]


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of a ``Tensor[B, C, H, W]`` (official name and state_dict layout: ``.norm``)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
