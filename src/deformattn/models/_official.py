"""Build our models from the official LeapLabTHU/DAT constructor arguments (re-exported by :mod:`deformattn.compat`).

* :func:`native_kwargs_from_official` / :func:`attention_from_official` do this for one ``DAttentionBaseline``.
* :func:`dat_kwargs_from_official` translates the keyword arguments of the official ``DAT`` class (DAT++ HEAD:
  ``version="pp"``; CVPR 2022 code: ``version="v1"``) into :class:`~deformattn.models.DAT` arguments, with the
  official defaults for absent keys.
* :func:`backbone_from_official` builds that model and loads an official state_dict strictly.
* :func:`neighborhood_attention_from_official` does the same for one ``NeighborhoodAttention2D``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .._utils import to_2tuple
from ..attention import DeformableAttention2d
from ..functional import VERSIONS
from ..layers import NeighborhoodAttention2d
from ._helpers import load_checkpoint, unwrap_state_dict
from .dat import BLOCK_KINDS, DAT, NUM_STAGES

__all__ = [
    "native_kwargs_from_official",
    "attention_from_official",
    "dat_kwargs_from_official",
    "backbone_from_official",
    "neighborhood_attention_from_official",
]

_V1_KSIZES = (9, 7, 5, 3)  # v1 picks the offset kernel by stage index


def native_kwargs_from_official(config: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Translate official ``DAttentionBaseline`` kwargs into :class:`DeformableAttention2d` kwargs.

    The official flags map to one ``pos_bias`` kind: ``use_pe=False`` -> ``"none"``; else ``dwc_pe`` -> ``"dwc"``,
    ``fixed_pe`` -> ``"fixed"``, ``log_cpb`` (DAT++) -> ``"log_cpb"``, otherwise ``"table"``. DAT++ builds no bias
    at all when ``no_off`` (so ``no_off`` with ``dwc_pe``, which crashes there, runs here without a bias).
    """
    if version not in VERSIONS:
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
    q_size = to_2tuple(config["q_size"], "config['q_size']", "native_kwargs_from_official")
    kv_size = to_2tuple(config["kv_size"], "config['kv_size']", "native_kwargs_from_official") if config.get("kv_size") is not None else None
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


_OWNER = "backbone_from_official"

# defaults of the official DAT.__init__ (identical in both versions where both have the argument)
_OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    img_size=224, patch_size=4, num_classes=1000, expansion=4, dim_stem=96, dims=[96, 192, 384, 768],
    depths=[2, 2, 6, 2], heads=[3, 6, 12, 24], window_sizes=[7, 7, 7, 7], drop_rate=0.0, attn_drop_rate=0.0,
    drop_path_rate=0.0, strides=[-1, -1, -1, -1], offset_range_factor=[1, 2, 3, 4],
    stage_spec=[["L", "D"], ["L", "D"], ["L", "D", "L", "D", "L", "D"], ["L", "D"]], groups=[-1, -1, 3, 6],
    use_pes=[False] * 4, dwc_pes=[False] * 4, fixed_pes=[False] * 4, no_offs=[False] * 4, use_dwc_mlps=[False] * 4,
    use_conv_patches=False, ksizes=[9, 7, 5, 3], nat_ksizes=[3, 3, 3, 3], layer_scale_values=[-1] * 4,
    use_lpus=[False] * 4, log_cpb=[False] * 4,
)
_PP_ONLY = ("ksizes", "nat_ksizes", "layer_scale_values", "use_lpus", "log_cpb")
# accepted and ignored: arguments of block kinds the released models do not use, or of nothing at all
_IGNORED = ("heads_q", "sr_ratios", "lower_lr_kvs", "ns_per_pts", "ksize_qnas", "nqs", "qna_activation")


def _stage_list(config: Mapping[str, Any], key: str) -> list:
    value = config.get(key, _OFFICIAL_DEFAULTS[key])
    if not isinstance(value, (list, tuple)) or len(value) != NUM_STAGES:
        raise ValueError(f"{_OWNER}: config[{key!r}] must be a list of {NUM_STAGES} per-stage values, got {value!r}")
    return list(value)


