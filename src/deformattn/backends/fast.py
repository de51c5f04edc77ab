"""The fast backend: same numerics as the reference, less time and bounded memory.

What it changes (and why):

* **Attention** runs through fused scaled-dot-product attention (``F.scaled_dot_product_attention``), one block of
  query rows at a time, so inference never holds the ``(B, nH, H*W, Ns)`` bias or attention matrix whole. Under
  autograd, small problems (``<= _SAVE_ELEMS`` attention entries) let autograd keep the matrix (nothing to
  recompute); larger ones go through a custom function that keeps only ``q, k, v``, the output and the per-query
  log-sum-exp, and recomputes each block's bias and softmax in the backward pass (flash-attention style).
* **The table bias** is gathered from the table directly instead of ``grid_sample``-ing it at a materialised
  ``(B*G, H*W, Ns, 2)`` displacement. Query ``i`` looks the table up at row ``u = S*i + c(n)``: ``S`` is the
  query step in table cells (``(q_h - 1) / (H - 1)``, exactly 1 when the input has the size the table was built
  for) and ``c(n)`` depends on the key only. When ``S`` is an integer the bilinear weights depend on the key only,
  so each key's bias over a block of rows is one contiguous window of the (zero-padded) table blended with four
  scalars: one strided gather and three ``lerp``s. Its backward is written out (the window adjoint plus one
  accumulating scatter into the table, and a per-key reduction for the positions) instead of ``grid_sample``'s
  atomic scatter over every query-key pair. Other steps (v1 tables, resized inputs), and small problems under
  autograd (where ``grid_sample``'s single fused backward kernel beats the window adjoint's several passes), sample
  the table with ``grid_sample`` at a displacement grid written once, in ``(x, y)`` order.
* **Inference memory**: the output and the window gather's per-block index and intermediates are views of one
  allocation (``_Arena``), reused by every block, and the output is laid out as ``(B, H*W, nH, hc)`` so that the
  caller merges the heads with a view. Why one allocation: see ``_Arena`` (glibc's heap trimming).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as DF

# Elements of one bias/attention block (B * nH * rows * W * Ns): 1M floats = 4 MB in float32, which bounds the
# memory of a block's intermediates (and of the backward pass). Larger blocks mean fewer kernel launches until the
# window gather's intermediates leave the cache; benchmarks/attention.py measures the choice (RESULTS.md).
# Change these with tuning(), not by assignment.
_BLOCK_ELEMS = 1 << 20
# ... but in inference at least this many rows per block while that stays within 4x the budget (see _row_blocks).
_MIN_ROWS = 8
# Below this many attention elements autograd keeps the whole attention matrix (cheaper than recomputing it).
_SAVE_ELEMS = 1 << 23

# the private CPU flash-attention kernel that returns the log-sum-exp; off: the generic (CUDA / other devices) branch
_CPU_FLASH = True
# Largest single allocation for an inference call's output and bias intermediates (_Arena): glibc's dynamic mmap
# threshold stops rising at 32 MiB on 64-bit systems, so a larger block would be mmapped, faulted in and unmapped
# on every call; larger problems allocate their tensors one by one.
_ARENA_MAX_BYTES = 32 << 20

BiasFn = Callable[[int, int, Sequence[Tensor]], Tensor]


@contextlib.contextmanager
def tuning(
    *,
    block_elems: int | None = None,
    min_rows: int | None = None,
    save_elems: int | None = None,
    cpu_flash: bool | None = None,
    arena_bytes: int | None = None,
) -> Iterator[None]:
    """Temporarily change the fast backend's knobs (None keeps a knob): ``block_elems`` bias entries per block of
    query rows, ``min_rows`` rows per block in inference, ``save_elems`` the size below which autograd keeps the
    whole attention matrix (0: always the recomputing backward), ``cpu_flash=False`` runs the generic attention
    branch (what CUDA and other devices run) on the CPU too, ``arena_bytes`` is the largest single allocation for
    an inference call's output and bias intermediates (0: allocate them one by one). Tests use it to force every
    branch on the CPU."""
    global _BLOCK_ELEMS, _MIN_ROWS, _SAVE_ELEMS, _CPU_FLASH, _ARENA_MAX_BYTES
    saved = (_BLOCK_ELEMS, _MIN_ROWS, _SAVE_ELEMS, _CPU_FLASH, _ARENA_MAX_BYTES)
    for name, value in (
        ("block_elems", block_elems), ("min_rows", min_rows), ("save_elems", save_elems), ("arena_bytes", arena_bytes)
    ):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"tuning: {name} must be an int >= 0, got {value!r}")
    if block_elems is not None:
        _BLOCK_ELEMS = max(block_elems, 1)
    if min_rows is not None:
        _MIN_ROWS = min_rows
    if save_elems is not None:
        _SAVE_ELEMS = save_elems
    if cpu_flash is not None:
        _CPU_FLASH = bool(cpu_flash)
    if arena_bytes is not None:
        _ARENA_MAX_BYTES = arena_bytes
    try:
        yield
    finally:
        _BLOCK_ELEMS, _MIN_ROWS, _SAVE_ELEMS, _CPU_FLASH, _ARENA_MAX_BYTES = saved


# ---------------------------------------------------------------------------------------------------------------
# Table bias
# ---------------------------------------------------------------------------------------------------------------
def _table_step(table_len: int, n: int, version: str) -> int | None:
    """Query step in table cells, ``(T - 1) / 4 * dq`` with ``dq`` the query spacing, if it is an integer.

    DAT++ spaces queries by ``2 / (n - 1)``: the step is ``(T - 1) / (2 (n - 1))``, i.e. 1 at the built size. v1
    spaces them by ``2 / n``, so its step ``(T - 1) / (2 n)`` is fractional at the built size.
    """
    if n == 1:
        return 0
    den = 2 * (n - 1) if version == "pp" else 2 * n
    return (table_len - 1) // den if (table_len - 1) % den == 0 else None


class _Arena:
    """Named tensors carved out of one allocation, each at a fixed offset (a smaller request takes a prefix).

    Why one allocation: glibc returns the top of its heap to the kernel when a free leaves more than its trim
    threshold there, and the threshold follows the largest block it has served by ``mmap`` (twice its size, up to
    twice ``_ARENA_MAX_BYTES``). An inference call whose temporaries add up to more than twice its largest single
    tensor therefore hands its pages back after every call and faults them in again on the next one. As one block,
    the output and the bias intermediates are the call's largest allocation and its other temporaries stay below
    it, so the heap keeps its pages.
    """

    _ALIGN = 64  # bytes: every part starts on a cache line (and on any element size)

    def __init__(self, parts: dict[str, tuple[int, torch.dtype]], device: torch.device):
        self.slots: dict[str, tuple[int, int, torch.dtype]] = {}
        nbytes = 0
        for name, (numel, dtype) in parts.items():
            size = numel * dtype.itemsize
            self.slots[name] = (nbytes, numel, dtype)
            nbytes += -(-size // self._ALIGN) * self._ALIGN
        self.nbytes = nbytes
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)

    @staticmethod
    def nbytes_of(parts: dict[str, tuple[int, torch.dtype]]) -> int:
        return sum(-(-n * dt.itemsize // _Arena._ALIGN) * _Arena._ALIGN for n, dt in parts.values())

    def take(self, name: str, shape: Sequence[int]) -> Tensor:
        """A contiguous tensor of ``shape`` at the start of slot ``name`` (contents undefined)."""
        off, numel, dtype = self.slots[name]
        n = math.prod(shape)
        if n > numel:
            raise RuntimeError(f"fast backend: arena slot {name!r} holds {numel} elements, {n} requested")
        return self.buf[off : off + n * dtype.itemsize].view(dtype).view(tuple(shape))


class _WindowPlan:
    """What every block of the window gather shares, computed once per forward: the zero-padded table and the
    gather index of the largest block, relative to the block's first row (a block reads the padded table from
    offset ``S * r0 * Wp`` on, so one index serves every block; a shorter block uses a prefix of it).

    The border is the whole map's extent (``S * (H - 1) + 2`` rows, ``Sx * (W - 1) + 2`` columns): a window start
    clamped into ``[-P, T]`` then only moves windows that lie wholly in the zero border, so clamping never changes
    a value.
    """

    def __init__(self, table: Tensor, cy: Tensor, cx: Tensor, S: int, Sx: int, H: int, W: int):
        G, hg, Th, Tw = table.shape
        B, _, Ns = cy.shape
        # a step of 0 (one query row, or a table of one row): every query row reads the same pair of table rows
        Py, Px = max(S, 1) * (H - 1) + 2, max(Sx, 1) * (W - 1) + 2
        self.Tp = F.pad(table.detach(), (Px, Px, Py, Py)).reshape(G, hg, -1)  # G, hg, Hp*Wp
        self.Wp = Tw + 2 * Px
        fy, fx = torch.floor(cy.detach()), torch.floor(cx.detach())
        self.base = (fy.clamp(-Py, Th).long() + Py) * self.Wp + fx.clamp(-Px, Tw).long() + Px  # B, G, Ns
        self.S, self.Sx, self.W, self.cols, self.Ns = S, Sx, W, Sx * (W - 1) + 2, Ns
        self.table_shape, self.Py, self.Px = (G, hg, Th, Tw), Py, Px
        self.idx: Tensor | None = None
        self.rows = 0
        # set by attend() around an inference loop: the block's index and intermediates are written into it
        self.arena: _Arena | None = None

    def window_rows(self, Hc: int) -> int:
        """Table rows a block of ``Hc`` query rows reads."""
        return self.S * (Hc - 1) + 2

    def arena_parts(self, Hc: int, dtype: torch.dtype) -> dict[str, tuple[int, torch.dtype]]:
        """Element counts and dtypes of a block's index and intermediates (blocks of at most ``Hc`` rows)."""
        G, hg, _, _ = self.table_shape
        B = self.base.shape[0]
        rows, n = self.window_rows(Hc), B * G * self.Ns
        return {
            "idx": (n * rows * self.cols, torch.int64),
            "Z": (n * hg * rows * self.cols, dtype),
            "X": (n * hg * rows * self.W, dtype),
            "bias": (n * hg * Hc * self.W, dtype),
        }

    def block(self, r0: int, r1: int) -> tuple[Tensor, int, int]:
        """The gather index of query rows ``r0:r1`` (Tensor[B, G, rows*cols*Ns]: window rows outermost, keys
        innermost), the block's flat offset into the padded table, and its number of window rows."""
        rows = self.window_rows(r1 - r0)
        if self.idx is None or rows > self.rows:
            dev = self.base.device
            offs = (torch.arange(rows, device=dev) * self.Wp).view(rows, 1) + torch.arange(self.cols, device=dev)
            B, G, Ns = self.base.shape
            a, b = self.base.unsqueeze(2), offs.reshape(1, 1, -1, 1)
            if self.arena is not None:
                idx = torch.add(a, b, out=self.arena.take("idx", (B, G, rows * self.cols, Ns)))
            else:
                idx = a + b
            self.idx = idx.reshape(B, G, -1)  # B, G, rows*cols*Ns
            self.rows = rows
        return self.idx[:, :, : rows * self.cols * self.Ns], self.S * r0 * self.Wp, rows


