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

The neighbourhoods are gathered with advanced indexing (``Tensor[B, nH, H, W, k, k, hd]``), which needs no custom
kernel and no ``natten``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_float, check_image_tensor, check_int

__all__ = [
    "NeighborhoodAttention2d",
    "neighborhood_indices",
    "na2d_logits",
    "na2d_av",
    "neighborhood_attention2d",
]


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


def neighborhood_attention2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    kernel_size: int,
    *,
    attn_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``softmax(q k^T + rpb) v`` over neighbourhoods; ``q`` already scaled, all ``Tensor[B, nH, H, W, hd]``.

    Returns:
        Tensor[B, nH, H, W, hd]
    """
    attn = na2d_logits(q, k, rpb, kernel_size).softmax(dim=-1)
    attn = F.dropout(attn, p=attn_drop, training=training)
    return na2d_av(attn, v, kernel_size)


class NeighborhoodAttention2d(nn.Module):
    """Neighborhood attention with relative position bias (the official DAT++ ``NeighborhoodAttention2D``).

    Args:
        dim: channels ``C``; divisible by ``num_heads``.
        kernel_size: ``k``, odd and >= 3.
        num_heads: ``nH``.
        attn_drop, proj_drop: dropout on the attention weights and on the output (training mode only).
        dilation: only 1 (what DAT++ uses) is supported.

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
        qkv = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)  # B, nH, Hp, Wp, hd
        return q * self.scale, k, v

    def pad(self, x: Tensor) -> Tensor:
        """Zero-pad a channels-last ``Tensor[B, H, W, C]`` at the bottom/right up to ``k x k`` if smaller."""
        H, W = x.shape[1:3]
        pad_b, pad_r = max(0, self.kernel_size - H), max(0, self.kernel_size - W)
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        return x

    def forward(self, x: Tensor) -> Tensor:
        check_image_tensor(x, "x", "NeighborhoodAttention2d", channels=self.dim)
        B, C, H, W = x.shape
        x = self.pad(x.permute(0, 2, 3, 1))  # B, Hp, Wp, C
        Hp, Wp = x.shape[1:3]
        q, k, v = self.qkv_heads(x)
        out = neighborhood_attention2d(
            q, k, v, self.rpb, self.kernel_size, attn_drop=self.attn_drop, training=self.training
        )  # B, nH, Hp, Wp, hd
        out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)[:, :H, :W]  # B, H, W, C
        out = F.dropout(self.proj(out), p=self.proj_drop, training=self.training)
        return out.permute(0, 3, 1, 2)  # B, C, H, W
