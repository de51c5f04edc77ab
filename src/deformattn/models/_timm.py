"""Registration of the DAT / DAT++ variants with timm (imported only by :func:`~deformattn.models.timm_register`).

``timm.create_model(name, ...)`` then builds our :class:`~deformattn.models.DAT` through timm's
``build_model_with_cfg``: ``features_only=True`` wraps it in timm's ``FeatureGetterNet`` (which calls
``forward_intermediates``), and local weights load with ``pretrained=True,
pretrained_cfg_overlay=dict(file=path)`` through :func:`~deformattn.models.dat.checkpoint_filter_fn`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from timm.models import PretrainedCfg, build_model_with_cfg, generate_default_cfgs, is_model, register_model

from .dat import DAT, MODEL_CONFIGS, checkpoint_filter_fn
from .dat import default_cfgs as _our_cfgs
from ._entrypoints import pretrained_unavailable

__all__ = ["register_all", "default_cfgs"]

_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}


def _timm_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k in _FIELDS and k != "url"}
    facts = [f"{k}={cfg[k]}" for k in ("top1", "params_m", "gmacs") if cfg.get(k) is not None]
    if facts:
        out["notes"] = ("published ImageNet-1k results: " + ", ".join(facts),)
    return out


# read by timm's register_model from this module (fn.__module__)
default_cfgs = generate_default_cfgs({name: _timm_cfg(cfg) for name, cfg in _our_cfgs.items()})


def _has_local_weights(kwargs: dict[str, Any]) -> bool:
    sources = [kwargs.get("pretrained_cfg_overlay") or {}, kwargs.get("pretrained_cfg") or {}]
    for src in sources:
        get = src.get if isinstance(src, dict) else lambda k, s=src: getattr(s, k, None)
        if get("file") or get("state_dict") is not None:
            return True
    return False


def _entrypoint(variant: str) -> Callable[..., DAT]:
    def fn(pretrained: bool = False, **kwargs: Any) -> DAT:
        if pretrained and not _has_local_weights(kwargs):
            raise pretrained_unavailable(variant)
        config = dict(MODEL_CONFIGS[variant])
        config.update(kwargs)
        return build_model_with_cfg(
            DAT,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
            **config,
        )

    fn.__name__ = fn.__qualname__ = variant
    fn.__module__ = __name__
    fn.__doc__ = f"{variant} (deformattn): see deformattn.models.dat.{variant}."
    return fn


def register_all() -> None:
    """Register every variant not yet known to timm (idempotent)."""
    for variant in MODEL_CONFIGS:
        if not is_model(variant):
            register_model(_entrypoint(variant))
