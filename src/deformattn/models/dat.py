"""DAT (Xia et al., CVPR 2022) and DAT++ (arXiv 2309.01430): the hierarchical vision backbones.

Layout (both versions): a stem (``patch_proj``) reduces the image by 4, then four stages of transformer blocks at
strides 4, 8, 16 and 32, separated by down-sampling layers (``down_projs``); the classifier is
``cls_norm -> global average pool -> cls_head``. Each stage is a sequence of blocks named by a letter:

* ``L`` window attention with a relative position bias table, ``S`` the shifted-window version (shift
  ``ceil(ws / 2)``) - :class:`~deformattn.layers.WindowAttention`;
* ``D`` deformable attention - :class:`~deformattn.DeformableAttention2d`;
* ``N`` neighborhood attention - :class:`~deformattn.layers.NeighborhoodAttention2d`.

A block is ``[x = x + LPU(x)]; x = x + drop_path(ls1(attn(norm1(x)))); x = x + drop_path(ls2(ffn(norm2(x))))``
(the local perception unit and LayerScale are DAT++ options). The released DAT v1 models use ``L``/``S`` then
``L``/``D`` pairs with a patchify stem and plain MLPs; DAT++ uses ``N``/``D`` pairs with a conv stem, ConvFFN and
LPUs, and deformable attention at key-grid strides 8/4/2/1.

Module and parameter names are the official ones (``patch_proj``, ``stages.{i}.attns.{j}``,
``stages.{i}.layer_norms.{2j}``, ``mlps``, ``layer_scales``, ``local_perception_units``, ``down_projs``,
``cls_norm``, ``cls_head``), so official checkpoints load without renaming.

File order (timm's): blocks -> stage -> model -> checkpoint filter -> builder -> pretrained cfgs ->
registered variants.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._shapes import concrete, shared_sizes
from .._utils import check_float, check_image_tensor, check_int, to_2tuple
from ..attention import DeformableAttention2d
from ..functional import POS_BIAS_KINDS, VERSIONS
from ..layers import (
    ConvFFN,
    ConvStem,
    Downsample,
    DropPath,
    LayerNormProxy,
    LayerScale,
    LocalPerceptionUnit,
    Mlp,
    NeighborhoodAttention2d,
    PatchifyStem,
    WindowAttention,
)
from ..layers.stem import conv_output_size
from ..layers.window_attention import DERIVED_BUFFERS as _DERIVED_BUFFERS
from ._helpers import check_state_dict, clean_key, describe_report, unwrap_state_dict
from ._entrypoints import register_model

__all__ = [
    "DAT",
    "TransformerStage",
    "BLOCK_KINDS",
    "checkpoint_filter_fn",
    "default_cfgs",
    "MODEL_CONFIGS",
]

_OWNER = "DAT"
NUM_STAGES = 4
BLOCK_KINDS = {
    "L": "window attention (relative position bias table)",
    "S": "shifted-window attention, shift ceil(ws / 2)",
    "D": "deformable attention",
    "N": "neighborhood attention",
}


# ---------------------------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------------------------
def build_attention(
    kind: str,
    *,
    dim: int,
    num_heads: int,
    fmap_size: tuple[int, int],
    window_size: int,
    nat_kernel_size: int,
    offset_groups: int,
    stride: int,
    offset_range_factor: float,
    offset_kernel_size: int,
    pos_bias: str,
    no_off: bool,
    version: str,
    attn_drop: float,
    proj_drop: float,
    backend: str | None = None,
) -> nn.Module:
    """The token mixer of one block (stage letter ``kind``); every kind maps ``Tensor[B, C, H, W]`` to itself."""
    if kind == "L":
        return WindowAttention(dim, num_heads, window_size, attn_drop=attn_drop, proj_drop=proj_drop)
    if kind == "S":
        return WindowAttention(
            dim, num_heads, window_size, shift_size=math.ceil(window_size / 2), fmap_size=fmap_size,
            attn_drop=attn_drop, proj_drop=proj_drop,
        )
    if kind == "N":
        return NeighborhoodAttention2d(dim, nat_kernel_size, num_heads, attn_drop, proj_drop, backend=backend)
    if kind == "D":
        return DeformableAttention2d(
            dim,
            num_heads,
            offset_groups=offset_groups,
            stride=stride,
            offset_kernel_size=offset_kernel_size,
            offset_range_factor=offset_range_factor,
            pos_bias=pos_bias,
            q_size=fmap_size,
            kv_size=fmap_size if version == "v1" else None,  # v1 sizes its table by kv_size = the map
            no_off=no_off,
            version=version,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            backend=backend,
        )
    raise ValueError(f"{_OWNER}: unknown block kind {kind!r} (expected one of {sorted(BLOCK_KINDS)})")


# ---------------------------------------------------------------------------------------------------------------
# stage
# ---------------------------------------------------------------------------------------------------------------
class TransformerStage(nn.Module):
    """One stage: ``depth`` blocks at a fixed resolution (official ``TransformerStage``, same state_dict names).

    Args:
        dim_in, dim: input and block channels (a 1x1 ``proj`` conv maps ``dim_in`` to ``dim`` when they differ).
        spec: one letter per block (see :data:`BLOCK_KINDS`).
        fmap_size: the map size the size-dependent tables are built for (D bias tables, S attention mask).
        conv_ffn: ConvFFN instead of the plain MLP. use_lpu: local perception unit before every block.
        layer_scale_init: LayerScale init value, None for no LayerScale.
        drop_path_rates: one stochastic-depth rate per block.
        The remaining arguments configure the token mixers (:func:`build_attention`).

    Shape: ``Tensor[B, dim_in, H, W] -> Tensor[B, dim, H, W]``.
    """

    def __init__(
        self,
        *,
        dim_in: int,
        dim: int,
        spec: Sequence[str],
        num_heads: int,
        fmap_size: tuple[int, int],
        window_size: int = 7,
        nat_kernel_size: int = 7,
        offset_groups: int = 1,
        stride: int = 1,
        offset_range_factor: float = -1.0,
        offset_kernel_size: int = 3,
        pos_bias: str = "table",
        no_off: bool = False,
        version: str = "pp",
        conv_ffn: bool = True,
        use_lpu: bool = False,
        layer_scale_init: float | None = None,
        mlp_ratio: int = 4,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rates: Sequence[float] = (),
        backend: str | None = None,
    ):
        super().__init__()
        depth = len(spec)
        if len(drop_path_rates) != depth:
            raise ValueError(f"TransformerStage: need {depth} drop_path_rates, got {len(drop_path_rates)}")
        self.spec = tuple(spec)
        self.depth = depth
        self.use_lpu = use_lpu
        self.grad_checkpointing = False
        # registration order = the official one, so state_dict keys come out in the same order
        self.proj = nn.Conv2d(dim_in, dim, 1, 1, 0) if dim_in != dim else nn.Identity()
        self.layer_norms = nn.ModuleList([LayerNormProxy(dim) for _ in range(2 * depth)])
        self.mlps = nn.ModuleList(
            [ConvFFN(dim, mlp_ratio, drop, version) if conv_ffn else Mlp(dim, mlp_ratio, drop) for _ in range(depth)]
        )
        self.attns = nn.ModuleList(
            [
                build_attention(
                    kind, dim=dim, num_heads=num_heads, fmap_size=fmap_size, window_size=window_size,
                    nat_kernel_size=nat_kernel_size, offset_groups=offset_groups, stride=stride,
                    offset_range_factor=offset_range_factor, offset_kernel_size=offset_kernel_size,
                    pos_bias=pos_bias, no_off=no_off, version=version, attn_drop=attn_drop, proj_drop=drop,
                    backend=backend,
                )
                for kind in spec
            ]
        )
        self.drop_path = nn.ModuleList([DropPath(p) if p > 0.0 else nn.Identity() for p in drop_path_rates])
        self.layer_scales = nn.ModuleList(
            [LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity() for _ in range(2 * depth)]
        )
        self.local_perception_units = nn.ModuleList([LocalPerceptionUnit(dim) for _ in range(depth)] if use_lpu else [])

    def block(self, d: int, x: Tensor) -> Tensor:
        """Block ``d``: LPU, attention and feed-forward, each with its residual."""
        if self.use_lpu:
            x = self.local_perception_units[d](x)
        x = x + self.drop_path[d](self.layer_scales[2 * d](self.attns[d](self.layer_norms[2 * d](x))))
        x = x + self.drop_path[d](self.layer_scales[2 * d + 1](self.mlps[d](self.layer_norms[2 * d + 1](x))))
        return x

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_dynamo_compiling():  # Dynamo's graph deduplicates by itself; no Python-side cache
            return self._blocks(x)
        # the blocks share the size-derived tensors of this resolution (tile indices, masks, reference grids),
        # computed once by the first block that needs them (deformattn._shapes.shared)
        with shared_sizes():
            return self._blocks(x)

    def _blocks(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        for d in range(self.depth):
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(self.block, d, x, use_reentrant=False)
            else:
                x = self.block(d, x)
        return x


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------
def _per_stage(value: Any, name: str) -> tuple:
    """A per-stage argument as a 4-tuple (a scalar applies to every stage)."""
    if isinstance(value, (list, tuple)):
        if len(value) != NUM_STAGES:
            raise ValueError(
                f"{_OWNER}: {name} must have {NUM_STAGES} entries (one per stage), got {len(value)}: {value!r}"
            )
        return tuple(value)
    return (value,) * NUM_STAGES


def _normalize_spec(stage_spec: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(stage_spec, (list, tuple)) or len(stage_spec) != NUM_STAGES:
        raise ValueError(
            f"{_OWNER}: stage_spec must list {NUM_STAGES} stages (e.g. ['ND', 'ND', 'NDND', 'DD']), got {stage_spec!r}"
        )
    spec = []
    for i, s in enumerate(stage_spec):
        letters = tuple(s) if isinstance(s, (str, list, tuple)) else None
        if not letters or any(not isinstance(c, str) or c not in BLOCK_KINDS for c in letters):
            raise ValueError(
                f"{_OWNER}: stage_spec[{i}] must be a non-empty sequence of block letters from "
                f"{sorted(BLOCK_KINDS)}, got {s!r}"
            )
        spec.append(letters)
    return tuple(spec)


class DAT(nn.Module):
    """Deformable Attention Transformer (DAT v1 and DAT++), with the timm model API.

    Per-stage arguments take a 4-sequence or one value for every stage.

    Args:
        version: ``"pp"`` (DAT++) or ``"v1"`` (DAT, CVPR 2022): selects the deformable-attention numerics, the conv
            stem and the ConvFFN variant of that code.
        img_size: image size the size-dependent parameters are built for (deformable bias tables, shifted-window
            masks); any input size runs (see ``forward_features``).
        in_chans, num_classes, global_pool: input channels, classes (0: no classifier), pooling (timm's names:
            ``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"``, ``"fast*"``; ``""``: none, see ``forward_head``).
        patch_size: stem stride (4 in every released model). conv_stem: overlapping conv stem and 3x3/2
            down-sampling (official ``use_conv_patches``) instead of patchify + 2x2/2.
        stem_dim: stem channels (default ``dims[0]``). dims, depths, num_heads: per stage.
        stage_spec: per stage, one letter per block: ``L``, ``S``, ``D`` or ``N`` (its length is the depth).
        window_sizes: ``L``/``S`` windows. nat_kernel_sizes: ``N`` kernels.
        offset_groups, strides, offset_range_factors, offset_kernel_sizes, pos_biases, no_offs: ``D`` blocks, see
            :class:`~deformattn.DeformableAttention2d` (``pos_biases`` kinds: table, fixed, dwc, log_cpb, none).
        conv_ffns: ConvFFN instead of the plain MLP. use_lpus: local perception units.
        layer_scale_inits: LayerScale init per stage (None: off). mlp_ratio: feed-forward expansion.
        drop_rate: dropout after attention / MLP projections (official ``drop_rate``). attn_drop_rate: on attention
            weights. drop_path_rate: stochastic depth, linearly increasing over all blocks.
        backend: backend of the deformable and neighborhood attention layers (None: automatic, ``"fast"`` unless
            ``$DEFORMATTN_BACKEND`` says otherwise; ``"reference"``: the plain reference algorithms).

    Example:
        >>> model = DAT(version="pp", img_size=32, num_classes=10, patch_size=2, conv_stem=False,
        ...             dims=(24, 48, 96, 192), stage_spec=("ND", "ND", "ND", "D"), num_heads=(1, 2, 4, 8),
        ...             nat_kernel_sizes=(5, 5, 3, 3), offset_groups=(1, 1, 2, 4), strides=(4, 2, 1, 1),
        ...             offset_kernel_sizes=(7, 5, 3, 3))
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        version: str = "pp",
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        patch_size: int = 4,
        conv_stem: bool = True,
        stem_dim: int | None = None,
        dims: Sequence[int] = (64, 128, 256, 512),
        stage_spec: Sequence[Any] = ("ND", "NDND", "ND" * 9, "DD"),
        num_heads: Sequence[int] | int = (2, 4, 8, 16),
        window_sizes: Sequence[int] | int = 7,
        nat_kernel_sizes: Sequence[int] | int = 7,
        offset_groups: Sequence[int] | int = (1, 2, 4, 8),
        strides: Sequence[int] | int = (8, 4, 2, 1),
        offset_range_factors: Sequence[float] | float = -1.0,
        offset_kernel_sizes: Sequence[int] | int = (9, 7, 5, 3),
        pos_biases: Sequence[str] | str = "table",
        no_offs: Sequence[bool] | bool = False,
        conv_ffns: Sequence[bool] | bool = True,
        use_lpus: Sequence[bool] | bool = True,
        layer_scale_inits: Sequence[float | None] | float | None = None,
        mlp_ratio: int = 4,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"{_OWNER}: version must be one of {VERSIONS}, got {version!r}")
        img_size = to_2tuple(img_size, "img_size", _OWNER)
        in_chans = check_int(in_chans, "in_chans", _OWNER, minimum=1)
        num_classes = check_int(num_classes, "num_classes", _OWNER, minimum=0)
        patch_size = check_int(patch_size, "patch_size", _OWNER, minimum=1)
        mlp_ratio = check_int(mlp_ratio, "mlp_ratio", _OWNER, minimum=1)
        drop_rate = check_float(drop_rate, "drop_rate", _OWNER, minimum=0.0, maximum=1.0)
        attn_drop_rate = check_float(attn_drop_rate, "attn_drop_rate", _OWNER, minimum=0.0, maximum=1.0)
        drop_path_rate = check_float(drop_path_rate, "drop_path_rate", _OWNER, minimum=0.0, maximum=1.0)
        pool = _check_pool(global_pool, _OWNER)
        spec = _normalize_spec(stage_spec)
        dims = tuple(check_int(d, "dims", _OWNER, minimum=1) for d in _per_stage(dims, "dims"))
        heads = tuple(check_int(h, "num_heads", _OWNER, minimum=1) for h in _per_stage(num_heads, "num_heads"))
        windows = tuple(
            check_int(w, "window_sizes", _OWNER, minimum=1) for w in _per_stage(window_sizes, "window_sizes")
        )
        nat_ks = _per_stage(nat_kernel_sizes, "nat_kernel_sizes")
        groups = _per_stage(offset_groups, "offset_groups")
        strides_ = _per_stage(strides, "strides")
        orfs = _per_stage(offset_range_factors, "offset_range_factors")
        ksizes = _per_stage(offset_kernel_sizes, "offset_kernel_sizes")
        pos_biases_ = _per_stage(pos_biases, "pos_biases")
        no_offs_ = _per_stage(no_offs, "no_offs")
        conv_ffns_ = _per_stage(conv_ffns, "conv_ffns")
        lpus = _per_stage(use_lpus, "use_lpus")
        ls_inits = _per_stage(layer_scale_inits, "layer_scale_inits")
        stem_dim = dims[0] if stem_dim is None else check_int(stem_dim, "stem_dim", _OWNER, minimum=1)
        for i in range(NUM_STAGES):
            if dims[i] % heads[i]:
                raise ValueError(f"{_OWNER}: dims[{i}] ({dims[i]}) must be divisible by num_heads[{i}] ({heads[i]})")
            if "S" in spec[i] and windows[i] < 2:
                raise ValueError(f"{_OWNER}: shifted windows (stage {i}) need window_sizes[{i}] >= 2, got {windows[i]}")
            if pos_biases_[i] not in POS_BIAS_KINDS:
                raise ValueError(f"{_OWNER}: pos_biases[{i}] must be one of {POS_BIAS_KINDS}, got {pos_biases_[i]!r}")

        self.version = version
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = pool
        self.patch_size = patch_size
        self.dims = dims
        self.stage_spec = spec
        self.num_features = dims[-1]
        self.head_hidden_size = dims[-1] * _pool_feat_mult(pool)
        self.drop_rate = drop_rate
        self.output_fmt = "NCHW"
        self.grad_checkpointing = False

        if conv_stem:
            self.patch_proj: nn.Module = ConvStem(in_chans, stem_dim, patch_size, version)
        else:
            self.patch_proj = PatchifyStem(in_chans, stem_dim, patch_size)
        reduction = self.patch_proj.reduction

        # construction-time map sizes follow the official formula (img_size // patch_size, then // 2 per stage):
        # they fix the shapes of the size-dependent tables, hence checkpoint compatibility
        fmap = (img_size[0] // patch_size, img_size[1] // patch_size)
        depths = [len(s) for s in spec]
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.stages = nn.ModuleList()
        self.feature_info: list[dict[str, Any]] = []
        for i in range(NUM_STAGES):
            if min(fmap) < 1:
                raise ValueError(
                    f"{_OWNER}: img_size {img_size} is too small: stage {i} would be built for a {fmap[0]}x{fmap[1]} "
                    f"map (img_size must be >= {patch_size * 2 ** (NUM_STAGES - 1)})"
                )
            self.stages.append(
                TransformerStage(
                    dim_in=stem_dim if i == 0 else dims[i],
                    dim=dims[i],
                    spec=spec[i],
                    num_heads=heads[i],
                    fmap_size=fmap,
                    window_size=windows[i],
                    nat_kernel_size=nat_ks[i],
                    offset_groups=groups[i],
                    stride=strides_[i],
                    offset_range_factor=orfs[i],
                    offset_kernel_size=ksizes[i],
                    pos_bias=pos_biases_[i],
                    no_off=no_offs_[i],
                    version=version,
                    conv_ffn=conv_ffns_[i],
                    use_lpu=lpus[i],
                    layer_scale_init=ls_inits[i],
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path_rates=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    backend=backend,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction * 2**i, module=f"stages.{i}"))
            fmap = (fmap[0] // 2, fmap[1] // 2)
        self.down_projs = nn.ModuleList(
            [Downsample(dims[i], dims[i + 1], overlapping=conv_stem) for i in range(NUM_STAGES - 1)]
        )
        self.cls_norm: nn.Module = LayerNormProxy(dims[-1])
        self.cls_head: nn.Module = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, all or nothing: keys and shapes are checked *before* anything is copied.

        torch copies every tensor that fits and raises only at the end, so a truncated checkpoint or one of another
        variant would leave the model half overwritten. Here it raises torch's ``RuntimeError`` (listing the
        missing, unexpected and shape-mismatched keys; missing / unexpected ones only with ``strict``) and the model
        is unchanged. Official checkpoints (``module.`` prefixes, other resolutions) go through
        :func:`~deformattn.models.load_checkpoint`.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict).__name__}.")
        own_keys = set(self.state_dict())
        report = check_state_dict(self, state_dict)
        # derived buffers are never copied (WindowAttention keeps its computed ones), so their shape cannot clash
        report["mismatched"] = [m for m in report["mismatched"] if m[0].rsplit(".", 1)[-1] not in _DERIVED_BUFFERS]
        not_tensors = [k for k in report["unexpected"] if k in own_keys]  # a model key holding no tensor
        report["unexpected"] = [k for k in report["unexpected"] if k not in own_keys]
        if not strict:
            report["missing"], report["unexpected"] = [], []
        if report["missing"] or report["unexpected"] or report["mismatched"] or not_tensors:
            hint = ""
            if any(clean_key(k) != k for k in state_dict):
                hint = " (keys carry a 'module.' / '_orig_mod.' prefix: deformattn.models.load_checkpoint strips it)"
            described = describe_report(report)
            problems = [described] if described else []
            if not_tensors:
                problems.append(f"{len(not_tensors)} key(s) not holding a tensor: {', '.join(not_tensors[:8])}")
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: nothing was loaded{hint}. "
                + "; ".join(problems)
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- timm API ---------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the position-bias parameters (window tables, deformable ``rpe_table``, NA ``rpb``): the
        official recipe exempts them from weight decay."""
        keys = ("relative_position_bias_table", "rpe_table", "rpb")
        return {n for n, _ in self.named_parameters() if any(k in n.split(".") for k in keys)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.cls_head

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """timm's layer grouping (``timm.models.group_parameters``; layer-wise lr decay in
        ``timm.optim.create_optimizer_v2(model, layer_decay=...)`` and ``deformattn train --layer-decay``).

        Returns a function of a parameter / module name giving its ordinal, in data-path order: the stem, then one
        group per block (``coarse``: per stage) with each down-sampling layer opening the stage it feeds, then
        ``cls_norm``; ``cls_head`` is unmatched (``inf``, the last group) as in timm. A function rather than timm's
        regex dict because block ``j`` owns ``layer_norms.{2j, 2j+1}`` and ``attns.{j}``: no regex capture gives
        them one ordinal.
        """
        return functools.partial(_dat_group, coarse=coarse)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool`` (None: unchanged) takes every value of
        timm's ``SelectAdaptivePool2d``: ``avg``, ``max``, ``avgmax``, ``catavgmax`` (2x wide), their ``fast``
        forms, and ``''`` (no pooling: :meth:`forward_head` returns maps)."""
        owner = f"{_OWNER}.reset_classifier"
        num_classes = check_int(num_classes, "num_classes", owner, minimum=0)
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool, owner)
            self.head_hidden_size = self.num_features * _pool_feat_mult(self.global_pool)
        self.num_classes = num_classes
        self.cls_head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def min_input_size(self) -> int:
        """Smallest accepted H and W: the total stride of the last stage (32 for the released models), so that
        every stage map covers at least one input patch."""
        return self.feature_info[len(self.stages) - 1]["reduction"]

    def _stage_sizes(self, H: int, W: int) -> list[tuple[int, int]]:
        """Map size of every stage for an ``H x W`` input (the stem and down-sampling convs round as official)."""
        sizes = [(conv_output_size(H, self.patch_proj), conv_output_size(W, self.patch_proj))]
        for down in self.down_projs[: len(self.stages) - 1]:
            sizes.append((conv_output_size(sizes[-1][0], down), conv_output_size(sizes[-1][1], down)))
        return sizes

    def _check_input(self, x: Tensor) -> None:
        check_image_tensor(x, "x", _OWNER, channels=self.in_chans)
        H, W = (concrete(s) for s in x.shape[-2:])  # example values while torch.jit.trace records
        need = self.min_input_size()
        if H < need or W < need:
            raise ValueError(
                f"{_OWNER}: input x of size {H}x{W} is too small: this model reduces the image {need}x, so it needs "
                f"H, W >= {need}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """``Tensor[B, in_chans, H, W]`` -> final normalised map ``Tensor[B, dims[-1], H/32, W/32]``.

        Any ``H, W`` at least :meth:`min_input_size` works: window attention pads to multiples of the window and
        crops back, neighborhood attention pads maps smaller than its kernel, deformable attention samples a key
        grid of the actual size; the stem and down-sampling convs round as the official ones.
        """
        self._check_input(x)
        x = self.patch_proj(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.down_projs):
                x = self.down_projs[i](x)
        return self.cls_norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the final map and classify: ``Tensor[B, C, h, w]`` -> logits ``Tensor[B, num_classes]``, or the
        pooled ``Tensor[B, head_hidden_size]`` with ``pre_logits=True``.

        With ``global_pool=''`` nothing is pooled: ``pre_logits=True`` returns the map itself and the classifier
        runs at every position (``Tensor[B, num_classes, h, w]``; the map when ``num_classes=0``).
        """
        x = _global_pool(x, self.global_pool)  # B, C' (pooled) or B, C, h, w
        if pre_logits:
            return x
        if x.dim() == 4:
            return self.cls_head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # B, num_classes, h, w
        return self.cls_head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (timm semantics).

        Args:
            indices: stages to return: None = all, an int ``n`` = the last ``n``, a sequence = those (negative
                counts from the end).
            norm: apply ``cls_norm`` to the last stage's output if it is returned.
            stop_early: stop after the last requested stage (then the final features are not computed).
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list.

        Returns:
            ``[Tensor[B, dims[i], H_i, W_i] for i in indices]``, or ``(final_features, that list)``; the final
            features equal :meth:`forward_features`.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"{_OWNER}.forward_intermediates: output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = _take_indices(len(self.stages), indices)
        self._check_input(x)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        last = len(self.stages) - 1
        intermediates = []
        x = self.patch_proj(x)
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(self.cls_norm(x) if norm and i == last else x)
            if i < len(self.down_projs) and i < len(stages) - 1:
                x = self.down_projs[i](x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.cls_norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm / head) not needed for ``indices``; returns the absolute indices kept."""
        take, max_index = _take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        self.down_projs = self.down_projs[:max_index]
        if prune_norm or prune_end:
            self.cls_norm = nn.Identity()
        self.num_features = self.dims[max_index]
        self.head_hidden_size = self.num_features * _pool_feat_mult(self.global_pool)
        if prune_head:
            self.reset_classifier(0)
        return take


# timm's SelectAdaptivePool2d names; the 'fast' forms pool the same values (timm's faster kernels for NCHW)
POOL_TYPES = ("", "avg", "max", "avgmax", "catavgmax", "fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax")


def _check_pool(global_pool: Any, owner: str) -> str:
    if not isinstance(global_pool, str) or global_pool.lower() not in POOL_TYPES:
        raise ValueError(f"{owner}: global_pool must be one of {POOL_TYPES} ('': no pooling), got {global_pool!r}")
    return global_pool.lower()


def _pool_feat_mult(global_pool: str) -> int:
    return 2 if global_pool.endswith("catavgmax") else 1


def _global_pool(x: Tensor, global_pool: str) -> Tensor:
    """``Tensor[B, C, h, w]`` -> ``Tensor[B, C]`` (``Tensor[B, 2C]`` for catavgmax; the map itself for ``''``)."""
    if global_pool == "":
        return x
    kind = global_pool[4:] if global_pool.startswith("fast") else global_pool
    if kind in ("", "avg"):  # "fast" alone is timm's fast average
        return x.mean((2, 3))
    if kind == "max":
        return x.amax((2, 3))
    avg, mx = x.mean((2, 3)), x.amax((2, 3))
    return 0.5 * (avg + mx) if kind == "avgmax" else torch.cat([avg, mx], dim=1)  # B, 2C for catavgmax


def _dat_group(name: str, *, coarse: bool) -> tuple[float, ...]:
    """Ordinal of a parameter / module name for :meth:`DAT.group_matcher` (timm sorts and numbers them)."""
    parts = name.split(".")
    if parts[0] == "patch_proj":
        return (0.0,)
    if parts[0] == "down_projs" and len(parts) > 1:
        return (1.0, int(parts[1]) + 1.0) if coarse else (1.0, int(parts[1]) + 1.0, -1.0)
    if parts[0] == "stages" and len(parts) > 1:
        stage = float(parts[1])
        if coarse or len(parts) < 4 or parts[2] == "proj":
            return (1.0, stage) if coarse else (1.0, stage, -1.0)
        index = int(parts[3])
        per_block = 2 if parts[2] in ("layer_norms", "layer_scales") else 1  # two norms / scales per block
        return (1.0, stage, float(index // per_block))
    if parts[0] == "cls_norm":
        return (2.0,)
    return (math.inf,)  # cls_head, as timm's unmatched head


def _take_indices(num: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: None -> all, int n -> last n, sequence -> those (negatives from the end)."""
    if indices is None:
        indices = num
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f"{_OWNER}: indices={indices} must be in 1..{num} (the last n stages)")
        take = list(range(num - indices, num))
    else:
        take = []
        for i in indices:
            idx = num + i if i < 0 else i
            if not 0 <= idx < num:
                raise ValueError(f"{_OWNER}: stage index {i} is out of range for {num} stages")
            take.append(idx)
    return take, max(take)


