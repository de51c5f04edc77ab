"""``export_model``: write an ONNX or TorchScript file atomically, load it back, and check it against PyTorch.

The data path, top-down:

1. :func:`export_model` (this file) validates the arguments, switches the deformable layers to the requested sampler
   (:func:`set_sampler`, default ``"gather"``: no ``GridSample`` node, plain ops only) and puts the model in eval mode;
   ``precision="fp16"``/``"bf16"`` exports a converted copy.
2. The file is produced in a temporary file next to ``output``:

   * **ONNX** (:mod:`.onnx`), two exporters (``exporter=``). ``"torchscript"`` (the default):
     ``torch.onnx.export(dynamo=False)``, which traces the model with ``torch.jit.trace`` semantics (:mod:`.trace`):
     every ``x.shape[i]`` is a tensor, so the model's shape-polymorphic size code (:mod:`deformattn._shapes`) is
     recorded, and the trace is translated; where the
     trace would fix a dynamic size (the tracer warns: code turned a traced size into a Python value, e.g.
     ``pos_bias="fixed"``) the default falls back to ``"dynamo"``: ``_export_program`` captures the model with
     ``torch.export.export(strict=False)`` and symbolic sizes, then ``torch.onnx.export(program, dynamo=True)``
     translates it (the exporter torch >= 2.9 recommends; the TorchScript-based one is deprecated but shipped).
     Either way one capture at a generic size (``verify.trace_size``) holds the code of every size, at ``opset``
     (default 18, at least 16), and the graph is cleaned (common subexpressions, constants, dead nodes). A model
     whose code fixes the size keeps its height and width, and :attr:`ExportResult.spatial_note` says why.
     ``dynamic="batch"`` asks for a dynamic batch only.
   * **TorchScript** (:mod:`.torchscript`) - the same ``torch.jit.trace`` (``_torchscript_bytes`` says why
     tracing, not scripting), dynamic like the ONNX file where the trace fixed no size.

3. (:mod:`.verify`) The temporary file is loaded back (onnxruntime, CPU execution provider / ``torch.jit.load``) and run on fresh
   random batches: the export shape, and with ``dynamic=True`` batches of 1 and ``batch_size + 1`` (and, when the
   height and width are dynamic, the three :func:`other_sizes`: odd, non-square, smaller). The outputs are compared
   with the PyTorch model as the caller gave it (its own sampler, its default backend, its dtype); a difference above
   ``atol + rtol * max|reference|`` raises :class:`ExportVerificationError`. ``progress`` reports the steps
   (capture, translate, optimize, verify) with elapsed times.
4. Only a verified file replaces ``output`` (``os.replace``): a failure at any step leaves no partial file and
   keeps a previous ``output`` intact.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import atomic_path, check_float, check_int, optional_import, to_2tuple
from ..attention import DeformableAttention2d
from ..functional import SAMPLERS
from .errors import _OWNER, ExportError, ExportVerificationError
from .onnx import DEFAULT_OPSET, EXPORTERS, MIN_OPSET, _onnx_bytes, _onnx_runner, onnx_op_counts
from .torchscript import _torchscript_bytes, _torchscript_runner
from .verify import check_shapes, verify

__all__ = [
    "FORMATS",
    "PRECISIONS",
    "DEFAULT_TOLERANCES",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "EXPORTERS",
    "ExportError",
    "ExportVerificationError",
    "ExportResult",
    "set_sampler",
    "export_model",
    "onnx_op_counts",
]

FORMATS = ("onnx", "torchscript")
PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# default (atol, rtol) of the verification per precision: a half-precision file is compared with the float32
# model, so the tolerance covers its rounding (measured on dat_nano: fp16 ~1e-3, bf16 ~1e-2 of max|logit|)
DEFAULT_TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (1e-3, 1e-2), "bf16": (1e-2, 5e-2)}


# ---------------------------------------------------------------------------------------------------------------
# sampler switch
# ---------------------------------------------------------------------------------------------------------------
def set_sampler(model: nn.Module, sampler: str) -> dict[str, str]:
    """Set ``sampler`` (``"grid_sample"`` or ``"gather"``) on every :class:`~deformattn.DeformableAttention2d` in
    ``model`` (the model itself included).

    ``"gather"`` samples keys and bias tables with gather and arithmetic only (no ``GridSample`` in an exported
    graph) and, for layers built with ``backend=None``, runs the reference backend's plain ops; the outputs equal
    the ``grid_sample`` path's.

    Returns:
        ``{module name: previous sampler}``, to restore with ``set_sampler``-like code or :func:`_restore_samplers`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"set_sampler: sampler must be one of {SAMPLERS}, got {sampler!r}")
    previous: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, DeformableAttention2d):
            previous[name] = module.sampler
            module.sampler = sampler
    return previous


