"""Parameters and FLOPs of a model, per stage, per block kind and per deformable layer (offset network apart).

Counting convention
-------------------
FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts **2 FLOPs per
multiply-add** for the operators it knows: matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm`` - ``einsum``,
``matmul`` and ``linear`` lower to them), convolutions, and fused scaled-dot-product attention (we add the CPU
flash kernel ``_scaled_dot_product_flash_attention_for_cpu``, which torch's table lacks, with torch's own SDPA
formula; and a convolution's backward pass is counted as twice its forward, since torch's formula ignores
``groups`` in the weight gradient and overcounts depthwise convolutions by their channel count). It does **not**
count bilinear sampling (``grid_sample`` of the keys and of the bias table), gathers,
softmax, normalisation, activations, pooling or element-wise additions (the bias of ``addmm`` included). The papers
quote multiply-adds (the "FLOPs" of DAT, DAT++, Swin, PVT are GMACs, from fvcore-style counters that count the
same matrix products and convolutions), so tables here show ``MACs = FLOPs / 2``.

Neighborhood attention is counted on its reference path (each query times its ``k * k`` keys, what NATTEN and the
papers count): the fast path's tiles multiply every query with its tile's whole ``(T + k - 1)^2`` key region and mask
the rest, redundant work that is not the model's cost (:func:`model_counting`).

For one deformable layer these counted terms are exactly the cost model of the DAT paper (Sec. 3.3), in MACs:
``HW*Ns*C`` twice (``q k`` and ``attn v``), ``HW*C^2`` twice (``proj_q``, ``proj_out``), ``Ns*C^2`` twice
(``proj_k``, ``proj_v``) and ``(k^2 + 2) * Ns * C`` for the offset network - see :func:`dmha_macs`.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count

from ..attention import DeformableAttention2d

__all__ = [
    "flop_counter",
    "count_flops",
    "model_counting",
    "dmha_macs",
    "CostReport",
    "model_cost",
    "format_cost_report",
    "block_kind",
]


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Backward of a convolution: the input gradient and the weight gradient each cost what the forward does.

    torch's own formula counts the weight gradient as a dense ``C_out x C_in`` convolution whatever ``groups`` is,
    i.e. ``C`` times too much for a depthwise convolution (ConvFFN, LPU, the offset network); here the weight
    shape ``(C_out, C_in / groups, k, k)`` carries the grouping, as in the forward count.
    """
    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=bool(transposed))
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _custom_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flop
    return mapping


def flop_counter() -> FlopCounterMode:
    """A silent :class:`~torch.utils.flop_counter.FlopCounterMode` that also counts the CPU flash-attention
    kernel (see the module docstring for what is and is not counted)."""
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())


@contextlib.contextmanager
def model_counting(model: nn.Module):
    """Within the block, ``model``'s neighborhood-attention layers run their reference path, whose counted matrix
    products are the layer's own work (see the module docstring); their backends are restored afterwards."""
    from ..layers import NeighborhoodAttention2d

    layers = [m for m in model.modules() if isinstance(m, NeighborhoodAttention2d)]
    saved = [m.backend for m in layers]
    try:
        for m in layers:
            m.backend = "reference"
        yield model
    finally:
        for m, b in zip(layers, saved):
            m.backend = b


