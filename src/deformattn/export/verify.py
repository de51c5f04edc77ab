"""Verification of an exported file: the input shapes it is run at and the comparison with the PyTorch model."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from .errors import _OWNER, ExportVerificationError, _first_line

__all__ = ["other_sizes", "spatial_step", "trace_size", "check_shapes", "verify", "flatten"]


def spatial_step(model: nn.Module) -> int:
    """A natural size step of the model (its total stride), used for the minimum and the second checked size."""
    min_size = getattr(model, "min_input_size", None)
    if callable(min_size):
        return int(min_size())
    return int(getattr(model, "stride", 1))


def trace_size(H: int, W: int, step: int, min_steps: int = 16) -> tuple[int, int]:
    """The example size a dynamic height and width are traced at: odd, non-square and at least ``min_steps``
    total strides, so that no size derived from it (stage maps, window and tile counts) is 1 or equal between the
    axes.

    An exporter may specialise a size that is 0 or 1 at the example: ``torch.export`` turns a branch a library
    takes on a size (a view or a broadcast deciding whether a dimension is 1) into a guard that holds for the
    example. At an export size like 224 the last stage of DAT v1 has one 7x7 window, so a trace there would fix the
    size; traced here, the graph holds the general code. ``torch.export`` traces on fake tensors (the size costs
    nothing: 16 steps, >= 2 tiles of up to 12 per axis in the deepest map); ``torch.jit.trace`` runs the model,
    so it takes as few as the model allows (:func:`~.trace.trace_steps`: 8 with shifted windows, 6 otherwise),
    at the smallest such size rather than the export size, and reports any size it fixed itself.
    """
    base = min_steps * max(1, step)
    return max(H, base) + 3, max(W, base) + max(1, step) + 5


def flatten(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flatten(o)]
    raise TypeError(f"{_OWNER}: the model returned a {type(out).__name__}; expected tensors")


def other_sizes(H: int, W: int, step: int, low: int) -> list[tuple[int, int]]:
    """Three sizes besides ``H x W`` that a dynamic export is checked at: odd and near-square, non-square and
    larger, and smaller (down to ``low``); none a multiple of ``step`` unless ``low`` forces it.

    For ``224 x 224`` and step 32: ``241 x 241``, ``258 x 294``, ``207 x 227``.
    """
    step = max(1, step)
    odd = (H + step // 2 + 1) | 1, (W + step // 2 + 1) | 1
    wide = H + step + 2, W + 2 * step + 6
    small = max(low, H - step // 2 - 1), W + 3
    return [odd, wide, small]


def check_shapes(model: nn.Module, shape: torch.Size, dynamic: bool | str, dynamic_spatial: bool
                  ) -> list[tuple]:
    """Input shapes the exported file is run at: the export shape; with ``dynamic`` batches 1 and B + 1; with a
    dynamic height and width the three :func:`other_sizes` (batches 1, B and 1)."""
    B, C, H, W = shape
    shapes = [(B, C, H, W)]
    if dynamic:
        shapes += [(1, C, H, W), (B + 1, C, H, W)]
    if dynamic_spatial:
        step = spatial_step(model)
        for b, (h, w) in zip((1, B, 1), other_sizes(H, W, step, max(2, step))):
            shapes.append((b, C, h, w))
    return shapes


def verify(
    reference: Callable[[Tensor], Any],
    run: Callable[[Tensor], list[Tensor]],
    shapes: list[tuple],
    gen: torch.Generator,
    dtype: torch.dtype,
    atol: float,
    rtol: float,
    fmt: str,
    file_dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Run the exported file (``run``) and ``reference`` on one random batch per shape; raise
    :class:`ExportVerificationError` listing every shape whose max abs difference is above
    ``atol + rtol * max|reference|``. The file gets the batch in ``file_dtype`` (default ``dtype``: the same values;
    a half-precision file gets them rounded), the reference in ``dtype``.

    Returns:
        one ``{"shape", "max_abs_diff", "tolerance"}`` per shape.
    """
    checks, failures = [], []
    for shape in shapes:
        x = torch.randn(*shape, generator=gen, dtype=dtype)
        with torch.no_grad():
            ref = flatten(reference(x))
        label = "x".join(str(s) for s in shape)
        try:
            got = run(x if file_dtype in (None, dtype) else x.to(file_dtype))
        except Exception as exc:  # noqa: BLE001 - reported with every other failed check below
            failures.append(f"{label}: the exported {fmt} file failed to run ({_first_line(exc)})")
            continue
        if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
            failures.append(f"{label}: output shapes {[tuple(g.shape) for g in got]} != PyTorch's "
                            f"{[tuple(r.shape) for r in ref]}")
            continue
        diff = max(float((g.to(r.dtype) - r).abs().max()) if r.numel() else 0.0 for g, r in zip(got, ref))
        scale = max(float(r.abs().max()) if r.numel() else 0.0 for r in ref)
        tolerance = atol + rtol * scale
        checks.append({"shape": list(shape), "max_abs_diff": diff, "tolerance": tolerance})
        if not diff <= tolerance:  # NaN fails too
            failures.append(f"{label}: max abs diff {diff:.3e} > tolerance {tolerance:.3e} "
                            f"(atol {atol:g} + rtol {rtol:g} * max|output| {scale:.3g})")
    if failures:
        raise ExportVerificationError(
            f"{_OWNER}: the exported {fmt} file does not match the PyTorch model (nothing was written):\n  "
            + "\n  ".join(failures)
        )
    return checks
