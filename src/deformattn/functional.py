"""Pure functions of deformable attention: the coordinate conventions, offset bounding, bilinear sampling of keys,
and the reference (official-algorithm) position biases.

Coordinate convention
---------------------
All positions are *normalised* to ``[-1, 1]`` with ``align_corners=True`` semantics: ``-1`` is the centre of the
first pixel and ``+1`` the centre of the last one, and the last dimension is ordered **(y, x)**. Worked example on
a map with ``W = 5`` columns: pixel column ``j`` sits at ``2 * j / (W - 1) - 1``, i.e. ``-1, -0.5, 0, 0.5, 1``; a
normalised x of ``0.25`` lies halfway between columns 2 and 3, so bilinear sampling returns ``0.5 * x[..., 2] +
0.5 * x[..., 3]``. Positions outside ``[-1, 1]`` read zeros beyond the border (``padding_mode="zeros"``).

Reference points (the uniform grid the offsets are added to) follow the official code of each version:

* ``"v1"`` (DAT, CVPR 2022): ``ref_i = (i + 0.5) / Hk * 2 - 1`` - cell centres of an ``Hk``-cell partition.
* ``"pp"`` (DAT++, official HEAD): ``ref_i = (i + 0.5) / (Hk - 1) * 2 - 1`` - the published weights were trained
  with this grid, so it is kept: for ``Hk = 4`` it gives ``-0.667, 0, 0.667, 1.333`` (the last point lies outside the
  map until an offset moves it in).

Query coordinates (used by the relative position bias) are ``i / (H - 1) * 2 - 1`` for ``"pp"`` and the cell-centre
formula for ``"v1"``.

Degenerate axes (length 1). The official DAT++ formulas divide by ``Hk - 1`` and ``H - 1``. What happens then:

* Key grid of length 1 with clamped offsets (``offset_range_factor < 0``): the official reference is ``+inf`` and
  the clamp puts every sample on the last row/column (``+1``). This runs in the official code, so it is reproduced
  exactly (the reference returned is ``+inf``, the sampling positions are ``+1``).
* Key grid of length 1 with bounded offsets (``offset_range_factor >= 0``): the official code raises
  ``ZeroDivisionError``. Here the reference is the map centre (``0``) and the offset range is ``1`` (one half
  of the normalised span), i.e. the v1 formulas, which are the limit of a sensible grid.
* Query map of length 1: the official query coordinate is ``0 / 0 = NaN``; here it is the centre, ``0``.

Precision. Positions, bilinear weights and position biases are computed in :func:`coord_dtype` (float32 for
bfloat16 / float16 models, the model's dtype otherwise): in bfloat16 a 56-pixel map resolves only a quarter pixel
near its far edge, and PyTorch's CPU ``grid_sample`` in half precision on a channels_last input returns garbage
(docs/grid_sample_channels_last_lowp.md). Sampled values come back in the features' dtype, so keys, values and the
attention stay in the model's precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._shapes import concrete, shared, sym_max, sym_min

__all__ = [
    "POS_BIAS_KINDS",
    "coord_dtype",
    "VERSIONS",
    "key_grid_size",
    "reference_points",
    "query_grid",
    "bound_offsets",
    "SAMPLERS",
    "bilinear_sample",
    "grid_sample_gather",
    "sample_keys",
    "pool_keys",
    "table_bias",
    "log_cpb_bias",
    "log_cpb_coords",
    "log_cpb_bias_fn",
    "attention_core",
    "PositionBias",
    "position_bias",
]

POS_BIAS_KINDS = ("table", "fixed", "dwc", "log_cpb", "none")
SAMPLERS = ("grid_sample", "gather")
VERSIONS = ("pp", "v1")


def coord_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype positions, interpolation weights and biases are computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def key_grid_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Length of the key grid along one axis: the output length of the offset network's strided conv.

    A map shorter than the kernel is padded (bottom/right) up to it, so the key grid always has at least one point.
    """
    return sym_max((size + 2 * padding - kernel_size) // stride + 1, 1)


def reference_points(
    Hk: int,
    Wk: int,
    *,
    version: str = "pp",
    offset_range_factor: float = -1.0,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Uniform reference grid of the key points.

    Returns:
        Tensor[Hk, Wk, 2]: normalised (y, x) coordinates (see the module docstring for the per-version formula).
    """
    axes = []
    for n in (Hk, Wk):
        # Same operation order as the official code (linspace, divide, *2, -1) so float64 results agree to the ulp;
        # arange + 0.5 is linspace(0.5, n - 0.5, n) exactly (step 1) and needs no branch on a symbolic n.
        t = torch.arange(n, device=device, dtype=dtype or torch.get_default_dtype()).add(0.5)
        if version == "v1":
            t = t.div(n)
        elif offset_range_factor < 0:
            t = t.div(n - 1.0)  # n = 1: official 0.5 / 0 -> +inf, clamped to +1 afterwards
        else:
            t = t.div(sym_max(n - 1, 1))  # n = 1: official ZeroDivisionError; 0.5 / 1 -> the centre, 0
        axes.append(t.mul(2.0).sub(1.0))
    ref_y, ref_x = torch.meshgrid(axes[0], axes[1], indexing="ij")
    return torch.stack((ref_y, ref_x), -1)  # Hk, Wk, 2


def query_grid(
    H: int, W: int, *, version: str = "pp", device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Normalised (y, x) coordinates of every query pixel, as the relative position bias sees them.

    Returns:
        Tensor[H, W, 2]
    """
    axes = []
    for n in (H, W):
        t = torch.arange(n, device=device, dtype=dtype or torch.get_default_dtype())
        if version == "v1":
            t = t.add(0.5).div(n).mul(2.0).sub(1.0)  # linspace(0.5, n - 0.5, n) / n, exactly
        else:
            t = t.div(sym_max(n - 1, 1)).mul(2.0).sub(sym_min(n - 1, 1))  # n = 1: official 0 / 0 = NaN; here 0
        axes.append(t)
    qy, qx = torch.meshgrid(axes[0], axes[1], indexing="ij")
    return torch.stack((qy, qx), -1)  # H, W, 2


def offset_range(Hk: int, Wk: int, version: str) -> tuple[float, float]:
    """Scale of ``tanh(offset)`` per axis (before ``offset_range_factor``): half a grid step."""
    if version == "v1":
        return 1.0 / Hk, 1.0 / Wk
    return tuple(1.0 / sym_max(n - 1, 1) for n in (Hk, Wk))  # type: ignore[return-value]


def bound_offsets(
    offset: Tensor,
    reference: Tensor,
    *,
    offset_range_factor: float,
    version: str = "pp",
    no_off: bool = False,
) -> Tensor:
    """Turn raw offsets into sampling positions.

    Args:
        offset (Tensor[BG, 2, Hk, Wk]): raw output of the offset network, channel 0 = y, 1 = x.
        reference (Tensor[Hk, Wk, 2]): reference grid from :func:`reference_points`.
        offset_range_factor: ``s``. DAT++: ``s >= 0`` gives ``ref + s * tanh(offset) / (Hk - 1)`` (per axis),
            ``s < 0`` gives ``clamp(ref + offset, -1, 1)``. v1: ``s > 0`` gives ``ref + s * tanh(offset) / Hk``,
            ``s == 0`` gives ``ref + offset`` (unbounded), ``s < 0`` gives ``tanh(ref + offset)``.
        no_off: the offsets are zero (keys at the reference grid).

    Returns:
        Tensor[BG, Hk, Wk, 2]: sampling positions, (y, x).
    """
    Hk, Wk = offset.shape[-2:]
    off = offset.permute(0, 2, 3, 1)  # BG, Hk, Wk, 2
    if no_off:
        off = torch.zeros_like(off)
    bounded = offset_range_factor > 0 if version == "v1" else offset_range_factor >= 0
    if bounded and not no_off:
        ry, rx = offset_range(Hk, Wk, version)
        if isinstance(ry, Tensor):  # sizes recorded by torch.jit.trace: the range stays a function of them
            rng = torch.stack([ry, rx]).to(device=off.device, dtype=off.dtype)
        else:
            rng = torch.tensor((ry, rx), dtype=off.dtype, device=off.device)
        off = off.tanh().mul(rng).mul(offset_range_factor)
    if offset_range_factor >= 0:
        return off + reference
    if version == "v1":
        return (off + reference).tanh()
    return (off + reference).clamp(-1.0, 1.0)


def grid_sample_gather(input: Tensor, grid: Tensor) -> Tensor:
    """``F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=True)`` built from
    ``gather`` and arithmetic only (no GridSample operator), for runtimes without a correct GridSample.

    Coordinates and weights are computed in :func:`coord_dtype` of the grid, the sum of the four taps too; the
    result has the input's dtype.

    Args:
        input (Tensor[N, C, H, W]); grid (Tensor[N, Ho, Wo, 2]) normalised (x, y).

    Returns:
        Tensor[N, C, Ho, Wo]
    """
    N, C, H, W = input.shape
    acc = coord_dtype(torch.promote_types(input.dtype, grid.dtype))
    grid = _to(grid, acc)
    rows = input.permute(0, 2, 3, 1).flatten(0, 2)  # N*H*W, C: map n starts at row n*H*W
    base = torch.arange(N, device=input.device).mul(H * W).view(-1, 1, 1)  # N, 1, 1
    out = _gather_bilinear(rows, base, H, W, grid[..., 1], grid[..., 0])  # N, Ho, Wo, C
    return _to(out.permute(0, 3, 1, 2), input.dtype)


def _gather_bilinear(rows: Tensor, base: Tensor, H, W, gy: Tensor, gx: Tensor) -> Tensor:
    """Bilinear samples of ``H x W`` maps stored as rows of channels: each tap is one Gather of whole rows (an
    embedding lookup), with no index spread over the channels and no size arithmetic in an exported graph; the
    taps are summed one by one in grid_sample's order (one gather of all four would make the index, weight and
    tap tensors four times the output).

    Args:
        rows (Tensor[M, C]): the maps, pixel-major; base, gy, gx: see :func:`_bilinear_taps`.

    Returns:
        Tensor[N, Ho, Wo, C] in the coordinates' dtype.
    """
    out: Tensor | None = None
    for idx, w in _bilinear_taps(base, H, W, gy, gx):
        tap = _to(F.embedding(idx, rows), gx.dtype) * w.unsqueeze(-1)  # N, Ho, Wo, C
        out = tap if out is None else out + tap
    assert out is not None
    return out


def _bilinear_taps(base: Tensor, H, W, gy: Tensor, gx: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The four taps of bilinear sampling (zeros outside, ``align_corners=True``) in grid_sample's order.

    Args:
        base (Tensor[N, 1, 1] int64): flat index of each sample's map's first pixel; gy, gx (Tensor[N, Ho, Wo]):
            normalised coordinates in :func:`coord_dtype`.

    Returns:
        ``[(index, weight)]``: flat pixel index (int64, clamped into the map) and weight (zero where the tap lies
        outside the map), each ``Tensor[N, Ho, Wo]``.
    """
    # per axis once (not per tap): each tap's clamped position and its weight, zero outside the map (where the
    # clamp moved the position); positions become integers before they are combined (exact at any size)
    xs, ys = [], []
    for g, size, out_list in ((gx, W, xs), (gy, H, ys)):
        last = size - 1
        i = (g + 1.0) * (0.5 * last)  # N, Ho, Wo (pixel coordinates)
        p0 = torch.floor(i)
        w1 = i - p0
        for p, w in ((p0, 1.0 - w1), (p0 + 1, w1)):
            pc = p.clamp(0, last)
            out_list.append((pc.to(torch.int64), torch.where(pc == p, w, 0.0)))
    taps = []
    for yi, wy in ys:
        row = yi * W + base
        taps.extend((row + xi, wx * wy) for xi, wx in xs)
    return taps


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, recording no conversion in a captured graph when ``t`` already has it."""
    return t if t.dtype == dtype else t.to(dtype)


def bilinear_sample(input: Tensor, grid: Tensor, sampler: str = "grid_sample") -> Tensor:
    """Bilinear sampling, zeros outside, ``align_corners=True``; ``sampler`` picks ``grid_sample`` or the
    gather-only equivalent :func:`grid_sample_gather` (same values and gradients).

    Half-precision inputs are sampled in float32 (contiguous) and the result cast back: PyTorch's half-precision
    ``grid_sample`` computes pixel coordinates in half precision and, on channels_last inputs on the CPU, returns
    wrong values (docs/grid_sample_channels_last_lowp.md). The grid is always used in :func:`coord_dtype`.
    """
    if sampler == "gather":
        return grid_sample_gather(input, grid)
    acc = coord_dtype(input.dtype)
    src = input if input.dtype == acc else input.to(acc, memory_format=torch.contiguous_format)
    out = F.grid_sample(src, grid.to(acc), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.to(input.dtype)


def sample_keys(x: Tensor, pos: Tensor, groups: int, sampler: str = "grid_sample") -> Tensor:
    """Bilinearly sample every group's channels at that group's positions (zeros outside the map).

    Args:
        x (Tensor[B, C, H, W]): features to sample.
        pos (Tensor[B*G, Hk, Wk, 2]): normalised (y, x) positions.
        groups: ``G``; channel block ``g`` of ``x`` is sampled at ``pos[b * G + g]``.

    Returns:
        Tensor[B, C, Ns] with ``Ns = Hk * Wk``.
    """
    B, C, H, W = x.shape
    Hk, Wk = pos.shape[1:3]
    if sampler == "gather":  # the gather core reads (y, x) as given: no flipped copy of the positions
        acc = coord_dtype(torch.promote_types(x.dtype, pos.dtype))
        pos = _to(pos, acc)
        rows = x.reshape(-1, C // groups, H, W).permute(0, 2, 3, 1).flatten(0, 2)  # BG*H*W, Cg
        base = torch.arange(B * groups, device=x.device).mul(H * W).view(-1, 1, 1)  # BG, 1, 1
        sampled = _gather_bilinear(rows, base, H, W, pos[..., 0], pos[..., 1])  # BG, Hk, Wk, Cg
        return _to(sampled.permute(0, 3, 1, 2), x.dtype).reshape(-1, C, Hk * Wk)
    sampled = bilinear_sample(
        x.reshape(B * groups, C // groups, H, W), pos.flip(-1), sampler  # grid_sample wants (x, y)
    )  # BG, Cg, Hk, Wk
    return sampled.reshape(B, C, Hk * Wk)


def pool_keys(x: Tensor, Hk: int, Wk: int) -> Tensor:
    """``no_off`` keys: average-pool ``x`` to the key grid (equals ``avg_pool2d(x, stride)`` when ``H = stride*Hk``;
    an adaptive pool keeps every size working where the official assert would fail).

    Returns:
        Tensor[B, C, Ns]
    """
    B, C = x.shape[:2]
    return F.adaptive_avg_pool2d(x, (Hk, Wk)).reshape(B, C, Hk * Wk)


def table_bias(table: Tensor, q_grid: Tensor, pos: Tensor, groups: int, sampler: str = "grid_sample") -> Tensor:
    """Deformable relative position bias, the official way: ``grid_sample`` of the table at the displacement
    (``sampler="gather"``: the same taps gathered from the table's own rows).

    The table covers displacements in ``[-2, 2]`` (normalised units) with ``2 * q_h - 1`` cells; the displacement
    ``(q - p) / 2`` is therefore a ``grid_sample`` coordinate in ``[-1, 1]``.

    Args:
        table (Tensor[nH, Th, Tw]): the learned table, heads ordered group-major.
        q_grid (Tensor[H, W, 2]): query coordinates.
        pos (Tensor[B*G, Hk, Wk, 2]): key positions.

    Returns:
        Tensor[B, nH, H*W, Ns] in :func:`coord_dtype` (a half-precision table is read in float32)
    """
    acc = coord_dtype(torch.promote_types(table.dtype, pos.dtype))
    table, q_grid, pos = _to(table, acc), _to(q_grid, acc), _to(pos, acc)
    nH, Th, Tw = table.shape
    BG = pos.shape[0]
    B = BG // groups
    Nq = q_grid.shape[0] * q_grid.shape[1]
    Ns = pos.shape[1] * pos.shape[2]
    if sampler == "gather":  # rows of the table itself (not one copy per image), read with g = n % G, (y, x)
        # a head's table is a row and each tap one gather along the rows, the index repeated on every row
        # (onnxruntime gathers single values far faster that way than with a Gather along the axis); the
        # table's sizes are the parameter's, the same at every input size (plain ints in a captured graph)
        nH, Th, Tw = (concrete(n) for n in table.shape)
        hg, T = nH // groups, Th * Tw
        cols = table.reshape(groups, hg, T).transpose(0, 1).flatten(1)  # hg, G*Th*Tw
        base = (torch.arange(BG, device=pos.device) % groups).mul(T).view(-1, 1, 1)  # BG, 1, 1
        dy, dx = (q_grid[..., i].flatten()[None, :, None] - pos[..., i].flatten(1)[:, None, :] for i in (0, 1))
        per_head = torch.zeros((hg, 1), dtype=torch.int64, device=pos.device)  # + index: the index on every row
        out: Tensor | None = None
        for idx, w in _bilinear_taps(base, Th, Tw, dy.mul(0.5), dx.mul(0.5)):  # BG, Nq, Ns each
            tap = cols.gather(1, idx.reshape(1, -1) + per_head) * w.reshape(-1)  # hg, BG*Nq*Ns
            out = tap if out is None else out + tap
        assert out is not None
        return out.reshape(hg, -1, groups, Nq, Ns).permute(1, 2, 0, 3, 4).reshape(-1, nH, Nq, Ns)
    displacement = (q_grid.reshape(1, Nq, 1, 2) - pos.reshape(BG, 1, Ns, 2)).mul(0.5)  # BG, Nq, Ns, 2
    bias = bilinear_sample(
        table.reshape(1, groups, nH // groups, Th, Tw).expand(B, -1, -1, -1, -1).reshape(BG, nH // groups, Th, Tw),
        displacement.flip(-1),
        sampler,
    )  # BG, hg, Nq, Ns
    return bias.reshape(B, nH, Nq, Ns)


def log_cpb_coords(q_grid: Tensor, pos: Tensor) -> Tensor:
    """Log-spaced displacement fed to the continuous position bias MLP (DAT++, after Swin-V2).

    Returns:
        Tensor[BG, H*W, Ns, 2]: ``sign(d) * log2(|d| + 1) / 3`` with ``d = 4 (q - p)``.
    """
    BG = pos.shape[0]
    Nq = q_grid.shape[0] * q_grid.shape[1]
    Ns = pos.shape[1] * pos.shape[2]
    d = (q_grid.reshape(1, Nq, 1, 2) - pos.reshape(BG, 1, Ns, 2)).mul(4.0)  # BG, Nq, Ns, 2
    return torch.sign(d) * torch.log2(torch.abs(d) + 1.0) / math.log2(8.0)


def log_cpb_bias(mlp: torch.nn.Module, q_grid: Tensor, pos: Tensor, groups: int) -> Tensor:
    """Continuous position bias: an MLP (``Linear(2, 32), ReLU, Linear(32, hg)``) of the log-spaced displacement,
    shared by the groups, evaluated in :func:`coord_dtype` whatever the MLP's dtype.

    Returns:
        Tensor[B, nH, H*W, Ns]
    """
    lin1, lin2 = mlp[0], mlp[2]
    return log_cpb_bias_fn(q_grid, pos, groups, lin1.weight, lin1.bias, lin2.weight)


def log_cpb_bias_fn(q_grid: Tensor, pos: Tensor, groups: int, w1: Tensor, b1: Tensor | None, w2: Tensor) -> Tensor:
    """:func:`log_cpb_bias` from the MLP's weights (``w1`` Tensor[32, 2], ``b1`` Tensor[32], ``w2`` Tensor[hg, 32]).

    Returns:
        Tensor[B, nH, H*W, Ns] in :func:`coord_dtype` of the positions.
    """
    BG = pos.shape[0]
    acc = coord_dtype(pos.dtype)
    coords = log_cpb_coords(q_grid.to(acc), pos.to(acc))  # BG, Nq, Ns, 2
    b1 = None if b1 is None else b1.to(acc)
    bias = F.linear(F.relu(F.linear(coords, w1.to(acc), b1)), w2.to(acc))  # BG, Nq, Ns, hg
    B, hg = BG // groups, bias.shape[-1]
    return bias.permute(0, 3, 1, 2).reshape(B, groups * hg, bias.shape[1], bias.shape[2])


def attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    *,
    scale: float,
    attn_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Plain multi-head attention over sampled keys (the official einsum formulation).

    Args:
        q (Tensor[B, nH, hc, Nq]), k (Tensor[B, nH, hc, Ns]), v (Tensor[B, nH, hc, Ns])
        bias (Tensor[B or 1, nH, Nq, Ns] or None): added to the scaled logits; a bias of higher precision than
            ``q`` (float32 with a half-precision model) makes the softmax run in its precision.
        training: dropout on the attention weights only when True (explicit, never implied).

    Returns:
        Tensor[B, nH, hc, Nq]
    """
    attn = torch.einsum("bhcm,bhcn->bhmn", q, k).mul(scale)  # B, nH, Nq, Ns
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, p=attn_drop, training=training)
    return torch.einsum("bhmn,bhcn->bhcm", _to(attn, v.dtype), v)  # B, nH, hc, Nq


@dataclass(frozen=True)
class PositionBias:
    """The parameters of a relative position bias that acts on the attention logits, as a backend receives them.

    Attributes:
        kind: ``"table"``, ``"fixed"`` or ``"log_cpb"`` (``"dwc"`` acts on the output, ``"none"`` has no bias:
            neither reaches a backend).
        params: ``table``: (Tensor[nH, Th, Tw],); ``fixed``: (Tensor[nH, H*W, Ns],); ``log_cpb``: the MLP's
            ``(w1 Tensor[32, 2], b1 Tensor[32], w2 Tensor[hg, 32])``.
        groups: ``G`` (heads are ordered group-major).
        version: ``"pp"`` or ``"v1"`` (query coordinates, table extent).
        sampler: how the reference reads the table (``"grid_sample"`` or ``"gather"``).
    """

    kind: str
    params: tuple[Tensor, ...]
    groups: int
    version: str = "pp"
    sampler: str = "grid_sample"


def position_bias(bias: PositionBias | None, H: int, W: int, pos: Tensor) -> Tensor | None:
    """The additive attention bias, the official way (the reference backend's): ``Tensor[B or 1, nH, H*W, Ns]``.

    Args:
        pos (Tensor[B*G, Hk, Wk, 2]): key positions, normalised (y, x).
    """
    if bias is None:
        return None
    if bias.kind == "fixed":
        (table,) = bias.params
        Ns = pos.shape[1] * pos.shape[2]
        return table.reshape(1, table.shape[0], H * W, Ns)
    acc = coord_dtype(pos.dtype)
    q_grid = shared(("query_grid", H, W, bias.version, pos.device, acc),  # one per stage and size
                    lambda: query_grid(H, W, version=bias.version, device=pos.device, dtype=acc))
    if bias.kind == "table":
        return table_bias(bias.params[0], q_grid, pos, bias.groups, bias.sampler)
    if bias.kind == "log_cpb":
        return log_cpb_bias_fn(q_grid, pos, bias.groups, *bias.params)
    raise ValueError(f"position_bias: kind must be 'table', 'fixed' or 'log_cpb', got {bias.kind!r}")


# Multi-scale deformable attention (Deformable DETR) lives in ops/msda.py with its backends; re-exported here.
from .ops.msda import multi_scale_deformable_attention  # noqa: E402

__all__ += ["multi_scale_deformable_attention"]
