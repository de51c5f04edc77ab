"""The table of model entrypoints (a leaf module: model files register into it, the registry reads it)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

__all__ = ["register_model", "PretrainedWeightsUnavailableError", "pretrained_unavailable"]

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entrypoint ``fn(pretrained=False, **kwargs)`` under its ``__name__``."""
    _model_entrypoints[fn.__name__] = fn
    return fn


class PretrainedWeightsUnavailableError(RuntimeError, ValueError):
    """``pretrained=True`` without a local checkpoint: the library never downloads weights.

    A ``RuntimeError`` (what timm raises for missing weights) and a ``ValueError`` (a bad argument combination).
    """


def pretrained_unavailable(name: str) -> PretrainedWeightsUnavailableError:
    return PretrainedWeightsUnavailableError(
        f"create_model: pretrained=True for {name!r} needs checkpoint_path: deformattn never downloads weights. "
        "Download the official checkpoint (links in https://github.com/LeapLabTHU/DAT) and pass "
        f"create_model({name!r}, checkpoint_path='path/to/checkpoint.pth') (with timm: "
        "pretrained_cfg_overlay=dict(file='path/to/checkpoint.pth'))."
    )
