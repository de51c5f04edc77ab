"""Size arithmetic that works on plain ints (eager) and on symbolic sizes (``torch.export`` with a dynamic height
and width, ``torch.compile(dynamic=True)``).

Under ``torch.export`` a dynamic size is a ``torch.SymInt``: arithmetic on it is recorded, but a Python branch on
it (``if pad:``, ``max(a, b)``, a dict lookup keyed by it) either fixes the size or fails. The size-dependent code
of the layers therefore

* computes with :func:`sym_max` / :func:`ceil_div` (no branch), and
* takes its general branch when :func:`is_symbolic` says a size is symbolic (e.g. pad by a possibly-zero amount,
  build a mask even where none may be needed, skip size-keyed caches), while eager mode keeps its shortcuts.

Both branches compute the same values, so the exported graph holds the one code path eager mode runs at every size.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["is_symbolic", "sym_max", "sym_min", "ceil_div"]


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
