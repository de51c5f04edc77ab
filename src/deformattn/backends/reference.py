"""The reference backend: the official algorithm, step by step (einsum + ``grid_sample`` of the bias table).
Plain, float64-testable, and the ground truth the fast backend is tested against."""
from __future__ import annotations

from torch import Tensor

from .. import functional as DF


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
    """Deformable attention over sampled keys.

    Args:
        q (Tensor[B, nH, H*W, hc]): projected queries; k, v (Tensor[B, nH, Ns, hc]): projected sampled keys and
            values; pos (Tensor[B*G, Hk, Wk, 2]): the key positions (normalised (y, x)) the bias is evaluated at.
        bias: the position bias parameters (None: no bias on the logits).
        training: dropout on the attention weights only when True.

    Returns:
        Tensor[B, nH, H*W, hc]
    """
    logits_bias = DF.position_bias(bias, H, W, pos)  # B or 1, nH, H*W, Ns
    out = DF.attention_core(
        q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), logits_bias, scale=scale,
        attn_drop=attn_drop, training=training,
    )  # B, nH, hc, H*W
    return out.transpose(-1, -2)
