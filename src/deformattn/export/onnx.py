"""ONNX: ``torch.export`` capture (dynamic batch, height and width), ``torch.onnx.export(dynamo=True)`` translation,
the graph cleanup, and the onnxruntime runner the verification uses."""
from __future__ import annotations

import io
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import optional_import
from .errors import _OWNER, ExportError, _first_line, _quiet
from .trace import capture
from .verify import spatial_step, trace_size

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "EXPORTERS", "onnx_op_counts"]

DEFAULT_OPSET = 18  # the opset torch 2.14's ONNX exporter targets natively (others go through a version converter)
EXPORTERS = ("torchscript", "dynamo")  # torch.onnx.export(dynamo=False) of a trace / torch.export + dynamo=True
MIN_OPSET = 16  # GridSample (the default sampler's node) exists from opset 16


def _export_program(
    model: nn.Module, x: Tensor, dynamic: bool | str, log: Callable[[str], None] | None = None
) -> tuple[Any, dict[str, Any]]:
    """``torch.export`` program of ``model`` at ``x`` and what is dynamic.

    ``dynamic=True`` asks for a dynamic batch, height and width (``Dim.AUTO`` with the model's minimum size): the
    model's size-dependent code is shape-polymorphic (``deformattn._shapes``), so the program is traced once at a
    generic example size (:func:`~.verify.trace_size`) and holds the general code. Guards that ``torch.export`` adds inside
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
    low = max(2, spatial_step(model))
    reason = ""
    if dynamic == "batch":
        reason = "dynamic='batch'"
    elif min(H, W) >= low:
        Ht, Wt = trace_size(H, W, spatial_step(model))
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
    log: Callable[[str], None] | None = None, timings: dict[str, float] | None = None, precision: str = "fp32",
    exporter: str | None = None,
) -> tuple[bytes, dict[str, Any]]:
    timings = {} if timings is None else timings
    with _quiet(verbose), warnings.catch_warnings():
        if not verbose:
            # side effects on size-keyed caches (window-attention masks) while tracing: harmless, the file is checked
            warnings.filterwarnings("ignore", message=".*side effects happened", category=UserWarning)
            # ... which torch.export undoes afterwards (and says so)
            warnings.filterwarnings("ignore", message=".*was assigned during export", category=UserWarning)
        ir_model, info = None, {}
        if exporter == "torchscript":
            ir_model, info = _translate_traced(model, x, dynamic, opset, verbose, log, timings, fallback=True)
        elif exporter is None:
            try:
                ir_model, info = _translate_traced(model, x, dynamic, opset, verbose, log, timings, fallback=False)
                reason = info["spatial_note"].removeprefix("fixed: ")
            except ExportError as exc:  # e.g. a custom autograd function (sampler=None on the fast backend)
                reason = str(exc).removeprefix(f"{_OWNER}: ")
            if ir_model is None and log is not None:
                log(f"capture: falling back to torch.export ({reason})")
        if ir_model is None:
            ir_model, info = _translate_dynamo(model, x, dynamic, opset, verbose, log, timings)
        fold = not info["method"].startswith("torch.jit")
        if log is not None:
            log(f"optimize: deduplicate, {'fold constants, ' if fold else ''}prune ({_ir_node_count(ir_model)} nodes)")
        t0 = time.perf_counter()
        try:
            _clean_onnx(ir_model, fold=fold)
        except Exception as exc:
            raise ExportError(f"{_OWNER}: cleaning the ONNX graph failed: {_first_line(exc)}") from exc
        timings["optimize"] = time.perf_counter() - t0
    import onnx_ir as ir

    proto = ir.serde.serialize_model(ir_model)
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
        "deformattn.precision": precision,
        "deformattn.input_shape": "x".join(str(s) for s in x.shape),
        "deformattn.dynamic_batch": str(info["dynamic_batch"]),
        "deformattn.spatial": ("dynamic: " if info["dynamic_spatial"] else "") + info["spatial_note"],
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if proto.ByteSize() >= 2**31:
        raise ExportError(f"{_OWNER}: the ONNX model is over protobuf's 2 GB limit ({proto.ByteSize()} bytes)")
    info.update(opset=opset, op_counts=dict(counts))
    return proto.SerializeToString(), info


def _translate_traced(
    model: nn.Module, x: Tensor, dynamic: bool | str, opset: int, verbose: bool,
    log: Callable[[str], None] | None, timings: dict[str, float], fallback: bool,
) -> tuple[Any, dict[str, Any]]:
    """The TorchScript-based ``torch.onnx.export(dynamo=False)`` of the model, which traces it (``torch.jit.trace``
    semantics, :func:`.trace.capture`): an ONNX-IR model and what is dynamic, or ``(None, info)`` when the trace
    fixes the size and ``fallback`` is off.

    The exporter is given the module, not a ``torch.jit.trace`` of it: it traces the module itself and keeps that
    forward's outputs, where a traced module would be run once more for them. A forward hook on the module marks
    the end of the trace (the capture / translate split of ``timings``).
    """
    import onnx
    import onnx_ir as ir

    t0 = time.perf_counter()
    marks: list[float] = []
    net = _Forward(model).train(model.training)  # the exporter restores this mode on the whole tree afterwards

    def run(xt: Tensor, dynamic_spatial: bool) -> bytes:
        axes = ({0: "batch"} if dynamic else {}) | ({2: "height", 3: "width"} if dynamic_spatial else {})
        buffer = io.BytesIO()
        marks.clear()
        handle = net.register_forward_hook(lambda *_: _traced_mark(marks, log, opset))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based", category=DeprecationWarning)
                warnings.filterwarnings("ignore", message=".*will be removed", category=DeprecationWarning)
                torch.onnx.export(net, (xt,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
                                  dynamic_axes={"input": axes} if axes else None, verbose=verbose)
        finally:
            handle.remove()
        return buffer.getvalue()

    data, _, info = capture(model, x, dynamic, run, "torch.onnx.export(dynamo=False) tracing the model", log,
                            fallback=fallback)
    if data is None:
        return None, info
    t_traced = marks[-1] if marks else t0
    timings["capture"], timings["translate"] = t_traced - t0, time.perf_counter() - t_traced
    try:
        ir_model = ir.serde.deserialize_model(onnx.load_model_from_string(data))
    except Exception as exc:
        raise ExportError(f"{_OWNER}: reading the exported ONNX graph failed: {_first_line(exc)}") from exc
    info["method"] = "torch.jit.trace + torch.onnx.export(dynamo=False)"
    return ir_model, info


class _Forward(nn.Module):
    """``model(x)``, its other arguments left at their defaults: the TorchScript-based exporter passes every
    defaulted argument of ``forward`` as a traced input (a flag like ``return_sampling`` would become a tensor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return self.model(x)


def _traced_mark(marks: list[float], log: Callable[[str], None] | None, opset: int) -> None:
    """Forward hook of the traced module: the trace is recorded, translation starts."""
    marks.append(time.perf_counter())
    if log is not None:
        log(f"translate: torch.onnx.export(dynamo=False) of the trace, opset {opset}")


def _translate_dynamo(
    model: nn.Module, x: Tensor, dynamic: bool | str, opset: int, verbose: bool,
    log: Callable[[str], None] | None, timings: dict[str, float],
) -> tuple[Any, dict[str, Any]]:
    """``torch.export`` (:func:`_export_program`) + ``torch.onnx.export(dynamo=True)``: an ONNX-IR model and what is
    dynamic."""
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
    info["method"] = "torch.export + torch.onnx.export(dynamo=True)"
    return program.model, info


def _clean_onnx(model: Any, fold: bool = True) -> None:
    """Shrink the translated graph in place: the passes of ``torch.onnx.export(optimize=True)`` that pay off here.

    The translation repeats the size arithmetic of every block (``Shape``, ``Gather``, ``Range``, comparisons):
    common-subexpression elimination first halves the graph, then constants are folded (with ONNX shape
    inference, cheap on the deduplicated graph) and dead nodes pruned. ``optimize=True`` runs the folding and the
    onnxscript pattern rewriter on the graph as translated, which took minutes on a DAT (the rewriter alone is
    seconds for a few percent of the nodes); onnxruntime fuses patterns itself when it builds a session.
    ``fold=False`` skips the folding: the TorchScript-based exporter has folded the constants it can already, and
    onnxscript's folding then costs more than the few percent of nodes it removes (and the second deduplication,
    which then finds nothing).
    """
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants_ir

    passes.InlinePass()(model)
    passes.CommonSubexpressionEliminationPass()(model)
    passes.RemoveUnusedNodesPass()(model)
    if fold:
        fold_constants_ir(model, onnx_shape_inference=True)
        passes.RemoveUnusedNodesPass()(model)
    passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    passes.DeduplicateInitializersPass()(model)
    if fold:  # folded constants can make nodes equal; after the TorchScript-based exporter this finds none
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
