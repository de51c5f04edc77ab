"""Export to ONNX and TorchScript, verified by running the exported file.

:func:`export_model` writes the file atomically, loads it back (onnxruntime's CPU execution provider for ONNX,
``torch.jit.load`` for TorchScript), runs it on random batches and compares the result with the PyTorch model,
raising :class:`ExportVerificationError` above the tolerance::

    >>> from deformattn.models import create_model
    >>> from deformattn.export import export_model
    >>> model = create_model("dat_nano")
    >>> result = export_model(model, "onnx", img_size=32, dynamic=True, output="dat_nano.onnx")
    >>> result.max_abs_diff < 1e-4
    True

``sampler="gather"`` (the default of :func:`export_model`) switches every
:class:`~deformattn.DeformableAttention2d` to the gather-only bilinear sampler for the export (see
:func:`set_sampler`), so the ONNX graph has no ``GridSample`` node; the model is restored afterwards.

Layout: :mod:`.core` (``export_model``, the result and the sampler switch), :mod:`.trace` (``torch.jit.trace``
capture with the size arithmetic recorded, and the places where a trace fixed a size), :mod:`.onnx` (both ONNX
exporters: the trace through ``torch.onnx.export(dynamo=False)``, or ``torch.export`` through ``dynamo=True``;
cleanup), :mod:`.torchscript` (the trace, saved), :mod:`.verify` (the checked sizes and the comparison),
:mod:`.errors`.

``torch.compile(model, fullgraph=True)`` needs nothing from this package: the models compile without graph
breaks for inference (see the README's Export section).
"""
from __future__ import annotations

from .core import (
    DEFAULT_TOLERANCES,
    EXPORTERS,
    FORMATS,
    PRECISIONS,
    ExportError,
    ExportResult,
    ExportVerificationError,
    export_model,
    onnx_op_counts,
    set_sampler,
)

__all__ = [
    "DEFAULT_TOLERANCES",
    "EXPORTERS",
    "FORMATS",
    "PRECISIONS",
    "ExportError",
    "ExportResult",
    "ExportVerificationError",
    "export_model",
    "onnx_op_counts",
    "set_sampler",
]
