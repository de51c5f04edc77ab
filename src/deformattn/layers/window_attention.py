"""Window attention with a relative position bias table (Swin; DAT stage letters ``L`` and ``S``).

The map is split into non-overlapping ``ws x ws`` windows and every window attends within itself, with a learned
bias per head and per relative offset (``relative_position_bias_table[(2ws-1)^2, nH]``). The shifted variant
(``S``) first rolls the map by ``-shift`` (DAT: ``shift = ceil(ws / 2)``) and masks out pairs of tokens that were
not neighbours before the roll (additive ``-100``, as the official code).

Any input size works: the map is zero-padded at the bottom/right to a multiple of ``ws`` and cropped back. Unlike
Swin, the padded tokens are masked out as *keys* (additive ``-100``), so the output at real pixels does not depend on
how much padding a size needs. At sizes that are multiples of ``ws`` nothing is padded and the numerics are the
official ones. The shift mask is computed for the actual (padded) size and cached per size.

Official state_dict names are kept: ``proj_qkv``, ``proj_out``, ``relative_position_bias_table`` and the persistent
buffers ``relative_position_index`` and (shifted) ``attn_mask``. Those two buffers are derived from the geometry: a
checkpoint's copies are accepted (official checkpoints carry them) but never overwrite the computed values.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._shapes import ceil_div, is_symbolic, shared
from .._utils import check_float, check_image_tensor, check_int, to_2tuple

__all__ = ["DERIVED_BUFFERS", "WindowAttention", "relative_position_index", "window_attention_mask"]

# buffers recomputed from the geometry: a checkpoint's copies (official names) are accepted, never loaded
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")

_MASK_VALUE = -100.0  # the official shift mask value; also used for padded keys


def relative_position_index(window_size: int) -> Tensor:
    """Index into the ``(2ws-1)^2`` bias table for every (query, key) pair of a window.

    Returns:
        Tensor[ws*ws, ws*ws] (int64): ``(dy + ws - 1) * (2ws - 1) + (dx + ws - 1)`` with ``d = query - key``.
    """
    ws = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # 2, N
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N (query - key)
    return (rel[0] + ws - 1) * (2 * ws - 1) + (rel[1] + ws - 1)  # N, N


def _partition(t: Tensor, ws: int) -> Tensor:
    """``Tensor[..., Hp, Wp]`` -> ``Tensor[..., nW, ws*ws]`` with windows ordered row-major."""
    *lead, Hp, Wp = t.shape
    t = t.reshape(*lead, Hp // ws, ws, Wp // ws, ws).transpose(-3, -2)  # ..., r1, r2, ws, ws
    return t.reshape(*lead, (Hp // ws) * (Wp // ws), ws * ws)


def window_attention_mask(
    H: int, W: int, window_size: int, shift_size: int, *, device=None, dtype=torch.float32
) -> Tensor | None:
    """Additive attention mask for every window of an ``H x W`` map (padded to multiples of the window).

    Entry ``[w, i, j]`` is ``-100`` where key ``j`` of window ``w`` is not allowed for query ``i``: it lies in a
    different pre-roll region (shifted windows, the official mask) and/or it is a padded token; ``0`` otherwise.
    Coordinates are those of the (rolled) padded map the windows are cut from.

    ``H`` and ``W`` may be symbolic (``torch.export`` with a dynamic size): the mask is then always built (it may be
    all zeros), from size arithmetic only.

    Returns:
        Tensor[nW, ws*ws, ws*ws], or None when nothing is masked (no shift, no padding; plain ints only).
    """
    ws, s = window_size, shift_size
    Hp, Wp = ceil_div(H, ws) * ws, ceil_div(W, ws) * ws
    symbolic = is_symbolic(H, W)
    if s == 0 and not symbolic and Hp == H and Wp == W:
        return None
    N = ws * ws
    rows, cols = torch.arange(Hp, device=device), torch.arange(Wp, device=device)
    mask = torch.zeros((Hp // ws) * (Wp // ws), N, N, device=device, dtype=dtype)
    if s > 0:
        # the official slices (0, -ws), (-ws, -s), (-s, None) of each axis are regions 0, 1, 2; label 3 * row + col
        region_r = (rows >= Hp - ws).long() + (rows >= Hp - s).long()  # Hp
        region_c = (cols >= Wp - ws).long() + (cols >= Wp - s).long()  # Wp
        label = region_r[:, None] * 3 + region_c[None, :]  # Hp, Wp
        lw = _partition(label, ws)  # nW, N
        mask = torch.where(lw[:, None, :] != lw[:, :, None], _MASK_VALUE, 0.0).to(dtype)  # nW, N, N
    if symbolic or Hp != H or Wp != W:
        valid = (rows < H)[:, None] & (cols < W)[None, :]  # Hp, Wp
        if s > 0:
            valid = torch.roll(valid, shifts=(-s, -s), dims=(0, 1))
        key_pad = torch.where(_partition(valid, ws), 0.0, _MASK_VALUE).to(dtype)  # nW, N
        mask = mask + key_pad[:, None, :]  # nW, N, N
    return mask


class WindowAttention(nn.Module):
    """Multi-head self-attention within (optionally shifted) windows, with a relative position bias table.

    Args:
        dim: channels ``C``; divisible by ``num_heads``.
        num_heads: ``nH``.
        window_size: ``ws`` (square windows).
        shift_size: roll of the shifted variant (0 = plain windows, letter ``L``; DAT's ``S`` uses
            ``ceil(ws / 2)``); must be ``< ws``.
        fmap_size: map size the persistent ``attn_mask`` buffer is built for (shifted windows only; the official
            checkpoints carry it). Other sizes compute their mask on the fly.
        attn_drop, proj_drop: dropout on the attention weights and on the output (training mode only).

    Shape: ``Tensor[B, C, H, W] -> Tensor[B, C, H, W]``, any ``H, W >= 1``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        *,
        shift_size: int = 0,
        fmap_size: int | tuple[int, int] | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        owner = "WindowAttention"
        dim = check_int(dim, "dim", owner, minimum=1)
        num_heads = check_int(num_heads, "num_heads", owner, minimum=1)
        window_size = check_int(window_size, "window_size", owner, minimum=1)
        shift_size = check_int(shift_size, "shift_size", owner, minimum=0)
        if dim % num_heads:
            raise ValueError(f"{owner}: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if shift_size >= window_size:
            raise ValueError(f"{owner}: shift_size ({shift_size}) must be < window_size ({window_size})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window_size
        self.shift_size = shift_size
        self.attn_drop = check_float(attn_drop, "attn_drop", owner, minimum=0.0, maximum=1.0)
        self.proj_drop = check_float(proj_drop, "proj_drop", owner, minimum=0.0, maximum=1.0)

        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.01)
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.fmap_size: tuple[int, int] | None = None
        if shift_size > 0:
            if fmap_size is None:
                raise ValueError(f"{owner}: shifted windows need fmap_size (the map size of the attn_mask buffer)")
            self.fmap_size = to_2tuple(fmap_size, "fmap_size", owner)
            mask = window_attention_mask(*self.fmap_size, window_size, shift_size)
            self.register_buffer("attn_mask", mask)
        self._mask_cache: dict[tuple, Tensor | None] = {}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in DERIVED_BUFFERS:
            key = prefix + name
            if key in state_dict and getattr(self, name, None) is not None:
                state_dict[key] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _mask(self, H: int, W: int, x: Tensor) -> Tensor | None:
        ws, s = self.window_size, self.shift_size
        if is_symbolic(H, W):  # a traced dynamic size: the general mask in the graph, once per stage (no module cache)
            return shared(("window_mask", H, W, ws, s, x.device, x.dtype),
                          lambda: window_attention_mask(H, W, ws, s, device=x.device, dtype=x.dtype))
        if self.shift_size > 0 and (H, W) == self.fmap_size:
            return self.attn_mask.to(x.dtype)
        key = (H, W, x.device, x.dtype)
        if key not in self._mask_cache:
            if len(self._mask_cache) > 16:  # bounded: varying input sizes must not grow memory without limit
                self._mask_cache.clear()
            self._mask_cache[key] = window_attention_mask(
                H, W, self.window_size, self.shift_size, device=x.device, dtype=x.dtype
            )
        return self._mask_cache[key]

    def relative_position_bias(self) -> Tensor:
        """``Tensor[nH, N, N]`` with ``N = ws * ws``."""
        N = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]  # N*N, nH
        return bias.reshape(N, N, self.num_heads).permute(2, 0, 1)  # nH, N, N

    def forward(self, x: Tensor) -> Tensor:
        check_image_tensor(x, "x", "WindowAttention", channels=self.dim)
        B, C, H, W = x.shape
        ws, s, nH, hd = self.window_size, self.shift_size, self.num_heads, self.head_dim
        mask = self._mask(H, W, x)
        Hp, Wp = ceil_div(H, ws) * ws, ceil_div(W, ws) * ws
        # channels-last throughout (a view of the blocks' channels_last maps; the output is one as well, so the
        # residual add that follows does not convert layouts)
        x = x.permute(0, 2, 3, 1)  # B, H, W, C
        if is_symbolic(H, W) or Hp != H or Wp != W:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        r1, r2 = Hp // ws, Wp // ws
        nW, N = r1 * r2, ws * ws
        windows = x.reshape(B, r1, ws, r2, ws, C).transpose(2, 3).reshape(B * nW, N, C)  # B*nW, N, C
        qkv = self.proj_qkv(windows).reshape(B * nW, N, 3, nH, hd).permute(2, 0, 3, 1, 4)  # 3, B*nW, nH, N, hd
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # B*nW, nH, N, N
        bias = self.relative_position_bias()  # nH, N, N
        if mask is None:
            attn = attn + bias
        else:  # bias and mask in one pass over the logits; explicit nW (not -1): B may be 0
            attn = (attn.view(B, nW, nH, N, N) + (bias + mask.reshape(nW, 1, N, N))).view(B * nW, nH, N, N)
        attn = F.dropout(attn.softmax(dim=-1), p=self.attn_drop, training=self.training)
        out = (attn @ v).transpose(1, 2).reshape(B * nW, N, C)  # B*nW, N, C
        out = F.dropout(self.proj_out(out), p=self.proj_drop, training=self.training)
        out = out.reshape(B, r1, r2, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)  # B, Hp, Wp, C
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out[:, :H, :W].permute(0, 3, 1, 2)  # B, C, H, W (channels_last strides)
