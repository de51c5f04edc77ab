"""Size arithmetic that works on plain ints (eager) and on symbolic sizes (``torch.export`` with a dynamic height
and width, ``torch.compile(dynamic=True)``, ``torch.jit.trace``).

Under ``torch.export`` a dynamic size is a ``torch.SymInt``, under ``torch.jit.trace`` (the TorchScript export and
the TorchScript-based ONNX exporter) a 0-dim tensor: arithmetic on it is recorded, but a Python branch on it (``if
pad:``, ``max(a, b)``, a dict lookup keyed by it) either fixes the size (``torch.jit.trace`` says so with a
``TracerWarning``) or fails. The size-dependent code
of the layers therefore

* computes with :func:`sym_max` / :func:`ceil_div` (no branch), and
* takes its general branch when :func:`is_symbolic` says a size is symbolic (e.g. pad by a possibly-zero amount,
  build a mask even where none may be needed, skip size-keyed caches), while eager mode keeps its shortcuts.

Both branches compute the same values, so the exported graph holds the one code path eager mode runs at every size.

Tensors derived from sizes only (neighborhood-attention tile indices, window masks, reference grids) are the same
for every block of a stage. Inside a :class:`shared_sizes` scope (one per stage forward, see
``models.dat.TransformerStage``) :func:`shared` computes each of them once, keyed by the sizes, and hands the same
tensor to every block: an exported graph holds one copy of that arithmetic per stage instead of one per block
(fewer nodes to capture and translate), and eager mode skips the repeats. A symbolic size is keyed by its
expression; a size ``torch.jit.trace`` records (a fresh tensor at every read) by its value at the example, which is
exact because every block of a scope reads the same map (the same function of the input size) and a key names the
parameters that derive its sizes from that map. Outside a scope, and while Dynamo compiles (``torch.compile``,
whose graph deduplicates by itself), :func:`shared` just calls the function.
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, TypeVar

import torch

__all__ = ["is_symbolic", "is_tracing", "concrete", "sym_max", "sym_min", "ceil_div", "shared_sizes", "shared"]

_T = TypeVar("_T")
_SCOPES = threading.local()  # .stack: one dict per open shared_sizes scope, innermost last


def is_tracing() -> bool:
    """True while a graph is being captured (TorchScript tracing, ONNX export, ``torch.export`` / ``compile``)."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def is_symbolic(*sizes: Any) -> bool:
    """True when any of ``sizes`` is a size being traced: a ``torch.SymInt`` / ``SymFloat`` (``torch.export``,
    ``torch.compile``) or a 0-dim tensor (what ``x.shape[i]`` is while ``torch.jit.trace`` records)."""
    return any(isinstance(s, (torch.SymInt, torch.SymFloat, torch.Tensor)) for s in sizes)


def concrete(size: Any) -> Any:
    """The example's value of a size that ``torch.jit.trace`` records (a 0-dim tensor), for a Python decision that
    does not change the computed values (which backend runs) or a size that is the same at every input size (a
    parameter's); anything else unchanged. Reading it this way is
    deliberate, so the tracer's warning (which the export treats as a size fixed by mistake) is not raised."""
    if not isinstance(size, torch.Tensor):
        return size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(size)


def _tensor_extreme(a: Any, b: Any, pick: Callable[[Any, Any], Any], clamp: str) -> Any:
    """``max`` / ``min`` of two sizes of which one or both are traced 0-dim tensors, recorded as tensor ops."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return pick(a, b)
    t, n = (a, b) if isinstance(a, torch.Tensor) else (b, a)
    return t.clamp(**{clamp: n})


def sym_max(a: Any, b: Any) -> Any:
    """``max(a, b)`` without a branch on traced sizes (plain ``max`` for ints)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return _tensor_extreme(a, b, torch.maximum, "min")
    return torch.sym_max(a, b) if is_symbolic(a, b) else max(a, b)


def sym_min(a: Any, b: Any) -> Any:
    """``min(a, b)`` without a branch on traced sizes (plain ``min`` for ints)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return _tensor_extreme(a, b, torch.minimum, "max")
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
    """A hashable key part: a symbolic size by its expression (``SymInt`` is not hashable), a size recorded by
    ``torch.jit.trace`` by its example value (see the module docstring), anything else as is."""
    if isinstance(part, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return type(part).__name__, str(part)
    if isinstance(part, torch.Tensor):
        return "traced", concrete(part)
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