def _taps(V: Tensor, dim: int, n: int, step: int) -> tuple[Tensor, Tensor]:
    """The two inputs of ``n`` lerps along ``dim``: views of ``V[step*r]`` and ``V[step*r + 1]``, ``r < n``
    (step 0: one pair of rows, repeated)."""
    if step == 0:
        shape = list(V.shape)
        shape[dim] = n
        return V.narrow(dim, 0, 1).expand(shape), V.narrow(dim, 1, 1).expand(shape)
    head = (slice(None),) * dim
    return V[head + (slice(0, step * (n - 1) + 1, step),)], V[head + (slice(1, step * (n - 1) + 2, step),)]


def _lerp_backward(d: Tensor, V: Tensor, w: Tensor, dim: int, step: int) -> tuple[Tensor, Tensor]:
    """Adjoint of ``out[r] = lerp(V[step*r], V[step*r + 1], w)`` along ``dim`` (``w`` broadcasts, one weight per
    batch, group and key): returns ``dV`` and ``dw`` summed to ``Tensor[B, G, Ns]`` (over heads, rows, columns).

    With ``step == 1`` neighbouring outputs share an input, ``dV[r] = (1 - w) d[r] + w d[r-1]``; written with the
    difference ``E[r] = d[r] - d[r-1]`` (zero outside) as ``dV[r] = d[r] - w E[r]``, and by summation by parts
    ``dw = sum_r d[r] (V[r+1] - V[r]) = -sum_r V[r] E[r]``: three passes instead of zero-filling and accumulating.
    """
    if step == 0:  # every output reads the same pair (the weight does not depend on the row): sum them first
        d, step = d.sum(dim, keepdim=True), 2
    n = d.shape[dim]
    if step == 1:
        E = torch.empty_like(V)  # n + 1 along dim
        E.narrow(dim, 0, 1).copy_(d.narrow(dim, 0, 1))
        torch.sub(d.narrow(dim, 1, n - 1), d.narrow(dim, 0, n - 1), out=E.narrow(dim, 1, n - 1))
        torch.neg(d.narrow(dim, n - 1, 1), out=E.narrow(dim, n, 1))
        dV = torch.empty_like(V)
        torch.addcmul(d, E.narrow(dim, 0, n), w, value=-1.0, out=dV.narrow(dim, 0, n))
        torch.mul(d.narrow(dim, n - 1, 1), w, out=dV.narrow(dim, n, 1))
        dw = (V * E).sum((2, 3, 4)).neg_()
        return dV, dw
    # larger steps: the two inputs of every output are nobody else's
    dV = torch.zeros_like(V)
    lo, hi = _taps(dV, dim, n, step)
    torch.mul(d, w, out=hi)
    torch.sub(d, hi, out=lo)
    V0, V1 = _taps(V, dim, n, step)
    dw = (d * (V1 - V0)).sum((2, 3, 4))
    return dV, dw


