"""Residual-branch regularisers: stochastic depth (``DropPath``) and per-channel ``LayerScale``."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_float

__all__ = ["drop_path", "DropPath", "LayerScale"]


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """Drop the whole residual branch per sample with probability ``drop_prob`` (stochastic depth).

    ``training`` is explicit: nothing is dropped unless it is True. Kept samples are scaled by ``1 / (1 - p)`` so
    the expectation is unchanged.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)  # one draw per sample
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (timm semantics, identity in eval mode)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = check_float(drop_prob, "drop_prob", "DropPath", minimum=0.0, maximum=1.0)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch on ``Tensor[B, C, H, W]`` (CaiT; DAT++ option).

    The parameter is called ``weight`` as in the official code (``stages.i.layer_scales.j.weight``).
    """

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        init_values = check_float(init_values, "init_values", "LayerScale")
        self.weight = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(-1, 1, 1)
