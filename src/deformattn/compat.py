"""Bridge to the official LeapLabTHU/DAT code: its constructor keyword arguments and state_dict names.

``attention_from_official`` builds a :class:`DeformableAttention2d` from the keyword arguments of the official
``DAttentionBaseline`` (DAT++ HEAD: ``version="pp"``; CVPR 2022 code: ``version="v1"``). Parameter names are the
official ones, so an official state_dict loads strictly as it is.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .attention import DeformableAttention2d

__all__ = [
    "native_kwargs_from_official",
    "attention_from_official",
    "backbone_from_official",
    "neighborhood_attention_from_official",
]

_V1_KSIZES = (9, 7, 5, 3)  # v1 picks the offset kernel by stage index


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def native_kwargs_from_official(config: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Translate official ``DAttentionBaseline`` kwargs into :class:`DeformableAttention2d` kwargs.

    The official flags map to one ``pos_bias`` kind: ``use_pe=False`` -> ``"none"``; else ``dwc_pe`` -> ``"dwc"``,
    ``fixed_pe`` -> ``"fixed"``, ``log_cpb`` (DAT++) -> ``"log_cpb"``, otherwise ``"table"``. DAT++ builds no bias
    at all when ``no_off`` (so ``no_off`` with ``dwc_pe``, which crashes there, runs here without a bias).
    """
    if version not in ("pp", "v1"):
        raise ValueError(f"native_kwargs_from_official: version must be 'pp' or 'v1', got {version!r}")
    missing = [k for k in ("q_size", "n_heads", "n_head_channels", "n_groups", "stride") if k not in config]
    if missing:
        raise ValueError(f"native_kwargs_from_official: config lacks {missing} (got keys {sorted(config)})")
    n_heads, hc = int(config["n_heads"]), int(config["n_head_channels"])
    use_pe = bool(config.get("use_pe", True))
    no_off = bool(config.get("no_off", False))
    if not use_pe or (version == "pp" and no_off):
        pos_bias = "none"
    elif config.get("dwc_pe", False):
        pos_bias = "dwc"
    elif config.get("fixed_pe", False):
        pos_bias = "fixed"
    elif version == "pp" and config.get("log_cpb", False):
        pos_bias = "log_cpb"
    else:
        pos_bias = "table"
    if version == "v1":
        ksize = _V1_KSIZES[int(config.get("stage_idx", 3))]
    else:
        ksize = int(config.get("ksize", 3))
    q_size = _pair(config["q_size"])
    kv_size = _pair(config["kv_size"]) if config.get("kv_size") is not None else None
    stride = int(config["stride"])
    if version == "pp":
        kv_size = (q_size[0] // stride, q_size[1] // stride)  # DAT++ ignores the kv_size argument
    return dict(
        dim=n_heads * hc,
        num_heads=n_heads,
        offset_groups=int(config["n_groups"]),
        stride=stride,
        offset_kernel_size=ksize,
        offset_range_factor=float(config.get("offset_range_factor", -1)),
        pos_bias=pos_bias,
        q_size=q_size,
        kv_size=kv_size,
        no_off=no_off,
        version=version,
        attn_drop=float(config.get("attn_drop", 0.0)),
        proj_drop=float(config.get("proj_drop", 0.0)),
    )


def attention_from_official(
    config: Mapping[str, Any], version: str, state_dict: Mapping[str, torch.Tensor] | None = None
) -> DeformableAttention2d:
    """A :class:`DeformableAttention2d` equal to the official ``DAttentionBaseline(**config)``.

    Args:
        config: the official constructor keyword arguments (as stored in the ``dattn`` fixtures).
        version: ``"pp"`` (DAT++) or ``"v1"`` (DAT, CVPR 2022).
        state_dict: an official state_dict, loaded strictly (its dtype is kept: float64 in, float64 module).

    The module runs its fast path (``backend=None``); ``forward(x, return_sampling=True)`` returns the official
    ``(output, pos, reference)``.
    """
    module = DeformableAttention2d(**native_kwargs_from_official(config, version))
    if state_dict is not None:
        dtypes = {v.dtype for v in state_dict.values() if torch.is_tensor(v) and v.is_floating_point()}
        if len(dtypes) == 1:
            module.to(dtypes.pop())
        module.load_state_dict(dict(state_dict), strict=True)
    return module


def backbone_from_official(config: Mapping[str, Any], version: str, state_dict=None):
    """The DAT / DAT++ classifier built from the official ``DAT`` constructor kwargs (see :mod:`deformattn.models`)."""
    from .models._official import backbone_from_official as impl

    return impl(config, version, state_dict)


def neighborhood_attention_from_official(config: Mapping[str, Any], state_dict=None):
    """Our neighborhood attention built from the official ``NeighborhoodAttention2D`` kwargs (natten 0.14)."""
    from .models._official import neighborhood_attention_from_official as impl

    return impl(config, state_dict)