# ---------------------------------------------------------------------------------------------------------------
# checkpoint filter: official format -> ours (reading, checking, loading: models/_helpers.py)
# ---------------------------------------------------------------------------------------------------------------


def _resize_table(value: Tensor, shape: torch.Size, key: str) -> Tensor:
    """Bicubic resize of a relative position table (the official ``load_pretrained`` rule)."""
    src = value.to(torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype)
    if key.endswith("relative_position_bias_table"):  # ((2ws-1)^2, nH)
        (n, c), (m, _) = src.shape, shape
        side, new_side = math.isqrt(n), math.isqrt(m)
        grid = src.reshape(1, side, side, c).permute(0, 3, 1, 2)  # 1, nH, 2ws-1, 2ws-1
        out = F.interpolate(grid, (new_side, new_side), mode="bicubic")
        return out.reshape(c, new_side * new_side).permute(1, 0).to(value.dtype)
    out = F.interpolate(src.unsqueeze(0), tuple(shape[-2:]), mode="bicubic")  # 1, nH, 2H-1, 2W-1
    return out.squeeze(0).to(value.dtype)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: DAT) -> dict[str, Tensor]:
    """Convert an official or own checkpoint into ``model``'s state_dict format (timm's filter signature).

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}``, strips ``module.`` / ``_orig_mod.`` prefixes, replaces the
    derived buffers (``relative_position_index``, ``attn_mask``) by the model's own, and resizes relative position
    tables (``relative_position_bias_table``, table-kind ``rpe_table``) bicubically when the checkpoint was made at
    another resolution or window size. Keys that do not fit are passed through for
    :func:`~deformattn.models._helpers.check_state_dict`; reading files and loading live in ``models/_helpers.py``.
    """
    state_dict = unwrap_state_dict(state_dict)
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = clean_key(key)
        if key in own and key.rsplit(".", 1)[-1] in _DERIVED_BUFFERS:
            value = own[key]
        elif key in own and torch.is_tensor(value) and value.shape != own[key].shape and value.dim() == own[key].dim():
            name = key.rsplit(".", 1)[-1]
            if name == "relative_position_bias_table" and value.shape[1] == own[key].shape[1]:
                value = _resize_table(value, own[key].shape, key)
            elif name == "rpe_table" and value.dim() == 3 and value.shape[0] == own[key].shape[0]:
                owner = model.get_submodule(key.rsplit(".", 1)[0])
                if getattr(owner, "pos_bias", None) == "table":
                    value = _resize_table(value, own[key].shape, key)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# builder
