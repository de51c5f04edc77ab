"""The fast backend: same numerics as the reference, less time and bounded memory.

What it changes (and why):

* **Attention** runs through fused scaled-dot-product attention (``F.scaled_dot_product_attention``), one block of
  query rows at a time. Under autograd a custom function keeps only ``q, k, v``, the output and the per-query
  log-sum-exp, and recomputes each block's bias and softmax in the backward pass (flash-attention style), so
  neither the ``(B, nH, H*W, Ns)`` bias nor the attention matrix is ever held whole.
* **The table bias** is gathered from the table directly instead of ``grid_sample``-ing it at a materialised
  ``(B*G, H*W, Ns, 2)`` displacement. Query ``i`` looks the table up at row ``u = S*i + c(n)``: ``S`` is the
  query step in table cells (``(q_h - 1) / (H - 1)``, exactly 1 when the input has the size the table was built
  for) and ``c(n)`` depends on the key only. When ``S`` is an integer the bilinear weights depend on the key only,
  so each key's bias over a block of rows is one contiguous window of the (zero-padded) table blended with four
  scalars: one strided gather and three ``lerp``s. Its backward is written out (the window adjoint plus one
  accumulating scatter into the table, and a per-key reduction for the positions) instead of ``grid_sample``'s
  atomic scatter over every query-key pair. Other steps (v1 tables, resized inputs) use a separable
  row-then-column gather whose autograd backward is equally cheap.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as DF

if TYPE_CHECKING:  # pragma: no cover
    from ..attention import DeformableAttention2d

# Elements of one bias/attention block (B * nH * rows * W * Ns): 4M floats = 16 MB in float32.
_BLOCK_ELEMS = int(os.environ.get("DEFORMATTN_BLOCK_ELEMS", 1 << 22))

BiasFn = Callable[[int, int, Sequence[Tensor]], Tensor]


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


class _WindowTableBias(torch.autograd.Function):
    """Table bias for integer query steps: ``bias[i, j, n] = sum_ab w_ab(n) T[S*i + oy(n) + a, Sx*j + ox(n) + b]``.

    Inputs: table (Tensor[G, hg, Th, Tw]), cy, cx (Tensor[B, G, Ns]: table coordinates of query row/col 0),
    rows ``r0:r1``, steps ``S, Sx`` and the query map width ``W``. Output: Tensor[B, G, hg, (r1-r0)*W, Ns].
    """

    @staticmethod
    def forward(ctx, table: Tensor, cy: Tensor, cx: Tensor, r0: int, r1: int, S: int, Sx: int, W: int) -> Tensor:
        G, hg, Th, Tw = table.shape
        Hc = r1 - r0
        rows, cols = S * (Hc - 1) + 2, Sx * (W - 1) + 2
        # zero border wide enough that a window starting anywhere in [-P, T] stays inside the padded table
        Py, Px = rows, cols
        Tp = F.pad(table, (Px, Px, Py, Py))  # G, hg, Th + 2Py, Tw + 2Px
        uy = cy + S * r0
        fy, fx = torch.floor(uy), torch.floor(cx)
        wy, wx = uy - fy, cx - fx  # B, G, Ns
        oy = fy.clamp(-Py, Th).long() + Py
        ox = fx.clamp(-Px, Tw).long() + Px
        Z = _windows(Tp, oy, ox, rows, cols)  # B, G, Ns, hg, rows, cols
        wx_ = wx[..., None, None, None]
        wy_ = wy[..., None, None, None]
        S1, Sx1 = max(S, 1), max(Sx, 1)  # a step of 0 only occurs with a single row / column
        X = torch.lerp(Z[..., 0 : Sx1 * (W - 1) + 1 : Sx1], Z[..., 1 : Sx1 * (W - 1) + 2 : Sx1], wx_)  # ..., rows, W
        X0 = X[..., 0 : S1 * (Hc - 1) + 1 : S1, :]  # B, G, Ns, hg, Hc, W
        X1 = X[..., 1 : S1 * (Hc - 1) + 2 : S1, :]
        bias = torch.lerp(X0, X1, wy_)  # B, G, Ns, hg, Hc, W
        ctx.save_for_backward(Z, X0, X1, wy, wx, oy, ox)
        ctx.meta = (table.shape, S, Sx, W, Hc, rows, cols, Py, Px, r0)
        B, Ns = cy.shape[0], cy.shape[-1]
        return bias.permute(0, 1, 3, 4, 5, 2).reshape(B, G, hg, Hc * W, Ns)

    @staticmethod
    def backward(ctx, grad: Tensor):
        Z, X0, X1, wy, wx, oy, ox = ctx.saved_tensors
        (G, hg, Th, Tw), S, Sx, W, Hc, rows, cols, Py, Px, r0 = ctx.meta
        B, Ns = wy.shape[0], wy.shape[-1]
        dB = grad.reshape(B, G, hg, Hc, W, Ns).permute(0, 1, 5, 2, 3, 4)  # B, G, Ns, hg, Hc, W
        wy_ = wy[..., None, None, None]
        wx_ = wx[..., None, None, None]
        d_wy = (dB * (X1 - X0)).sum((-3, -2, -1))  # B, G, Ns
        S1, Sx1 = max(S, 1), max(Sx, 1)
        dX = dB.new_zeros(X0.shape[:-2] + (rows, W))
        dX[..., 0 : S1 * (Hc - 1) + 1 : S1, :] += dB * (1 - wy_)
        dX[..., 1 : S1 * (Hc - 1) + 2 : S1, :] += dB * wy_
        Zl = Z[..., 0 : Sx1 * (W - 1) + 1 : Sx1]
        Zr = Z[..., 1 : Sx1 * (W - 1) + 2 : Sx1]
        d_wx = (dX * (Zr - Zl)).sum((-3, -2, -1))
        dZ = dB.new_zeros(Z.shape)
        dZ[..., 0 : Sx1 * (W - 1) + 1 : Sx1] += dX * (1 - wx_)
        dZ[..., 1 : Sx1 * (W - 1) + 2 : Sx1] += dX * wx_
        d_table = None
        if ctx.needs_input_grad[0]:
            dTp = dB.new_zeros(G, hg, Th + 2 * Py, Tw + 2 * Px)
            _windows_add_(dTp, oy, ox, dZ)
            d_table = dTp[:, :, Py : Py + Th, Px : Px + Tw]
        # u = S*i + c(n): the integer parts are piecewise constant, so d(weight)/dc = 1
        return d_table, d_wy, d_wx, None, None, None, None, None


def _window_view(Tp: Tensor, rows: int, cols: int) -> Tensor:
    """View ``V[g, h, y, x, r, c] = Tp[g, h, y + r, x + c]`` of every window (no copy)."""
    G, hg, Hp, Wp = Tp.shape
    s = Tp.stride()
    return Tp.as_strided((G, hg, Hp - rows + 1, Wp - cols + 1, rows, cols), (s[0], s[1], s[2], s[3], s[2], s[3]))


def _windows(Tp: Tensor, oy: Tensor, ox: Tensor, rows: int, cols: int) -> Tensor:
    """Gather the window of every (batch, group, key): Tensor[B, G, Ns, hg, rows, cols]."""
    G = Tp.shape[0]
    V = _window_view(Tp.contiguous(), rows, cols).transpose(0, 1)  # hg, G, Ly, Lx, rows, cols
    g = torch.arange(G, device=Tp.device).view(1, G, 1)
    return V[:, g, oy, ox].permute(1, 2, 3, 0, 4, 5)  # B, G, Ns, hg, rows, cols


def _windows_add_(dTp: Tensor, oy: Tensor, ox: Tensor, dZ: Tensor) -> None:
    """Adjoint of :func:`_windows`: accumulate every window's gradient into the padded table (in place)."""
    G, hg, Hp, Wp = dTp.shape
    B, _, Ns, _, rows, cols = dZ.shape
    r = torch.arange(rows, device=dTp.device)
    c = torch.arange(cols, device=dTp.device)
    flat = ((oy[..., None, None] + r.view(rows, 1)) * Wp + ox[..., None, None] + c)  # B, G, Ns, rows, cols
    flat = flat + (torch.arange(G, device=dTp.device) * (hg * Hp * Wp)).view(1, G, 1, 1, 1)
    flat = flat.unsqueeze(3) + (torch.arange(hg, device=dTp.device) * (Hp * Wp)).view(1, 1, 1, hg, 1, 1)
    dTp.view(-1).index_add_(0, flat.reshape(-1), dZ.reshape(-1))


