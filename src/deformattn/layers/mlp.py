"""Feed-forward layers of DAT / DAT++ on ``Tensor[B, C, H, W]``.

* :class:`Mlp`: the plain two-layer MLP (official ``TransformerMLP``; parameters under ``chunk.linear1/2``).
* :class:`ConvFFN`: the MLP with a depthwise 3x3 conv on the hidden features (official
  ``TransformerMLPWithConv``). DAT v1 applies the conv *in place of* the identity (``act(dwc(fc1(x)))``); DAT++
  adds it as a residual (``act(fc1(x) + dwc(fc1(x)))``) and wraps the 1x1 convs in a ``Sequential`` - both kept,
  so each version's checkpoints load under their own names.
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn
from torch import Tensor

from .._utils import check_float, check_int
from ..functional import VERSIONS

__all__ = ["Mlp", "ConvFFN"]


def _hidden_dim(owner: str, dim: int, mlp_ratio: int) -> int:
    check_int(dim, "dim", owner, minimum=1)
    check_int(mlp_ratio, "mlp_ratio", owner, minimum=1)
    return dim * mlp_ratio


class Mlp(nn.Module):
    """``Linear -> GELU -> Dropout -> Linear -> Dropout`` over the channels of every pixel.

    Shape: ``Tensor[B, C, H, W] -> Tensor[B, C, H, W]``.
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, drop: float = 0.0):
        super().__init__()
        hidden = _hidden_dim("Mlp", dim, mlp_ratio)
        drop = check_float(drop, "drop", "Mlp", minimum=0.0, maximum=1.0)
        self.chunk = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(dim, hidden),
                act=nn.GELU(),
                drop1=nn.Dropout(drop),
                linear2=nn.Linear(hidden, dim),
                drop2=nn.Dropout(drop),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.chunk(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # B, H, W, C -> B, C, H, W


class ConvFFN(nn.Module):
    """Feed-forward with a depthwise 3x3 conv between the two 1x1 convs.

    Args:
        dim: channels ``C``.
        mlp_ratio: hidden channels are ``mlp_ratio * C``.
        drop: dropout after each 1x1 conv.
        version: ``"pp"`` (DAT++: ``x + dwc(x)``) or ``"v1"`` (DAT: ``dwc(x)``).

    Shape: ``Tensor[B, C, H, W] -> Tensor[B, C, H, W]``.
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, drop: float = 0.0, version: str = "pp"):
        super().__init__()
        hidden = _hidden_dim("ConvFFN", dim, mlp_ratio)
        drop = check_float(drop, "drop", "ConvFFN", minimum=0.0, maximum=1.0)
        if version not in VERSIONS:
            raise ValueError(f"ConvFFN: version must be 'pp' or 'v1', got {version!r}")
        self.version = version
        fc1, fc2 = nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, dim, 1)
        # DAT++ keeps the 1x1 convs inside a Sequential: its checkpoints name them linear1.0 / linear2.0
        self.linear1 = nn.Sequential(fc1) if version == "pp" else fc1
        self.drop1 = nn.Dropout(drop)
        self.act = nn.GELU()
        self.linear2 = nn.Sequential(fc2) if version == "pp" else fc2
        self.drop2 = nn.Dropout(drop)
        self.dwc = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear1(x)  # B, hidden, H, W
        if self.version == "pp":
            x = self.drop1(x)
            x = self.act(x + self.dwc(x))
        else:
            x = self.drop1(self.act(self.dwc(x)))
        return self.drop2(self.linear2(x))

    def extra_repr(self) -> str:
        return f"version={self.version!r}"
