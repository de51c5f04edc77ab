"""``MultiScaleDeformableAttention``: the multi-scale deformable attention module of Deformable DETR.

Parameter names, shapes and initialisation are the official ``MSDeformAttn``'s (fundamentalvision/Deformable-DETR,
``models/ops/modules/ms_deform_attn.py``): ``sampling_offsets``, ``attention_weights``, ``value_proj``,
``output_proj``, so official and Hugging Face (``DeformableDetrMultiscaleDeformableAttention``) state dicts load with
``strict=True``. The core is :func:`deformattn.functional.multi_scale_deformable_attention`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._utils import check_int
from .backends.dispatch import check_backend_name
from .ops.msda import MSDA_OP, as_spatial_shapes, check_msda_inputs, is_tracing, multi_scale_deformable_attention

__all__ = ["MultiScaleDeformableAttention"]

_OWNER = "MultiScaleDeformableAttention"


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021).

    Each query attends, per head, to ``n_points`` locations on each of ``n_levels`` feature maps: locations are a
    reference point plus offsets predicted from the query, the weights a softmax over the ``n_levels * n_points``
    locations of the head, also predicted from the query.

    Args:
        d_model: channels ``C`` of queries, inputs and output (``M * D``).
        n_levels: ``L`` feature levels.
        n_heads: ``M``; ``d_model`` must be divisible by it.
        n_points: ``P`` sampling points per head and level.
        backend: ``None`` (automatic), ``"reference"`` (official algorithm) or ``"fast"``; see
            :func:`deformattn.functional.multi_scale_deformable_attention`.

    Shapes: see :meth:`forward`.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, *,
                 backend: str | None = None):
        super().__init__()
        check_int(d_model, "d_model", _OWNER, minimum=1)
        check_int(n_levels, "n_levels", _OWNER, minimum=1)
        check_int(n_heads, "n_heads", _OWNER, minimum=1)
        check_int(n_points, "n_points", _OWNER, minimum=1)
        if d_model % n_heads != 0:
            raise ValueError(f"{_OWNER}: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        check_backend_name(_OWNER, MSDA_OP, backend)
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: zero offset weights, offset biases on a ring of ``n_heads`` directions
        (point ``i`` at distance ``i + 1``, L-inf normalised), uniform attention (zero weights and biases),
        Xavier-uniform projections with zero biases."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # M, 2
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)  # M, L, P, 2
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, backend={self.backend!r}")

    def _check(self, query, reference_points, input_flatten, shapes, input_padding_mask) -> None:
        for name, t, layout in (("query", query, "(N, Len_q, C)"), ("reference_points", reference_points,
                                                                     "(N, Len_q, L, 2 or 4)"),
                                ("input_flatten", input_flatten, "(N, Len_in, C)")):
            if not isinstance(t, Tensor):
                raise TypeError(f"{_OWNER}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != len(layout.split(",")):
                raise ValueError(f"{_OWNER}: {name} must have shape {layout}, got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{_OWNER}: {name} must be a floating-point tensor, got dtype {t.dtype}")
        N, Lq, C = query.shape
        if C != self.d_model:
            raise ValueError(f"{_OWNER}: query must have d_model = {self.d_model} channels (dim 2), got shape "
                             f"{tuple(query.shape)}")
        if input_flatten.shape[0] != N or input_flatten.shape[2] != self.d_model:
            raise ValueError(f"{_OWNER}: input_flatten must have shape (N, Len_in, C) = ({N}, Len_in, {self.d_model})"
                             f", got {tuple(input_flatten.shape)}")
        dtype = self.value_proj.weight.dtype
        for name, t in (("query", query), ("input_flatten", input_flatten)):
            if t.dtype != dtype and not torch.is_autocast_enabled(t.device.type):
                raise TypeError(f"{_OWNER}: {name} has dtype {t.dtype} but the module's parameters are {dtype} "
                                f"(convert one of them with .to(), or run under torch.autocast)")
        if not is_tracing():
            total = sum(int(h) * int(w) for h, w in shapes.tolist())
            if total != input_flatten.shape[1]:
                raise ValueError(f"{_OWNER}: input_spatial_shapes {shapes.tolist()} cover sum(H * W) = {total} keys "
                                 f"but input_flatten has Len_in = {input_flatten.shape[1]} (shape "
                                 f"{tuple(input_flatten.shape)})")
        rp = tuple(reference_points.shape)
        if rp[:3] != (N, Lq, self.n_levels) or rp[3] not in (2, 4):
            raise ValueError(f"{_OWNER}: reference_points must have shape (N, Len_q, n_levels, 2 or 4) = ({N}, {Lq}, "
                             f"{self.n_levels}, 2 or 4), got {rp}")
        if shapes.shape[0] != self.n_levels:
            raise ValueError(f"{_OWNER}: input_spatial_shapes must have n_levels = {self.n_levels} rows, got shape "
                             f"{tuple(shapes.shape)}")
        if input_padding_mask is not None:
            if not isinstance(input_padding_mask, Tensor) or input_padding_mask.dtype != torch.bool:
                got = input_padding_mask.dtype if isinstance(input_padding_mask, Tensor) else \
                    type(input_padding_mask).__name__
                raise TypeError(f"{_OWNER}: input_padding_mask must be a bool tensor, got {got}")
            if tuple(input_padding_mask.shape) != tuple(input_flatten.shape[:2]):
                raise ValueError(f"{_OWNER}: input_padding_mask must have shape (N, Len_in) = "
                                 f"{tuple(input_flatten.shape[:2])}, got {tuple(input_padding_mask.shape)}")

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor | None = None,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Official signature and semantics.

        Args:
            query (Tensor[N, Len_q, C]): queries (with their position embedding added, as in Deformable DETR).
            reference_points (Tensor[N, Len_q, L, 2] or Tensor[N, Len_q, L, 4]): points ``(x, y)`` in ``[0, 1]``
                (offsets are divided by each level's ``(W, H)``), or boxes ``(cx, cy, w, h)`` (offsets are scaled
                by ``0.5 * (w, h) / n_points``). Outside ``[0, 1]``, sampling reads zeros.
            input_flatten (Tensor[N, Len_in, C]): the levels' features, flattened level by level (row-major);
                ``Len_in = S = sum H_l * W_l``.
            input_spatial_shapes (Tensor[L, 2]): ``(H_l, W_l)``, int64.
            input_level_start_index (Tensor[L], optional): start of each level in ``input_flatten``; checked.
            input_padding_mask (Tensor[N, Len_in], bool, optional): True at padded keys (their values read 0).

        Returns:
            Tensor[N, Len_q, C]
        """
        shapes = as_spatial_shapes(input_spatial_shapes, query.device if isinstance(query, Tensor) else None,
                                   _OWNER)
        self._check(query, reference_points, input_flatten, shapes, input_padding_mask)
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)  # N, S, M, D
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P)
        weights = F.softmax(weights, -1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1)  # L, 2 as (W, H)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        level_start = input_level_start_index if (input_level_start_index is not None and not is_tracing()) else None
        out = multi_scale_deformable_attention(value, shapes, locations, weights, level_start_index=level_start,
                                               backend=self.backend)
        # the core returns float32 for low-precision inputs; the projection runs in the value's dtype (or autocast's)
        return self.output_proj(out.to(value.dtype))