def _restore_samplers(model: nn.Module, previous: dict[str, str]) -> None:
    modules = dict(model.named_modules())
    for name, sampler in previous.items():
        modules[name].sampler = sampler


# ---------------------------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how it was verified.

    ``checks`` has one entry per verification run: ``{"shape": [B, C, H, W], "max_abs_diff": float,
    "tolerance": float}``; :attr:`max_abs_diff` is the largest of them.
    """

    path: str
    format: str
    method: str
    input_shape: tuple[int, int, int, int]
    dynamic_batch: bool
    dynamic_spatial: bool
    spatial_note: str
    sampler: str | None
    opset: int | None
    precision: str = "fp32"
    checks: list[dict[str, Any]] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0
    export_seconds: float = 0.0
    verify_seconds: float = 0.0
    capture_seconds: float = 0.0
    translate_seconds: float = 0.0
    optimize_seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max((c["max_abs_diff"] for c in self.checks), default=float("nan"))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["max_abs_diff"] = self.max_abs_diff
        return out

    def summary(self) -> str:
        """A few human-readable lines (what the CLI prints)."""
        B, C, H, W = self.input_shape
        batch = "dynamic" if self.dynamic_batch else str(B)
        spatial = f"dynamic ({self.spatial_note})" if self.dynamic_spatial else f"{H}x{W} ({self.spatial_note})"
        lines = [
            f"wrote {self.path} ({self.file_bytes / 2**20:.1f} MiB, {self.format}: {self.method})",
            f"input [batch {batch}, {C} channels, size {spatial}]; {self.precision}; "
            f"sampler: {self.sampler or 'as built'}"
            + (f"; opset {self.opset}" if self.opset else ""),
        ]
        if self.format == "onnx":
            lines.append(f"GridSample nodes: {self.op_counts.get('GridSample', 0)}; "
                         f"{sum(self.op_counts.values())} nodes in all")
        for c in self.checks:
            shape = "x".join(str(s) for s in c["shape"])
            lines.append(f"verified on a random {shape} batch: max abs diff {c['max_abs_diff']:.2e} "
                         f"(tolerance {c['tolerance']:.1e})")
        lines.append(f"export {self.export_seconds:.1f} s, verification {self.verify_seconds:.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# export_model
# ---------------------------------------------------------------------------------------------------------------
def export_model(
    model: nn.Module,
    fmt: str = "onnx",
    img_size: int | tuple[int, int] | None = None,
    dynamic: bool | str = False,
    output: str | os.PathLike | None = None,
    *,
    batch_size: int = 2,
    in_chans: int | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str | None = None,
    sampler: str | None = "gather",
    precision: str = "fp32",
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    verbose: bool = False,
    progress: bool | Callable[[str], None] = False,
    reference: Callable[[Tensor], Any] | None = None,
) -> ExportResult:
    """Export ``model`` (``Tensor[B, C, H, W] -> Tensor``) to ``output``, then load the file back and verify it.

    Args:
        model: a DAT model, a :class:`~deformattn.DeformableAttention2d`, or any module taking one image batch. On
            the CPU. Its training flag and samplers are restored afterwards.
        fmt: ``"onnx"`` or ``"torchscript"``.
        img_size: input ``H, W`` (int or pair); default: the model's ``pretrained_cfg["input_size"]``.
        dynamic: dynamic batch, height and width (any size >= the model's minimum; see
            :attr:`ExportResult.dynamic_spatial` and ``spatial_note``), ONNX and TorchScript alike; ``"batch"``: a
            dynamic batch only.
        output: file to write (parent folders are created).
        batch_size: batch of the example input (>= 2, so that the exporter does not take batch 1 as a constant).
        in_chans: input channels; default ``model.in_chans`` (DAT) or ``model.dim`` (DeformableAttention2d).
        opset: ONNX opset, >= 16.
        exporter: ONNX: ``"torchscript"`` (``torch.jit.trace`` + ``torch.onnx.export(dynamo=False)``: seconds),
            ``"dynamo"`` (``torch.export`` + ``torch.onnx.export(dynamo=True)``: minutes for a DAT with a dynamic
            height and width) or None: ``"torchscript"``, and ``"dynamo"`` when the trace would fix a dynamic size
            (the model's code turns it into a Python value; ``pos_bias="fixed"``).
        sampler: set on every DeformableAttention2d for the export (``"gather"``: no GridSample node; ``None``: keep
            the model's). Verification compares with the model as given, so it also checks the samplers agree.
        precision: ``"fp32"`` (the model's own dtype), ``"fp16"`` or ``"bf16"``: a copy of the model is converted
            to that dtype and exported with an input of that dtype; the file is verified against the model as given
            (float32), with the precision's :data:`DEFAULT_TOLERANCES`. ONNX supports ``"fp32"`` and ``"fp16"``:
            onnxruntime's CPU execution provider has no bfloat16 ``Conv`` kernel, so a bf16 file could not be
            verified (``ValueError``); TorchScript supports all three.
        atol, rtol: verification passes when ``max|exported - pytorch| <= atol + rtol * max|pytorch|``; default:
            ``DEFAULT_TOLERANCES[precision]`` (fp32: 1e-4 and 1e-4).
        seed: seed of the random example and verification batches.
        verbose: show the exporters' own messages.
        progress: report the steps (capture, translate, optimize, verify) with elapsed times: True prints them to stderr,
            a callable receives each line.
        reference: what the file's outputs are compared with (a callable taking the float input batch; default:
            the model as given).

    Returns:
        :class:`ExportResult` (path, what is dynamic, per-check max abs differences, ONNX op counts).

    Raises:
        ValueError / TypeError: bad arguments. ImportError: ONNX without ``pip install 'deformattn[export]'``.
        ExportError: the exporter failed. ExportVerificationError: the file's outputs differ from PyTorch's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OWNER}: model must be a torch.nn.Module, got {type(model).__name__}")
    if fmt not in FORMATS:
        raise ValueError(f"{_OWNER}: fmt must be one of {FORMATS}, got {fmt!r}")
    if output is None:
        raise ValueError(f"{_OWNER}: output (the file to write) is required")
    if not isinstance(dynamic, bool) and dynamic != "batch":
        raise TypeError(f"{_OWNER}: dynamic must be True, False or 'batch', got {dynamic!r}")
    if exporter is not None and exporter not in EXPORTERS:
        raise ValueError(f"{_OWNER}: exporter must be None or one of {EXPORTERS}, got {exporter!r}")
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"{_OWNER}: sampler must be None or one of {SAMPLERS}, got {sampler!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"{_OWNER}: precision must be one of {PRECISIONS}, got {precision!r}")
    if fmt == "onnx" and precision == "bf16":
        raise ValueError(
            f"{_OWNER}: precision='bf16' is not available for ONNX: onnxruntime's CPU execution provider has no "
            "bfloat16 Conv kernel, so the file could not be loaded and verified; use precision='fp16' (or 'fp32') "
            "for ONNX, or fmt='torchscript' for bfloat16"
        )
    if reference is not None and not callable(reference):
        raise TypeError(f"{_OWNER}: reference must be None or a callable, got {type(reference).__name__}")
    batch_size = check_int(batch_size, "batch_size", _OWNER, minimum=2)
    opset = check_int(opset, "opset", _OWNER, minimum=MIN_OPSET)
    atol = check_float(DEFAULT_TOLERANCES[precision][0] if atol is None else atol, "atol", _OWNER, minimum=0.0)
    rtol = check_float(DEFAULT_TOLERANCES[precision][1] if rtol is None else rtol, "rtol", _OWNER, minimum=0.0)
    seed = check_int(seed, "seed", _OWNER)
    H, W = _input_size(model, img_size)
    C = _input_channels(model, in_chans)
    dtype = _check_cpu_float(model)
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"{_OWNER}: output {str(path)!r} is a directory; give a file name")
    ort = None
    if fmt == "onnx":  # fail before any work when the extra is missing
        optional_import("onnx", "export", "ONNX export")
        optional_import("onnxscript", "export", "ONNX export")
        ort = optional_import("onnxruntime", "export", "Verifying an ONNX export")

    log = _progress_logger(progress)
    was_training = model.training
    model.eval()
    previous = set_sampler(model, sampler) if sampler is not None else {}
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, C, H, W, generator=gen, dtype=dtype)
    file_dtype = dtype if precision == "fp32" else _DTYPES[precision]
    # a lower precision exports a converted copy (same samplers); the model itself stays the reference
    net = model if file_dtype == dtype else copy.deepcopy(model).to(file_dtype)
    timings: dict[str, float] = {}
    try:
        with atomic_path(path) as tmp:
            t0 = time.perf_counter()
            xf = x.to(file_dtype)
            if fmt == "onnx":
                data, info = _onnx_bytes(net, xf, dynamic, opset, verbose, sampler, log, timings, precision,
                                         exporter)
            else:
                data, info = _torchscript_bytes(net, xf, dynamic, log)
                timings["capture"] = time.perf_counter() - t0
            del net
            tmp.write_bytes(data)  # atomic_path syncs and renames it
            export_seconds = time.perf_counter() - t0
            _restore_samplers(model, previous)  # verify against the model as the caller gave it
            previous = {}
            t0 = time.perf_counter()
            run = _onnx_runner(ort, tmp) if fmt == "onnx" else _torchscript_runner(tmp)
            shapes = check_shapes(model, x.shape, dynamic, info["dynamic_spatial"])
            if log is not None:
                what = "onnxruntime (CPU)" if fmt == "onnx" else "torch.jit.load"
                log(f"verify: {what} vs PyTorch at {', '.join('x'.join(map(str, s)) for s in shapes)}")
            checks = verify(model if reference is None else reference, run, shapes, gen, dtype, atol, rtol, fmt,
                            file_dtype)
            verify_seconds = time.perf_counter() - t0
            if log is not None:
                worst = max(c["max_abs_diff"] / max(c["tolerance"], 1e-30) for c in checks)
                log(f"verified: largest difference {worst:.2g} of the tolerance")
    finally:
        _restore_samplers(model, previous)
        model.train(was_training)
    return ExportResult(
        path=str(path), format=fmt, input_shape=tuple(x.shape), sampler=sampler, precision=precision, checks=checks,
        file_bytes=path.stat().st_size, export_seconds=export_seconds, verify_seconds=verify_seconds,
        capture_seconds=timings.get("capture", 0.0), translate_seconds=timings.get("translate", 0.0),
        optimize_seconds=timings.get("optimize", 0.0), **info,
    )


