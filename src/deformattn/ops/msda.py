"""Multi-scale deformable attention (Deformable DETR, Zhu et al. ICLR 2021): the functional core and its backend
choice.

Shapes (one-letter vocabulary): ``N`` batch, ``Lq`` queries, ``S`` flattened keys of all levels (``sum H_l * W_l``),
``M`` heads, ``D`` channels per head, ``L`` levels, ``P`` sampling points per head and level.

Coordinate convention (the official one)
----------------------------------------
A sampling location is ``(x, y)`` in ``[0, 1]``, relative to the level's map, with ``align_corners=False``
semantics: ``0`` is the *left edge* of the first pixel and ``1`` the right edge of the last one, so pixel column
``j`` has its centre at ``(j + 0.5) / W``. The location reads ``value`` bilinearly at pixel coordinate
``x * W - 0.5``, and a pixel outside the map reads zero. Worked example on a level with ``W = 4`` columns:
``x = 0.5`` is pixel coordinate ``1.5``, halfway between columns 1 and 2 (``0.5 * v[1] + 0.5 * v[2]``);
``x = 0.125`` is column 0 exactly; ``x = 0`` is ``-0.5``, half of column 0 plus half of the zero padding
(``0.5 * v[0]``); ``x = 1.2`` is ``4.3``, entirely outside: zero. The level's rows in ``value`` start at
``level_start_index[l] = sum_{k < l} H_k * W_k`` and are in row-major order (``y * W + x``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .._shapes import is_tracing
from ..backends.dispatch import Problem, check_backend_name, register_backend, select_backend
from ..backends.msda_fast import msda_fast, msda_gather
from ..backends.msda_reference import msda_reference

__all__ = ["MSDA_OP", "multi_scale_deformable_attention", "check_msda_inputs", "is_tracing"]

MSDA_OP = "multi_scale_deformable_attention"
_OWNER = "multi_scale_deformable_attention"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _shapes_list(spatial_shapes: Tensor) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def _floating(problem: Problem) -> str | None:
    if not problem.dtype.is_floating_point:
        return f"needs floating-point inputs, got {problem.dtype}"
    return None


def _reference(value: Tensor, spatial_shapes: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
    return msda_reference(value, _shapes_list(spatial_shapes), loc, attn)


def _fast(value: Tensor, spatial_shapes: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
    # graph capture: the plain-operation gather form (no GridSample node, dynamic sizes)
    return msda_gather(value, spatial_shapes, loc, attn) if is_tracing() else msda_fast(value, spatial_shapes, loc,
                                                                                          attn)


# registration order is the automatic preference: the fast path first, the official algorithm as the ground truth
register_backend(MSDA_OP, "fast", _fast, _floating)
register_backend(MSDA_OP, "reference", _reference, _floating, plain_ops=True)


def _check_tensor(x: Any, name: str, owner: str, dims: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{owner}: {name} must have shape {layout} ({dims} dims), got {x.dim()} dims with shape "
                         f"{tuple(x.shape)}")


def as_spatial_shapes(spatial_shapes: Any, device: torch.device, owner: str) -> Tensor:
    """``spatial_shapes`` as an int64 Tensor[L, 2] on ``device`` (a sequence of ``(H, W)`` pairs is accepted)."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.is_floating_point() or spatial_shapes.is_complex() or spatial_shapes.dtype == torch.bool:
            raise TypeError(f"{owner}: spatial_shapes must be an integer tensor, got dtype {spatial_shapes.dtype}")
        shapes = spatial_shapes
    elif isinstance(spatial_shapes, Sequence) and all(
        isinstance(p, Sequence) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
        for p in spatial_shapes
    ):
        shapes = torch.tensor([list(p) for p in spatial_shapes], dtype=torch.int64).view(-1, 2)
    else:
        raise TypeError(f"{owner}: spatial_shapes must be a Tensor[L, 2] of ints or a sequence of (H, W) int pairs, "
                        f"got {type(spatial_shapes).__name__}")
    if shapes.dim() != 2 or shapes.shape[1] != 2:
        raise ValueError(f"{owner}: spatial_shapes must have shape (L, 2) (one (H, W) per level), got "
                         f"{tuple(shapes.shape)}")
    return shapes.to(device=device, dtype=torch.int64)


