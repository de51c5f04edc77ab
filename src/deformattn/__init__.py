"""deformattn: deformable attention for vision (DAT, DAT++) in PyTorch."""
from __future__ import annotations

from . import functional
from .attention import DeformableAttention2d

__version__ = "0.1.0"

__all__ = ["DeformableAttention2d", "functional", "__version__"]
