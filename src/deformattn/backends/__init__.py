"""Backends of :class:`~deformattn.DeformableAttention2d`, chosen by one dispatcher.

* ``"reference"``: the official algorithm (einsum + ``grid_sample``), the ground truth.
* ``"fast"``: fused scaled-dot-product attention over query chunks, with the table bias gathered directly from the
  table (no displacement tensor, no ``grid_sample`` over the table) and memory bounded by the chunk size.

``backend=None`` picks ``"fast"`` (it supports every configuration), except with ``sampler="gather"``, which asks
for plain, exportable operations and so runs ``"reference"``. ``DEFORMATTN_BACKEND`` (environment variable) overrides
the automatic choice, e.g. to run a whole model on the reference path.

:class:`~deformattn.layers.NeighborhoodAttention2d` (the backbones' other two-path token mixer) follows the same
rule through :func:`resolve_backend`: its own ``backend`` attribute, else ``$DEFORMATTN_BACKEND``, else ``"fast"``.
Window attention has one path (the official matmul + softmax).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from torch import Tensor

from . import fast, reference

if TYPE_CHECKING:  # pragma: no cover
    from ..attention import DeformableAttention2d

BackendFn = Callable[["DeformableAttention2d", Tensor], "tuple[Tensor, Tensor, Tensor]"]

BACKENDS: dict[str, BackendFn] = {"reference": reference.forward, "fast": fast.forward}


BACKEND_NAMES = tuple(BACKENDS)


def resolve_backend(owner: str, requested: str | None) -> str:
    """``requested``, else ``$DEFORMATTN_BACKEND``, else ``"fast"``; an unknown name is a ``ValueError``."""
    name = requested or os.environ.get("DEFORMATTN_BACKEND") or "fast"
    if name not in BACKEND_NAMES:
        source = "backend" if requested else "$DEFORMATTN_BACKEND"
        raise ValueError(f"{owner}: {source} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def check_backend_arg(owner: str, backend: str | None) -> str | None:
    """Validate a constructor's ``backend`` argument (``None`` or one of :data:`BACKEND_NAMES`)."""
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"{owner}: backend must be None or one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def select_backend(m: "DeformableAttention2d", x: Tensor) -> BackendFn:
    """The backend the module asked for, else ``$DEFORMATTN_BACKEND``, else ``"fast"``."""
    if m.sampler == "gather" and m.backend is None:
        return BACKENDS["reference"]  # the exportable path: plain ops only
    return BACKENDS[resolve_backend("DeformableAttention2d", m.backend)]