def check_msda_inputs(value: Any, spatial_shapes: Tensor, sampling_locations: Any, attention_weights: Any,
                      level_start_index: Any = None, *, owner: str = _OWNER) -> None:
    """Every shape rule of the core, with errors that name the argument and the shapes received.

    ``spatial_shapes`` must already be a Tensor[L, 2] (see :func:`as_spatial_shapes`). The checks that read
    tensor values (sizes vs ``S``, ``level_start_index``) are skipped while a graph is captured.
    """
    _check_tensor(value, "value", owner, 4, "(N, S, M, D)")
    _check_tensor(sampling_locations, "sampling_locations", owner, 6, "(N, Lq, M, L, P, 2)")
    _check_tensor(attention_weights, "attention_weights", owner, 5, "(N, Lq, M, L, P)")
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise TypeError(f"{owner}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    N, S, M, D = value.shape
    L = spatial_shapes.shape[0]
    loc, attn = tuple(sampling_locations.shape), tuple(attention_weights.shape)
    if loc[-1] != 2:
        raise ValueError(f"{owner}: sampling_locations must end with 2 coordinates (x, y), got shape {loc}")
    if loc[0] != N or loc[2] != M:
        raise ValueError(f"{owner}: sampling_locations (N, Lq, M, L, P, 2) = {loc} must match value (N, S, M, D) = "
                         f"{tuple(value.shape)} in N and M")
    if loc[3] != L:
        raise ValueError(f"{owner}: sampling_locations has {loc[3]} levels (dim 3 of {loc}) but spatial_shapes has "
                         f"{L} (shape {tuple(spatial_shapes.shape)})")
    if attn != loc[:5]:
        raise ValueError(f"{owner}: attention_weights must have shape (N, Lq, M, L, P) = {loc[:5]} (from "
                         f"sampling_locations {loc}), got {attn}")
    if level_start_index is not None:
        _check_tensor(level_start_index, "level_start_index", owner, 1, "(L,)")
        if level_start_index.is_floating_point():
            raise TypeError(f"{owner}: level_start_index must be an integer tensor, got dtype "
                            f"{level_start_index.dtype}")
        if level_start_index.shape[0] != L:
            raise ValueError(f"{owner}: level_start_index must have shape ({L},) (one per level of spatial_shapes), "
                             f"got {tuple(level_start_index.shape)}")
    if is_tracing():
        return
    shapes = _shapes_list(spatial_shapes)
    if any(h < 0 or w < 0 for h, w in shapes):
        raise ValueError(f"{owner}: spatial_shapes must be non-negative, got {shapes}")
    total = sum(h * w for h, w in shapes)
    if total != S:
        raise ValueError(f"{owner}: spatial_shapes {shapes} cover sum(H * W) = {total} keys but value has S = {S} "
                         f"(dim 1 of shape {tuple(value.shape)})")
    if level_start_index is not None:
        expected = [sum(h * w for h, w in shapes[:i]) for i in range(L)]
        got = [int(v) for v in level_start_index.tolist()]
        if got != expected:
            raise ValueError(f"{owner}: level_start_index must be the start of each level in value, {expected} for "
                             f"spatial_shapes {shapes}, got {got}")


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    level_start_index: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention core (``MSDeformAttnFunction`` / ``ms_deform_attn_core_pytorch``).

    ``output[n, q, m*D:(m+1)*D] = sum_{l, p} attention_weights[n, q, m, l, p] *
    bilinear(value_l[n, :, m], sampling_locations[n, q, m, l, p])``, zeros outside each map.

    Args:
        value (Tensor[N, S, M, D]): the projected keys of all levels, flattened level by level (row-major).
        spatial_shapes (Tensor[L, 2]): ``(H_l, W_l)`` per level, integers (a list of pairs is accepted).
        sampling_locations (Tensor[N, Lq, M, L, P, 2]): ``(x, y)`` in ``[0, 1]``, ``align_corners=False``
            (see the module docstring); outside reads zeros.
        attention_weights (Tensor[N, Lq, M, L, P]): usually softmax-normalised over ``(L, P)`` per head.
        level_start_index (Tensor[L], optional): checked against ``spatial_shapes`` when given.
        backend: ``None`` (automatic: ``$DEFORMATTN_BACKEND`` if it names a backend of this op, else the first
            that can run, ``"fast"``), ``"reference"`` or ``"fast"``; chosen by the package's one dispatcher
            (:func:`deformattn.backends.select_backend`, op ``"multi_scale_deformable_attention"``), which logs
            its choice on the ``deformattn.backends`` logger.

    Returns:
        Tensor[N, Lq, M*D]. Differentiable in value, locations and weights. Float16 / bfloat16 inputs are sampled
        in float32 with autocast disabled (as detection code does for this op); the result has the promoted dtype
        of the three inputs.
    """
    if isinstance(value, Tensor):
        shapes = as_spatial_shapes(spatial_shapes, value.device, _OWNER)
    else:
        raise TypeError(f"{_OWNER}: value must be a torch.Tensor, got {type(value).__name__}")
    check_msda_inputs(value, shapes, sampling_locations, attention_weights, level_start_index)
    check_backend_name(_OWNER, MSDA_OP, backend)
    out_dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                    attention_weights.dtype)
    compute = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    problem = Problem.of(value, sampling_locations, attention_weights,
                         sizes=dict(N=N, Lq=Lq, S=S, M=M, D=D, L=L, P=P), tracing=is_tracing())
    fn = select_backend(MSDA_OP, problem, backend, owner=_OWNER)
    with torch.autocast(value.device.type, enabled=False):
        v, loc, attn = value.to(compute), sampling_locations.to(compute), attention_weights.to(compute)
        if S == 0 and not is_tracing():
            # every level empty: zeros, still connected to the inputs (zero gradients)
            out = v.new_zeros(N, Lq, M * D) + 0 * (v.sum() + loc.sum() + attn.sum())
        else:
            out = fn(v, shapes, loc, attn)
    return out.to(out_dtype)
