"""``torch.jit.trace`` capture, shared by the TorchScript file and the TorchScript-based ONNX exporter.

While ``torch.jit.trace`` records, ``x.shape[i]`` is a 0-dim tensor and the library's size arithmetic
(:mod:`deformattn._shapes`) is recorded with it, so one trace at a generic size holds the code of every size. Where
code turns a traced size into a Python value (a branch, ``int()``, ``range``), the trace fixes that size and the
tracer says so with a ``TracerWarning``: :func:`traced` collects those places, and :func:`capture` then treats the
trace as valid at its own height and width only.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.nn as nn
from torch import Tensor

from .errors import _OWNER, ExportError, _first_line
from .verify import spatial_step, trace_size

__all__: list[str] = []

_JIT_DEPRECATED = r".*torch\.jit\.\w+` is deprecated"
_T = TypeVar("_T")

# what a trace run gets: the example input and whether its height and width are to be dynamic
TraceRun = Callable[[Tensor, bool], _T]


def traced(run: Callable[[], _T], what: str) -> tuple[_T, list[str]]:
    """``run()`` (something that traces the model: ``torch.jit.trace``, or the TorchScript-based ONNX exporter,
    which traces it itself) without autograd, and the places (``file:line``) where the trace fixed a size.

    Warnings other than the tracer's and ``torch.jit``'s deprecation notice are passed on.
    """
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=FutureWarning)
            result = run()
    except (ValueError, TypeError) as exc:  # the model's own argument checks
        raise ExportError(f"{_OWNER}: {what} failed: {_first_line(exc)}") from exc
    except Exception as exc:
        raise ExportError(
            f"{_OWNER}: {what} failed: {_first_line(exc)}. Custom autograd functions (the fast backend's with "
            "sampler=None) cannot be traced: export with sampler='gather' (the default)"
        ) from exc
    fixed: list[str] = []
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            place = f"{Path(w.filename).name}:{w.lineno}"
            if place not in fixed:
                fixed.append(place)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result, fixed


def jit_trace(model: nn.Module) -> TraceRun[torch.jit.ScriptModule]:
    """A :data:`TraceRun` of ``torch.jit.trace(model, x)``."""
    return lambda x, dynamic_spatial: torch.jit.trace(model, (x,), check_trace=False)


def trace_steps(model: nn.Module) -> int:
    """Total strides the generic example of a ``torch.jit.trace`` spans (:func:`~.verify.trace_size`): 8 where
    window attention runs (every stage map then holds two windows of 7, as a shifted-window block needs), else 6
    (every stage map of a DAT is >= 6 and the two axes differ); the smaller the example, the cheaper the trace."""
    from ..layers.window_attention import WindowAttention
    from ..models.dat import DAT

    if isinstance(model, DAT) and not any(isinstance(m, WindowAttention) for m in model.modules()):
        return 6
    return 8


def capture(
    model: nn.Module, x: Tensor, dynamic: bool | str, run: TraceRun[_T], what: str,
    log: Callable[[str], None] | None = None, fallback: bool = True,
) -> tuple[_T | None, Tensor, dict[str, Any]]:
    """Trace ``model`` (``run``) for an export at ``x``'s shape.

    ``dynamic=True``: traced once at a generic size (:func:`~.verify.trace_size`); if that trace fixed no size, its
    batch, height and width are dynamic. If it fixed one (or the model refuses that size): with ``fallback`` the
    model is traced again at ``x`` (batch dynamic, height and width fixed, ``spatial_note`` says why), without it
    the result is ``None`` (the caller uses another exporter). ``dynamic="batch"`` / ``False``: traced at ``x``.

    Returns:
        what ``run`` returned (or None), the example it was traced with, and ``dynamic_batch``,
        ``dynamic_spatial``, ``spatial_note``.
    """
    B, C, H, W = x.shape
    step = spatial_step(model)
    low = max(2, step)
    if dynamic is True and min(H, W) >= low:
        # the smallest generic size (the trace runs the model): not grown to the export size
        Ht, Wt = trace_size(low, low, step, min_steps=trace_steps(model))
        xt = torch.randn(B, C, Ht, Wt, dtype=x.dtype)
        if log is not None:
            log(f"capture: {what} at {B}x{C}x{Ht}x{Wt} (sizes recorded: dynamic batch, height and width)")
        try:
            result, fixed = traced(lambda: run(xt, True), what)
        except ExportError as exc:  # the model refuses other sizes (pos_bias="fixed" checks its size)
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            result, reason = None, f"the model does not run at {Ht}x{Wt}: {_first_line(cause)}"
        else:
            if not fixed:
                return result, xt, dict(dynamic_batch=True, dynamic_spatial=True,
                                        spatial_note=f"height and width >= {low}")
            where = ", ".join(fixed[:4]) + (f" and {len(fixed) - 4} more" if len(fixed) > 4 else "")
            reason = f"the model's code turns the traced size into Python values at {where}"
        if log is not None:
            log(f"capture: the trace fixes the size: {reason}")
        if not fallback:
            return None, xt, dict(dynamic_batch=True, dynamic_spatial=False, spatial_note=f"fixed: {reason}")
    elif dynamic is True:
        reason = f"img_size below {low}"
    else:
        reason = "dynamic='batch'" if dynamic else "dynamic=False"
    if log is not None:
        log(f"capture: {what} at {'x'.join(map(str, x.shape))}")
    result, _ = traced(lambda: run(x, False), what)
    return result, x, dict(dynamic_batch=bool(dynamic), dynamic_spatial=False,
                           spatial_note=f"fixed: {reason}" if dynamic else reason)
