"""Fast path of multi-scale deformable attention: the four bilinear corners gathered straight from ``value``.

The reference samples every level with ``grid_sample`` into a ``(N*M, D, Lq, L*P)`` tensor, then multiplies it by
the attention weights and sums over levels and points; its backward expands the gradient back to that size and runs
``grid_sample``'s backward per level. Here the bilinear weight of each corner is folded into the attention weight,
so the output of a (query, head) is one weighted sum of ``L*P*4`` rows of ``value``:

* **Forward** (:class:`_SampleFunction`): per block of queries, one index computation for all levels and corners
  (``idx``, ``Tensor[N, Qb, M, L, P, 4]`` rows of ``value`` viewed as ``(N*S*M, D)``, clamped, with the zero-padding
  folded into the weights) and one ``F.embedding_bag(mode="sum", per_sample_weights=...)``: gather and reduction in
  one kernel, nothing of size ``points x D`` is materialised. Memory: the block's indices and weights.
* **Backward**, written by hand; it keeps only the inputs and recomputes the corners per block:

  - locations and attention weights need, per corner, the dot product of the output gradient with the corner's
    value row (a gather of the block's rows and a batched matrix-vector product, memory bounded by the block);
  - ``value`` receives one scatter for all levels, points and queries, done as a *gather*: the sampling points are
    sorted once by their top-left corner in a grid padded by one row and column, and four ``embedding_bag`` calls
    (one per corner, bags = padded positions) sum the weighted output gradients of the points of each position;
    the four results are shifted by their corner offset and added. No atomic scatter, no per-level pass.

* **Export / compile** (:func:`msda_gather`): the same formulas with plain operations (``index_select``, ``mul``,
  ``sum``), one level and corner at a time, computed from ``spatial_shapes`` as a tensor, so the graph has no
  GridSample node and the number of queries and the level sizes stay dynamic. Autograd differentiates it directly.

Coordinates: ``x = loc_x * W - 0.5`` (``align_corners=False``), ``x0 = floor(x)``, ``fx = x - x0``; the corner
columns are ``x0`` (weight ``1 - fx``) and ``x0 + 1`` (weight ``fx``), and a column outside ``[0, W - 1]`` has weight
0 (``padding_mode="zeros"``). Same for rows.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Sampling points (N * queries * M * L * P) per block. Forward: the block's index and weight tensors (4 corners,
# ~12 bytes each in float32) stay in cache-sized chunks. Backward: the dot products gather points * 4 * D values.
_FWD_BLOCK_POINTS = int(os.environ.get("DEFORMATTN_MSDA_FWD_BLOCK", 1 << 18))
_BWD_BLOCK_POINTS = int(os.environ.get("DEFORMATTN_MSDA_BWD_BLOCK", 1 << 15))


def _level_tables(spatial_shapes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per level (Tensor[L] each, int64): height, width, start row in ``value``, start in the padded grid."""
    H, W = spatial_shapes[:, 0], spatial_shapes[:, 1]
    sizes = H * W
    start = torch.cumsum(sizes, 0) - sizes
    ext = (H + 1) * (W + 1)  # top-left corners range over [-1, H-1] x [-1, W-1]
    ext_start = torch.cumsum(ext, 0) - ext
    return H, W, start, ext_start


def _corners(loc: Tensor, H: Tensor, W: Tensor):
    """Bilinear corners of ``loc`` (Tensor[..., L, P, 2], (x, y) in [0, 1]).

    Returns top-left integer corners ``x0, y0`` (clamped to [-1, W-1] / [-1, H-1], int64), fractional parts
    ``fx, fy``, and the validity (0/1, float) of the columns ``x0, x0+1`` and rows ``y0, y0+1``.
    """
    Wf = W.to(loc.dtype)[:, None]  # L, 1: broadcasts over (..., L, P)
    Hf = H.to(loc.dtype)[:, None]
    x = loc[..., 0] * Wf - 0.5
    y = loc[..., 1] * Hf - 0.5
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


