"""The reference backend: the official algorithm, step by step (einsum + ``grid_sample`` for the keys and for the
bias table). Plain, float64-testable, and the ground truth the fast backend is tested against."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from .. import functional as DF

if TYPE_CHECKING:  # pragma: no cover
    from ..attention import DeformableAttention2d


def position_bias(m: "DeformableAttention2d", H: int, W: int, pos: Tensor) -> Tensor | None:
    """The additive attention bias of the module's ``pos_bias`` kind: ``Tensor[B or 1, nH, H*W, Ns]`` or None."""
    kind = m.pos_bias
    if kind == "table":
        q_grid = DF.query_grid(H, W, version=m.version, device=pos.device, dtype=pos.dtype)
        return DF.table_bias(m.rpe_table, q_grid, pos, m.offset_groups, m.sampler)
    if kind == "log_cpb":
        q_grid = DF.query_grid(H, W, version=m.version, device=pos.device, dtype=pos.dtype)
        return DF.log_cpb_bias(m.rpe_table, q_grid, pos, m.offset_groups)
    if kind == "fixed":
        Ns = pos.shape[1] * pos.shape[2]
        return m.rpe_table.reshape(1, m.num_heads, H * W, Ns)
    return None  # "dwc" acts on the output, "none" has no bias


def forward(m: "DeformableAttention2d", x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, C, H, W = x.shape
    nH, hc = m.num_heads, m.head_dim
    q = m.proj_q(x)  # B, C, H, W
    pos, reference = m.sampling_positions(q)  # BG, Hk, Wk, 2 ; Hk, Wk, 2
    x_sampled = m.sample_kv_input(x, pos)  # B, C, Ns
    Ns = x_sampled.shape[-1]
    x_sampled = x_sampled.reshape(B, C, 1, Ns)
    k = m.proj_k(x_sampled).reshape(B, nH, hc, Ns)
    v = m.proj_v(x_sampled).reshape(B, nH, hc, Ns)
    bias = position_bias(m, H, W, pos)
    out = DF.attention_core(
        q.reshape(B, nH, hc, H * W), k, v, bias, scale=m.scale, attn_drop=m.attn_drop, training=m.training
    )  # B, nH, hc, H*W
    out = out.reshape(B, C, H, W)
    if m.pos_bias == "dwc":
        out = out + m.rpe_table(q)
    y = F.dropout(m.proj_out(out), p=m.proj_drop, training=m.training)
    return y, pos, reference
