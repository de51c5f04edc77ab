"""``export_model``: write an ONNX or TorchScript file atomically, load it back, and check it against PyTorch.

The data path, top-down:

1. :func:`export_model` validates the arguments, switches the deformable layers to the requested sampler
   (:func:`set_sampler`, default ``"gather"``: no ``GridSample`` node, plain ops only) and puts the model in eval mode.
2. The file is produced in a temporary file next to ``output``:

   * **ONNX** - :func:`_export_program` captures the model with ``torch.export.export(strict=False)``; then
     ``torch.onnx.export(program, dynamo=True)`` (the exporter torch >= 2.9 recommends; the TorchScript-based one is
     deprecated, and it records every size computed in Python as a constant without saying so) translates it at
     ``opset`` (default 18, at least 16). With ``dynamic=True`` the batch, height and width are dynamic: the
     model's size code is shape-polymorphic (:mod:`deformattn._shapes`), so one trace at a generic size
     (:func:`_trace_size`) holds the code of every size. A model whose code fixes the size (``pos_bias="fixed"``)
     keeps its height and width, and :attr:`ExportResult.spatial_note` says why. ``dynamic="batch"`` asks for a
     dynamic batch only.
   * **TorchScript** - ``torch.jit.trace`` (see :func:`_torchscript_bytes` for why tracing, not scripting).

3. The temporary file is loaded back (onnxruntime, CPU execution provider / ``torch.jit.load``) and run on fresh
   random batches: the export shape, and with ``dynamic=True`` batches of 1 and ``batch_size + 1`` (and, when the
   height and width are dynamic, the three :func:`other_sizes`: odd, non-square, smaller). The outputs are compared
   with the PyTorch model as the caller gave it (its own sampler, its default backend); a difference above
   ``atol + rtol * max|reference|`` raises :class:`ExportVerificationError`. ``progress`` reports the steps
   (capture, translate, optimize, verify) with elapsed times.
4. Only a verified file replaces ``output`` (``os.replace``): a failure at any step leaves no partial file and
   keeps a previous ``output`` intact.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import atomic_path, check_float, check_int, optional_import, to_2tuple
from ..attention import DeformableAttention2d
from ..functional import SAMPLERS

__all__ = [
    "FORMATS",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "ExportError",
    "ExportVerificationError",
    "ExportResult",
    "set_sampler",
    "export_model",
    "onnx_op_counts",
]

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 18  # the opset torch 2.14's ONNX exporter targets natively (others go through a version converter)
MIN_OPSET = 16  # GridSample (the default sampler's node) exists from opset 16
_OWNER = "export_model"


class ExportError(RuntimeError):
    """The model could not be exported (the message says which step failed and why)."""


class ExportVerificationError(ExportError):
    """The exported file runs, but its outputs differ from the PyTorch model's above the tolerance."""


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
            f"input [batch {batch}, {C} channels, size {spatial}]; sampler: {self.sampler or 'as built'}"
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
    sampler: str | None = "gather",
    atol: float = 1e-4,
    rtol: float = 1e-4,
    seed: int = 0,
    verbose: bool = False,
    progress: bool | Callable[[str], None] = False,
) -> ExportResult:
    """Export ``model`` (``Tensor[B, C, H, W] -> Tensor``) to ``output``, then load the file back and verify it.

    Args:
        model: a DAT model, a :class:`~deformattn.DeformableAttention2d`, or any module taking one image batch. On
            the CPU. Its training flag and samplers are restored afterwards.
        fmt: ``"onnx"`` or ``"torchscript"``.
        img_size: input ``H, W`` (int or pair); default: the model's ``pretrained_cfg["input_size"]``.
        dynamic: ONNX: dynamic batch, height and width (any size >= the model's minimum; see
            :attr:`ExportResult.dynamic_spatial` and ``spatial_note``); ``"batch"``: a dynamic batch only.
            TorchScript: the trace is checked at other batch sizes too (its height and width are always those of
            the trace: sizes computed in Python become constants).
        output: file to write (parent folders are created).
        batch_size: batch of the example input (>= 2, so that the exporter does not take batch 1 as a constant).
        in_chans: input channels; default ``model.in_chans`` (DAT) or ``model.dim`` (DeformableAttention2d).
        opset: ONNX opset, >= 16.
        sampler: set on every DeformableAttention2d for the export (``"gather"``: no GridSample node; ``None``: keep
            the model's). Verification compares with the model as given, so it also checks the samplers agree.
        atol, rtol: verification passes when ``max|exported - pytorch| <= atol + rtol * max|pytorch|``.
        seed: seed of the random example and verification batches.
        verbose: show the exporters' own messages.
        progress: report the steps (capture, translate, optimize, verify) with elapsed times: True prints them to stderr,
            a callable receives each line.

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
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"{_OWNER}: sampler must be None or one of {SAMPLERS}, got {sampler!r}")
    batch_size = check_int(batch_size, "batch_size", _OWNER, minimum=2)
    opset = check_int(opset, "opset", _OWNER, minimum=MIN_OPSET)
    atol = check_float(atol, "atol", _OWNER, minimum=0.0)
    rtol = check_float(rtol, "rtol", _OWNER, minimum=0.0)
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
    timings: dict[str, float] = {}
    try:
        with atomic_path(path) as tmp:
            t0 = time.perf_counter()
            if fmt == "onnx":
                data, info = _onnx_bytes(model, x, dynamic, opset, verbose, sampler, log, timings)
            else:
                if log is not None:
                    log(f"capture: torch.jit.trace at {'x'.join(str(s) for s in x.shape)}")
                data, info = _torchscript_bytes(model, x), _torchscript_info(dynamic)
                timings["capture"] = time.perf_counter() - t0
            _write_bytes(tmp, data)
            export_seconds = time.perf_counter() - t0
            _restore_samplers(model, previous)  # verify against the model as the caller gave it
            previous = {}
            t0 = time.perf_counter()
            run = _onnx_runner(ort, tmp) if fmt == "onnx" else _torchscript_runner(tmp)
            shapes = _check_shapes(model, x.shape, dynamic, info["dynamic_spatial"])
            if log is not None:
                what = "onnxruntime (CPU)" if fmt == "onnx" else "torch.jit.load"
                log(f"verify: {what} vs PyTorch at {', '.join('x'.join(map(str, s)) for s in shapes)}")
            checks = _verify(model, run, shapes, gen, dtype, atol, rtol, fmt)
            verify_seconds = time.perf_counter() - t0
            if log is not None:
                worst = max(c["max_abs_diff"] / max(c["tolerance"], 1e-30) for c in checks)
                log(f"verified: largest difference {worst:.2g} of the tolerance")
    finally:
        _restore_samplers(model, previous)
        model.train(was_training)
    return ExportResult(
        path=str(path), format=fmt, input_shape=tuple(x.shape), sampler=sampler, checks=checks,
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


# ---------------------------------------------------------------------------------------------------------------
# file writing
# ---------------------------------------------------------------------------------------------------------------
def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Hide the exporters' progress prints (``[torch.onnx] ...``) unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


# ---------------------------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------------------------
def _spatial_step(model: nn.Module) -> int:
    """A natural size step of the model (its total stride), used for the minimum and the second checked size."""
    min_size = getattr(model, "min_input_size", None)
    if callable(min_size):
        return int(min_size())
    return int(getattr(model, "stride", 1))


def _trace_size(H: int, W: int, step: int) -> tuple[int, int]:
    """The example size a dynamic height and width are traced at: odd, non-square and large enough that no
    size derived from it (stage maps, window and tile counts) is 1 or equal between the axes.

    ``torch.export`` specialises a size that is 0 or 1 at the example, and turns a branch a library takes on a
    size (a view or a broadcast deciding whether a dimension is 1) into a guard that holds for the example. At an
    export size like 224 the last stage of DAT v1 has one 7x7 window, so a trace there would fix the size; traced
    here, the graph holds the general code. It costs nothing: the trace runs on fake tensors.
    """
    base = 16 * max(1, step)  # the deepest map of a DAT is >= 16: >= 2 windows / tiles of up to 12 per axis
    return max(H, base) + 3, max(W, base) + max(1, step) + 5


def _export_program(
    model: nn.Module, x: Tensor, dynamic: bool | str, log: Callable[[str], None] | None = None
) -> tuple[Any, dict[str, Any]]:
    """``torch.export`` program of ``model`` at ``x`` and what is dynamic.

    ``dynamic=True`` asks for a dynamic batch, height and width (``Dim.AUTO`` with the model's minimum size): the
    model's size-dependent code is shape-polymorphic (``deformattn._shapes``), so the program is traced once at a
    generic example size (:func:`_trace_size`) and holds the general code. Guards that ``torch.export`` adds inside
    PyTorch's own ops (whether a view or a broadcast meets a dimension of 1) become runtime assertions of the
    program (``prefer_deferred_runtime_asserts_over_guards``); the ONNX graph does not carry them and its
    operators handle those cases themselves, which the verification at other sizes checks. A model whose code
    fixes the size (``pos_bias="fixed"``) keeps its height and width: ``spatial_note`` says so.
    ``dynamic="batch"`` asks for a dynamic batch only.
    """
    from torch.export import Dim, export

    B, C, H, W = x.shape
    if not dynamic:
        return export(model, (x,), strict=False), dict(
            dynamic_batch=False, dynamic_spatial=False, spatial_note="dynamic=False")
    batch = Dim("batch", min=1)
    low = max(2, _spatial_step(model))
    reason = ""
    if dynamic == "batch":
        reason = "dynamic='batch'"
    elif min(H, W) >= low:
        Ht, Wt = _trace_size(H, W, _spatial_step(model))
        xt = torch.randn(B, C, Ht, Wt, dtype=x.dtype)
        if log is not None:
            log(f"capture: torch.export with a dynamic batch, height and width (traced at {B}x{C}x{Ht}x{Wt})")
        shapes: tuple[dict[int, Any]] = ({0: batch, 2: Dim.AUTO(min=low), 3: Dim.AUTO(min=low)},)
        try:
            ep = export(model, (xt,), dynamic_shapes=shapes, strict=False,
                        prefer_deferred_runtime_asserts_over_guards=True)
        except Exception as exc:  # noqa: BLE001 - any failure of the spatial attempt falls back to a fixed size
            reason = f"torch.export could not make height and width dynamic ({_first_line(exc)})"
        else:
            ranges = _input_ranges(ep)
            if isinstance(ranges[2], tuple) and isinstance(ranges[3], tuple):
                return ep, dict(dynamic_batch=True, dynamic_spatial=True,
                                spatial_note=f"height and width >= {low}")
            reason = "the model's code fixes the height / width (e.g. pos_bias='fixed')"
    else:
        reason = f"img_size below {low}"
    if log is not None:
        log(f"capture: torch.export with a dynamic batch at {H}x{W} ({reason})")
    try:
        ep = export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:
        raise ExportError(f"{_OWNER}: torch.export failed with a dynamic batch: {_first_line(exc)}") from exc
    return ep, dict(dynamic_batch=True, dynamic_spatial=False, spatial_note=f"fixed: {reason}")


def _input_ranges(ep: Any) -> list[Any]:
    """Per dimension of the first input: an int (static) or ``(low, high)`` (dynamic; ``high`` may be ``inf``)."""
    placeholder = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name not in
                       ep.graph_signature.inputs_to_parameters and n.name not in ep.graph_signature.inputs_to_buffers
                       and n.name not in ep.graph_signature.inputs_to_lifted_tensor_constants)
    out: list[Any] = []
    for size in placeholder.meta["val"].shape:
        if isinstance(size, int):
            out.append(size)
            continue
        vr = ep.range_constraints.get(size.node.expr)
        out.append((_to_int(vr.lower) if vr is not None else 0, _to_int(vr.upper) if vr is not None else float("inf")))
    return out


def _to_int(value: Any) -> int | float:
    """A range bound as an int; ``inf`` for sympy's infinities (``int_oo`` passes ``is_finite`` but not ``int``)."""
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return float("inf")


def _onnx_bytes(
    model: nn.Module, x: Tensor, dynamic: bool | str, opset: int, verbose: bool, sampler: str | None,
    log: Callable[[str], None] | None = None, timings: dict[str, float] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    timings = {} if timings is None else timings
    with _quiet(verbose), warnings.catch_warnings():
        if not verbose:
            # side effects on size-keyed caches (window-attention masks) while tracing: harmless, the file is checked
            warnings.filterwarnings("ignore", message=".*side effects happened", category=UserWarning)
            # ... which torch.export undoes afterwards (and says so)
            warnings.filterwarnings("ignore", message=".*was assigned during export", category=UserWarning)
        t0 = time.perf_counter()
        try:
            ep, info = _export_program(model, x, dynamic, log)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"{_OWNER}: torch.export failed: {_first_line(exc)}") from exc
        timings["capture"] = time.perf_counter() - t0
        if log is not None:
            log(f"translate: torch.onnx.export(dynamo=True), opset {opset}")
        t0 = time.perf_counter()
        try:
            program = torch.onnx.export(ep, dynamo=True, opset_version=opset, input_names=["input"],
                                        optimize=False, verbose=verbose)
        except Exception as exc:
            raise ExportError(f"{_OWNER}: torch.onnx.export failed: {_first_line(exc)}") from exc
        timings["translate"] = time.perf_counter() - t0
        if log is not None:
            log(f"optimize: deduplicate, fold constants, prune ({_ir_node_count(program.model)} nodes)")
        t0 = time.perf_counter()
        try:
            _clean_onnx(program.model)
        except Exception as exc:
            raise ExportError(f"{_OWNER}: cleaning the ONNX graph failed: {_first_line(exc)}") from exc
        timings["optimize"] = time.perf_counter() - t0
    proto = program.model_proto
    _name_input_dims(proto, {0: "batch", 2: "height", 3: "width"})
    counts = onnx_op_counts(proto)
    if sampler == "gather" and counts.get("GridSample"):
        raise ExportError(
            f"{_OWNER}: sampler='gather' was set but the graph has {counts['GridSample']} GridSample node(s): a "
            "DeformableAttention2d built with an explicit backend='fast' still samples its bias table with "
            "grid_sample; build the model with backend=None (or 'reference')"
        )
    for key, value in {
        "deformattn.sampler": sampler or "as built",
        "deformattn.input_shape": "x".join(str(s) for s in x.shape),
        "deformattn.dynamic_batch": str(info["dynamic_batch"]),
        "deformattn.spatial": ("dynamic: " if info["dynamic_spatial"] else "") + info["spatial_note"],
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if proto.ByteSize() >= 2**31:
        raise ExportError(f"{_OWNER}: the ONNX model is over protobuf's 2 GB limit ({proto.ByteSize()} bytes)")
    info.update(method="torch.export + torch.onnx.export(dynamo=True)", opset=opset, op_counts=dict(counts))
    return proto.SerializeToString(), info


def _clean_onnx(model: Any) -> None:
    """Shrink the translated graph in place: the passes of ``torch.onnx.export(optimize=True)`` that pay off here.

    The translation repeats the size arithmetic of every block (``Shape``, ``Gather``, ``Range``, comparisons):
    common-subexpression elimination first halves the graph, then constants are folded (with ONNX shape
    inference, cheap on the deduplicated graph) and dead nodes pruned. ``optimize=True`` runs the folding and the
    onnxscript pattern rewriter on the graph as translated, which took minutes on a DAT (the rewriter alone is
    seconds for a few percent of the nodes); onnxruntime fuses patterns itself when it builds a session.
    """
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants_ir

    passes.InlinePass()(model)
    passes.CommonSubexpressionEliminationPass()(model)
    passes.RemoveUnusedNodesPass()(model)
    fold_constants_ir(model, onnx_shape_inference=True)
    passes.RemoveUnusedNodesPass()(model)
    passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    passes.DeduplicateInitializersPass()(model)
    passes.CommonSubexpressionEliminationPass()(model)
    passes.RemoveUnusedNodesPass()(model)
    passes.RemoveUnusedFunctionsPass()(model)
    passes.RemoveUnusedOpsetsPass()(model)
    passes.OutputFixPass()(model)
    passes.NameFixPass()(model)


def _ir_node_count(model: Any) -> int:
    import onnx_ir as ir

    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def _name_input_dims(proto: Any, names: dict[int, str]) -> None:
    """Rename the exporter's symbols of the input's dynamic dimensions (``s77``) to ``batch`` / ``height`` /
    ``width``, everywhere they occur (graph inputs, outputs, value infos, also inside expressions like ``2*s77``)."""
    import re

    dims = proto.graph.input[0].type.tensor_type.shape.dim
    mapping = {}
    for axis, name in names.items():
        if axis < len(dims) and dims[axis].dim_param and re.fullmatch(r"\w+", dims[axis].dim_param):
            mapping[dims[axis].dim_param] = name
    taken = {d.dim_param for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
             for d in vi.type.tensor_type.shape.dim if d.dim_param}
    if not mapping or any(name in taken for name in mapping.values()):
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in mapping) + r")\b")
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: mapping[m.group(1)], d.dim_param)