# ---------------------------------------------------------------------------------------------------------------
def _create_dat(variant: str, pretrained: bool = False, **kwargs: Any) -> DAT:
    """Build a registered variant: its config (``MODEL_CONFIGS``) updated with ``kwargs``.

    ``pretrained=True`` raises: the library never downloads weights (use ``create_model(name,
    checkpoint_path=...)`` with a downloaded official checkpoint).
    """
    if pretrained:
        from ._entrypoints import pretrained_unavailable

        raise pretrained_unavailable(variant)
    config = dict(MODEL_CONFIGS[variant])
    config.update(kwargs)
    model = DAT(**config)
    cfg = dict(default_cfgs[variant], architecture=variant, num_classes=model.num_classes)
    model.pretrained_cfg = model.default_cfg = cfg
    return model


# ---------------------------------------------------------------------------------------------------------------
# configs of the released (and small CPU) variants, and their pretrained cfgs
# ---------------------------------------------------------------------------------------------------------------
_V1 = dict(
    version="v1", patch_size=4, conv_stem=False, window_sizes=7, nat_kernel_sizes=3, strides=1,
    offset_range_factors=(-1, -1, 2, 2), offset_kernel_sizes=(9, 7, 5, 3),
    pos_biases=("none", "none", "table", "table"),
    no_offs=False, conv_ffns=False, use_lpus=False, layer_scale_inits=None, mlp_ratio=4,
)
_PP = dict(
    version="pp", patch_size=4, conv_stem=True, window_sizes=7, nat_kernel_sizes=7, strides=(8, 4, 2, 1),
    offset_range_factors=-1, offset_kernel_sizes=(9, 7, 5, 3), pos_biases="table", no_offs=False, conv_ffns=True,
    use_lpus=True, layer_scale_inits=None, mlp_ratio=4,
)
_V1_SPEC_T = ("LS", "LS", "LD" * 3, "LD")
_V1_SPEC_SB = ("LS", "LS", "LD" * 9, "LD")
_PP_SPEC = ("ND", "NDND", "ND" * 9, "DD")

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # DAT v1 (configs/dat_{tiny,small,base,base_384}.yaml of the CVPR 2022 code)
    "dat_tiny": dict(_V1, stem_dim=96, dims=(96, 192, 384, 768), stage_spec=_V1_SPEC_T, num_heads=(3, 6, 12, 24),
                     offset_groups=(1, 1, 3, 6), drop_path_rate=0.2),
    "dat_small": dict(_V1, stem_dim=96, dims=(96, 192, 384, 768), stage_spec=_V1_SPEC_SB, num_heads=(3, 6, 12, 24),
                      offset_groups=(1, 1, 3, 6), drop_path_rate=0.3),
    "dat_base": dict(_V1, stem_dim=128, dims=(128, 256, 512, 1024), stage_spec=_V1_SPEC_SB, num_heads=(4, 8, 16, 32),
                     offset_groups=(1, 1, 4, 8), drop_path_rate=0.5),
    "dat_base_384": dict(_V1, img_size=384, window_sizes=12, stem_dim=128, dims=(128, 256, 512, 1024),
                         stage_spec=_V1_SPEC_SB, num_heads=(4, 8, 16, 32), offset_groups=(1, 1, 4, 8),
                         drop_path_rate=0.5),
    # DAT++ (configs/dat_{tiny,small,base,base_384}.yaml of the official HEAD; the 384 model is built at 224)
    "dat_pp_tiny": dict(_PP, stem_dim=64, dims=(64, 128, 256, 512), stage_spec=_PP_SPEC, num_heads=(2, 4, 8, 16),
                        offset_groups=(1, 2, 4, 8), drop_path_rate=0.2),
    "dat_pp_small": dict(_PP, stem_dim=96, dims=(96, 192, 384, 768), stage_spec=_PP_SPEC, num_heads=(3, 6, 12, 24),
                         offset_groups=(1, 2, 3, 6), drop_path_rate=0.4),
    "dat_pp_base": dict(_PP, stem_dim=128, dims=(128, 256, 512, 1024), stage_spec=_PP_SPEC, num_heads=(4, 8, 16, 32),
                        offset_groups=(2, 4, 8, 16), drop_path_rate=0.7),
    "dat_pp_base_384": dict(_PP, img_size=224, stem_dim=128, dims=(128, 256, 512, 1024), stage_spec=_PP_SPEC,
                            num_heads=(4, 8, 16, 32), offset_groups=(2, 4, 8, 16), drop_path_rate=0.6),
    # small CPU variants for 32x32 images (stem stride 2: stage maps 16/8/4/2)
    "dat_nano": dict(_PP, img_size=32, num_classes=10, patch_size=2, conv_stem=False, stem_dim=24,
                     dims=(24, 48, 96, 192),
                     stage_spec=("ND", "ND", "ND", "D"), num_heads=(1, 2, 4, 8), nat_kernel_sizes=(5, 5, 3, 3),
                     offset_groups=(1, 1, 2, 4), strides=(4, 2, 1, 1), offset_kernel_sizes=(7, 5, 3, 3),
                     drop_path_rate=0.1),
    "dat_v1_nano": dict(_V1, img_size=32, num_classes=10, patch_size=2, stem_dim=24, dims=(24, 48, 96, 192),
                        stage_spec=("LS", "LS", "LD", "D"), num_heads=(1, 2, 4, 8), window_sizes=(4, 4, 4, 2),
                        offset_groups=(1, 1, 2, 4), drop_path_rate=0.1),
}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)
_PAPERS = {
    "v1": dict(paper_name="Vision Transformer with Deformable Attention", paper_ids="arXiv:2201.00520",
               origin_url="https://github.com/LeapLabTHU/DAT"),
    "pp": dict(paper_name="DAT++: Spatially Dynamic Vision Transformer with Deformable Attention",
               paper_ids="arXiv:2309.01430", origin_url="https://github.com/LeapLabTHU/DAT"),
}