def dat_kwargs_from_official(config: Mapping[str, Any], version: str) -> dict[str, Any]:
    """:class:`~deformattn.models.DAT` keyword arguments equal to the official ``DAT(**config)``.

    Args:
        config: official constructor kwargs (as in the ``backbone_*`` fixtures and the manifests).
        version: ``"pp"`` (DAT++) or ``"v1"`` (DAT).
    """
    if version not in VERSIONS:
        raise ValueError(f"{_OWNER}: version must be 'pp' or 'v1', got {version!r}")
    if not isinstance(config, Mapping):
        raise TypeError(f"{_OWNER}: config must be a dict of the official DAT kwargs, got {type(config).__name__}")
    known = set(_OFFICIAL_DEFAULTS) | set(_IGNORED)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{_OWNER}: config has arguments the official DAT does not take: {unknown}")
    if version == "v1":
        v1_unknown = sorted(k for k in _PP_ONLY if k in config)
        if v1_unknown:
            raise ValueError(f"{_OWNER}: {v1_unknown} exist only in the DAT++ code (version='pp')")

    def get(key: str) -> Any:
        return config.get(key, _OFFICIAL_DEFAULTS[key])

    depths = _stage_list(config, "depths")
    spec_in = _stage_list(config, "stage_spec")
    dims, heads = _stage_list(config, "dims"), _stage_list(config, "heads")
    img_size, patch_size = get("img_size"), int(get("patch_size"))
    window_sizes = _stage_list(config, "window_sizes")
    groups, strides = _stage_list(config, "groups"), _stage_list(config, "strides")
    orfs = _stage_list(config, "offset_range_factor")
    use_pes, dwc_pes = _stage_list(config, "use_pes"), _stage_list(config, "dwc_pes")
    fixed_pes, no_offs = _stage_list(config, "fixed_pes"), _stage_list(config, "no_offs")
    ksizes, log_cpbs = _stage_list(config, "ksizes"), _stage_list(config, "log_cpb")

    spec, pos_biases, ksize_out, groups_out, strides_out = [], [], [], [], []
    if isinstance(img_size, bool) or not isinstance(img_size, int):
        raise TypeError(f"{_OWNER}: config['img_size'] must be an int (the official code divides it), got {img_size!r}")
    fmap = img_size // patch_size
    for i in range(NUM_STAGES):
        letters = list(spec_in[i])
        if len(letters) < depths[i]:
            raise ValueError(f"{_OWNER}: stage_spec[{i}] has {len(letters)} letters for depths[{i}] = {depths[i]}")
        letters = letters[: depths[i]]  # the official stage reads only the first `depth` letters
        bad = [c for c in letters if c not in BLOCK_KINDS or (c == "N" and version == "v1")]
        if bad:
            raise ValueError(
                f"{_OWNER}: stage_spec[{i}] uses block kinds {bad}; supported: {sorted(BLOCK_KINDS)}"
                + (" ('N' only in DAT++)" if version == "v1" else "")
            )
        spec.append("".join(letters))
        pos_bias, ksize, g, s = "none", ksizes[i] if version == "pp" else (9, 7, 5, 3)[i], 1, 1
        if "D" in letters:
            if groups[i] < 1 or strides[i] < 1:
                raise ValueError(
                    f"{_OWNER}: stage {i} has D blocks but groups ({groups[i]}) / strides ({strides[i]}) < 1"
                )
            g, s = int(groups[i]), int(strides[i])
            hc = dims[i] // heads[i]
            official_attn = dict(
                q_size=(fmap, fmap), kv_size=(fmap, fmap), n_heads=heads[i], n_head_channels=hc,
                n_groups=g, stride=s, offset_range_factor=orfs[i], use_pe=use_pes[i], dwc_pe=dwc_pes[i],
                no_off=no_offs[i], fixed_pe=fixed_pes[i],
            )
            if version == "pp":
                official_attn.update(ksize=ksizes[i], log_cpb=log_cpbs[i])
            else:
                official_attn.update(stage_idx=i)
            native = native_kwargs_from_official(official_attn, version)
            pos_bias, ksize = native["pos_bias"], native["offset_kernel_size"]
        pos_biases.append(pos_bias)
        ksize_out.append(int(ksize))
        groups_out.append(g)
        strides_out.append(s)

    layer_scales = [v if v > 0.0 else None for v in _stage_list(config, "layer_scale_values")]
    return dict(
        version=version,
        img_size=img_size,
        num_classes=int(get("num_classes")),
        patch_size=patch_size,
        conv_stem=bool(get("use_conv_patches")),
        stem_dim=int(get("dim_stem")),
        dims=tuple(dims),
        stage_spec=tuple(spec),
        num_heads=tuple(heads),
        window_sizes=tuple(window_sizes),
        nat_kernel_sizes=tuple(_stage_list(config, "nat_ksizes")),
        offset_groups=tuple(groups_out),
        strides=tuple(strides_out),
        offset_range_factors=tuple(orfs),
        offset_kernel_sizes=tuple(ksize_out),
        pos_biases=tuple(pos_biases),
        no_offs=tuple(bool(v) for v in no_offs),
        conv_ffns=tuple(bool(v) for v in _stage_list(config, "use_dwc_mlps")),
        use_lpus=tuple(bool(v) for v in _stage_list(config, "use_lpus")),
        layer_scale_inits=tuple(layer_scales),
        mlp_ratio=int(get("expansion")),
        drop_rate=float(get("drop_rate")),
        attn_drop_rate=float(get("attn_drop_rate")),
        drop_path_rate=float(get("drop_path_rate")),
    )