def _general_table_bias(
    table: Tensor, uy: Tensor, ux: Tensor
) -> Tensor:
    """Table bias for any query step, by separable gathers (rows, then columns); autograd does the backward.

    Args:
        table (Tensor[G, hg, Th, Tw]); uy (Tensor[B, G, Hc, Ns]) and ux (Tensor[B, G, W, Ns]): table coordinates.

    Returns:
        Tensor[B, G, hg, Hc*W, Ns]
    """
    G, hg, Th, Tw = table.shape
    B, _, Hc, Ns = uy.shape
    W = ux.shape[2]
    Tp = F.pad(table, (2, 2, 2, 2))  # G, hg, Th+4, Tw+4
    fy, fx = torch.floor(uy), torch.floor(ux)
    wy, wx = uy - fy, ux - fx
    iy = fy.clamp(-2, Th).long() + 2  # B, G, Hc, Ns
    ix = fx.clamp(-2, Tw).long() + 2  # B, G, W, Ns
    g = torch.arange(G, device=table.device).view(1, G, 1, 1)
    TpT = Tp.transpose(1, 2)  # G, Thp, hg, Twp
    r0 = TpT[g, iy]  # B, G, Hc, Ns, hg, Twp
    r1 = TpT[g, iy + 1]
    Y = torch.lerp(r0, r1, wy[..., None, None])  # B, G, Hc, Ns, hg, Twp
    idx = ix.permute(0, 1, 3, 2)[:, :, None, :, None, :].expand(B, G, Hc, Ns, hg, W)
    c0 = torch.gather(Y, -1, idx)
    c1 = torch.gather(Y, -1, idx + 1)
    bias = torch.lerp(c0, c1, wx.permute(0, 1, 3, 2)[:, :, None, :, None, :])  # B, G, Hc, Ns, hg, W
    return bias.permute(0, 1, 4, 2, 5, 3).reshape(B, G, hg, Hc * W, Ns)


