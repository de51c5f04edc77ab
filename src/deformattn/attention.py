"""``DeformableAttention2d``: the deformable multi-head attention of DAT / DAT++.

The parameters carry the official module's names (``proj_q``, ``proj_k``, ``proj_v``, ``proj_out``,
``conv_offset``, ``rpe_table``) so that official state_dicts load unchanged. The numerics follow the official code
of the chosen ``version`` (see :mod:`deformattn.functional` for the coordinate conventions and the degenerate cases).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import functional as DF
from ._shapes import is_symbolic, shared, sym_max
from ._utils import check_float, check_image_tensor, check_int, to_2tuple
from .backends import DEFORMABLE_OP, Problem, check_backend_name, select_backend
from .layers.norm import LayerNormProxy

__all__ = ["DeformableAttention2d", "default_offset_kernel_size"]

_OWNER = "DeformableAttention2d"


def _conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 conv applied to channels-last ``Tensor[B, N, C]``: ``Tensor[B, N, C_out]``."""
    return F.linear(x, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)


def default_offset_kernel_size(stride: int) -> int:
    """DAT++'s offset kernel per stride (8 -> 9, 4 -> 7, 2 -> 5, 1 -> 3); an odd kernel > stride otherwise."""
    return {1: 3, 2: 5, 4: 7, 8: 9}.get(stride, stride + 1 + stride % 2)