class _WindowTableBias(torch.autograd.Function):
    """Table bias for integer query steps: ``bias[i, j, n] = sum_ab w_ab(n) T[S*i + oy(n) + a, Sx*j + ox(n) + b]``.

    Inputs: table (Tensor[G, hg, Th, Tw]), cy, cx (Tensor[B, G, Ns]: table coordinates of query row/col 0; their
    fractional parts are the bilinear weights of every query), the block's rows ``r0:r1`` and the shared
    :class:`_WindowPlan`. Output: Tensor[B, G, hg, (r1-r0)*W, Ns], keys last (the layout the attention mask needs,
    so no pass transposes).
    """

    @staticmethod
    def forward(ctx, table: Tensor, cy: Tensor, cx: Tensor, r0: int, r1: int, plan: _WindowPlan) -> Tensor:
        G, hg, Th, Tw = table.shape
        B, _, Ns = cy.shape
        Hc, W, cols = r1 - r0, plan.W, plan.cols
        idx, off, rows = plan.block(r0, r1)
        src = plan.Tp[:, :, off:]  # the block's rows start at its offset; the index is relative to it
        wy = (cy - torch.floor(cy)).unsqueeze(2)  # B, G, 1, Ns
        wx = (cx - torch.floor(cx)).unsqueeze(2)
        arena = plan.arena
        Z = torch.gather(
            src.unsqueeze(0).expand(B, G, hg, src.shape[-1]),
            3,
            idx.unsqueeze(2).expand(B, G, hg, idx.shape[-1]),
            out=arena.take("Z", (B, G, hg, idx.shape[-1])) if arena is not None else None,
        ).reshape(B, G, hg, rows, cols, Ns)
        wx_, wy_ = wx.unsqueeze(2).unsqueeze(2), wy.unsqueeze(2).unsqueeze(2)  # B, G, 1, 1, 1, Ns
        X0, X1 = _taps(Z, 4, W, plan.Sx)
        if arena is not None:
            X = torch.lerp(X0, X1, wx_, out=arena.take("X", (B, G, hg, rows, W, Ns)))
        else:
            X = torch.lerp(X0, X1, wx_)  # B, G, hg, rows, W, Ns
        X0, X1 = _taps(X, 3, Hc, plan.S)  # B, G, hg, Hc, W, Ns
        if arena is not None:
            bias = torch.lerp(X0, X1, wy_, out=arena.take("bias", (B, G, hg, Hc, W, Ns)))
        else:
            bias = torch.lerp(X0, X1, wy_)  # B, G, hg, Hc, W, Ns
        ctx.save_for_backward(Z, X, wy_, wx_)
        ctx.meta = (plan, r0, r1)
        return bias.reshape(B, G, hg, Hc * W, Ns)

    @staticmethod
    def backward(ctx, grad: Tensor):
        Z, X, wy_, wx_ = ctx.saved_tensors
        plan, r0, r1 = ctx.meta
        G, hg, Th, Tw = plan.table_shape
        W, Py, Px = plan.W, plan.Py, plan.Px
        Hc = r1 - r0
        idx, off, rows = plan.block(r0, r1)
        B, Ns = Z.shape[0], plan.Ns
        dB = grad.reshape(B, G, hg, Hc, W, Ns)
        dX, d_wy = _lerp_backward(dB, X, wy_, 3, plan.S)  # the lerp along rows ...
        dZ, d_wx = _lerp_backward(dX, Z, wx_, 4, plan.Sx)  # ... and the one along columns
        d_table = None
        if ctx.needs_input_grad[0]:
            dTp = dZ.new_zeros(B, G, hg, plan.Tp.shape[-1])
            dTp[:, :, :, off:].scatter_add_(
                3, idx.unsqueeze(2).expand(B, G, hg, idx.shape[-1]), dZ.reshape(B, G, hg, -1)
            )
            Hp, Wp = plan.Tp.shape[-1] // plan.Wp, plan.Wp
            d_table = dTp.sum(0).reshape(G, hg, Hp, Wp)[:, :, Py : Py + Th, Px : Px + Tw]
        return d_table, d_wy, d_wx, None, None, None


