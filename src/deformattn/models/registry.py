"""Model registry: ``create_model`` / ``list_models`` by name, and the optional registration with timm.

timm is never needed: :func:`timm_register` imports it only when asked (and only if it is installed) and makes the
variants available to ``timm.create_model``.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib.util
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from .._utils import InvalidArgumentError
from . import dat  # noqa: F401  (importing registers the variants)
from ._entrypoints import (  # noqa: F401  (re-exported)
    PretrainedWeightsUnavailableError,
    _model_entrypoints,
    pretrained_unavailable,
    register_model,
)
from ._helpers import clean_key, load_checkpoint, read_checkpoint

__all__ = [
    "register_model",
    "list_models",
    "is_model",
    "model_entrypoint",
    "check_model_name",
    "create_model",
    "timm_register",
    "PretrainedWeightsUnavailableError",
]

def list_models(filter: str = "") -> list[str]:
    """Sorted names of the registered variants, optionally filtered by a wildcard pattern (``"dat_pp_*"``)."""
    names = sorted(_model_entrypoints)
    return [n for n in names if fnmatch.fnmatch(n, filter)] if filter else names


def is_model(name: str) -> bool:
    return name in _model_entrypoints


def check_model_name(name: Any, argument: str = "model_name") -> str:
    """``name`` if it is a registered variant; else a ``TypeError`` / ``ValueError`` (an
    :class:`~deformattn._utils.InvalidArgumentError` naming ``argument``) with close matches and the list."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str, got {type(name).__name__}")
    if name not in _model_entrypoints:
        close = difflib.get_close_matches(name, list(_model_entrypoints), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted(_model_entrypoints))
        raise InvalidArgumentError(argument, f"unknown model {name!r}.{hint} Registered models: {known}")
    return name


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder of a registered variant; a ``ValueError`` with close matches otherwise."""
    return _model_entrypoints[check_model_name(name)]


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    checkpoint_weights_only: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Build a registered variant by name, optionally loading a checkpoint.

    Args:
        model_name: see :func:`list_models` (``dat_tiny`` ... ``dat_pp_base_384``, ``dat_nano``).
        pretrained: load weights; needs ``checkpoint_path`` (nothing is downloaded).
        checkpoint_path: an official checkpoint (``{"model": state_dict}`` or a bare state_dict), a bare
            ``model.state_dict()`` of this library, or a training checkpoint (``{"model": ..., "model_name": ...,
            "model_kwargs": ...}``; its ``model_kwargs`` are used when it was saved from the same variant). Without
            an explicit ``num_classes`` the classifier size is taken from the checkpoint; with one that differs the
            classifier keeps its initialisation (fine-tuning) and a warning says so. Relative position tables are
            resized when the checkpoint was made at another resolution. A checkpoint of another variant raises a
            ``ValueError`` listing the keys / shapes that differ, and nothing is loaded.
        num_classes, img_size: the usual overrides (``img_size`` sizes the position tables; any input size runs).
        checkpoint_weights_only: read the checkpoint with ``torch.load(weights_only=True)`` (tensors and plain
            containers only). Intact checkpoints that pickle other objects (e.g. a yacs config saved by the official
            training script) need False; use it only for files you trust. A truncated or damaged file raises a
            :class:`~deformattn.models.CheckpointError` that says so, whatever this flag.
        **overrides: any other :class:`~deformattn.models.DAT` argument (``drop_path_rate``, ``backend``, ...).

    Returns:
        The model (in training mode, as ``nn.Module`` s are built), with ``pretrained_cfg`` describing its input.
    """
    fn = model_entrypoint(model_name)
    if pretrained and checkpoint_path is None:
        raise pretrained_unavailable(model_name)
    kwargs: dict[str, Any] = {}
    state_dict = None
    meta: dict[str, Any] = {}
    if checkpoint_path is not None:
        state_dict, meta = read_checkpoint(checkpoint_path, weights_only=checkpoint_weights_only)
        saved_name = meta.get("model_name")
        saved_kwargs = meta.get("model_kwargs")
        if isinstance(saved_kwargs, dict) and saved_name in (None, model_name):
            kwargs.update(saved_kwargs)
        if num_classes is None:
            head = {clean_key(k): v for k, v in state_dict.items() if k.endswith("cls_head.weight")}
            kwargs["num_classes"] = int(head["cls_head.weight"].shape[0]) if "cls_head.weight" in head else 0
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    kwargs.update(overrides)
    model = fn(pretrained=False, **kwargs)
    if state_dict is not None:
        load_checkpoint(model, {"model": state_dict, **meta}, skip_mismatched_head=num_classes is not None)
        if isinstance(getattr(model, "pretrained_cfg", None), dict):
            model.pretrained_cfg["file"] = str(checkpoint_path)
    return model


def timm_register() -> bool:
    """Register every variant with timm (``timm.create_model("dat_pp_tiny", features_only=True)``).

    Returns False (and does nothing) when timm is not installed; idempotent.
    """
    if importlib.util.find_spec("timm") is None:
        return False
    from . import _timm

    _timm.register_all()
    return True
