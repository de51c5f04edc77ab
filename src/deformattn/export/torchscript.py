"""TorchScript: ``torch.jit.trace`` of the model, and the ``torch.jit.load`` runner the verification uses."""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from .trace import _JIT_DEPRECATED, capture, jit_trace
from .verify import flatten

__all__: list[str] = []


def _torchscript_bytes(
    model: nn.Module, x: Tensor, dynamic: bool | str, log: Callable[[str], None] | None = None
) -> tuple[bytes, dict[str, Any]]:
    """``torch.jit.trace`` of the model (:func:`.trace.capture`), serialised, and what is dynamic.

    Tracing, not scripting: the library is written in ordinary Python (``X | None`` annotations, f-string error
    messages, size-keyed caches, custom autograd functions), which the TorchScript compiler rejects, while tracing
    records the tensor operations of one forward pass, size arithmetic included. With the ``"gather"`` sampler those
    are plain ops (the fast backend's custom autograd function cannot be traced). ``torch.jit`` is deprecated in
    favour of ``torch.export``; its deprecation warnings are silenced because the loaded file is checked anyway.
    """
    module, _, info = capture(model, x, dynamic, jit_trace(model), "torch.jit.trace", log)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=FutureWarning)
        torch.jit.save(module, buffer)
    info.update(method="torch.jit.trace", opset=None, op_counts={})
    return buffer.getvalue(), info


def _torchscript_runner(path: Path) -> Callable[[Tensor], list[Tensor]]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()

    def run(x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return flatten(module(x))

    return run
