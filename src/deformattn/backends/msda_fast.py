"""Fast path of multi-scale deformable attention: the four bilinear corners gathered straight from ``value``.

The reference samples every level with ``grid_sample`` into a ``(N*M, D, Lq, L*P)`` tensor, then multiplies it by
the attention weights and sums over levels and points; its backward expands the gradient back to that size and runs
``grid_sample``'s backward per level. Here the bilinear weight of each corner is folded into the attention weight,
so the output of a (query, head) is one weighted sum of ``L*P*4`` rows of ``value``:

* **Forward** (:class:`_SampleFunction`): ``value`` is copied once into a table with a zero border around every
  level (``Tensor[N, Sp, M, D]``, :func:`_padded_table`), so the four corners of a point are the row of its top-left
  corner plus fixed per-level offsets and a corner outside the map reads zero (only a cell entirely outside needs
  its weight zeroed). Per block of queries: one index computation for all levels and corners
  (``Tensor[N, Qb, M, L, P, 4]`` rows) and one ``F.embedding_bag(mode="sum", per_sample_weights=...)``: gather and
  reduction in one kernel, nothing of size ``points x D`` is materialised. Memory: the block's indices and
  weights.
* **Backward**, written by hand; it keeps only the inputs and recomputes the corners per block:

  - locations and attention weights need, per corner, the dot product of the output gradient with the corner's
    value row (a gather of the block's rows and one batched ``(1 x D) @ (D x K)`` product; memory bounded by the
    block);
  - ``value`` receives one scatter for all levels, points and queries, done as a *gather*: the sampling points
    are sorted once by their top-left corner in the zero-bordered table, and four ``embedding_bag`` calls (one per
    corner, bags = table rows) sum the weighted output gradients of the points of each row; the four results are
    shifted by their corner offset and added. No atomic scatter, no per-level pass.

* **Few points per key** (:class:`_DirectFunction`, decoder queries): the bordered table and the sorted gather
  cost about ten passes over value-sized buffers whatever the number of points, which only pays when every value
  row is read by many corners. When the corner reads number at most ``direct_ratio`` (2; :func:`tuning`) per row of
  ``value`` (``N*Lq*M*L*P*4 <= 2*N*S*M``, :func:`fast_form`), the corners are read straight from ``value`` (rows
  clamped into the map, the weight of a corner outside it zeroed), and the backward adds each block's
  ``(K x 1) * (1 x D)`` contributions to the value gradient with one ``index_add_``: no copy of ``value``, memory
  bounded by the block. Same formulas, same results (both forms are tested against the reference).

* **Export / compile** (:func:`msda_gather`): the same formulas with plain operations (``index_select``, ``mul``,
  ``sum``), one level and corner at a time, computed from ``spatial_shapes`` as a tensor, so the graph has no
  GridSample node and the number of queries and the level sizes stay dynamic. Autograd differentiates it directly.

Coordinates: ``x = loc_x * W - 0.5`` (``align_corners=False``), ``x0 = floor(x)``, ``fx = x - x0``; the corner
columns are ``x0`` (weight ``1 - fx``) and ``x0 + 1`` (weight ``fx``), and a column outside ``[0, W - 1]`` has weight
0 (``padding_mode="zeros"``). Same for rows.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Sampling points (N * queries * M * L * P) per block. Forward: the block's index and weight tensors (4 corners,
# ~12 bytes each in float32) stay in cache-sized chunks. Backward: the dot products gather points * 4 * D values.
# Change these with tuning(), not by assignment.
_FWD_BLOCK_POINTS = 1 << 18
_BWD_BLOCK_POINTS = 1 << 15
# Corner reads per value row below which the direct form runs (see the module docstring)
_DIRECT_RATIO = 2.0


@contextlib.contextmanager
def tuning(
    *,
    fwd_block_points: int | None = None,
    bwd_block_points: int | None = None,
    direct_ratio: float | None = None,
) -> Iterator[None]:
    """Temporarily change the multi-scale fast backend's knobs (None keeps a knob): ``fwd_block_points`` /
    ``bwd_block_points`` sampling points per block of queries in the forward / backward pass (memory against
    speed), ``direct_ratio`` the corner reads per row of ``value`` up to which the direct form runs (0: always the
    bordered table, ``math.inf``: always direct; see :func:`fast_form`). Tests use it to force both forms and many
    blocks on small inputs."""
    global _FWD_BLOCK_POINTS, _BWD_BLOCK_POINTS, _DIRECT_RATIO
    saved = (_FWD_BLOCK_POINTS, _BWD_BLOCK_POINTS, _DIRECT_RATIO)
    for name, value in (("fwd_block_points", fwd_block_points), ("bwd_block_points", bwd_block_points)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"tuning: {name} must be an int >= 1, got {value!r}")
    if direct_ratio is not None and (
        isinstance(direct_ratio, bool) or not isinstance(direct_ratio, (int, float)) or math.isnan(direct_ratio)
        or direct_ratio < 0
    ):
        raise ValueError(f"tuning: direct_ratio must be a number >= 0 (math.inf allowed), got {direct_ratio!r}")
    if fwd_block_points is not None:
        _FWD_BLOCK_POINTS = fwd_block_points
    if bwd_block_points is not None:
        _BWD_BLOCK_POINTS = bwd_block_points
    if direct_ratio is not None:
        _DIRECT_RATIO = float(direct_ratio)
    try:
        yield
    finally:
        _FWD_BLOCK_POINTS, _BWD_BLOCK_POINTS, _DIRECT_RATIO = saved


def fast_form(N: int, Lq: int, M: int, L: int, P: int, S: int) -> str:
    """The form :func:`msda_fast` runs for these sizes: ``"direct"`` when the corner reads number at most
    ``direct_ratio`` (:func:`tuning`) per row of ``value`` (``N*Lq*M*L*P*4 <= ratio * N*S*M``), else
    ``"bordered"``."""
    return "direct" if N * Lq * M * L * P * 4 <= _DIRECT_RATIO * N * S * M else "bordered"


def _level_tables(spatial_shapes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per level (Tensor[L] each, int64, computed from the tensor so that exported graphs keep the sizes dynamic):
    height, width, start row in ``value``."""
    H, W = spatial_shapes[:, 0], spatial_shapes[:, 1]
    sizes = H * W
    return H, W, torch.cumsum(sizes, 0) - sizes