def count_flops(model: nn.Module, *inputs: Any) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of ``model(*inputs)`` under ``torch.no_grad()``, per module.

    Returns:
        ``{qualified module name: FLOPs}``: ``""`` is the whole call; a module's count includes its children's.
        Modules with no counted operator are absent.
    """
    with torch.no_grad(), model_counting(model), flop_counter() as counter:
        model(*inputs)
    root = type(model).__name__
    out: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        if key == root:
            name = ""
        elif key.startswith(root + "."):
            name = key[len(root) + 1:]
        else:  # pragma: no cover - FlopCounterMode names every module under the root
            continue
        out[name] = int(sum(ops.values()))
    out[""] = int(counter.get_total_flops())
    return out


def dmha_macs(H: int, W: int, C: int, Ns: int, offset_kernel_size: int) -> dict[str, int]:
    """The DAT paper's cost of one deformable attention layer, in multiply-adds (PAPER_FACTS: Sec. 3.3).

    Returns:
        ``{"attention": 2 HW Ns C, "projections": 2 HW C^2 + 2 Ns C^2, "offset": (k^2 + 2) Ns C, "total": sum}``.
    """
    HW = H * W
    terms = {
        "attention": 2 * HW * Ns * C,
        "projections": 2 * HW * C * C + 2 * Ns * C * C,
        "offset": (offset_kernel_size**2 + 2) * Ns * C,
    }
    terms["total"] = sum(terms.values())
    return terms


def block_kind(module: nn.Module) -> str | None:
    """The stage letter of a token mixer (``D``, ``N``, ``L``, ``S``), None for other modules."""
    from ..layers import NeighborhoodAttention2d, WindowAttention

    if isinstance(module, DeformableAttention2d):
        return "D"
    if isinstance(module, NeighborhoodAttention2d):
        return "N"
    if isinstance(module, WindowAttention):
        return "S" if module.shift_size > 0 else "L"
    return None


_KIND_NAMES = {
    "D": "D deformable attention",
    "D.offset": "  of which offset network",
    "D.bias": "  of which position bias",
    "N": "N neighborhood attention",
    "L": "L window attention",
    "S": "S shifted-window attention",
    "mlps": "feed-forward (MLP / ConvFFN)",
    "local_perception_units": "local perception units",
    "layer_norms": "layer norms",
    "proj": "stage input projections",
}


@dataclass
class CostReport:
    """Parameters and FLOPs of one model at one input size (FLOPs: 2 per multiply-add; see the module docstring).

    ``parts``: one row per top-level part (stem, each stage, each down-sampling, norm, head), in registration order.
    ``kinds``: one row per block kind (token mixers by stage letter, the deformable layers' offset networks and
    position biases apart, then the other block parts). ``deformable``: one row per deformable layer.
    """

    name: str
    input_size: tuple[int, int]
    params: int
    flops: int
    parts: list[dict[str, Any]] = field(default_factory=list)
    kinds: list[dict[str, Any]] = field(default_factory=list)
    deformable: list[dict[str, Any]] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return self.flops // 2

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.name, "input_size": list(self.input_size), "params": self.params, "flops": self.flops,
            "macs": self.macs, "parts": self.parts, "kinds": self.kinds, "deformable": self.deformable,
        }


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _top_level_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    parts = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):  # stages, down-sampling layers: one row each
            parts.extend((f"{name}.{i}", c) for i, c in child.named_children())
        else:
            parts.append((name, child))
    return parts


def model_cost(model: nn.Module, input_size: int | Sequence[int], *, name: str | None = None,
               in_chans: int | None = None) -> CostReport:
    """Count parameters and FLOPs of ``model`` on one ``Tensor[1, in_chans, H, W]`` input.

    Args:
        input_size: ``S`` or ``(H, W)``.
        name: shown in the report (default: ``model.pretrained_cfg["architecture"]`` or the class name).
        in_chans: input channels (default ``model.in_chans`` or 3).
    """
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    H, W = (int(v) for v in input_size)
    in_chans = in_chans or int(getattr(model, "in_chans", 3))
    if name is None:
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    x = torch.randn(1, in_chans, H, W, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None else None)
    shapes: dict[str, tuple[int, int]] = {}
    handles = []
    for n, m in model.named_modules():
        if isinstance(m, DeformableAttention2d):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, n=n: shapes.__setitem__(n, tuple(args[0].shape[-2:]))
            ))
    try:
        flops = count_flops(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    report = CostReport(name=name, input_size=(H, W), params=_params(model), flops=flops[""])
    for part, module in _top_level_parts(model):
        report.parts.append({"part": part, "params": _params(module), "flops": flops.get(part, 0)})

    kinds: dict[str, dict[str, Any]] = {}

    def add(kind: str, params: int, fl: int) -> None:
        row = kinds.setdefault(kind, {"kind": _KIND_NAMES.get(kind, kind), "count": 0, "params": 0, "flops": 0})
        row["count"] += 1
        row["params"] += params
        row["flops"] += fl

    list_pattern = re.compile(r"(?:^|\.)(mlps|local_perception_units|layer_norms)\.\d+$")
    for n, m in model.named_modules():
        kind = block_kind(m)
        if kind is not None:
            add(kind, _params(m), flops.get(n, 0))
            if kind == "D":
                off = f"{n}.conv_offset"
                add("D.offset", _params(m.conv_offset), flops.get(off, 0))
                bias_params = m.rpe_table.numel() if isinstance(m.rpe_table, nn.Parameter) else (
                    _params(m.rpe_table) if isinstance(m.rpe_table, nn.Module) else 0)
                bias_flops = flops.get(f"{n}.rpe_table", 0)
                add("D.bias", bias_params, bias_flops)
                Hq, Wq = shapes.get(n, (0, 0))
                Hk, Wk = m.key_grid_size(Hq, Wq) if Hq else (0, 0)
                total = flops.get(n, 0)
                report.deformable.append({
                    "layer": n, "map": [Hq, Wq], "keys": Hk * Wk, "dim": m.dim, "heads": m.num_heads,
                    "groups": m.offset_groups, "stride": m.stride, "params": _params(m),
                    "offset_params": _params(m.conv_offset), "flops": total, "offset_flops": flops.get(off, 0),
                    "offset_share": flops.get(off, 0) / total if total else 0.0,
                })
            continue
        match = list_pattern.search(n)
        if match:
            add(match.group(1), _params(m), flops.get(n, 0))
        elif re.search(r"(?:^|\.)stages\.\d+\.proj$", n) and not isinstance(m, nn.Identity):
            add("proj", _params(m), flops.get(n, 0))
    order = ["D", "D.offset", "D.bias", "N", "L", "S", "mlps", "local_perception_units", "layer_norms", "proj"]
    report.kinds = [kinds[k] for k in order if k in kinds] + [v for k, v in kinds.items() if k not in order]
    return report


def _g(v: float) -> str:
    return f"{v / 1e9:.3f}"


def _m(v: float) -> str:
    return f"{v / 1e6:.3f}"


def format_cost_report(report: CostReport) -> str:
    """The report as markdown tables (params in M, multiply-adds in G = FLOPs / 2 / 1e9)."""
    H, W = report.input_size
    lines = [
        f"## {report.name} at {H}x{W}",
        "",
        f"params {_m(report.params)} M, {_g(report.macs)} GMACs ({_g(report.flops)} GFLOPs as FlopCounterMode "
        "counts: 2 per multiply-add; grid_sample, softmax, norms and activations are not counted)",
        "",
        "| part | params (M) | GMACs | share |",
        "|---|---:|---:|---:|",
    ]
    for r in report.parts:
        share = r["flops"] / report.flops if report.flops else 0.0
        lines.append(f"| {r['part']} | {_m(r['params'])} | {_g(r['flops'] / 2)} | {share:.1%} |")
    lines += ["", "| block kind | count | params (M) | GMACs | share |", "|---|---:|---:|---:|---:|"]
    for r in report.kinds:
        share = r["flops"] / report.flops if report.flops else 0.0
        lines.append(f"| {r['kind']} | {r['count']} | {_m(r['params'])} | {_g(r['flops'] / 2)} | {share:.1%} |")
    if report.deformable:
        lines += [
            "",
            "| deformable layer | map | keys Ns | params (M) | MMACs | offset net MMACs | offset share |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in report.deformable:
            lines.append(
                f"| {r['layer']} | {r['map'][0]}x{r['map'][1]} | {r['keys']} | {_m(r['params'])} | "
                f"{r['flops'] / 2e6:.2f} | {r['offset_flops'] / 2e6:.3f} | {r['offset_share']:.2%} |"
            )
    return "\n".join(lines)