def _make_table_bias_fn(m: "DeformableAttention2d", H: int, W: int, pos: Tensor) -> tuple[BiasFn, list[Tensor]]:
    table = m.rpe_table
    nH = m.num_heads
    G = m.offset_groups
    hg = nH // G
    _, Th, Tw = table.shape
    BG, Hk, Wk, _ = pos.shape
    B, Ns = BG // G, Hk * Wk
    qg = DF.query_grid(H, W, version=m.version, device=pos.device, dtype=pos.dtype)  # H, W, 2
    qy, qx = qg[:, 0, 0], qg[0, :, 1]
    p = pos.reshape(B, G, Ns, 2)
    table4 = table.reshape(G, hg, Th, Tw)
    A_y, A_x = (Th - 1) / 4.0, (Tw - 1) / 4.0
    S, Sxi = _table_step(Th, H, m.version), _table_step(Tw, W, m.version)

    if S is not None and Sxi is not None:
        # table coordinate of query row / column 0 for every key: u = S * i + c(n)
        cy = A_y * (qy[0] - p[..., 0] + 2.0)  # B, G, Ns
        cx = A_x * (qx[0] - p[..., 1] + 2.0)

        def bias_fn(r0: int, r1: int, tensors: Sequence[Tensor]) -> Tensor:
            t, cy_, cx_ = tensors
            out = _WindowTableBias.apply(t, cy_, cx_, r0, r1, S, Sxi, W)
            return out.reshape(B, nH, (r1 - r0) * W, Ns)

        return bias_fn, [table4, cy, cx]

    def bias_fn_general(r0: int, r1: int, tensors: Sequence[Tensor]) -> Tensor:
        t, p_ = tensors
        uy = A_y * (qy[r0:r1].view(1, 1, -1, 1) - p_[..., 0].unsqueeze(2) + 2.0)  # B, G, Hc, Ns
        ux = A_x * (qx.view(1, 1, -1, 1) - p_[..., 1].unsqueeze(2) + 2.0)  # B, G, W, Ns
        return _general_table_bias(t, uy, ux).reshape(B, nH, (r1 - r0) * W, Ns)

    return bias_fn_general, [table4, p]


def _make_bias_fn(m: "DeformableAttention2d", H: int, W: int, pos: Tensor) -> tuple[BiasFn | None, list[Tensor]]:
    kind = m.pos_bias
    BG, Hk, Wk, _ = pos.shape
    Ns = Hk * Wk
    if kind == "table":
        return _make_table_bias_fn(m, H, W, pos)
    if kind == "fixed":
        nH = m.num_heads

        def fixed_fn(r0: int, r1: int, tensors: Sequence[Tensor]) -> Tensor:
            return tensors[0].reshape(1, nH, H, W, Ns)[:, :, r0:r1].reshape(1, nH, (r1 - r0) * W, Ns)

        return fixed_fn, [m.rpe_table]
    if kind == "log_cpb":
        mlp = m.rpe_table
        lin1, lin2 = mlp[0], mlp[2]
        G = m.offset_groups
        qg = DF.query_grid(H, W, version=m.version, device=pos.device, dtype=pos.dtype)

        def cpb_fn(r0: int, r1: int, tensors: Sequence[Tensor]) -> Tensor:
            p_, w1, b1, w2 = tensors
            coords = DF.log_cpb_coords(qg[r0:r1], p_)  # BG, Nc, Ns, 2
            bias = F.linear(F.relu(F.linear(coords, w1, b1)), w2)  # BG, Nc, Ns, hg
            B, hg = BG // G, bias.shape[-1]
            return bias.permute(0, 3, 1, 2).reshape(B, G * hg, bias.shape[1], Ns)

        return cpb_fn, [pos, lin1.weight, lin1.bias, lin2.weight]
    return None, []