class DeformableAttention2d(nn.Module):
    """Deformable multi-head attention (DAT, Xia et al. CVPR 2022; DAT++).

    Queries come from every pixel; keys and values are bilinearly sampled from the input at ``Hk x Wk`` points of a
    uniform grid (downsample factor ``stride``) moved by offsets that a small network predicts from the queries, one
    offset field per group of channels. A relative position bias, evaluated at the continuous query-key
    displacement, is added to the attention logits.

    Args:
        dim: channels ``C`` of input and output.
        num_heads: ``nH``; ``dim`` must be divisible by it, and it by ``offset_groups``.
        offset_groups: ``G``, channel groups with their own offsets (heads of a group share its keys).
        stride: downsample factor ``r`` of the key grid (official name: ``stride``).
        offset_kernel_size: ``k`` of the offset network's depthwise conv (official: ``ksize``); default by stride.
        offset_padding: padding of that conv; default the official rule (``k // 2``, but 0 when ``k == stride`` in
            DAT++).
        offset_range_factor: ``s``; ``>= 0`` bounds offsets to ``s * tanh`` of half a grid step, ``< 0`` keeps raw
            offsets (clamped to the map in DAT++, squashed by ``tanh`` in v1). See :func:`functional.bound_offsets`.
        pos_bias: ``"table"`` (deformable relative position bias, default), ``"fixed"`` (a learned
            ``(nH, H*W, Ns)`` bias, fixed sizes only), ``"dwc"`` (depthwise 3x3 conv of q added to the output,
            LePE), ``"log_cpb"`` (DAT++'s log-spaced continuous position bias MLP) or ``"none"``.
        q_size: query map size the ``"table"``/``"fixed"`` biases are built for (int or (H, W)). The table bias
            works at any input size (it is sampled at normalised displacements); ``"fixed"`` needs this size.
        kv_size: key grid size of the ``"fixed"`` bias (default ``q_size // stride``; v1: ``q_size``) and of the v1
            table.
        no_off: no offsets; DAT++ averages-pools the keys, v1 samples them at the reference grid.
        version: ``"pp"`` (DAT++, official HEAD, default) or ``"v1"`` (CVPR 2022 code).
        attn_drop, proj_drop: dropout on the attention weights and on the output (training mode only).
        backend: ``None`` (the dispatcher's choice: ``$DEFORMATTN_BACKEND``, else the first backend that can run
            the input, see :mod:`deformattn.backends`), ``"fast"`` or ``"reference"``. A named backend that cannot
            run an input raises ``ValueError``.
        sampler: ``"grid_sample"`` (default) or ``"gather"``: bilinear sampling (keys and, on the reference path, the
            bias table) from gather and arithmetic only, for exporting to runtimes without a correct GridSample.
            ``"gather"`` runs the reference backend's algorithm (plain ops, exportable).

    Shape:
        - Input: ``Tensor[B, C, H, W]``, any ``H, W >= 1``.
        - Output: ``Tensor[B, C, H, W]``; with ``return_sampling=True`` also ``pos`` and ``reference``, both
          ``Tensor[B, G, Hk, Wk, 2]`` in normalised (y, x) order.

    Example:
        >>> attn = DeformableAttention2d(64, 4, offset_groups=2, stride=2, q_size=14)
        >>> x = torch.randn(2, 64, 14, 14)
        >>> y, pos, ref = attn(x, return_sampling=True)
        >>> y.shape, pos.shape
        (torch.Size([2, 64, 14, 14]), torch.Size([2, 2, 7, 7, 2]))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        offset_groups: int = 1,
        stride: int = 1,
        offset_kernel_size: int | None = None,
        offset_padding: int | None = None,
        offset_range_factor: float = -1.0,
        pos_bias: str = "table",
        q_size: int | tuple[int, int] | None = None,
        kv_size: int | tuple[int, int] | None = None,
        no_off: bool = False,
        version: str = "pp",
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
        sampler: str = "grid_sample",
    ):
        super().__init__()
        dim = check_int(dim, "dim", _OWNER, minimum=1)
        num_heads = check_int(num_heads, "num_heads", _OWNER, minimum=1)
        offset_groups = check_int(offset_groups, "offset_groups", _OWNER, minimum=1)
        stride = check_int(stride, "stride", _OWNER, minimum=1)
        if dim % num_heads:
            raise ValueError(f"{_OWNER}: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % offset_groups:
            raise ValueError(
                f"{_OWNER}: num_heads ({num_heads}) must be divisible by offset_groups ({offset_groups})"
            )
        if version not in DF.VERSIONS:
            raise ValueError(f"{_OWNER}: version must be one of {DF.VERSIONS}, got {version!r}")
        if pos_bias not in DF.POS_BIAS_KINDS:
            raise ValueError(f"{_OWNER}: pos_bias must be one of {DF.POS_BIAS_KINDS}, got {pos_bias!r}")
        if pos_bias == "log_cpb" and version == "v1":
            raise ValueError(f"{_OWNER}: pos_bias='log_cpb' exists only in DAT++ (version='pp'), got version='v1'")
        if offset_kernel_size is None:
            offset_kernel_size = default_offset_kernel_size(stride)
        offset_kernel_size = check_int(offset_kernel_size, "offset_kernel_size", _OWNER, minimum=1)
        if offset_padding is None:
            if version == "pp" and offset_kernel_size == stride:
                offset_padding = 0
            else:
                offset_padding = offset_kernel_size // 2
        offset_padding = check_int(offset_padding, "offset_padding", _OWNER, minimum=0)
        if offset_kernel_size < stride and offset_padding == 0:
            raise ValueError(
                f"{_OWNER}: offset_kernel_size ({offset_kernel_size}) must be >= stride ({stride}) when "
                f"offset_padding is 0, otherwise the offset network skips pixels"
            )
        offset_range_factor = check_float(offset_range_factor, "offset_range_factor", _OWNER)
        attn_drop = check_float(attn_drop, "attn_drop", _OWNER, minimum=0.0, maximum=1.0)
        proj_drop = check_float(proj_drop, "proj_drop", _OWNER, minimum=0.0, maximum=1.0)
        check_backend_name(_OWNER, DEFORMABLE_OP, backend)
        if sampler not in DF.SAMPLERS:
            raise ValueError(f"{_OWNER}: sampler must be one of {DF.SAMPLERS}, got {sampler!r}")
        if not isinstance(no_off, bool):
            raise TypeError(f"{_OWNER}: no_off must be a bool, got {type(no_off).__name__}")

        if q_size is not None:
            q_size = to_2tuple(q_size, "q_size", _OWNER)
            if min(q_size) < 1:
                raise ValueError(f"{_OWNER}: q_size must be >= 1, got {q_size}")
        if pos_bias in ("table", "fixed") and q_size is None:
            raise ValueError(
                f"{_OWNER}: pos_bias={pos_bias!r} needs q_size, the query map size its table is built for"
            )
        if kv_size is not None:
            kv_size = to_2tuple(kv_size, "kv_size", _OWNER)
        elif q_size is not None:
            kv_size = q_size if version == "v1" else (q_size[0] // stride, q_size[1] // stride)

        self.dim = dim
        self.num_heads = num_heads
        self.offset_groups = offset_groups
        self.head_dim = dim // num_heads
        self.group_dim = dim // offset_groups
        self.group_heads = num_heads // offset_groups
        self.scale = self.head_dim**-0.5
        self.stride = stride
        self.offset_kernel_size = offset_kernel_size
        self.offset_padding = offset_padding
        self.offset_range_factor = offset_range_factor
        self.pos_bias = pos_bias
        self.q_size = q_size
        self.kv_size = kv_size
        self.no_off = no_off
        self.version = version
        self.attn_drop = attn_drop
        self.proj_drop = proj_drop
        self.backend = backend
        self.sampler = sampler

        Cg = self.group_dim
        self.conv_offset = nn.Sequential(
            nn.Conv2d(Cg, Cg, offset_kernel_size, stride, offset_padding, groups=Cg),
            LayerNormProxy(Cg),
            nn.GELU(),
            nn.Conv2d(Cg, 2, 1, 1, 0, bias=False),
        )
        if no_off:  # kept (official checkpoints carry it) but unused
            self.conv_offset.requires_grad_(False)
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)

        self.rpe_table: nn.Module | nn.Parameter | None
        if pos_bias == "dwc":
            self.rpe_table = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        elif pos_bias == "fixed":
            assert q_size is not None and kv_size is not None
            self.rpe_table = nn.Parameter(torch.zeros(num_heads, q_size[0] * q_size[1], kv_size[0] * kv_size[1]))
            nn.init.trunc_normal_(self.rpe_table, std=0.01)
        elif pos_bias == "log_cpb":
            self.rpe_table = nn.Sequential(
                nn.Linear(2, 32, bias=True), nn.ReLU(inplace=True), nn.Linear(32, self.group_heads, bias=False)
            )
        elif pos_bias == "table":
            assert q_size is not None and kv_size is not None
            # DAT++ spans the query map's displacements; v1 sized it by the key map (equal in the released models).
            th, tw = q_size if version == "pp" else kv_size
            self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * th - 1, 2 * tw - 1))
            nn.init.trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.rpe_table = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, offset_groups={self.offset_groups}, stride={self.stride}, "
            f"offset_kernel_size={self.offset_kernel_size}, offset_range_factor={self.offset_range_factor}, "
            f"pos_bias={self.pos_bias!r}, q_size={self.q_size}, no_off={self.no_off}, version={self.version!r}"
        )

    def key_grid_size(self, H: int, W: int) -> tuple[int, int]:
        """``(Hk, Wk)`` for an ``H x W`` input."""
        k, s, p = self.offset_kernel_size, self.stride, self.offset_padding
        return DF.key_grid_size(H, k, s, p), DF.key_grid_size(W, k, s, p)

    # -- the steps of the forward pass, shared by every backend ------------------------------------------------
    def sampling_positions(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Offsets from the queries and the resulting sampling positions.

        Args:
            q (Tensor[B, C, H, W]): projected queries.

        Returns:
            pos (Tensor[B*G, Hk, Wk, 2]) and reference (Tensor[Hk, Wk, 2]), normalised (y, x), in
            :func:`~deformattn.functional.coord_dtype` (float32 for a half-precision model).
        """
        B, C, H, W = q.shape
        G, Cg = self.offset_groups, self.group_dim
        Hk, Wk = self.key_grid_size(H, W)
        acc = DF.coord_dtype(q.dtype)
        orf, version = self.offset_range_factor, self.version
        k, p, r = self.offset_kernel_size, self.offset_padding, self.stride
        reference = shared(  # one grid per stage and size (deformattn._shapes.shared); (H, W, k, p, r) give Hk, Wk
            ("reference_points", H, W, k, p, r, Hk, Wk, version, orf, q.device, acc),
            lambda: DF.reference_points(Hk, Wk, version=version, offset_range_factor=orf, device=q.device, dtype=acc),
        )
        if self.no_off:
            offset = q.new_zeros(B * G, 2, Hk, Wk, dtype=acc)
        else:
            q_off = q.reshape(-1, Cg, H, W)  # BG, Cg, H, W
            # maps shorter than the kernel get padded bottom/right so the key grid keeps >= 1 point; no map needs
            # it when k - 2p <= 1 (the official padding k // 2), and then no pad is recorded for a traced size
            pad_h, pad_w = sym_max(k - H - 2 * p, 0), sym_max(k - W - 2 * p, 0)
            if k - 2 * p > 1 and (is_symbolic(H, W) or pad_h or pad_w):
                q_off = F.pad(q_off, (0, pad_w, 0, pad_h))
            offset = self.conv_offset(q_off).to(acc)  # BG, 2, Hk, Wk
        pos = DF.bound_offsets(
            offset,
            reference,
            offset_range_factor=self.offset_range_factor,
            version=self.version,
            no_off=self.no_off,
        )  # BG, Hk, Wk, 2
        return pos, reference

    def sample_kv_input(self, x: Tensor, pos: Tensor) -> Tensor:
        """Features the keys and values are projected from: ``Tensor[B, C, Ns]``."""
        Hk, Wk = pos.shape[1:3]
        if self.no_off and self.version == "pp":
            return DF.pool_keys(x, Hk, Wk)
        return DF.sample_keys(x, pos, self.offset_groups, self.sampler)

    def position_bias_params(self) -> DF.PositionBias | None:
        """The bias on the attention logits as a backend receives it (None for ``"dwc"`` and ``"none"``)."""
        kind = self.pos_bias
        if kind in ("table", "fixed"):
            params: tuple[Tensor, ...] = (self.rpe_table,)
        elif kind == "log_cpb":
            lin1, lin2 = self.rpe_table[0], self.rpe_table[2]
            params = (lin1.weight, lin1.bias, lin2.weight)
        else:
            return None
        return DF.PositionBias(kind, params, self.offset_groups, self.version, self.sampler)

    def position_bias(self, H: int, W: int, pos: Tensor) -> Tensor | None:
        """The reference (official-algorithm) bias on the logits: ``Tensor[B or 1, nH, H*W, Ns]`` or None."""
        return DF.position_bias(self.position_bias_params(), H, W, pos)

    def forward(self, x: Tensor, return_sampling: bool = False):
        check_image_tensor(x, "x", _OWNER, channels=self.dim)
        B, C, H, W = x.shape
        if self.pos_bias == "fixed":
            self._check_fixed_size(H, W)
        nH, hc = self.num_heads, self.head_dim
        q = self.proj_q(x)  # B, C, H, W
        pos, reference = self.sampling_positions(q)  # BG, Hk, Wk, 2 ; Hk, Wk, 2
        xs = self.sample_kv_input(x, pos).transpose(1, 2)  # B, Ns, C
        Ns = xs.shape[1]
        # contiguous here, not in the backend: the strided projection outputs would otherwise stay alive (held by
        # this frame) beside the backend's copies for the whole attention call
        k = _conv1x1(self.proj_k, xs).reshape(-1, Ns, nH, hc).transpose(1, 2).contiguous()  # B, nH, Ns, hc
        v = _conv1x1(self.proj_v, xs).reshape(-1, Ns, nH, hc).transpose(1, 2).contiguous()  # B, nH, Ns, hc
        del xs
        # contiguous here (unit stride along hc, as the fast kernels need), so that q itself can go before the
        # attention call when nothing after it reads q: the call then holds one copy of the queries, not two
        qh = q.reshape(-1, nH, hc, H * W).transpose(-1, -2).contiguous()  # B, nH, H*W, hc
        if self.pos_bias != "dwc":
            del q
        bias = self.position_bias_params()
        problem = Problem.of(
            qh, k, v, pos, *(bias.params if bias is not None else ()),
            sizes={"B": B, "nH": nH, "H": H, "W": W, "Ns": Ns, "hc": hc},
            plain_ops=self.sampler == "gather", sampler=self.sampler,
        )
        backend = select_backend(DEFORMABLE_OP, problem, self.backend, owner=_OWNER)
        out = backend(
            qh, k, v, pos, bias, H=H, W=W, scale=self.scale, attn_drop=self.attn_drop, training=self.training
        )  # B, nH, H*W, hc
        del qh, k, v
        out = out.transpose(1, 2).reshape(-1, H, W, self.dim).permute(0, 3, 1, 2)  # channels_last, as the blocks' maps
        if self.pos_bias == "dwc":
            out = out + self.rpe_table(q)
        y = F.dropout(self.proj_out(out), p=self.proj_drop, training=self.training)
        if not return_sampling:
            return y
        G = self.offset_groups
        Hk, Wk = reference.shape[:2]
        pos = pos.reshape(B, G, Hk, Wk, 2)
        reference = reference.reshape(1, 1, Hk, Wk, 2).expand(B, G, Hk, Wk, 2)
        return y, pos, reference

    def _check_fixed_size(self, H: int, W: int) -> None:
        assert self.q_size is not None and self.kv_size is not None
        Hk, Wk = self.key_grid_size(H, W)
        n_q, n_k = self.q_size[0] * self.q_size[1], self.kv_size[0] * self.kv_size[1]
        if H * W != n_q or Hk * Wk != n_k:
            raise ValueError(
                f"{_OWNER}: pos_bias='fixed' was built for {n_q} queries ({self.q_size[0]}x{self.q_size[1]}) and "
                f"{n_k} keys ({self.kv_size[0]}x{self.kv_size[1]}); input {H}x{W} gives {H * W} queries and a "
                f"{Hk}x{Wk} key grid. Use pos_bias='table' for inputs of varying size."
            )

