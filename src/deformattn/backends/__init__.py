"""Backends of the package's attention ops, chosen by one dispatcher (:mod:`.dispatch`).

Deformable attention (op ``"deformable_attention"``, registered here; :class:`~deformattn.DeformableAttention2d`
computes the projections, offsets, sampled keys and output projection and hands a backend tensors only):

* ``"fast"``: fused scaled-dot-product attention over blocks of query rows, with the table bias gathered directly
  from the table (no displacement tensor) and memory bounded by the block size. Preferred.
* ``"reference"``: the official algorithm (einsum + ``grid_sample`` of the table), the ground truth; plain ops
  (``plain_ops=True``), so it is the automatic choice under ``sampler="gather"`` (export tracing).

Neighborhood attention (op ``"neighborhood_attention"``) registers its ``"fast"`` (tiled) and ``"reference"``
(gathered) backends from :mod:`deformattn.layers.neighborhood_attention`. Window attention has one path.

Multi-scale deformable attention (op ``"multi_scale_deformable_attention"``) has its ``"fast"``
(:mod:`.msda_fast`: corner gather + ``embedding_bag``, hand-written backward) and ``"reference"``
(:mod:`.msda_reference`: the official ``grid_sample`` algorithm) here; :mod:`deformattn.ops.msda` registers them
beside its functional core.

``$DEFORMATTN_BACKEND`` names the backend for every op that has one of that name (e.g. ``reference`` runs a whole
model on the reference paths); an explicit ``backend=`` argument wins over it.
"""
from __future__ import annotations

from . import fast, reference
from .dispatch import (
    ENV_VAR,
    Backend,
    Problem,
    backend_names,
    check_backend_name,
    get_backend,
    register_backend,
    registered_ops,
    select_backend,
)

__all__ = [
    "DEFORMABLE_OP",
    "ENV_VAR",
    "Backend",
    "Problem",
    "backend_names",
    "check_backend_name",
    "get_backend",
    "register_backend",
    "registered_ops",
    "select_backend",
]

DEFORMABLE_OP = "deformable_attention"


def _floating(problem: Problem) -> str | None:
    if not problem.dtype.is_floating_point:
        return f"needs floating-point inputs, got {problem.dtype}"
    return None


register_backend(DEFORMABLE_OP, "fast", fast.forward, _floating)
register_backend(DEFORMABLE_OP, "reference", reference.forward, _floating, plain_ops=True)