class _SampleFunction(torch.autograd.Function):
    """Sampling + weighted sum with the hand-written backward described in the module docstring."""

    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        H, W, start, ext_start = _level_tables(spatial_shapes)
        table = value.reshape(N * S * M, D)
        out = value.new_empty(N, Lq, M, D)
        for q0, q1 in _query_blocks(N, Lq, M, L, P, _FWD_BLOCK_POINTS):
            x0i, y0i, fx, fy, vx0, vx1, vy0, vy1 = _corners(loc[:, q0:q1], H, W)
            rows = _corner_rows(x0i, y0i, H, W, start, S, M)  # N, Qb, M, L, P, 4
            w = _corner_weights(attn[:, q0:q1], fx, fy, vx0, vx1, vy0, vy1)
            K = L * P * 4
            out[:, q0:q1] = F.embedding_bag(rows.view(-1, K), table, per_sample_weights=w.reshape(-1, K),
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
        H, W, start, ext_start = _level_tables(spatial_shapes)
        table = value.reshape(N * S * M, D)
        go = grad_out.reshape(N, Lq, M, D).contiguous()
        grad_loc = torch.empty_like(loc) if need_loc else None
        grad_attn = torch.empty_like(attn) if need_attn else None
        if need_value:
            keys = torch.empty(N, Lq, M, L, P, dtype=torch.int64, device=value.device)  # padded top-left corner
            corner_w = torch.empty(N, Lq, M, L, P, 4, dtype=value.dtype, device=value.device)
            sext = int((ext_start[-1] + (H[-1] + 1) * (W[-1] + 1)).item()) if L else 0
            n = torch.arange(N, device=value.device).view(N, 1, 1, 1, 1)
            m = torch.arange(M, device=value.device).view(1, 1, M, 1, 1)
        for q0, q1 in _query_blocks(N, Lq, M, L, P, _BWD_BLOCK_POINTS):
            a = attn[:, q0:q1]
            x0i, y0i, fx, fy, vx0, vx1, vy0, vy1 = _corners(loc[:, q0:q1], H, W)
            if need_value:
                keys[:, q0:q1] = (n * M + m) * sext + ext_start[:, None] + (y0i + 1) * (W[:, None] + 1) + (x0i + 1)
                corner_w[:, q0:q1] = _corner_weights(a, fx, fy, vx0, vx1, vy0, vy1)
            if not (need_loc or need_attn):
                continue
            rows = _corner_rows(x0i, y0i, H, W, start, S, M)  # N, Qb, M, L, P, 4
            Qb, K = q1 - q0, L * P * 4
            gathered = table.index_select(0, rows.view(-1)).view(-1, K, D)  # N*Qb*M, K, D
            dots = torch.bmm(gathered, go[:, q0:q1].reshape(-1, D, 1)).view(N, Qb, M, L, P, 2, 2)  # dy, dx
            del gathered
            wx0, wx1 = (1 - fx) * vx0, fx * vx1
            wy0, wy1 = (1 - fy) * vy0, fy * vy1
            g00, g01, g10, g11 = dots[..., 0, 0], dots[..., 0, 1], dots[..., 1, 0], dots[..., 1, 1]
            if need_attn:
                grad_attn[:, q0:q1] = wy0 * (wx0 * g00 + wx1 * g01) + wy1 * (wx0 * g10 + wx1 * g11)
            if need_loc:
                gfx = a * (wy0 * (vx1 * g01 - vx0 * g00) + wy1 * (vx1 * g11 - vx0 * g10))
                gfy = a * (wx0 * (vy1 * g10 - vy0 * g00) + wx1 * (vy1 * g11 - vy0 * g01))
                grad_loc[:, q0:q1] = torch.stack(
                    [gfx * W.to(gfx.dtype)[:, None], gfy * H.to(gfy.dtype)[:, None]], -1)
        grad_value = _scatter_value(go, keys, corner_w, spatial_shapes, sext, value.shape) if need_value else None
        return grad_value, None, grad_loc, grad_attn


def _scatter_value(go: Tensor, keys: Tensor, corner_w: Tensor, spatial_shapes: Tensor, sext: int,
                   value_shape: torch.Size) -> Tensor:
    """Gradient of ``value`` (Tensor[N, S, M, D]): every point adds ``corner weight * grad_out[query, head]`` to
    its four corners. The points are sorted by their top-left corner in the padded grid, so each padded position is
    one bag of ``embedding_bag`` per corner (a gather-sum, no atomic scatter); corner ``(dy, dx)`` of padded
    position ``(i, j)`` is value position ``(i - 1 + dy, j - 1 + dx)``."""
    N, S, M, D = value_shape
    LP = keys.shape[-2] * keys.shape[-1]
    flat_keys = keys.view(-1)
    order = torch.argsort(flat_keys)
    counts = torch.bincount(flat_keys, minlength=N * M * sext)
    offsets = torch.cumsum(counts, 0) - counts
    bag_rows = order // LP  # the (n, q, m) row of go of each sorted point
    go_rows = go.view(-1, D)
    cw = corner_w.view(-1, 4)
    grids = [F.embedding_bag(bag_rows, go_rows, offsets, mode="sum", per_sample_weights=cw[:, c][order])
             .view(N, M, sext, D) for c in range(4)]
    grads = []
    es = 0
    for Hl, Wl in spatial_shapes.tolist():
        size = (Hl + 1) * (Wl + 1)
        acc = None
        for c, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            part = grids[c][:, :, es:es + size].view(N, M, Hl + 1, Wl + 1, D)[:, :, 1 - dy:1 - dy + Hl,
                                                                               1 - dx:1 - dx + Wl]
            acc = part if acc is None else acc + part
        grads.append(acc.permute(0, 2, 3, 1, 4).reshape(N, Hl * Wl, M, D))  # N, H*W, M, D
        es += size
    return torch.cat(grads, 1) if grads else go.new_zeros(value_shape)


def msda_fast(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Eager fast path (see the module docstring); inputs as for the reference, ``spatial_shapes`` a Tensor[L, 2]
    (int64, on ``value``'s device). Returns Tensor[N, Lq, M*D]."""
    return _SampleFunction.apply(value, spatial_shapes, sampling_locations, attention_weights)


def msda_gather(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
    """Plain-operation form of the fast path (exportable, compilable, differentiated by autograd).

    The level sizes are read from ``spatial_shapes`` as tensors only, so exported graphs keep them dynamic.
    Peak memory: one ``Tensor[N, Lq, M, P, D]`` per (level, corner) on top of the output.
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    H, W, start, _ = _level_tables(spatial_shapes)
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
