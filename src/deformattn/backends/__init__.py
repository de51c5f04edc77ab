"""Backends of :class:`~deformattn.DeformableAttention2d`, chosen by one dispatcher.

* ``"reference"``: the official algorithm (einsum + ``grid_sample``), the ground truth.
* ``"fast"``: fused scaled-dot-product attention over query chunks, with the table bias gathered directly from the
  table (no displacement tensor, no ``grid_sample`` over the table) and memory bounded by the chunk size.

``backend=None`` picks ``"fast"`` (it supports every configuration), except with ``sampler="gather"``, which asks
for plain, exportable operations and so runs ``"reference"``. ``DEFORMATTN_BACKEND`` (environment variable) overrides the automatic choice, e.g. to run a whole
model on the reference path.
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


def select_backend(m: "DeformableAttention2d", x: Tensor) -> BackendFn:
    """The backend the module asked for, else ``$DEFORMATTN_BACKEND``, else ``"fast"``."""
    if m.sampler == "gather" and m.backend is None:
        return BACKENDS["reference"]  # the exportable path: plain ops only
    name = m.backend or os.environ.get("DEFORMATTN_BACKEND") or "fast"
    if name not in BACKENDS:
        raise ValueError(f"DeformableAttention2d: unknown backend {name!r} (expected one of {tuple(BACKENDS)})")
    return BACKENDS[name]
