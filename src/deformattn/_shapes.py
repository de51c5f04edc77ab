"""Size arithmetic that works on plain ints (eager) and on symbolic sizes (``torch.export`` with a dynamic height
and width, ``torch.compile(dynamic=True)``).

Under ``torch.export`` a dynamic size is a ``torch.SymInt``: arithmetic on it is recorded, but a Python branch on
it (``if pad:``, ``max(a, b)``, a dict lookup keyed by it) either fixes the size or fails. The size-dependent code
of the layers therefore

* computes with :func:`sym_max` / :func:`ceil_div` (no branch), and
* takes its general branch when :func:`is_symbolic` says a size is symbolic (e.g. pad by a possibly-zero amount,
  build a mask even where none may be needed, skip size-keyed caches), while eager mode keeps its shortcuts.

Both branches compute the same values, so the exported graph holds the one code path eager mode runs at every size.

Tensors derived from sizes only (neighborhood-attention tile indices, window masks, reference grids) are the same
for every block of a stage. Inside a :class:`shared_sizes` scope (one per stage forward, see
``models.dat.TransformerStage``) :func:`shared` computes each of them once, keyed by the sizes (a symbolic size by
its expression), and hands the same tensor to every block: an exported graph holds one copy of that arithmetic per
stage instead of one per block (fewer nodes to capture and translate), and eager mode skips the repeats. Outside a
scope, and while Dynamo compiles (``torch.compile``, whose graph deduplicates by itself), :func:`shared` just calls
the function.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

import torch

__all__ = ["is_symbolic", "is_tracing", "sym_max", "sym_min", "ceil_div", "shared_sizes", "shared"]

_T = TypeVar("_T")
_SCOPES = threading.local()  # .stack: one dict per open shared_sizes scope, innermost last


def is_tracing() -> bool:
    """True while a graph is being captured (TorchScript tracing, ONNX export, ``torch.export`` / ``compile``)."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def is_symbolic(*sizes: Any) -> bool:
    """True when any of ``sizes`` is a symbolic ``torch.SymInt`` / ``SymFloat`` (a dynamic size being traced)."""
    return any(isinstance(s, (torch.SymInt, torch.SymFloat)) for s in sizes)


def sym_max(a: Any, b: Any) -> Any:
    """``max(a, b)`` without a branch on symbolic sizes (plain ``max`` for ints)."""
    return torch.sym_max(a, b) if is_symbolic(a, b) else max(a, b)


def sym_min(a: Any, b: Any) -> Any:
    """``min(a, b)`` without a branch on symbolic sizes (plain ``min`` for ints)."""
    return torch.sym_min(a, b) if is_symbolic(a, b) else min(a, b)


def ceil_div(a: Any, b: int) -> Any:
    """``ceil(a / b)`` for a non-negative size ``a`` and a positive int ``b``, in integer arithmetic.

    Written ``(a + b - 1) // b``, not ``-(-a // b)``: exporters may translate a symbolic ``//`` to a division that
    truncates, which is the floor only for non-negative operands.
    """
    return (a + b - 1) // b


class shared_sizes:
    """Context manager: within it, :func:`shared` computes each key once (the cache is dropped on exit).

    Scopes nest (each has its own cache) and are per thread. Dynamo does not trace into it: callers open it only
    when ``torch.compiler.is_dynamo_compiling()`` is False.
    """

    def __enter__(self) -> "shared_sizes":
        stack = getattr(_SCOPES, "stack", None)
        if stack is None:
            stack = _SCOPES.stack = []
        stack.append({})
        return self

    def __exit__(self, *exc: Any) -> None:
        _SCOPES.stack.pop()


def _cache_key(part: Any) -> Any:
    """A hashable key part: a symbolic size by its expression (``SymInt`` is not hashable), anything else as is."""
    if isinstance(part, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return type(part).__name__, str(part)
    return part


def shared(key: tuple, compute: Callable[[], _T]) -> _T:
    """``compute()``, computed once per ``key`` within the innermost :class:`shared_sizes` scope.

    ``key`` names everything the result depends on (a name, sizes, device, dtype); ``compute`` must depend on
    nothing else and must not read parameters (the result is reused by every block). Without an open scope, or
    while Dynamo compiles, ``compute()`` is called every time.
    """
    if torch.compiler.is_dynamo_compiling():
        return compute()
    stack = getattr(_SCOPES, "stack", None)
    if not stack:
        return compute()
    cache = stack[-1]
    k = tuple(_cache_key(p) for p in key)
    if k not in cache:
        cache[k] = compute()
    return cache[k]
