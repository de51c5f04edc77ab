"""Generic blocks shared by the DAT / DAT++ models (all on ``Tensor[B, C, H, W]``)."""
from __future__ import annotations

from .drop import DropPath, LayerScale, drop_path
from .mlp import ConvFFN, Mlp
from .norm import LayerNormProxy
from .neighborhood_attention import NeighborhoodAttention2d, neighborhood_attention2d
from .stem import ConvStem, Downsample, LocalPerceptionUnit, PatchifyStem
from .window_attention import WindowAttention

__all__ = [
    "ConvFFN",
    "ConvStem",
    "DropPath",
    "Downsample",
    "LayerNormProxy",
    "LayerScale",
    "LocalPerceptionUnit",
    "Mlp",
    "NeighborhoodAttention2d",
    "PatchifyStem",
    "WindowAttention",
    "drop_path",
    "neighborhood_attention2d",
]
