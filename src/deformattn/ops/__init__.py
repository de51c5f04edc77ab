"""Pure tensor operations beyond DAT's: the multi-scale deformable attention core of Deformable DETR
(:mod:`deformattn.ops.msda`), with its reference and fast paths."""
from __future__ import annotations

from .msda import multi_scale_deformable_attention

__all__ = ["multi_scale_deformable_attention"]