def onnx_op_counts(model: Any) -> Counter:
    """Node count per op type of an ONNX model (a ``ModelProto`` or a path), functions and subgraphs included."""
    onnx = optional_import("onnx", "export", "Reading an ONNX model")
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    counts: Counter = Counter()

    def visit(nodes: Any) -> None:
        for node in nodes:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)

    visit(proto.graph.node)
    for function in proto.functions:
        visit(function.node)
    return counts


def _onnx_runner(ort: Any, path: Path) -> Callable[[Tensor], list[Tensor]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: [torch.from_numpy(a) for a in session.run(None, {name: x.numpy()})]


# ---------------------------------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------------------------------
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
            return _flatten(module(x))

    return run


# ---------------------------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------------------------
def _flatten(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
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


def _check_shapes(model: nn.Module, shape: torch.Size, dynamic: bool | str, dynamic_spatial: bool
                  ) -> list[tuple]:
    """Input shapes the exported file is run at: the export shape; with ``dynamic`` batches 1 and B + 1; with a
    dynamic height and width the three :func:`other_sizes` (batches 1, B and 1)."""
    B, C, H, W = shape
    shapes = [(B, C, H, W)]
    if dynamic:
        shapes += [(1, C, H, W), (B + 1, C, H, W)]
    if dynamic_spatial:
        step = _spatial_step(model)
        for b, (h, w) in zip((1, B, 1), other_sizes(H, W, step, max(2, step))):
            shapes.append((b, C, h, w))
    return shapes


def _verify(
    model: nn.Module,
    run: Callable[[Tensor], list[Tensor]],
    shapes: list[tuple],
    gen: torch.Generator,
    dtype: torch.dtype,
    atol: float,
    rtol: float,
    fmt: str,
) -> list[dict[str, Any]]:
    checks, failures = [], []
    for shape in shapes:
        x = torch.randn(*shape, generator=gen, dtype=dtype)
        with torch.no_grad():
            ref = _flatten(model(x))
        label = "x".join(str(s) for s in shape)
        try:
            got = run(x)
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
