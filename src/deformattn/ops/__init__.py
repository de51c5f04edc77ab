"""Pure tensor operations beyond DAT's: the multi-scale deformable attention core of Deformable DETR
(:mod:`deformattn.ops.msda`); its reference and fast paths are in :mod:`deformattn.backends` (``msda_reference``,
``msda_fast``), chosen by the package's one dispatcher."""
from __future__ import annotations

from .msda import multi_scale_deformable_attention

__all__ = ["multi_scale_deformable_attention"]