def _float_dtype(state_dict: Mapping[str, Any]) -> torch.dtype | None:
    dtypes = {v.dtype for v in state_dict.values() if torch.is_tensor(v) and v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def backbone_from_official(
    config: Mapping[str, Any], version: str, state_dict: Mapping[str, torch.Tensor] | None = None
) -> DAT:
    """Our :class:`~deformattn.models.DAT` equal to the official ``DAT(**config)`` of ``version``.

    Args:
        config: the official constructor kwargs.
        version: ``"pp"`` (DAT++) or ``"v1"`` (DAT).
        state_dict: an official state_dict (or ``{"model": state_dict}``), loaded strictly: every key must be
            present with its shape, else a ``ValueError`` lists the differences. Its floating dtype is kept
            (float64 in, float64 model).

    Returns:
        The model in eval mode (like a loaded official model used for inference); ``model(x)`` returns the logits.
    """
    model = DAT(**dat_kwargs_from_official(config, version))
    if state_dict is not None:
        dtype = _float_dtype(unwrap_state_dict(state_dict))
        if dtype is not None:
            model.to(dtype)
        load_checkpoint(model, state_dict, strict=True)
    return model.eval()


def neighborhood_attention_from_official(
    config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None
) -> NeighborhoodAttention2d:
    """Our :class:`~deformattn.layers.NeighborhoodAttention2d` equal to the official ``NeighborhoodAttention2D``.

    Args:
        config: its constructor kwargs (``dim``, ``kernel_size``, ``num_heads``, ``attn_drop``, ``proj_drop``,
            ``dilation`` - None or 1).
        state_dict: official parameters (``qkv``, ``rpb``, ``proj``), loaded strictly, dtype kept.

    Returns:
        The module in eval mode; ``module(x)`` returns the output tensor (the official one also returns two Nones).
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"neighborhood_attention_from_official: config must be a dict, got {type(config).__name__}")
    allowed = {"dim", "kernel_size", "num_heads", "attn_drop", "proj_drop", "dilation"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(
            f"neighborhood_attention_from_official: unknown config keys {unknown} (allowed {sorted(allowed)})"
        )
    missing = sorted({"dim", "kernel_size", "num_heads"} - set(config))
    if missing:
        raise ValueError(f"neighborhood_attention_from_official: config lacks {missing}")
    module = NeighborhoodAttention2d(
        int(config["dim"]),
        int(config["kernel_size"]),
        int(config["num_heads"]),
        float(config.get("attn_drop", 0.0)),
        float(config.get("proj_drop", 0.0)),
        config.get("dilation"),
    )
    if state_dict is not None:
        dtype = _float_dtype(state_dict)
        if dtype is not None:
            module.to(dtype)
        module.load_state_dict(dict(state_dict), strict=True)
    return module.eval()

