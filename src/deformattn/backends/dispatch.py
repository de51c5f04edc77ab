"""One dispatcher for every op of the package (NATTEN's ``choose_backend``, xformers' dispatch).

An *op* (``"deformable_attention"``, ``"neighborhood_attention"``, later ``"multi_scale_deformable_attention"``)
has a registry of backends, in order of preference. Each backend is a function of tensors and answers
``can_run(problem)`` for a :class:`Problem` (device, dtype, sizes, grad mode, options): ``None`` when it can, else
the reason it cannot. :func:`select_backend` then

1. runs the backend named by the caller (``backend=`` argument), raising ``ValueError`` if the name is unknown for
   the op or the backend cannot run the problem (with its reason);
2. else the one named by ``$DEFORMATTN_BACKEND``, when the op has a backend of that name (a name that no op knows
   is a ``ValueError``; a name other ops know is ignored for this one);
3. else the first registered backend that can run the problem. A problem with ``plain_ops=True`` (the deformable
   layer's ``sampler="gather"``: plain differentiable ops, for export tracing) skips backends that are not
   ``plain_ops`` in this automatic choice only; asked for by name they still run.

Every choice logs one debug line (logger ``deformattn.backends``) saying which backend and why.

The dispatcher imports nothing from the package: ops register their backends from their own files
(:mod:`deformattn.backends` for deformable attention, :mod:`deformattn.layers.neighborhood_attention`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor

from .._shapes import concrete

__all__ = [
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

ENV_VAR = "DEFORMATTN_BACKEND"
log = logging.getLogger("deformattn.backends")


@dataclass(frozen=True)
class Problem:
    """What a backend may look at to decide whether it can run a call.

    Attributes:
        device, dtype: of the inputs.
        sizes: named sizes in the package's letters (``B``, ``nH``, ``Nq``, ``Ns``, ``H``, ``W``, ``k`` ...).
        requires_grad: autograd will differentiate the call.
        plain_ops: the caller asks for plain differentiable ops (export tracing); see the module docstring.
        options: op-specific settings (e.g. the deformable layer's ``sampler``).
    """

    device: torch.device
    dtype: torch.dtype
    sizes: Mapping[str, int] = field(default_factory=dict)
    requires_grad: bool = False
    plain_ops: bool = False
    options: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, *tensors: Tensor | None, sizes: Mapping[str, int] | None = None, plain_ops: bool = False,
           **options: object) -> "Problem":
        """The problem of ``tensors`` (the first gives device and dtype; grad mode from all of them)."""
        ts = [t for t in tensors if t is not None]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in ts)
        # a backend choice does not change the values: under torch.jit.trace it may use the example's sizes
        plain = {name: concrete(size) for name, size in (sizes or {}).items()}
        return cls(ts[0].device, ts[0].dtype, plain, grad, plain_ops, options)


@dataclass(frozen=True)
class Backend:
    """A registered implementation of an op: ``fn`` (tensors in, tensors out) and its ``can_run``."""

    op: str
    name: str
    fn: Callable
    can_run: Callable[[Problem], str | None]
    plain_ops: bool = False

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


_REGISTRY: dict[str, dict[str, Backend]] = {}


def _debug(msg: str, *args: object) -> None:
    # no logging while torch.compile traces the call (a Logger call is a graph break there)
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        log.debug(msg, *args)


def _always(problem: Problem) -> str | None:
    return None


def register_backend(
    op: str,
    name: str,
    fn: Callable,
    can_run: Callable[[Problem], str | None] | None = None,
    *,
    plain_ops: bool = False,
) -> Backend:
    """Register ``fn`` as backend ``name`` of ``op`` (registration order is the automatic preference order).

    Registering a name again replaces it in place (module reloads)."""
    if not isinstance(op, str) or not op or not isinstance(name, str) or not name:
        raise ValueError(f"register_backend: op and name must be non-empty strings, got {op!r}, {name!r}")
    backend = Backend(op, name, fn, can_run or _always, plain_ops)
    _REGISTRY.setdefault(op, {})[name] = backend
    return backend


def registered_ops() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def backend_names(op: str) -> tuple[str, ...]:
    """Names of ``op``'s backends, in preference order."""
    return tuple(_REGISTRY.get(op, {}))


def get_backend(op: str, name: str) -> Backend:
    """Backend ``name`` of ``op`` (``ValueError`` naming the known ones if there is none)."""
    if name not in _REGISTRY.get(op, {}):
        raise ValueError(f"{op}: backend must be one of {backend_names(op)}, got {name!r}")
    return _REGISTRY[op][name]


def check_backend_name(owner: str, op: str, backend: str | None) -> str | None:
    """Validate a ``backend`` argument (``None`` or a name registered for ``op``) when it is given."""
    if backend is not None and backend not in _REGISTRY.get(op, {}):
        raise ValueError(f"{owner}: backend must be None or one of {backend_names(op)}, got {backend!r}")
    return backend


def _known_anywhere(name: str) -> bool:
    return any(name in backends for backends in _REGISTRY.values())


def select_backend(op: str, problem: Problem, requested: str | None = None, *, owner: str | None = None) -> Backend:
    """The backend of ``op`` that runs ``problem``: the requested one, else ``$DEFORMATTN_BACKEND``'s, else the
    first that can (see the module docstring). ``owner`` prefixes error messages (default: the op)."""
    owner = owner or op
    backends = _REGISTRY.get(op, {})
    if not backends:
        raise ValueError(f"{owner}: no backend is registered for op {op!r}")
    source, name = "backend", requested
    if name is None:
        env = os.environ.get(ENV_VAR) or None
        if env is not None:
            if env in backends:
                source, name = f"${ENV_VAR}", env
            elif not _known_anywhere(env):
                raise ValueError(f"{owner}: ${ENV_VAR} must be one of {backend_names(op)}, got {env!r}")
    if name is not None:
        if name not in backends:
            raise ValueError(f"{owner}: {source} must be one of {backend_names(op)}, got {name!r}")
        backend = backends[name]
        reason = backend.can_run(problem)
        if reason is not None:
            raise ValueError(f"{owner}: backend {name!r} (from {source}) cannot run this input: {reason}")
        _debug("%s: backend %r, requested by %s", op, name, source)
        return backend
    skipped = []
    for backend in backends.values():
        reason = backend.can_run(problem)
        if reason is None and problem.plain_ops and not backend.plain_ops:
            reason = "not plain ops, and the caller asks for plain ops (export)"
        if reason is None:
            why = "; ".join(skipped) if skipped else "first in preference order"
            _debug("%s: backend %r (%s)", op, backend.name, why)
            return backend
        skipped.append(f"{backend.name!r} skipped: {reason}")
    raise ValueError(f"{owner}: no backend can run this input: {'; '.join(skipped)}")