def _general_table_bias(table: Tensor, qy: Tensor, qx: Tensor, p: Tensor) -> Tensor:
    """Table bias for any query step: ``grid_sample`` of the table, with the displacement grid written once in
    ``(x, y)`` order (the reference builds, scales and flips it in three passes).

    Args:
        table (Tensor[G, hg, Th, Tw]); qy (Tensor[Hc]), qx (Tensor[W]): query coordinates; p (Tensor[B, G, Ns, 2]).

    Returns:
        Tensor[B, G, hg, Hc*W, Ns]
    """
    G, hg, Th, Tw = table.shape
    B, _, Ns, _ = p.shape
    Hc, W = qy.numel(), qx.numel()
    half = p.mul(-0.5)  # B, G, Ns, 2
    gx = (qx * 0.5).view(1, 1, 1, W, 1) + half[..., 1].view(B, G, 1, 1, Ns)  # B, G, 1, W, Ns
    gy = (qy * 0.5).view(1, 1, Hc, 1, 1) + half[..., 0].view(B, G, 1, 1, Ns)  # B, G, Hc, 1, Ns
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # B, G, Hc, W, Ns, 2
    bias = F.grid_sample(
        table.unsqueeze(0).expand(B, G, hg, Th, Tw).reshape(B * G, hg, Th, Tw),
        grid.reshape(B * G, Hc * W, Ns, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )  # BG, hg, Hc*W, Ns
    return bias.reshape(B, G, hg, Hc * W, Ns)


def _make_table_bias_fn(
    table: Tensor, groups: int, version: str, H: int, W: int, pos: Tensor, window: bool
) -> tuple[BiasFn, list[Tensor]]:
    nH, Th, Tw = table.shape
    G = groups
    hg = nH // G
    BG, Hk, Wk, _ = pos.shape
    B, Ns = BG // G, Hk * Wk
    # coordinates, weights and the bias in float32 at least, whatever the model's dtype (a bfloat16 table
    # coordinate resolves a quarter cell on a 56-row table)
    acc = DF.coord_dtype(torch.promote_types(table.dtype, pos.dtype))
    qg = DF.query_grid(H, W, version=version, device=pos.device, dtype=acc)  # H, W, 2
    qy, qx = qg[:, 0, 0], qg[0, :, 1]
    p = pos.reshape(B, G, Ns, 2).to(acc)
    table4 = table.reshape(G, hg, Th, Tw).to(acc)
    S, Sxi = _table_step(Th, H, version), _table_step(Tw, W, version)

    if window and S is not None and Sxi is not None:
        A_y, A_x = (Th - 1) / 4.0, (Tw - 1) / 4.0
        # table coordinate of query row / column 0 for every key: u = S * i + c(n)
        cy = A_y * (qy[0] - p[..., 0] + 2.0)  # B, G, Ns
        cx = A_x * (qx[0] - p[..., 1] + 2.0)
        plan = _WindowPlan(table4, cy, cx, S, Sxi, H, W)

        def bias_fn(r0: int, r1: int, tensors: Sequence[Tensor]) -> Tensor:
            t, cy_, cx_ = tensors
            out = _WindowTableBias.apply(t, cy_, cx_, r0, r1, plan)
            return out.reshape(B, nH, (r1 - r0) * W, Ns)

        bias_fn.window_plan = plan  # type: ignore[attr-defined]
        return bias_fn, [table4, cy, cx]

    def bias_fn_general(r0: int, r1: int, tensors: Sequence[Tensor]) -> Tensor:
        t, p_ = tensors
        return _general_table_bias(t, qy[r0:r1], qx, p_).reshape(B, nH, (r1 - r0) * W, Ns)

    return bias_fn_general, [table4, p]


def _make_bias_fn(
    bias: DF.PositionBias | None, H: int, W: int, pos: Tensor, window: bool = True
) -> tuple[BiasFn | None, list[Tensor]]:
    """The bias as ``bias_fn(r0, r1, tensors) -> Tensor[B or 1, nH, (r1-r0)*W, Ns]`` plus the tensors it reads (the
    custom backward differentiates with respect to them). ``window`` allows the window gather for the table bias
    (fastest forward; its multi-pass backward only pays off on large maps)."""
    if bias is None:
        return None, []
    BG, Hk, Wk, _ = pos.shape
    Ns = Hk * Wk
    if bias.kind == "table":
        return _make_table_bias_fn(bias.params[0], bias.groups, bias.version, H, W, pos, window)
    if bias.kind == "fixed":
        nH = bias.params[0].shape[0]

        def fixed_fn(r0: int, r1: int, tensors: Sequence[Tensor]) -> Tensor:
            return tensors[0].reshape(1, nH, H, W, Ns)[:, :, r0:r1].reshape(1, nH, (r1 - r0) * W, Ns)

        return fixed_fn, [bias.params[0]]
    if bias.kind == "log_cpb":
        G = bias.groups
        qg = DF.query_grid(H, W, version=bias.version, device=pos.device, dtype=DF.coord_dtype(pos.dtype))

        def cpb_fn(r0: int, r1: int, tensors: Sequence[Tensor]) -> Tensor:
            p_, w1, b1, w2 = tensors
            return DF.log_cpb_bias_fn(qg[r0:r1], p_, G, w1, b1, w2)  # B, nH, Nc, Ns

        return cpb_fn, [pos, *bias.params]
    raise ValueError(f"fast backend: bias kind must be 'table', 'fixed' or 'log_cpb', got {bias.kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Attention over query-row blocks
# ---------------------------------------------------------------------------------------------------------------
def _row_blocks(B: int, nH: int, H: int, W: int, Ns: int, inference: bool) -> list[tuple[int, int]]:
    """Blocks of query rows of about ``_BLOCK_ELEMS`` bias entries. In inference at least ``_MIN_ROWS`` rows while
    that stays within 4x the budget: the window gather reads ``rows + 1`` table rows per block and every block
    costs a round of kernel launches. The backward's per-block intermediates are several times a block, so training
    keeps the budget (its peak memory grows with the block)."""
    per_row = max(1, B * nH * W * Ns)
    rows = max(1, min(H, _BLOCK_ELEMS // per_row))
    if inference:
        rows = max(rows, min(H, _MIN_ROWS, 4 * _BLOCK_ELEMS // per_row))
    return [(r, min(H, r + rows)) for r in range(0, H, rows)]


def _sdpa_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Attention output and per-query log-sum-exp of the logits."""
    if q.device.type == "cpu" and _CPU_FLASH:
        op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if op is not None and q.shape[-2] > 0 and k.shape[-2] > 0:
            # the private kernel needs a unit stride along the head dimension
            q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
            out, lse = op(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
            return out, lse.reshape(q.shape[:-1])
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits + mask
    lse = torch.logsumexp(logits, dim=-1)
    return torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), v), lse


class _BlockAttention(torch.autograd.Function):
    """Attention with a recomputed bias, one block of query rows at a time (memory: one block, not the map)."""

    @staticmethod
    def forward(ctx, q, k, v, bias_fn, blocks, W, scale, *bias_inputs):
        # q: B, nH, H*W, hc ; k, v: B, nH, Ns, hc
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = q.new_empty(q.shape[:-1])
        for r0, r1 in blocks:
            sl = slice(r0 * W, r1 * W)
            mask = bias_fn(r0, r1, bias_inputs) if bias_fn is not None else None
            if mask is not None:
                mask = mask.to(q.dtype)
            o, l = _sdpa_lse(q[:, :, sl], k, v, mask, scale)
            out[:, :, sl] = o
            lse[:, :, sl] = l
        ctx.bias_fn, ctx.blocks, ctx.W, ctx.scale = bias_fn, blocks, W, scale
        ctx.n_bias = len(bias_inputs)
        ctx.save_for_backward(q, k, v, out, lse, *bias_inputs)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, *bias_inputs = ctx.saved_tensors
        bias_fn, blocks, W, scale = ctx.bias_fn, ctx.blocks, ctx.W, ctx.scale
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        want = [ctx.needs_input_grad[7 + i] for i in range(ctx.n_bias)]
        leaves = [t.detach().requires_grad_(w) for t, w in zip(bias_inputs, want)]
        d_out = d_out.contiguous()
        delta = (d_out * out).sum(-1, keepdim=True)  # B, nH, Nq, 1
        q_s, k_s = q * scale, k * scale  # the scale folded into the small operands
        kT = k.transpose(-1, -2)
        vT = v.transpose(-1, -2)
        for r0, r1 in blocks:
            sl = slice(r0 * W, r1 * W)
            qb, dob = q_s[:, :, sl], d_out[:, :, sl]
            with torch.enable_grad():
                bias = bias_fn(r0, r1, leaves) if bias_fn is not None else None
            P = torch.matmul(qb, kT)  # B, nH, Nc, Ns
            if bias is not None:
                P.add_(bias.detach())
            P.sub_(lse[:, :, sl].unsqueeze(-1)).exp_()  # softmax from the saved log-sum-exp
            dv += torch.matmul(P.transpose(-1, -2), dob)
            dS = torch.matmul(dob, vT).sub_(delta[:, :, sl]).mul_(P)  # gradient of the logits (and the bias)
            del P
            dq[:, :, sl] = torch.matmul(dS, k_s)
            dk += torch.matmul(dS.transpose(-1, -2), qb)
            if bias is not None and bias.requires_grad:
                grad_b = dS if bias.shape[0] == dS.shape[0] else dS.sum(0, keepdim=True)
                torch.autograd.backward(bias, grad_b.to(bias.dtype))
        d_bias = [leaf.grad if w else None for leaf, w in zip(leaves, want)]
        return (dq, dk, dv, None, None, None, None, *d_bias)


def _inference_out(
    q: Tensor, plan: _WindowPlan | None, blocks: list[tuple[int, int]]
) -> tuple[Tensor, _Arena | None]:
    """The inference output, Tensor[B, nH, Nq, hc] laid out as (B, Nq, nH, hc) so that merging the heads back
    into channels is a view, and, on the CPU with the window gather, the :class:`_Arena` it lives in together with
    the blocks' bias intermediates (None when the problem is too large for one block of memory)."""
    B, nH, Nq, hc = q.shape
    if plan is not None and q.device.type == "cpu":
        Hc = max(r1 - r0 for r0, r1 in blocks)
        parts = {"out": (q.numel(), q.dtype), **plan.arena_parts(Hc, plan.Tp.dtype)}
        if _Arena.nbytes_of(parts) <= _ARENA_MAX_BYTES:
            arena = _Arena(parts, q.device)
            return arena.take("out", (B, Nq, nH, hc)).transpose(1, 2), arena
    return q.new_empty(B, Nq, nH, hc).transpose(1, 2), None


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_fn: BiasFn | None,
    bias_inputs: list[Tensor],
    *,
    H: int,
    W: int,
    scale: float,
    attn_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Multi-head attention of ``q`` (Tensor[B, nH, H*W, hc]) over ``k, v`` (Tensor[B, nH, Ns, hc]) with the bias
    ``bias_fn(r0, r1, bias_inputs)`` for query rows ``r0:r1``. Returns Tensor[B, nH, H*W, hc]."""
    B, nH, Nq, hc = q.shape
    Ns = k.shape[-2]
    if Nq == 0 or B == 0:
        # batch 0: empty output, still connected to k, v and the bias inputs so that every parameter gets a (zero)
        # gradient, as on the reference path
        keep = sum((t.sum() * 0 for t in (k, v, *bias_inputs)), q.sum() * 0)
        return q.new_zeros(q.shape) + keep
    drop = attn_drop if training else 0.0
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or any(t.requires_grad for t in bias_inputs)
    )
    blocks = _row_blocks(B, nH, H, W, Ns, inference=not needs_grad)
    if drop > 0.0:
        # dropout needs its random mask in the backward pass: let autograd keep the blocks
        outs = []
        for r0, r1 in blocks:
            mask = bias_fn(r0, r1, bias_inputs).to(q.dtype) if bias_fn is not None else None
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, r0 * W : r1 * W], k, v, attn_mask=mask, dropout_p=drop, scale=scale
                )
            )
        return torch.cat(outs, dim=2)
    if not needs_grad:
        plan: _WindowPlan | None = getattr(bias_fn, "window_plan", None)
        out, plan_arena = _inference_out(q, plan, blocks)
        # in half precision the CPU's fused attention kernel is slower than matmul + softmax (benchmarks/RESULTS.md)
        unfused = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        kT = k.transpose(-1, -2)
        if plan is not None:
            plan.arena = plan_arena
        try:
            for r0, r1 in blocks:
                mask = bias_fn(r0, r1, bias_inputs) if bias_fn is not None else None
                if mask is not None:
                    mask = mask.to(q.dtype)
                qb = q[:, :, r0 * W : r1 * W]
                if unfused:
                    logits = torch.matmul(qb, kT).mul_(scale)  # B, nH, rows*W, Ns
                    if mask is not None:
                        logits += mask
                    out[:, :, r0 * W : r1 * W] = torch.matmul(logits.softmax(-1), v)
                else:
                    out[:, :, r0 * W : r1 * W] = F.scaled_dot_product_attention(
                        qb, k, v, attn_mask=mask, scale=scale
                    )
        finally:
            if plan is not None:
                plan.arena = None
        return out
    if B * nH * Nq * Ns <= _SAVE_ELEMS:
        # small problem: plain autograd over one block (fused softmax backward, nothing recomputed)
        logits = torch.matmul(q * scale, k.transpose(-1, -2))  # B, nH, Nq, Ns
        if bias_fn is not None:
            logits = logits + bias_fn(0, H, bias_inputs)  # float32 with a half-precision model
        return torch.matmul(logits.softmax(-1).to(v.dtype), v)
    return _BlockAttention.apply(q, k, v, bias_fn, blocks, W, scale, *bias_inputs)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    bias: DF.PositionBias | None,
    *,
    H: int,
    W: int,
    scale: float,
    attn_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Deformable attention over sampled keys; same arguments and result as :func:`.reference.forward`.

    Args:
        q (Tensor[B, nH, H*W, hc]), k, v (Tensor[B, nH, Ns, hc]), pos (Tensor[B*G, Hk, Wk, 2]).

    Returns:
        Tensor[B, nH, H*W, hc]; in inference a view of ``(B, H*W, nH, hc)`` memory (heads merge with a view).
    """
    B, nH, Nq, hc = q.shape
    Ns = k.shape[-2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # B, nH, N, hc with unit stride along hc
    params = bias.params if bias is not None else ()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, pos, *params))
    # grid_sample's fused backward beats the window gather's when autograd keeps the whole (small) matrix
    window = not (needs_grad and B * nH * Nq * Ns <= _SAVE_ELEMS)
    bias_fn, bias_inputs = _make_bias_fn(bias, H, W, pos, window=window)
    return attend(q, k, v, bias_fn, bias_inputs, H=H, W=W, scale=scale, attn_drop=attn_drop, training=training)