def _cfg(version: str, *, size: int = 224, crop_pct: float = 0.875, top1: float | None = None,
         params_m: float | None = None, gmacs: float | None = None, num_classes: int = 1000, reduction: int = 32,
         mean: tuple[float, ...] = _IMAGENET_MEAN, std: tuple[float, ...] = _IMAGENET_STD) -> dict:
    """Pretrained cfg (timm's fields plus the published ``top1`` / ``params_m`` / ``gmacs``; no weight URL: the
    library never downloads, see ``create_model(checkpoint_path=...)``)."""
    return dict(
        url="", num_classes=num_classes, input_size=(3, size, size), pool_size=(size // reduction, size // reduction),
        crop_pct=crop_pct, crop_mode="center" if crop_pct < 1.0 else "squash", interpolation="bicubic",
        mean=mean, std=std, first_conv="patch_proj.0", classifier="cls_head", license="apache-2.0",
        top1=top1, params_m=params_m, gmacs=gmacs, **_PAPERS[version],
    )


# top-1 / params / GMACs (multiply-adds) as published: DAT paper Table and DAT++ README / paper
default_cfgs: dict[str, dict[str, Any]] = {
    "dat_tiny": _cfg("v1", top1=82.0, params_m=29.0, gmacs=4.6),
    "dat_small": _cfg("v1", top1=83.7, params_m=50.0, gmacs=9.0),
    "dat_base": _cfg("v1", top1=84.0, params_m=88.0, gmacs=15.8),
    "dat_base_384": _cfg("v1", size=384, top1=84.8, params_m=88.0, gmacs=49.8),
    "dat_pp_tiny": _cfg("pp", top1=83.9, params_m=24.0, gmacs=4.3),
    "dat_pp_small": _cfg("pp", top1=84.6, params_m=53.0, gmacs=9.4),
    "dat_pp_base": _cfg("pp", top1=84.9, params_m=93.0, gmacs=16.6),
    "dat_pp_base_384": _cfg("pp", size=384, crop_pct=1.0, top1=85.9, params_m=94.0, gmacs=49.7),
    # no published weights: the cfg describes the intended input (32x32 images scaled to [-1, 1])
    "dat_nano": _cfg("pp", size=32, crop_pct=1.0, num_classes=10, reduction=16, mean=_HALF, std=_HALF),
    "dat_v1_nano": _cfg("v1", size=32, crop_pct=1.0, num_classes=10, reduction=16, mean=_HALF, std=_HALF),
}


# ---------------------------------------------------------------------------------------------------------------
# registered variants
# ---------------------------------------------------------------------------------------------------------------
@register_model
def dat_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-T (v1): 28.3M params, 4.6 GMACs at 224, ImageNet-1k top-1 82.0."""
    return _create_dat("dat_tiny", pretrained, **kwargs)


@register_model
def dat_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-S (v1): 49.7M params, 9.0 GMACs at 224, top-1 83.7."""
    return _create_dat("dat_small", pretrained, **kwargs)


@register_model
def dat_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-B (v1): 87.9M params, 15.8 GMACs at 224, top-1 84.0."""
    return _create_dat("dat_base", pretrained, **kwargs)


@register_model
def dat_base_384(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-B (v1) fine-tuned at 384 (window 12, tables built for 384): top-1 84.8."""
    return _create_dat("dat_base_384", pretrained, **kwargs)


@register_model
def dat_pp_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-T++: 24.0M params, 4.3 GMACs at 224, top-1 83.9."""
    return _create_dat("dat_pp_tiny", pretrained, **kwargs)


@register_model
def dat_pp_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-S++: 53.1M params, 9.4 GMACs at 224, top-1 84.6."""
    return _create_dat("dat_pp_small", pretrained, **kwargs)


@register_model
def dat_pp_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-B++: 93.7M params, 16.6 GMACs at 224, top-1 84.9."""
    return _create_dat("dat_pp_base", pretrained, **kwargs)


@register_model
def dat_pp_base_384(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-B++ fine-tuned at 384: top-1 85.9. As in the official config the model is *built* at img_size 224 (same
    parameter shapes as ``dat_pp_base``) and run on 384 images."""
    return _create_dat("dat_pp_base_384", pretrained, **kwargs)


@register_model
def dat_nano(pretrained: bool = False, **kwargs: Any) -> DAT:
    """A DAT++-style model for 32x32 images on CPU (N + D blocks, LPU, ConvFFN; stem stride 2)."""
    return _create_dat("dat_nano", pretrained, **kwargs)


@register_model
def dat_v1_nano(pretrained: bool = False, **kwargs: Any) -> DAT:
    """A DAT v1-style model for 32x32 images on CPU (L/S window blocks, then L + D)."""
    return _create_dat("dat_v1_nano", pretrained, **kwargs)
