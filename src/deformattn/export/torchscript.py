"""TorchScript: ``torch.jit.trace`` of the model, and the ``torch.jit.load`` runner the verification uses."""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from .errors import _OWNER, ExportError, _first_line
from .verify import flatten

__all__: list[str] = []


def _torchscript_bytes(model: nn.Module, x: Tensor) -> bytes:
    """``torch.jit.trace`` of the model, serialised.

    Tracing, not scripting: the library is written in ordinary Python (``X | None`` annotations, f-string error
    messages, size-keyed caches, custom autograd functions), which the TorchScript compiler rejects, while tracing
    records the tensor operations of one forward pass. With the ``"gather"`` sampler those are plain ops (the fast
    backend's custom autograd function cannot be traced). A trace is valid for the traced height and width: sizes
    computed in Python are recorded as constants (the verification runs it at other batch sizes when ``dynamic``).
    ``torch.jit`` is deprecated in favour of ``torch.export``; its warnings are silenced here because the loaded
    file is checked against the model anyway.
    """
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
            traced = torch.jit.trace(model, (x,), check_trace=False)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
    except Exception as exc:
        raise ExportError(
            f"{_OWNER}: torch.jit.trace failed: {_first_line(exc)}. The fast backend's custom autograd functions "
            "cannot be traced: export with sampler='gather' (the default)"
        ) from exc
    return buffer.getvalue()


def _torchscript_info(dynamic: bool | str) -> dict[str, Any]:
    return dict(method="torch.jit.trace", opset=None, dynamic_batch=bool(dynamic), dynamic_spatial=False,
                spatial_note="fixed: a trace records the traced height and width", op_counts={})


def _torchscript_runner(path: Path) -> Callable[[Tensor], list[Tensor]]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()

    def run(x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return flatten(module(x))

    return run