def _progress_logger(progress: bool | Callable[[str], None]) -> Callable[[str], None] | None:
    """``progress``: False (silent), True (lines on stderr) or a callable; each line carries the elapsed time."""
    if progress is False or progress is None:
        return None
    t0 = time.perf_counter()
    sink = progress if callable(progress) else (lambda line: print(line, file=sys.stderr, flush=True))
    return lambda msg: sink(f"[{time.perf_counter() - t0:6.1f} s] {msg}")


# ---------------------------------------------------------------------------------------------------------------
# argument helpers
# ---------------------------------------------------------------------------------------------------------------
def _input_size(model: nn.Module, img_size: Any) -> tuple[int, int]:
    if img_size is None:
        cfg = getattr(model, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(int(s) for s in cfg["input_size"][-2:])  # type: ignore[return-value]
        raise ValueError(f"{_OWNER}: img_size is required for a {type(model).__name__} (no pretrained_cfg)")
    H, W = to_2tuple(img_size, "img_size", _OWNER)
    if min(H, W) < 1:
        raise ValueError(f"{_OWNER}: img_size must be >= 1, got {(H, W)}")
    min_size = getattr(model, "min_input_size", None)
    if callable(min_size) and min(H, W) < min_size():
        raise ValueError(f"{_OWNER}: img_size {(H, W)} is below the model's minimum input size {min_size()}")
    return H, W


def _input_channels(model: nn.Module, in_chans: int | None) -> int:
    if in_chans is not None:
        return check_int(in_chans, "in_chans", _OWNER, minimum=1)
    for attr in ("in_chans", "dim"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"{_OWNER}: in_chans is required for a {type(model).__name__} (no in_chans or dim attribute)")


def _check_cpu_float(model: nn.Module) -> torch.dtype:
    dtype = torch.float32
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "cpu":
            raise ValueError(f"{_OWNER}: the model must be on the CPU (found a tensor on {t.device}); call model.cpu()")
        if t.is_floating_point():
            dtype = t.dtype
    return dtype
