"""deformattn: deformable attention for vision (DAT, DAT++) in PyTorch."""
from __future__ import annotations

from typing import Any

from . import functional
from .attention import DeformableAttention2d
from .msda import MultiScaleDeformableAttention

__version__ = "0.1.0"

__all__ = ["DeformableAttention2d", "MultiScaleDeformableAttention", "create_model", "functional", "list_models",
           "__version__"]

_LAZY = {"create_model": "models", "list_models": "models"}


def __getattr__(name: str) -> Any:
    # the backbones are imported on first use, so `import deformattn` stays the core module only
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