# ---------------------------------------------------------------------------------------------------------------
# Attention over query-row blocks
# ---------------------------------------------------------------------------------------------------------------
def _row_blocks(B: int, nH: int, H: int, W: int, Ns: int) -> list[tuple[int, int]]:
    rows = max(1, min(H, _BLOCK_ELEMS // max(1, B * nH * W * Ns)))
    return [(r, min(H, r + rows)) for r in range(0, H, rows)]


def _sdpa_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Attention output and per-query log-sum-exp of the logits."""
    if q.device.type == "cpu":
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
        kT = k.transpose(-1, -2)
        for r0, r1 in blocks:
            sl = slice(r0 * W, r1 * W)
            qb, dob = q[:, :, sl], d_out[:, :, sl]
            with torch.enable_grad():
                bias = bias_fn(r0, r1, leaves) if bias_fn is not None else None
            logits = torch.matmul(qb, kT) * scale  # B, nH, Nc, Ns
            if bias is not None:
                logits = logits + bias.detach()
            P = torch.exp(logits - lse[:, :, sl].unsqueeze(-1))
            dv += torch.matmul(P.transpose(-1, -2), dob)
            dP = torch.matmul(dob, v.transpose(-1, -2))
            dS = P * (dP - delta[:, :, sl])  # B, nH, Nc, Ns: gradient of the logits (and of the bias)
            dq[:, :, sl] = torch.matmul(dS, k) * scale
            dk += torch.matmul(dS.transpose(-1, -2), qb) * scale
            if bias is not None and bias.requires_grad:
                grad_b = dS if bias.shape[0] == dS.shape[0] else dS.sum(0, keepdim=True)
                torch.autograd.backward(bias, grad_b.to(bias.dtype))
        d_bias = [leaf.grad if w else None for leaf, w in zip(leaves, want)]
        return (dq, dk, dv, None, None, None, None, *d_bias)


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
        return q.new_zeros(q.shape) + 0 * q  # keeps the graph for batch 0
    blocks = _row_blocks(B, nH, H, W, Ns)
    drop = attn_drop if training else 0.0
    if drop > 0.0:
        # dropout needs its random mask in the backward pass: let autograd keep the blocks
        outs = []
        for r0, r1 in blocks:
            mask = bias_fn(r0, r1, bias_inputs) if bias_fn is not None else None
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, r0 * W : r1 * W], k, v, attn_mask=mask, dropout_p=drop, scale=scale
                )
            )
        return torch.cat(outs, dim=2)
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or any(t.requires_grad for t in bias_inputs)
    )
    if not needs_grad:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        for r0, r1 in blocks:
            mask = bias_fn(r0, r1, bias_inputs) if bias_fn is not None else None
            if mask is not None:
                mask = mask.to(q.dtype)
            out[:, :, r0 * W : r1 * W] = F.scaled_dot_product_attention(
                q[:, :, r0 * W : r1 * W], k, v, attn_mask=mask, scale=scale
            )
        return out
    return _BlockAttention.apply(q, k, v, bias_fn, blocks, W, scale, *bias_inputs)


def _proj(conv: torch.nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 conv applied to Tensor[B, N, C] (channels last): Tensor[B, N, C_out]."""
    return F.linear(x, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)


def forward(m: "DeformableAttention2d", x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, C, H, W = x.shape
    nH, hc = m.num_heads, m.head_dim
    q = m.proj_q(x)  # B, C, H, W
    pos, reference = m.sampling_positions(q)  # BG, Hk, Wk, 2 ; Hk, Wk, 2
    x_sampled = m.sample_kv_input(x, pos)  # B, C, Ns
    Ns = x_sampled.shape[-1]
    xs = x_sampled.transpose(1, 2)  # B, Ns, C
    k = _proj(m.proj_k, xs).reshape(B, Ns, nH, hc).transpose(1, 2)  # B, nH, Ns, hc
    v = _proj(m.proj_v, xs).reshape(B, Ns, nH, hc).transpose(1, 2)  # B, nH, Ns, hc
    qh = q.reshape(B, nH, hc, H * W).transpose(-1, -2)  # B, nH, H*W, hc
    bias_fn, bias_inputs = _make_bias_fn(m, H, W, pos)
    out = attend(
        qh, k, v, bias_fn, bias_inputs, H=H, W=W, scale=m.scale, attn_drop=m.attn_drop, training=m.training
    )  # B, nH, H*W, hc
    out = out.transpose(-1, -2).reshape(B, C, H, W)
    if m.pos_bias == "dwc":
        out = out + m.rpe_table(q)
    y = F.dropout(m.proj_out(out), p=m.proj_drop, training=m.training)
    return y, pos, reference