def _pixel_coords(loc: Tensor, Wf: Tensor, Hf: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel coordinates ``loc * W - 0.5``, rounded exactly as the reference computes them (``grid = 2 * loc - 1``,
    then ``grid_sample``'s ``((grid + 1) * W - 1) / 2``), so both paths pick the same cell at integer coordinates,
    where the bilinear interpolant has a kink."""
    grid = 2 * loc - 1
    return ((grid[..., 0] + 1) * Wf - 1) / 2, ((grid[..., 1] + 1) * Hf - 1) / 2


def _corners(loc: Tensor, H: Tensor, W: Tensor):
    """Bilinear corners of ``loc`` (Tensor[..., L, P, 2], (x, y) in [0, 1]).

    Returns top-left integer corners ``x0, y0`` (clamped to [-1, W-1] / [-1, H-1], int64), fractional parts
    ``fx, fy``, and the validity (0/1, float) of the columns ``x0, x0+1`` and rows ``y0, y0+1``.
    """
    Wf = W.to(loc.dtype)[:, None]  # L, 1: broadcasts over (..., L, P)
    Hf = H.to(loc.dtype)[:, None]
    x, y = _pixel_coords(loc, Wf, Hf)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    vx0 = ((x0 >= 0) & (x0 <= Wf - 1)).to(loc.dtype)
    vx1 = ((x0 >= -1) & (x0 <= Wf - 2)).to(loc.dtype)
    vy0 = ((y0 >= 0) & (y0 <= Hf - 1)).to(loc.dtype)
    vy1 = ((y0 >= -1) & (y0 <= Hf - 2)).to(loc.dtype)
    # clamped in floating point first: a far-away (or non-finite) location must not overflow the integer cast
    x0i = torch.maximum(torch.minimum(x0, Wf - 1), torch.full_like(Wf, -1.0)).nan_to_num(-1.0).to(torch.int64)
    y0i = torch.maximum(torch.minimum(y0, Hf - 1), torch.full_like(Hf, -1.0)).nan_to_num(-1.0).to(torch.int64)
    return x0i, y0i, fx, fy, vx0, vx1, vy0, vy1


def _corner_rows(x0i: Tensor, y0i: Tensor, H: Tensor, W: Tensor, start: Tensor, S: int, M: int) -> Tensor:
    """Rows of ``value.view(N*S*M, D)`` of the four corners, Tensor[N, Q, M, L, P, 4] (order (0,0), (0,1), (1,0),
    (1,1) as (dy, dx)); clamped into the map (their weight is 0 where the corner is outside)."""
    N, Q, Mm = x0i.shape[:3]
    Wl, Hl, sl = W[:, None], H[:, None], start[:, None]  # L, 1
    xs = torch.stack([x0i, x0i + 1], -1)  # N, Q, M, L, P, 2
    ys = torch.stack([y0i, y0i + 1], -1)
    xs = torch.minimum(xs.clamp(min=0), (Wl - 1).clamp(min=0)[..., None])
    ys = torch.minimum(ys.clamp(min=0), (Hl - 1).clamp(min=0)[..., None])
    pos = sl[..., None, None] + ys[..., :, None] * Wl[..., None, None] + xs[..., None, :]  # N, Q, M, L, P, 2, 2
    n = torch.arange(N, device=x0i.device).view(N, 1, 1, 1, 1, 1, 1)
    m = torch.arange(Mm, device=x0i.device).view(1, 1, Mm, 1, 1, 1, 1)
    rows = (n * S + pos) * M + m
    # an empty level (H * W == 0) may point one past the end: its weight is 0, any valid row will do
    return rows.clamp_(0, max(N * S * M - 1, 0)).flatten(-2)  # N, Q, M, L, P, 4


def _corner_weights(attn: Tensor, fx: Tensor, fy: Tensor, vx0, vx1, vy0, vy1) -> Tensor:
    """Attention weight x bilinear weight x validity of the four corners, Tensor[..., 4] ((dy, dx) order)."""
    wx = torch.stack([(1 - fx) * vx0, fx * vx1], -1)  # ..., 2
    wy = torch.stack([(1 - fy) * vy0, fy * vy1], -1)
    return ((attn[..., None] * wy)[..., :, None] * wx[..., None, :]).flatten(-2)


def _query_blocks(N: int, Lq: int, M: int, L: int, P: int, budget: int) -> list[tuple[int, int]]:
    rows = max(1, budget // max(N * M * L * P, 1))
    return [(q, min(q + rows, Lq)) for q in range(0, Lq, rows)]


def _padded_table(value: Tensor, shapes: list[tuple[int, int]]) -> tuple[Tensor, list[int]]:
    """``value`` with a zero border around every level: Tensor[N, Sp, M, D] (``Sp = sum (H+2)(W+2)``), and the
    levels' start rows in it. Corners outside a map then read the border (zero) instead of needing a mask."""
    N, S, M, D = value.shape
    starts, sp = [], 0
    for H, W in shapes:
        starts.append(sp)
        sp += (H + 2) * (W + 2)
    table = value.new_zeros(N, sp, M, D)
    s = 0
    for (H, W), ps in zip(shapes, starts):
        table[:, ps:ps + (H + 2) * (W + 2)].view(N, H + 2, W + 2, M, D)[:, 1:H + 1, 1:W + 1] = \
            value[:, s:s + H * W].reshape(N, H, W, M, D)
        s += H * W
    return table, starts


class _Levels:
    """Per-level constants of the padded table, as tensors that broadcast over ``(N, Q, M, L, P)``."""

    def __init__(self, shapes: list[tuple[int, int]], starts: list[int], N: int, M: int, dtype, device):
        sp = sum((H + 2) * (W + 2) for H, W in shapes)
        self.Wf = torch.tensor([float(W) for _, W in shapes], dtype=dtype, device=device)[:, None]  # L, 1
        self.Hf = torch.tensor([float(H) for H, _ in shapes], dtype=dtype, device=device)[:, None]
        self.row0 = torch.tensor(starts, dtype=torch.int64, device=device)[:, None]  # L, 1
        self.Wp = torch.tensor([W + 2 for _, W in shapes], dtype=torch.int64, device=device)[:, None]
        # row offsets of the corners (dy, dx) = (0,0), (0,1), (1,0), (1,1) from the top-left one: L, 1, 4
        self.delta = torch.stack([torch.zeros_like(self.Wp), torch.ones_like(self.Wp), self.Wp, self.Wp + 1],
                                 -1) * M
        self.nm = (torch.arange(N, device=device).view(N, 1, 1, 1, 1) * sp * M
                   + torch.arange(M, device=device).view(1, 1, M, 1, 1))  # N, 1, M, 1, 1
        self.M = M

    def points(self, loc: Tensor, attn: Tensor):
        """Top-left rows in the padded table ``(N*Sp*M, D)`` (Tensor[N, Q, M, L, P], int64), the attention weight
        masked to 0 where the whole 2x2 cell is outside the map, the fractional parts ``fx, fy`` and the mask."""
        x, y = _pixel_coords(loc, self.Wf, self.Hf)
        x0, y0 = x.floor(), y.floor()
        inside = (x0 >= -1) & (x0 <= self.Wf - 1) & (y0 >= -1) & (y0 <= self.Hf - 1)
        a = torch.where(inside, attn, 0.0)
        # padded column of the top-left corner in [0, W]: clamped in floating point (no integer overflow)
        xi = (torch.minimum(x0.clamp(min=-1.0), self.Wf - 1) + 1).nan_to_num(0.0).to(torch.int64)
        yi = (torch.minimum(y0.clamp(min=-1.0), self.Hf - 1) + 1).nan_to_num(0.0).to(torch.int64)
        base = self.nm + (self.row0 + yi * self.Wp + xi) * self.M
        return base, a, x - x0, y - y0, inside

    @staticmethod
    def weights(a: Tensor, fx: Tensor, fy: Tensor) -> Tensor:
        wx = torch.stack([1 - fx, fx], -1)  # ..., 2
        wy = torch.stack([(1 - fy) * a, fy * a], -1)
        return (wy[..., :, None] * wx[..., None, :]).flatten(-2)  # ..., 4


class _SampleFunction(torch.autograd.Function):
    """Sampling + weighted sum with the hand-written backward described in the module docstring."""

    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        table, starts = _padded_table(value, shapes)
        lv = _Levels(shapes, starts, N, M, loc.dtype, loc.device)
        table = table.view(-1, D)
        out = value.new_empty(N, Lq, M, D)
        K = L * P * 4
        for q0, q1 in _query_blocks(N, Lq, M, L, P, _FWD_BLOCK_POINTS):
            base, a, fx, fy, _ = lv.points(loc[:, q0:q1], attn[:, q0:q1])
            rows = base[..., None] + lv.delta  # N, Qb, M, L, P, 4
            w = lv.weights(a, fx, fy)
            out[:, q0:q1] = F.embedding_bag(rows.view(-1, K), table, per_sample_weights=w.view(-1, K),
                                            mode="sum").view(N, q1 - q0, M, D)
        ctx.save_for_backward(value, spatial_shapes, loc, attn)
        return out.view(N, Lq, M * D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        value, spatial_shapes, loc, attn = ctx.saved_tensors
        need_value, _, need_loc, need_attn = ctx.needs_input_grad
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        table, starts = _padded_table(value, shapes)
        sp = table.shape[1]
        lv = _Levels(shapes, starts, N, M, loc.dtype, loc.device)
        table = table.view(-1, D)
        go = grad_out.reshape(N, Lq, M, D).contiguous()
        grad_loc = torch.empty_like(loc) if need_loc else None
        grad_attn = torch.empty_like(attn) if need_attn else None
        # many points per key (this form's regime, see msda_fast): sort once and gather per padded position
        if need_value:
            keys = torch.empty(N, Lq, M, L, P, dtype=torch.int64, device=value.device)  # top-left rows
            corner_w = torch.empty(N, Lq, M, L, P, 4, dtype=value.dtype, device=value.device)
        for q0, q1 in _query_blocks(N, Lq, M, L, P, _BWD_BLOCK_POINTS):
            base, a, fx, fy, inside = lv.points(loc[:, q0:q1], attn[:, q0:q1])
            if need_value:
                keys[:, q0:q1] = base
                corner_w[:, q0:q1] = lv.weights(a, fx, fy)
            if not (need_loc or need_attn):
                continue
            rows = base[..., None] + lv.delta  # N, Qb, M, L, P, 4
            Qb = q1 - q0
            gathered = table.index_select(0, rows.view(-1)).view(N * Qb * M, L * P * 4, D)
            # (1 x D) @ (D x K) per (query, head), the gathered block read transposed (no copy): one pass, where
            # (K x D) @ (D x 1) or a multiply-and-sum take two or more
            dots = torch.bmm(go[:, q0:q1].reshape(-1, 1, D), gathered.transpose(1, 2))
            dots = dots.view(N, Qb, M, L, P, 2, 2)  # dy, dx
            del gathered
            g00, g10, g01, g11 = dots[..., 0, 0], dots[..., 1, 0], dots[..., 0, 1], dots[..., 1, 1]
            wx0, wy0 = 1 - fx, 1 - fy
            if need_attn:
                s = wy0 * (wx0 * g00 + fx * g01) + fy * (wx0 * g10 + fx * g11)
                grad_attn[:, q0:q1] = torch.where(inside, s, 0.0)
            if need_loc:
                gfx = a * (wy0 * (g01 - g00) + fy * (g11 - g10)) * lv.Wf
                gfy = a * (wx0 * (g10 - g00) + fx * (g11 - g01)) * lv.Hf
                grad_loc[:, q0:q1] = torch.stack([gfx, gfy], -1)
        del table
        if need_value:
            held = [keys, corner_w]  # handed over so that _scatter_value can free them as soon as they are used
            del keys, corner_w
            grad_value = _scatter_value(go, held, shapes, starts, sp, value.shape)
        else:
            grad_value = None
        return grad_value, None, grad_loc, grad_attn


class _DirectFunction(torch.autograd.Function):
    """The fast path for few sampling points per key (decoder queries): corners read straight from ``value`` (rows
    clamped into the map, weight zeroed where the corner is outside), no zero-bordered copy of ``value``; the
    backward recomputes the corners per block and adds the value gradient with one ``index_add_`` per block."""

    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        H, W, start = _level_tables(spatial_shapes)
        table = value.view(-1, D)
        out = value.new_empty(N, Lq, M, D)
        K = L * P * 4
        for q0, q1 in _query_blocks(N, Lq, M, L, P, _FWD_BLOCK_POINTS):
            x0i, y0i, fx, fy, vx0, vx1, vy0, vy1 = _corners(loc[:, q0:q1], H, W)
            rows = _corner_rows(x0i, y0i, H, W, start, S, M)  # N, Qb, M, L, P, 4
            w = _corner_weights(attn[:, q0:q1], fx, fy, vx0, vx1, vy0, vy1)
            out[:, q0:q1] = F.embedding_bag(rows.view(-1, K), table, per_sample_weights=w.view(-1, K),
                                            mode="sum").view(N, q1 - q0, M, D)
        ctx.save_for_backward(value, spatial_shapes, loc, attn)
        return out.view(N, Lq, M * D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        value, spatial_shapes, loc, attn = ctx.saved_tensors
        need_value, _, need_loc, need_attn = ctx.needs_input_grad
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        H, W, start = _level_tables(spatial_shapes)
        Wf, Hf = W.to(loc.dtype)[:, None], H.to(loc.dtype)[:, None]  # L, 1
        K = L * P * 4
        table = value.view(-1, D)
        go = grad_out.reshape(N, Lq, M, D).contiguous()
        grad_table = value.new_zeros(N * S * M, D) if need_value else None
        grad_loc = torch.empty_like(loc) if need_loc else None
        grad_attn = torch.empty_like(attn) if need_attn else None
        for q0, q1 in _query_blocks(N, Lq, M, L, P, _BWD_BLOCK_POINTS):
            Qb = q1 - q0
            x0i, y0i, fx, fy, vx0, vx1, vy0, vy1 = _corners(loc[:, q0:q1], H, W)
            rows = _corner_rows(x0i, y0i, H, W, start, S, M)  # N, Qb, M, L, P, 4
            a = attn[:, q0:q1]
            if need_value:
                w = _corner_weights(a, fx, fy, vx0, vx1, vy0, vy1)  # N, Qb, M, L, P, 4
                # (K x 1) * (1 x D) per (query, head): a plain two-operand broadcast, several times faster than
                # broadcasting over the six point dimensions
                src = w.reshape(-1, K, 1) * go[:, q0:q1].reshape(-1, 1, D)  # N*Qb*M, K, D
                grad_table.index_add_(0, rows.view(-1), src.view(-1, D))
            if not (need_loc or need_attn):
                continue
            gathered = table.index_select(0, rows.view(-1)).view(N * Qb * M, L * P * 4, D)
            dots = torch.bmm(go[:, q0:q1].reshape(-1, 1, D), gathered.transpose(1, 2))
            del gathered
            # a corner outside the map reads zero: its clamped row's dot product is masked out
            valid = (torch.stack([vy0, vy1], -1)[..., :, None] * torch.stack([vx0, vx1], -1)[..., None, :])
            dots = dots.view(N, Qb, M, L, P, 2, 2) * valid  # dy, dx
            g00, g10, g01, g11 = dots[..., 0, 0], dots[..., 1, 0], dots[..., 0, 1], dots[..., 1, 1]
            wx0, wy0 = 1 - fx, 1 - fy
            if need_attn:
                grad_attn[:, q0:q1] = wy0 * (wx0 * g00 + fx * g01) + fy * (wx0 * g10 + fx * g11)
            if need_loc:
                gfx = a * (wy0 * (g01 - g00) + fy * (g11 - g10)) * Wf
                gfy = a * (wx0 * (g10 - g00) + fx * (g11 - g01)) * Hf
                grad_loc[:, q0:q1] = torch.stack([gfx, gfy], -1)
        grad_value = grad_table.view(N, S, M, D) if need_value else None
        return grad_value, None, grad_loc, grad_attn


def _scatter_value(go: Tensor, held: list[Tensor], shapes: list[tuple[int, int]], starts: list[int], sp: int,
                   value_shape: torch.Size) -> Tensor:
    """Gradient of ``value`` (Tensor[N, S, M, D]): every point adds ``corner weight * grad_out[query, head]`` to
    its four corners. The points are sorted by the row of their top-left corner in the padded table, so each padded
    position is one bag of ``embedding_bag`` per corner (a gather-sum, no atomic scatter); corner ``(dy, dx)`` of
    top-left padded position ``(i, j)`` is value position ``(i - 1 + dy, j - 1 + dx)``.

    ``held`` is ``[keys, corner_w]`` (top-left rows Tensor[N, Lq, M, L, P] and corner weights Tensor[..., 4]); the
    list is emptied and each tensor released once used (peak memory)."""
    N, S, M, D = value_shape
    keys, corner_w = held
    held.clear()
    LP = keys.shape[-2] * keys.shape[-1]
    flat_keys = keys.view(-1)
    order = torch.argsort(flat_keys)
    counts = torch.bincount(flat_keys, minlength=N * sp * M)
    del keys, flat_keys
    offsets = torch.cumsum(counts, 0) - counts
    del counts
    bag_rows = order // LP  # the (n, q, m) row of go of each sorted point
    go_rows = go.view(-1, D)
    sorted_w = corner_w.view(-1, 4).index_select(0, order).t().contiguous()  # 4, points (sorted)
    del corner_w, order
    grad = go.new_zeros(value_shape)
    starts_value = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
    for c, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):  # one corner's table alive at a time
        grid = F.embedding_bag(bag_rows, go_rows, offsets, mode="sum", per_sample_weights=sorted_w[c])
        grid = grid.view(N, sp, M, D)
        for (H, W), ps, s in zip(shapes, starts, starts_value):
            part = grid[:, ps:ps + (H + 2) * (W + 2)].view(N, H + 2, W + 2, M, D)[:, 1 - dy:1 - dy + H,
                                                                                  1 - dx:1 - dx + W]
            grad[:, s:s + H * W].view(N, H, W, M, D).add_(part)
        del grid
    return grad


def msda_fast(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Eager fast path (see the module docstring); inputs as for the reference, ``spatial_shapes`` a Tensor[L, 2]
    (int64, on ``value``'s device). Returns Tensor[N, Lq, M*D]."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    # the blocks take flat views of these: one copy here if a caller passes strided tensors
    if fast_form(N, Lq, M, L, P, S) == "direct":
        return _DirectFunction.apply(value.contiguous(), spatial_shapes, sampling_locations.contiguous(),
                                     attention_weights.contiguous())
    return _SampleFunction.apply(value.contiguous(), spatial_shapes, sampling_locations.contiguous(),
                                 attention_weights.contiguous())


def msda_gather(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
    """Plain-operation form of the fast path (exportable, compilable, differentiated by autograd).

    The level sizes are read from ``spatial_shapes`` as tensors only, so exported graphs keep them dynamic.
    Peak memory: one ``Tensor[N, Lq, M, P, D]`` per (level, corner) on top of the output.
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    H, W, start = _level_tables(spatial_shapes)
    x0i, y0i, fx, fy, vx0, vx1, vy0, vy1 = _corners(sampling_locations, H, W)
    rows = _corner_rows(x0i, y0i, H, W, start, S, M)  # N, Lq, M, L, P, 4
    w = _corner_weights(attention_weights, fx, fy, vx0, vx1, vy0, vy1)  # N, Lq, M, L, P, 4
    table = value.reshape(N * S * M, D)
    out = value.new_zeros(N, Lq, M, D)
    for lvl in range(L):
        for c in range(4):
            r = rows[:, :, :, lvl, :, c]  # N, Lq, M, P
            sampled = table.index_select(0, r.reshape(-1)).view(N, Lq, M, P, D)
            out = out + (sampled * w[:, :, :, lvl, :, c, None]).sum(3)
    return out.view(N, Lq, M * D)
