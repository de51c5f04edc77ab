"""Reference path of multi-scale deformable attention: the official algorithm (``ms_deform_attn_core_pytorch`` of
Deformable DETR), one ``grid_sample`` per level over a ``(N*M, D, Lq, P)`` tensor, then the weighted sum over levels
and points. Plain autograd, float64-testable: the ground truth the fast path is tested against.

Differences from the official function (same values where the official one runs): empty levels (``H * W == 0``)
contribute zeros instead of failing inside ``grid_sample``, and ``spatial_shapes`` is read once as Python ints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def msda_reference(value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Official algorithm. ``value`` (Tensor[N, S, M, D]), ``shapes`` [(H_l, W_l)] * L as ints,
    ``sampling_locations`` (Tensor[N, Lq, M, L, P, 2]) in [0, 1] as (x, y), ``attention_weights``
    (Tensor[N, Lq, M, L, P]). Returns Tensor[N, Lq, M*D]."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    value_list = value.split([H * W for H, W in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1], align_corners=False
    sampled = []
    for lid, (H, W) in enumerate(shapes):
        if H * W == 0:  # an empty level reads zeros everywhere
            sampled.append(value.new_zeros(N * M, D, Lq, P))
            continue
        value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(N * M, D, H, W)  # N*M, D, H, W
        grid_l = sampling_grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)  # N*M, Lq, P, 2
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)  # N*M, 1, Lq, L*P
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # N*M, D, Lq
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()  # N, Lq, M*D
