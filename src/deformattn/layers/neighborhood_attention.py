"""Neighborhood attention (Hassani et al.; DAT++ stage letter ``N``) in plain PyTorch, NATTEN 0.14 semantics.

Every query attends to a ``k x k`` neighbourhood of keys. Along an axis of length ``L`` the window of query ``i``
starts at ``clamp(i - k // 2, 0, L - k)``: centred in the interior and shifted inwards at the borders (never
truncated), so every query sees exactly ``k * k`` keys. Worked example, ``L = 6, k = 3``: the windows of queries
``0..5`` start at ``0, 0, 1, 2, 3, 3`` (query 0 sees rows 0-2, query 5 sees rows 3-5).

The relative position bias of key row ``r`` for query row ``i`` is ``rpb[h, r - i + k - 1, .]`` (likewise for
columns), ``rpb`` of shape ``(nH, 2k - 1, 2k - 1)``. ``q`` is scaled by ``head_dim ** -0.5`` before the dot product
and the bias is added after scaling. Maps smaller than ``k`` are zero-padded at the bottom/right *before* the qkv
projection (so padded tokens carry the qkv bias and act as keys), as the official DAT++ module does, and the output
is cropped back.

Two backends of the op ``"neighborhood_attention"``, registered here with the package's one dispatcher
(:mod:`deformattn.backends.dispatch`: ``backend`` argument, else ``$DEFORMATTN_BACKEND``, else the first that can
run the input, ``"fast"``; an unknown name is a ``ValueError``); neither needs a custom kernel or ``natten``:

* ``"reference"`` gathers every query's neighbourhood with advanced indexing (``Tensor[B, nH, H, W, k, k, hd]``,
  ``k * k`` copies of every key and value) and reduces it with einsum: NATTEN's algorithm written out.
* ``"fast"`` cuts the queries into ``T x T`` tiles. The neighbourhoods of a tile's queries all lie in one
  ``R x R`` key region (``R = T + k - 1``: window starts move by at most one per query), so each tile is a small
  dense attention of ``T*T`` queries over ``R*R`` keys, run as batched matrix products, with an additive bias
  that holds the relative position bias where a key is in the query's neighbourhood and ``-inf`` elsewhere.
  It does ``(R / k)^2`` times the reference's multiply-adds (``T = k = 7``: 3.4x) but copies keys and values
  ``(R / T)^2`` times instead of ``k^2`` times, and matrix products beat the gathered einsum by far on CPU
  (benchmarks/RESULTS.md has the measured ratios). Masked keys get exactly zero
  weight, so both backends compute the same sums (they differ by rounding only). Each of q, k, v is gathered once,
  straight into the tile layout (``index_select`` on the flattened map, indices cached per size); the bias is one
  ``take`` from the table with an appended ``-inf`` entry; the bias add (always) and the softmax (without autograd)
  run in place; the output is gathered pixel-major, so merging the heads for ``proj`` is a view.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._shapes import ceil_div, is_symbolic, is_tracing, shared, sym_max
from .._utils import check_float, check_image_tensor, check_int
from ..backends.dispatch import Problem, check_backend_name, register_backend, select_backend

__all__ = [
    "NeighborhoodAttention2d",
    "neighborhood_indices",
    "na2d_logits",
    "na2d_av",
    "neighborhood_attention2d",
    "neighborhood_tiles",
    "tile_plan",
    "neighborhood_attention_tiled",
    "NEIGHBORHOOD_OP",
]

NEIGHBORHOOD_OP = "neighborhood_attention"


def neighborhood_indices(length: int, kernel_size: int, device=None) -> tuple[Tensor, Tensor]:
    """Key positions and bias-table indices of every query along one axis.

    Returns:
        keys (Tensor[L, k]): ``start(i) + a`` with ``start(i) = clamp(i - k // 2, 0, L - k)``.
        rel (Tensor[L, k]): ``keys - i + k - 1``, the index into the ``2k - 1`` bias axis.
    """
    if length < kernel_size:
        raise ValueError(f"neighborhood_indices: length ({length}) must be >= kernel_size ({kernel_size})")
    i = torch.arange(length, device=device)
    start = (i - kernel_size // 2).clamp(0, length - kernel_size)
    keys = start[:, None] + torch.arange(kernel_size, device=device)  # L, k
    return keys, keys - i[:, None] + kernel_size - 1


def _gather(t: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``Tensor[B, nH, H, W, hd]`` -> neighbourhoods ``Tensor[B, nH, H, W, k, k, hd]``."""
    return t[:, :, rows[:, None, :, None], cols[None, :, None, :]]


def na2d_logits(q: Tensor, k: Tensor, rpb: Tensor | None, kernel_size: int) -> Tensor:
    """Attention logits of every query over its neighbourhood (NATTEN's ``QK + RPB`` kernel).

    Args:
        q (Tensor[B, nH, H, W, hd]): queries, already scaled. k: keys, same shape.
        rpb (Tensor[nH, 2k-1, 2k-1] or None): relative position bias.

    Returns:
        Tensor[B, nH, H, W, k*k]: entry ``a * k + b`` is key ``(si + a, sj + b)``.
    """
    H, W = q.shape[2:4]
    rows, rel_r = neighborhood_indices(H, kernel_size, q.device)
    cols, rel_c = neighborhood_indices(W, kernel_size, q.device)
    logits = torch.einsum("znhwd,znhwijd->znhwij", q, _gather(k, rows, cols))  # B, nH, H, W, k, k
    if rpb is not None:
        logits = logits + rpb[:, rel_r[:, None, :, None], rel_c[None, :, None, :]]  # nH, H, W, k, k
    return logits.flatten(-2)


def na2d_av(attn: Tensor, v: Tensor, kernel_size: int) -> Tensor:
    """Weighted sum of each query's neighbourhood values (NATTEN's ``AV`` kernel).

    Args:
        attn (Tensor[B, nH, H, W, k*k]), v (Tensor[B, nH, H, W, hd]).

    Returns:
        Tensor[B, nH, H, W, hd]
    """
    H, W = v.shape[2:4]
    rows, _ = neighborhood_indices(H, kernel_size, v.device)
    cols, _ = neighborhood_indices(W, kernel_size, v.device)
    attn = attn.unflatten(-1, (kernel_size, kernel_size))  # B, nH, H, W, k, k
    return torch.einsum("znhwij,znhwijd->znhwd", attn, _gather(v, rows, cols))


def _tile_size(length: int, kernel_size: int) -> int:
    """Queries per tile along an axis: one tile for short axes, else ``max(k, 7)`` (fastest measured, 1 thread).
    A symbolic length (a traced dynamic size) always gets ``max(k, 7)``: the tiling must not branch on it."""
    if not is_symbolic(length) and length <= 2 * max(kernel_size, 7):
        return length
    return max(kernel_size, 7)


def neighborhood_tiles(length: int, kernel_size: int, tile: int | None = None, device=None):
    """The fast backend's tiling of one axis of length ``L >= k``.

    Tiles of ``T`` queries start at ``min(t * T, Lp - T)`` (the last one overlaps its neighbour instead of running
    off the map); the keys of tile ``t`` are the ``R`` positions from ``min(start(first query), Lp - R)``, which
    hold every neighbourhood of its queries. For a plain-int ``L``: ``T <= L``, ``R = min(T + k - 1, L)`` and
    ``Lp = L``. For a symbolic ``L`` (a traced dynamic size) ``T`` and ``R = T + k - 1`` are fixed and the axis is
    padded to ``Lp = max(L, R)``: the extra positions are never in a neighbourhood (masked keys) and their queries
    are dropped by ``out``.

    Returns:
        query (Tensor[nt, T]): query positions of every tile.
        key (Tensor[nt, R]): key positions of every tile's region.
        valid (Tensor[nt, T, R] bool): key ``r`` of the region is in query ``q``'s neighbourhood.
        rel (Tensor[nt, T, R]): bias-table index ``key - query + k - 1`` (clamped into ``[0, 2k - 2]`` where
            not valid, so it can always be gathered).
        out (Tensor[L]): where query ``i``'s result is in the flattened ``nt * T`` tile outputs.
    """
    T = tile or _tile_size(length, kernel_size)
    if is_symbolic(length):
        R = T + kernel_size - 1
        padded = sym_max(length, R)
    else:
        T = min(T, length)
        R = min(T + kernel_size - 1, length)
        padded = length
    nt = ceil_div(length, T)
    first = (torch.arange(nt, device=device) * T).clamp(max=padded - T)  # nt
    start = (torch.arange(padded, device=device) - kernel_size // 2).clamp(0, length - kernel_size)  # Lp
    query = first[:, None] + torch.arange(T, device=device)  # nt, T
    key = start[first].clamp(max=padded - R)[:, None] + torch.arange(R, device=device)  # nt, R
    lo = start[query][:, :, None]  # nt, T, 1
    valid = (key[:, None, :] >= lo) & (key[:, None, :] < lo + kernel_size)  # nt, T, R
    rel = (key[:, None, :] - query[:, :, None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)  # nt, T, R
    i = torch.arange(length, device=device)
    t = (i // T).clamp(max=nt - 1)
    return query, key, valid, rel, t * T + (i - first[t])


def _flat_positions(rows: Tensor, cols: Tensor, width) -> Tensor:
    """Positions ``rows[nr, a] * width + cols[nc, b]`` in tile order ``(nr, nc, a, b)``: ``Tensor[nr*nc*a*b]``."""
    return (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(-1)


def tile_plan(H, W, kernel_size: int, tile: int | None, heads: int, device) -> tuple:
    """Gather indices of the fast backend on a map of ``H x W`` queries (positions in the map padded to the tiling's
    extent ``Hp x Wp``: ``Hp = H`` for a plain-int size, see :func:`neighborhood_tiles`).

    Returns:
        qpos (Tensor[nt*T*T]), kpos (Tensor[nt*R*R]): flattened map positions of every tile's queries / keys.
        bias_index (Tensor[heads, nt, T*T, R*R]): flat index into the ``Tensor[heads, (2k-1)^2 + 1]`` bias table
            (the relative position bias of each head, then ``-inf``): the ``-inf`` entry where the key is not in the
            query's neighbourhood.
        outpos (Tensor[H*W]): slot of pixel ``(i, j)`` in the flattened ``nt*T*T`` tile outputs.
        (nt, TT, RR, Hp, Wp): sizes.

    Eager calls with plain-int sizes keep it (:func:`_cached_tiled_plan`); while a graph is captured it is built
    once per stage and shared by the stage's blocks (:func:`deformattn._shapes.shared`), so the exported graph holds
    one copy of this index arithmetic per stage, not one per block.
    """
    rows = neighborhood_tiles(H, kernel_size, tile, device)
    cols = neighborhood_tiles(W, kernel_size, tile, device)
    (ntr, Tr), (ntc, Tc) = rows[0].shape, cols[0].shape
    Rr, Rc = rows[1].shape[1], cols[1].shape[1]
    Hp, Wp = sym_max(H, Rr), sym_max(W, Rc)
    side = 2 * kernel_size - 1
    allowed = (rows[2][:, None, :, None, :, None] & cols[2][None, :, None, :, None, :])  # ntr, ntc, Tr, Tc, Rr, Rc
    rel = rows[3][:, None, :, None, :, None] * side + cols[3][None, :, None, :, None, :]
    bias_index = torch.where(allowed, rel, side * side).reshape(ntr * ntc, Tr * Tc, Rr * Rc)
    bias_index = bias_index + torch.arange(heads, device=device)[:, None, None, None] * (side * side + 1)
    out_r, out_c = rows[4], cols[4]  # slot t * T + a of every row / column
    outpos = ((out_r[:, None] // Tr) * ntc + out_c[None, :] // Tc) * (Tr * Tc) + (out_r[:, None] % Tr) * Tc \
        + out_c[None, :] % Tc  # H, W
    qpos, kpos = _flat_positions(rows[0], cols[0], Wp), _flat_positions(rows[1], cols[1], Wp)
    return qpos, kpos, bias_index, outpos.reshape(-1), (ntr * ntc, Tr * Tc, Rr * Rc, Hp, Wp)


@functools.lru_cache(maxsize=64)
def _cached_tiled_plan(H: int, W: int, kernel_size: int, tile: int | None, heads: int, device) -> tuple:
    """:func:`tile_plan` of plain-int sizes, kept: it depends on the sizes only. Built outside inference mode, so
    the index tensors can be saved for a later backward pass."""
    with torch.inference_mode(False):
        return tile_plan(H, W, kernel_size, tile, heads, device)


def neighborhood_attention_tiled(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    kernel_size: int,
    *,
    attn_drop: float = 0.0,
    training: bool = False,
    tile: int | None = None,
) -> Tensor:
    """The fast backend: tiles of queries against their key regions (see the module docstring).

    Args:
        q, k, v (Tensor[B, nH, H, W, hd]): ``q`` already scaled; ``H, W >= kernel_size``.
        tile: queries per tile along each axis (None: automatic).

    Returns:
        Tensor[B, nH, H, W, hd]
    """
    B, nH, H, W, hd = q.shape
    symbolic, tracing = is_symbolic(H, W), is_tracing()
    heads = 1 if rpb is None else rpb.shape[0]
    if symbolic or tracing:  # one plan per stage in the captured graph
        plan = shared(("neighborhood_tiles", H, W, kernel_size, tile, heads, q.device),
                      lambda: tile_plan(H, W, kernel_size, tile, heads, q.device))
    else:  # the index tensors depend on the sizes only
        plan = _cached_tiled_plan(H, W, kernel_size, tile, heads, q.device)
    qpos, kpos, bias_index, outpos, (nt, TT, RR, Hp, Wp) = plan
    one_tile = not symbolic and nt == 1 and TT == RR == H * W  # the tile is the map: no gathers
    if symbolic:  # the tiling of a traced dynamic size may reach past the map: pad to its extent, the three maps
        # at once and k, v gathered together (each exported pad, flatten or unflatten of traced sizes is several
        # nodes of size arithmetic)
        qkv = F.pad(torch.stack((q, k, v)), (0, 0, 0, Wp - W, 0, Hp - H)).flatten(3, 4)  # 3, B, nH, Hp*Wp, hd
        qt = qkv[0].index_select(2, qpos).unflatten(2, (nt, TT))  # B, nH, nt, T*T, hd
        kt, vt = qkv[1:].index_select(3, kpos).unflatten(3, (nt, RR)).unbind(0)  # B, nH, nt, R*R, hd each
    else:  # B, nH, nt, T*T or R*R, hd (one gather each, straight into the tile layout)
        qt, kt, vt = (
            t.flatten(2, 3).view(B, nH, 1, H * W, hd) if one_tile
            else t.flatten(2, 3).index_select(2, pos).unflatten(2, (nt, n))
            for t, pos, n in ((q, qpos, TT), (k, kpos, RR), (v, kpos, RR))
        )
    if rpb is None:
        table = q.new_zeros(1, (2 * kernel_size - 1) ** 2)
    else:
        table = rpb.to(q.dtype).flatten(1)  # nH, (2k-1)^2
    table = torch.cat([table, table.new_full((heads, 1), float("-inf"))], 1)  # nH or 1, (2k-1)^2 + 1
    bias = table.take(bias_index)  # nH or 1, nt, T*T, R*R
    attn = qt @ kt.transpose(-2, -1)  # B, nH, nt, T*T, R*R
    attn.add_(bias)  # in place: the product's backward needs only its inputs
    if tracing or (torch.is_grad_enabled() and attn.requires_grad):
        attn = attn.softmax(dim=-1)
    else:  # no autograd: the row-wise softmax may overwrite its input (saves a full-size buffer)
        torch.softmax(attn, dim=-1, out=attn)
    attn = F.dropout(attn, p=attn_drop, training=training)
    out = (attn @ vt).view(-1, nH, nt * TT, hd)  # B, nH, nt*T*T, hd
    if one_tile:
        return out.view(B, nH, H, W, hd)
    # gathered pixel-major (B, H*W, nH, hd): the caller's merge of the heads is then a view
    return out.transpose(1, 2).index_select(1, outpos).view(-1, H, W, nH, hd).permute(0, 3, 1, 2, 4)


def neighborhood_attention2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    kernel_size: int,
    *,
    attn_drop: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``softmax(q k^T + rpb) v`` over neighbourhoods; ``q`` already scaled, all ``Tensor[B, nH, H, W, hd]``.

    Args:
        backend: ``"fast"`` (tiled matrix products), ``"reference"`` (gathered neighbourhoods) or None
            (``$DEFORMATTN_BACKEND``, else ``"fast"``).

    Returns:
        Tensor[B, nH, H, W, hd]
    """
    problem = Problem.of(
        q, k, v, rpb, sizes={"B": q.shape[0], "nH": q.shape[1], "H": q.shape[2], "W": q.shape[3], "k": kernel_size}
    )
    impl = select_backend(NEIGHBORHOOD_OP, problem, backend, owner="neighborhood_attention2d")
    return impl(q, k, v, rpb, kernel_size, attn_drop=attn_drop, training=training)


def neighborhood_attention_gathered(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    kernel_size: int,
    *,
    attn_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    """The reference backend: every query's neighbourhood gathered (NATTEN's algorithm written out).

    Args:
        q, k, v (Tensor[B, nH, H, W, hd]): ``q`` already scaled; ``H, W >= kernel_size``.

    Returns:
        Tensor[B, nH, H, W, hd]
    """
    attn = na2d_logits(q, k, rpb, kernel_size).softmax(dim=-1)
    attn = F.dropout(attn, p=attn_drop, training=training)
    return na2d_av(attn, v, kernel_size)


def _fits(problem: Problem) -> str | None:
    H, W, k = problem.sizes["H"], problem.sizes["W"], problem.sizes["k"]
    if H < k or W < k:
        return f"the map ({H}x{W}) must be at least kernel_size x kernel_size ({k}x{k})"
    if not problem.dtype.is_floating_point:
        return f"needs floating-point inputs, got {problem.dtype}"
    return None


register_backend(NEIGHBORHOOD_OP, "fast", neighborhood_attention_tiled, _fits, plain_ops=True)
register_backend(NEIGHBORHOOD_OP, "reference", neighborhood_attention_gathered, _fits, plain_ops=True)


class NeighborhoodAttention2d(nn.Module):
    """Neighborhood attention with relative position bias (the official DAT++ ``NeighborhoodAttention2D``).

    Args:
        dim: channels ``C``; divisible by ``num_heads``.
        kernel_size: ``k``, odd and >= 3.
        num_heads: ``nH``.
        attn_drop, proj_drop: dropout on the attention weights and on the output (training mode only).
        dilation: only 1 (what DAT++ uses) is supported.
        backend: ``"fast"``, ``"reference"`` or None (``$DEFORMATTN_BACKEND``, else ``"fast"``); see the module
            docstring. An attribute: set ``module.backend`` to switch.

    Parameters keep the official names: ``qkv``, ``rpb``, ``proj``.

    Shape: ``Tensor[B, C, H, W] -> Tensor[B, C, H, W]``, any ``H, W >= 1``.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        num_heads: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        dilation: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        owner = "NeighborhoodAttention2d"
        dim = check_int(dim, "dim", owner, minimum=1)
        kernel_size = check_int(kernel_size, "kernel_size", owner, minimum=3)
        num_heads = check_int(num_heads, "num_heads", owner, minimum=1)
        if kernel_size % 2 == 0:
            raise ValueError(f"{owner}: kernel_size must be odd, got {kernel_size}")
        if dim % num_heads:
            raise ValueError(f"{owner}: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if dilation not in (None, 1):
            raise ValueError(f"{owner}: only dilation 1 (or None) is supported, got {dilation!r}")
        self.backend = check_backend_name(owner, NEIGHBORHOOD_OP, backend)
        self.dim = dim
        self.kernel_size = kernel_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = check_float(attn_drop, "attn_drop", owner, minimum=0.0, maximum=1.0)
        self.proj_drop = check_float(proj_drop, "proj_drop", owner, minimum=0.0, maximum=1.0)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, num_heads={self.num_heads}"

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Padded channels-last input ``Tensor[B, Hp, Wp, C]`` -> scaled q, k, v, each ``Tensor[B, nH, Hp, Wp, hd]``."""
        B, Hp, Wp, _ = x.shape
        qkv = self.qkv(x).reshape(-1, Hp, Wp, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        # one copy into per-head planes: the backends gather whole hd-rows of contiguous maps
        q, k, v = qkv.contiguous().unbind(0)  # B, nH, Hp, Wp, hd
        return q * self.scale, k, v

    def pad(self, x: Tensor) -> Tensor:
        """Zero-pad a channels-last ``Tensor[B, H, W, C]`` at the bottom/right up to ``k x k`` if smaller."""
        H, W = x.shape[1:3]
        pad_b, pad_r = sym_max(0, self.kernel_size - H), sym_max(0, self.kernel_size - W)
        if is_symbolic(H, W) or pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        return x

    def forward(self, x: Tensor) -> Tensor:
        check_image_tensor(x, "x", "NeighborhoodAttention2d", channels=self.dim)
        B, C, H, W = x.shape
        x = self.pad(x.permute(0, 2, 3, 1))  # B, Hp, Wp, C
        Hp, Wp = x.shape[1:3]
        q, k, v = self.qkv_heads(x)
        out = neighborhood_attention2d(
            q, k, v, self.rpb, self.kernel_size, attn_drop=self.attn_drop, training=self.training,
            backend=self.backend,
        )  # B, nH, Hp, Wp, hd
        out = out.permute(0, 2, 3, 1, 4).reshape(-1, Hp, Wp, self.dim)[:, :H, :W]  # B, H, W, C
        out = F.dropout(self.proj(out), p=self.proj_drop, training=self.training)
        return out.permute(0, 3, 1, 2)  # B, C, H, W
