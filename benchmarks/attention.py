"""Speed and memory of deformable attention: deformattn's fast and reference paths and lucidrains' package.

    python benchmarks/attention.py                      # the four cases of issue 2, all cores (~5 min on 2 cores)
    python benchmarks/attention.py --quick --case tiny=2,16,8,8,2,1,2,3,-1     # smoke test, seconds

Per case and implementation it reports the median wall time of a forward pass (``torch.inference_mode``) and of a
forward + backward pass (input and every parameter take gradients; the output's gradient is a fixed random tensor),
and the peak memory of each. Every (case, implementation, mode) is measured in its own fresh worker process
(``--worker``), seeded the same way: the module and input are built, the module runs once on a tiny input (lazy
initialisation), then one full-size call is run under :class:`_common.PeakRSS` (peak RSS growth over the call, from
the kernel's resettable high-water mark; see ``_common.py``), then the warm-up and timed repeats follow. The parent
process only spawns workers and collects their results, so no measurement sees another's allocations.

Implementations:

* ``fast``: ``DeformableAttention2d(..., backend="fast")``.
* ``reference``: ``DeformableAttention2d(..., backend="reference")``, the official algorithm (einsum and
  ``grid_sample`` for the keys and the bias table).
* ``lucidrains``: ``deformable_attention.DeformableAttention2D`` (``pip install deformable-attention``) at the
  closest configuration (see :func:`lucidrains_kwargs` and ``LUCIDRAINS_NOTE``); skipped when not installed.

Where the time goes (deformattn's paths): after the timed repeats each worker runs one more call under
``torch.profiler`` and sums the self CPU time of its ATen ops into categories (:data:`OP_CATEGORIES`): matrix
products (``mm``/``bmm``/``addmm``/``baddbmm`` and the 1x1 convolutions, which are matrix products), the fused
attention kernel (SDPA: matrix products *and* softmax), softmax, sampling (``grid_sample`` and its backward, gathers,
scatters, lerps), the offset network's depthwise convolution / LayerNorm / GELU, and the rest (copies, element-wise
arithmetic, bookkeeping).

Two floors bound what any implementation can reach here. The *peak floor* is the call's matrix-product FLOPs at the
1024² float32 matmul rate. The *shape floor* (``--worker`` kind ``gemm_floor``, :func:`case_gemms`) times every
matrix product of the call alone at its own shape (the attention's products have a head dimension of 32 and run
well below the 1024² rate): the time of a call in which everything else took no time. ``reference / shape floor``,
per case and as a geometric mean over the four cases, is the largest speed-up over the reference the machine
allows for these matrix products; the targets print it next to the geometric-mean lines. The **attainable bound**
per case adds the fast path's non-matmul time (the profiled share of everything but the matrix-product and
fused-attention categories, applied to the median timed call) to the shape floor: the time the fast path would
take if every matrix product ran at the shape floor and nothing else changed; ``reference / bound`` is the largest
speed-up available without faster non-matmul kernels.

Output: a markdown table on stdout (machine limits, per-case FLOP floor, results, targets, time breakdown) and JSON
at ``--json`` (default ``benchmarks/results/attention.json``, written atomically).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    PeakRSS,
    add_harness_args,
    atomic_write_json,
    emit_result,
    geomean,
    machine_info,
    machine_limits,
    markdown_table,
    release_free_memory,
    run_worker,
    setup_torch,
    thread_env,
    time_fn,
)

IMPLS = ("fast", "reference", "lucidrains")
MODES = ("fwd", "fwdbwd")
MODE_LABEL = {"fwd": "forward", "fwdbwd": "forward+backward"}

# ATen op (self time) -> category of the time breakdown; ops not listed count as "rest"
OP_CATEGORIES = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::_slow_conv2d_forward",
               "aten::_slow_conv2d_backward"),
    "fused attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data", "aten::logsumexp", "aten::exp", "aten::exp_"),
    "sampling": ("aten::grid_sampler_2d", "aten::grid_sampler_2d_backward", "aten::gather", "aten::scatter_add_",
                 "aten::lerp", "aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::index_add_"),
    "offset net": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_conv_depthwise2d",
                   "aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::gelu",
                   "aten::gelu_backward", "aten::tanh", "aten::tanh_backward"),
}
CATEGORIES = tuple(OP_CATEGORIES) + ("rest",)
MATMUL_CATEGORIES = ("matmul", "fused attention")


def op_breakdown(call, setup=None, calls: int = 3) -> dict[str, float]:
    """Self CPU ms per call (mean of ``calls`` profiled calls) per category of :data:`OP_CATEGORIES`, plus
    ``"total"``. The profiler adds overhead per op, so the shares are what to read (:func:`attainable` applies them
    to the median timed call)."""
    import torch.profiler

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            if setup is not None:
                setup()
            call()
    lookup = {op: cat for cat, ops in OP_CATEGORIES.items() for op in ops}
    out = {c: 0.0 for c in CATEGORIES}
    for evt in prof.key_averages():
        if evt.key.startswith("aten::") or evt.key in lookup:
            out[lookup.get(evt.key, "rest")] += evt.self_cpu_time_total / 1e3 / calls
        else:  # python-level ranges (autograd Function names, profiler annotations): their ops are counted inside
            out["rest"] += evt.self_cpu_time_total / 1e3 / calls
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration: ``(B, C, H, W, heads, groups, stride, ksize, offset_range_factor)``, table RPB."""

    name: str
    B: int
    C: int
    H: int
    W: int
    heads: int
    groups: int
    stride: int
    ksize: int
    orf: float
    version: str = "pp"

    def shape(self) -> str:
        return f"{self.B}x{self.C}x{self.H}x{self.W}"

    def config(self) -> str:
        return f"nH={self.heads} G={self.groups} r={self.stride} k={self.ksize} s={self.orf:g} {self.version}"


CASES = {
    c.name: c
    for c in (
        Case("v1_stage3", 8, 384, 14, 14, 12, 3, 1, 3, 2, "v1"),  # DAT-T stage 3
        Case("pp_stage1", 8, 64, 56, 56, 2, 1, 8, 9, -1),  # DAT++-T stage 1
        Case("pp_stage3", 8, 256, 14, 14, 8, 4, 2, 5, -1),  # DAT++-T stage 3
        Case("det_stage1", 1, 64, 200, 200, 2, 1, 8, 9, -1),  # DAT++-T stage 1 at 800x800 (detection)
    )
}

LUCIDRAINS_NOTE = """\
lucidrains' `deformable_attention.DeformableAttention2D` is built at the closest configuration: dim=C, heads=nH,
dim_head=C/nH (inner dim = C, as in DAT), downsample_factor=stride, offset_groups=G, group_queries=False and
group_key_values=False (dense 1x1 q/k/v projections like DAT's; its default grouped projections would do G times
fewer projection FLOPs), offset_kernel_size=ksize when ksize-stride is even, else ksize+1 (its padding
(k-stride)/2 must be an integer; the key grid Hk x Wk is checked to equal DAT's, e.g. 9 -> 10 at stride 8, 5 -> 6 at
stride 2), offset_scale = offset_range_factor/2 key-grid steps when the factor is >= 0 (DAT bounds offsets to
s*tanh of half a grid step), else its default (= stride; DAT++'s unbounded offsets have no equivalent; the value does
not change the cost). Differences that remain and change the cost: its position bias is a continuous-position-bias
MLP (2 -> C/4 -> C/4 -> nH/G, ReLU, log-spaced displacements, SwinV2) evaluated at every (batch*group, query, key)
pair, i.e. O(B*G*HW*Ns*C/4) extra FLOPs and activations, instead of DAT's bilinear lookup in a learned table; its
offset network has no LayerNorm (conv -> GELU -> 1x1 conv -> tanh*scale); q/k/v projections have no bias;
attention is an explicit einsum + softmax (no fused kernel, no chunking)."""


def parse_case(spec: str) -> Case:
    """``NAME=B,C,H,W,heads,groups,stride,ksize,orf[,version]`` -> :class:`Case`."""
    name, sep, rest = spec.partition("=")
    fields = rest.split(",")
    if not sep or not name or len(fields) not in (9, 10):
        raise argparse.ArgumentTypeError(
            f"--case expects NAME=B,C,H,W,heads,groups,stride,ksize,orf[,version], got {spec!r}"
        )
    try:
        ints = [int(v) for v in fields[:8]]
        orf = float(fields[8])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--case {spec!r}: {e}") from None
    version = fields[9] if len(fields) == 10 else "pp"
    if version not in ("pp", "v1"):
        raise argparse.ArgumentTypeError(f"--case {spec!r}: version must be pp or v1, got {version!r}")
    return Case(name, *ints, orf, version)


# ---------------------------------------------------------------------------------------------------------------
# Building the implementations
# ---------------------------------------------------------------------------------------------------------------
def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def lucidrains_kwargs(case: Case) -> dict[str, Any]:
    """Constructor arguments of lucidrains' ``DeformableAttention2D`` closest to ``case`` (see ``LUCIDRAINS_NOTE``)."""
    s, k = case.stride, case.ksize
    dat_pad = 0 if (case.version == "pp" and k == s) else k // 2
    want = (_conv_out(case.H, k, s, dat_pad), _conv_out(case.W, k, s, dat_pad))

    def grid(kk: int) -> tuple[int, int]:
        return _conv_out(case.H, kk, s, (kk - s) // 2), _conv_out(case.W, kk, s, (kk - s) // 2)

    if (k - s) % 2 == 0 and k >= s:
        kernel = k
    else:  # nearest valid kernel (>= stride, same parity as the stride), preferring one giving DAT's key grid
        candidates = [kk for kk in (k + 1, k - 1, k + 3, k - 3) if kk >= s and (kk - s) % 2 == 0]
        kernel = next((kk for kk in candidates if grid(kk) == want), candidates[0])
    return dict(
        dim=case.C,
        heads=case.heads,
        dim_head=case.C // case.heads,
        downsample_factor=s,
        offset_groups=case.groups,
        offset_kernel_size=kernel,
        offset_scale=case.orf / 2 if case.orf >= 0 else s,
        group_queries=False,
        group_key_values=False,
        dropout=0.0,
    )


def build(impl: str, case: Case):
    """The module of ``impl`` for ``case`` (float32, CPU) and its key grid ``(Hk, Wk)``."""
    if impl == "lucidrains":
        from deformable_attention import DeformableAttention2D

        kw = lucidrains_kwargs(case)
        k, s = kw["offset_kernel_size"], kw["downsample_factor"]
        grid = (_conv_out(case.H, k, s, (k - s) // 2), _conv_out(case.W, k, s, (k - s) // 2))
        return DeformableAttention2D(**kw), grid
    from deformattn import DeformableAttention2d

    m = DeformableAttention2d(
        case.C,
        case.heads,
        offset_groups=case.groups,
        stride=case.stride,
        offset_kernel_size=case.ksize,
        offset_range_factor=case.orf,
        pos_bias="table",
        q_size=(case.H, case.W),
        version=case.version,
        backend=impl,
    )
    return m, m.key_grid_size(case.H, case.W)


def forward_gflop(case: Case, Ns: int) -> float:
    """Matmul FLOPs of one forward pass (GFLOP): q/out projections over H*W, k/v over Ns, QK^T and AV.

    The floor a forward pass cannot beat on this machine is this over the measured matmul rate; forward+backward
    does 3x the forward's matmul work (each matmul's backward is two matmuls of the same size).
    """
    HW, C, B = case.H * case.W, case.C, case.B
    return (2 * 2 * B * HW * C * C + 2 * 2 * B * Ns * C * C + 2 * 2 * B * HW * Ns * C) / 1e9


def case_gemms(case: Case, Ns: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int, int]]:
    """The matrix products of one call: ``(label, A shape, B shape, times in the forward, times in the backward)``.

    Forward: q/out projections over ``B*HW`` tokens, k/v projections over ``B*Ns``, ``QK^T`` and ``PV`` per
    (batch, head). Backward (autograd keeping the attention matrix, the fewest FLOPs): every projection's input
    gradient (same shape) and weight gradient (``C x tokens @ tokens x C``); ``dP = dO V^T`` (the shape of
    ``QK^T``), ``dQ = dS K`` (the shape of ``PV``), ``dV = P^T dO`` and ``dK = dS^T Q``. Their FLOPs sum to
    :func:`forward_gflop` (forward) and twice that (backward).
    """
    B, C, HW, BH, hc = case.B, case.C, case.H * case.W, case.B * case.heads, case.C // case.heads
    return [
        ("q/out projection", (B * HW, C), (C, C), 2, 2),
        ("q/out weight grad", (C, B * HW), (B * HW, C), 0, 2),
        ("k/v projection", (B * Ns, C), (C, C), 2, 2),
        ("k/v weight grad", (C, B * Ns), (B * Ns, C), 0, 2),
        ("QK^T, dO V^T", (BH, HW, hc), (BH, hc, Ns), 1, 1),
        ("PV, dS K", (BH, HW, Ns), (BH, Ns, hc), 1, 1),
        ("P^T dO, dS^T Q", (BH, Ns, HW), (BH, HW, hc), 0, 2),
    ]


def gemm_floor(case: Case, Ns: int, quick: bool) -> dict[str, Any]:
    """Time every matrix product of :func:`case_gemms` alone at its own shape (float32, this process's threads):
    the shape-aware matmul floor, i.e. the call's time if everything but its matrix products took no time and
    each ran as fast as this machine's BLAS runs that shape."""
    import torch

    gen = torch.Generator().manual_seed(0)
    items, fwd_ms, fwdbwd_ms, flop_f = [], 0.0, 0.0, 0.0
    for label, a_shape, b_shape, n_fwd, n_bwd in case_gemms(case, Ns):
        a, b = torch.randn(*a_shape, generator=gen), torch.randn(*b_shape, generator=gen)
        timing = time_fn(lambda: torch.matmul(a, b), warmup=1, repeats=2 if quick else 7, budget_s=3.0,
                         min_repeats=1 if quick else 3)
        ms = timing["median_ms"]
        flop = 2 * math.prod(a_shape) * b_shape[-1]
        items.append(dict(label=label, a=list(a_shape), b=list(b_shape), fwd=n_fwd, bwd=n_bwd, ms=ms,
                          gflops=flop / ms / 1e6 if ms > 0 else None))
        fwd_ms += n_fwd * ms
        fwdbwd_ms += (n_fwd + n_bwd) * ms
        flop_f += n_fwd * flop
    return dict(gemms=items, fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms, fwd_gflop=flop_f / 1e9)


def faults_per_call(call, setup=None, calls: int = 3) -> float:
    """Minor page faults per call after the timed repeats: fresh pages the allocator had to map. glibc returns
    freed heap tops and large blocks to the kernel, so a call whose temporaries do not fit the memory kept from the
    last one pays ~1 us per 4 KiB page (part of the timed call, on both paths; reported to explain differences)."""
    import resource

    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        if setup is not None:
            setup()
        call()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / calls


# ---------------------------------------------------------------------------------------------------------------
# Worker: one (case, implementation, mode) in a fresh process
# ---------------------------------------------------------------------------------------------------------------
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch = setup_torch(spec["threads"], spec["seed"])
    if spec["kind"] == "machine":
        return {**machine_info(), **machine_limits(spec["threads"], quick=spec["quick"])}
    if spec["kind"] == "gemm_floor":
        return gemm_floor(Case(**spec["case"]), spec["Ns"], spec["quick"])

    sys.path.insert(0, str(REPO / "src"))  # measure this checkout, not some installed copy
    case, impl, mode = Case(**spec["case"]), spec["impl"], spec["mode"]
    module, (Hk, Wk) = build(impl, case)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    x = torch.randn(case.B, case.C, case.H, case.W, generator=gen)
    # tiny input of the same kind: loads the kernels and starts the thread pools before the baseline is read
    th, tw = min(case.H, 2 * case.stride + case.ksize), min(case.W, 2 * case.stride + case.ksize)
    x_tiny = torch.randn(1, case.C, th, tw, generator=gen)

    if mode == "fwd":
        module.eval()

        def call(inp=x):
            with torch.inference_mode():
                module(inp)

        setup = None
        call(x_tiny)
    else:
        module.train()  # dropout is 0: same function, autograd on
        x.requires_grad_(True)
        grad_out = torch.randn(case.B, case.C, case.H, case.W, generator=gen)

        def call(inp=x, g=grad_out):
            module(inp).backward(g)

        def setup():
            module.zero_grad(set_to_none=True)
            x.grad = None

        x_tiny.requires_grad_(True)
        call(x_tiny, torch.randn_like(x_tiny))
        setup()
    del x_tiny
    release_free_memory()

    if setup is not None:
        setup()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        call()
    first_call_ms = (time.perf_counter() - t0) * 1e3
    timing = time_fn(
        call,
        setup=setup,
        warmup=spec["warmup"],
        repeats=spec["repeats"],
        budget_s=spec["budget_s"],
        min_repeats=spec["min_repeats"],
    )
    out = {**timing, **mem.as_dict(), "first_call_ms": first_call_ms, "Hk": Hk, "Wk": Wk,
           "faults_per_call": faults_per_call(call, setup)}
    if impl != "lucidrains" and spec.get("breakdown", True):
        out["breakdown_ms"] = op_breakdown(call, setup)
    if impl == "lucidrains":
        from importlib.metadata import version

        out["package"] = f"deformable-attention {version('deformable-attention')}"
        out["kwargs"] = lucidrains_kwargs(case)
    else:
        import deformattn

        out["package"] = f"deformattn from {Path(deformattn.__file__).parent}"
    return out


# ---------------------------------------------------------------------------------------------------------------
# Parent: spawn the workers, collect, report
# ---------------------------------------------------------------------------------------------------------------
def _fmt(v: float | None, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{nd}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def evaluate_targets(rows: dict[tuple[str, str], dict], cases: list[Case], impls: list[str],
                     bounds: dict[str, dict[str, Any]] | None = None) -> list[dict]:
    """The targets of issue 2, each with its measured value and whether it passed (None: not measured); the
    geometric-mean targets carry what the machine allows at most (``bounds``, see :func:`floor_bounds`)."""
    targets = []

    def ms(case, impl, mode):
        return rows.get((case.name, impl), {}).get(f"{mode}_ms")

    for case in cases:
        for other in ("reference", "lucidrains"):
            if other not in impls:
                continue
            ratios = [_ratio(ms(case, other, m), ms(case, "fast", m)) for m in MODES]
            ok = None if None in ratios else all(r > 1 for r in ratios)
            value = None if None in ratios else min(ratios)
            targets.append(
                dict(
                    name=f"{case.name}: fast ahead of {other} (forward and forward+backward)",
                    value=value,
                    threshold="> 1x",
                    passed=ok,
                    detail=" / ".join(f"{MODE_LABEL[m]} {_fmt(r, 2)}x" for m, r in zip(MODES, ratios)),
                )
            )
    standard = [c for c in cases if c.name in CASES]
    for mode, need in (("fwd", 1.5), ("fwdbwd", 3.0)):
        ratios = [_ratio(ms(c, "reference", mode), ms(c, "fast", mode)) for c in standard]
        value = geomean(ratios) if standard and None not in ratios else None
        complete = len(standard) == len(CASES)  # the target is defined over the four cases; a subset only informs
        scope = "all four cases" if complete else f"{len(standard)} of {len(CASES)} cases: not judged"
        bound = ((bounds or {}).get(mode) or {}).get("geomean")
        targets.append(
            dict(
                name=f"geometric-mean speed-up over reference, {MODE_LABEL[mode]} ({scope})",
                value=value,
                threshold=f">= {need}x",
                passed=None if value is None or not complete else value >= need,
                **({} if bound is None else dict(detail=(
                    f"at most {bound:.2f}x on this machine even if everything but the matrix products took no "
                    f"time: reference / shape-aware matmul floor"))),
            )
        )
    det = next((c for c in cases if c.name == "det_stage1"), None)
    if det is not None:
        for mode in MODES:
            f = rows.get((det.name, "fast"), {}).get(f"{mode}_peak_mib")
            r = rows.get((det.name, "reference"), {}).get(f"{mode}_peak_mib")
            value = _ratio(f, r)
            targets.append(
                dict(
                    name=f"det_stage1 peak memory fast / reference, {MODE_LABEL[mode]}",
                    value=value,
                    threshold="<= 0.25",
                    passed=None if value is None else value <= 0.25,
                    detail=f"{_fmt(f)} MiB vs {_fmt(r)} MiB",
                )
            )
    return targets


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["## Attention benchmark (benchmarks/attention.py)", ""]
    if "error" in m:
        lines.append(f"Machine limits: not measured ({m['error']})")
    else:
        mm = ", ".join(f"{k[6:-7]}²: {m[k]:.0f}" for k in m if k.startswith("matmul") and k[6:-7].isdigit())
        lines.append(
            f"Machine: {m['cpu']}, {report['settings']['threads']} threads, torch {m['torch']}. Limits measured in "
            f"the same run: float32 matmul {m['matmul_gflops']:.0f} GFLOP/s ({mm}), copy bandwidth "
            f"{m['copy_gbps']:.1f} GB/s (read + write)."
        )
    s = report["settings"]
    lines += [
        f"Settings: median of up to {s['repeats']} repeats after up to {s['warmup']} warm-up calls, at most "
        f"{s['budget_s']:g} s per measurement (at least {s['min_repeats']} repeats); seed {s['seed']}; one fresh "
        f"process per (case, implementation, mode). Peak memory: peak RSS growth over one full-size call "
        f"(kernel VmHWM reset through /proc/self/clear_refs).",
        "",
    ]
    gflops = m.get("matmul_gflops")
    crow = []
    for name, c in report["cases"].items():
        floor = _peak_floor_ms(c, gflops, "fwd")
        sf = c.get("shape_floor") or {}
        crow.append(
            [name, c["shape"], c["config"], c["Ns"], _fmt(c["fwd_gflop"], 2), _fmt(floor), _fmt(floor and 3 * floor),
             _fmt(sf.get("fwd_ms")), _fmt(sf.get("fwdbwd_ms"))]
        )
    lines += [
        markdown_table(
            ["case", "B×C×H×W", "config", "Ns", "fwd GFLOP", "peak floor fwd ms", "peak floor fwd+bwd ms",
             "shape floor fwd ms", "shape floor fwd+bwd ms"], crow, "lllrrrrrr"
        ),
        "",
        "(Peak floor: the matrix-product FLOPs at the 1024² matmul rate. Shape floor: every matrix product of the "
        "call timed alone at its own shape, see `case_gemms`; the attention's products have a head dimension of "
        "32 and run well below the 1024² rate.)",
        "",
    ]
    rrow = []
    for r in report["rows"]:
        err = {mode: r[mode].get("error") for mode in MODES if "error" in r[mode]}
        rrow.append(
            [
                r["case"],
                r["impl"],
                "error" if "fwd" in err else _fmt(r["fwd_ms"]),
                "error" if "fwdbwd" in err else _fmt(r["fwdbwd_ms"]),
                _fmt(r["fwd_peak_mib"]),
                _fmt(r["fwdbwd_peak_mib"]),
                _fmt(r["speedup_fwd"], 2),
                _fmt(r["speedup_fwdbwd"], 2),
                " / ".join(_fmt(r[mode].get("faults_per_call"), 0) for mode in MODES),
            ]
        )
    lines += [
        markdown_table(
            ["case", "impl", "fwd ms", "fwd+bwd ms", "fwd peak MiB", "fwd+bwd peak MiB", "fwd × ref", "fwd+bwd × ref",
             "page faults / call"],
            rrow,
            "llrrrrrrr",
        ),
        "",
        "(`× ref`: reference time / this time; above 1 is faster than the reference. Page faults: minor faults per "
        "call, forward / forward+backward, after the timed repeats; each is a fresh 4 KiB page glibc handed back to "
        "the kernel after the previous call, paid inside the timed call.)",
        "",
        "Targets:",
        "",
    ]
    for t in report["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        detail = f" ({t['detail']})" if t.get("detail") else ""
        lines.append(f"- {mark} {t['name']}: {_fmt(t['value'], 2)} (target {t['threshold']}){detail}")
    errors = [(r["case"], r["impl"], mode, r[mode]["error"]) for r in report["rows"] for mode in MODES
              if "error" in r[mode]]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {c} / {i} / {MODE_LABEL[mo]}: {e}" for c, i, mo, e in errors]
    lines += render_breakdown(report)
    lines += render_floor(report)
    for note in report["notes"]:
        lines += ["", note]
    return "\n".join(lines)


def _peak_floor_ms(c: dict[str, Any], gflops: float | None, mode: str) -> float | None:
    """The peak floor of a case: its matmul FLOPs (forward+backward: 3x) at the 1024^2 matmul rate."""
    return (1 if mode == "fwd" else 3) * c["fwd_gflop"] / gflops * 1e3 if gflops else None


def _floor_ms(report: dict[str, Any], name: str, mode: str) -> float | None:
    """The matmul floor of a case: shape-aware when measured, else the peak floor."""
    c = report["cases"][name]
    sf = c.get("shape_floor") or {}
    if sf.get(f"{mode}_ms"):
        return sf[f"{mode}_ms"]
    return _peak_floor_ms(c, report["machine"].get("matmul_gflops"), mode)


def floor_bounds(cases: dict[str, dict[str, Any]], rows: dict[tuple[str, str], dict]) -> dict[str, dict[str, Any]]:
    """Per mode: reference / shape-aware matmul floor per case and its geometric mean over the four issue cases,
    the largest speed-up any implementation of the same matrix products could reach on this machine."""
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        per_case = {}
        for name, c in cases.items():
            ref = rows.get((name, "reference"), {}).get(f"{mode}_ms")
            sf = (c.get("shape_floor") or {}).get(f"{mode}_ms")
            if ref and sf:
                per_case[name] = ref / sf
        std = [per_case[n] for n in CASES if n in per_case]
        out[mode] = dict(per_case=per_case, geomean=geomean(std) if len(std) == len(CASES) else None)
    return out


def attainable(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per case and mode: the attainable bound (matmul floor + the fast path's non-matmul time) and reference / bound."""
    rows = {(r["case"], r["impl"]): r for r in report["rows"]}
    out: dict[str, dict[str, float]] = {}
    for name, c in report["cases"].items():
        fast, ref = rows.get((name, "fast")), rows.get((name, "reference"))
        if fast is None or ref is None:
            continue
        for mode in MODES:
            bd = fast[mode].get("breakdown_ms")
            floor = _floor_ms(report, name, mode)
            if not bd or ref.get(f"{mode}_ms") is None or floor is None:
                continue
            # the profiled non-matmul share applied to the median timed call (the profiler's own overhead cancels)
            share = 1.0 - sum(bd[k] for k in MATMUL_CATEGORIES) / bd["total"]
            non_matmul = share * fast[f"{mode}_ms"]
            bound = floor + non_matmul
            out.setdefault(name, {})[mode] = dict(floor_ms=floor, non_matmul_ms=non_matmul, bound_ms=bound,
                                                  ref_over_bound=ref[f"{mode}_ms"] / bound)
    return out


def render_breakdown(report: dict[str, Any]) -> list[str]:
    brow = []
    for r in report["rows"]:
        for mode in MODES:
            bd = r[mode].get("breakdown_ms") if isinstance(r[mode], dict) else None
            if not bd:
                continue
            brow.append([r["case"], r["impl"], MODE_LABEL[mode], _fmt(bd["total"])] +
                        [f"{bd[c]:.1f} ({bd[c] / bd['total']:.0%})" if bd["total"] else "-" for c in CATEGORIES])
    if not brow:
        return []
    lines = ["", "Where the time goes (self CPU ms per call, mean of 3 profiled calls, per ATen op category; see "
             "OP_CATEGORIES in the script; the profiler adds per-op overhead, so read the shares):", "",
             markdown_table(["case", "impl", "mode", "total"] + list(CATEGORIES), brow, "llll" + "r" * len(CATEGORIES)),
             ""]
    att = report.get("attainable") or {}
    arow = []
    for name, modes in att.items():
        for mode, a in modes.items():
            arow.append([name, MODE_LABEL[mode], _fmt(a["floor_ms"]), _fmt(a["non_matmul_ms"]), _fmt(a["bound_ms"]),
                         _fmt(a["ref_over_bound"], 2)])
    if arow:
        lines += ["Attainable bound: the fast path with its matrix products at the shape floor and its "
                  "other (non-matmul) ops as they are (their profiled share of the median fast call); `ref / bound` "
                  "is the largest speed-up over the reference without faster non-matmul kernels.", "",
                  markdown_table(["case", "mode", "shape floor ms", "fast non-matmul ms", "bound ms", "ref / bound"],
                                 arow, "llrrrr"), ""]
        for mode in MODES:
            vals = [m[mode]["ref_over_bound"] for m in att.values() if mode in m]
            if len(vals) == len(att) and vals:
                lines.append(f"- geometric mean of ref / bound, {MODE_LABEL[mode]}: {geomean(vals):.2f}x")
    return lines


def render_floor(report: dict[str, Any]) -> list[str]:
    grow = []
    for name, c in report["cases"].items():
        for g in (c.get("shape_floor") or {}).get("gemms", []):
            grow.append([name, g["label"], "x".join(map(str, g["a"])) + " @ " + "x".join(map(str, g["b"])),
                         g["fwd"], g["bwd"], _fmt(g["ms"], 2), _fmt(g["gflops"])])
    if not grow:
        return []
    fb = report.get("floor_bounds") or {}
    lines = ["", "The shape-aware matmul floor: every matrix product of one call (`case_gemms`), timed alone at its "
             "shape; `fwd` / `bwd`: how often the forward / backward pass runs it.", "",
             markdown_table(["case", "product", "shape", "fwd", "bwd", "ms", "GFLOP/s"], grow, "lllrrrr"), ""]
    for mode in MODES:
        b = fb.get(mode) or {}
        if b.get("per_case"):
            per = ", ".join(f"{n} {v:.2f}x" for n, v in b["per_case"].items())
            g = f"; geometric mean **{b['geomean']:.2f}x**" if b.get("geomean") else ""
            lines.append(f"- reference / shape floor, {MODE_LABEL[mode]}: {per}{g}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", help=f"comma-separated built-in cases (default: all of {', '.join(CASES)}; "
                   "none when --case is given)")
    p.add_argument("--case", action="append", type=parse_case, default=[], metavar="NAME=B,C,H,W,nH,G,r,k,orf[,v]",
                   help="a custom case (repeatable); version pp (default) or v1")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 20; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per measurement (default 3; quick 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per measurement: repeats are cut to fit (never below --min-repeats); default 20")
    p.add_argument("--min-repeats", type=int, default=None, help="repeats kept whatever the budget (default 5)")
    add_harness_args(p, results="attention", quick_help="tiny repeats and machine probes: a smoke test",
                     timeout_s=1800.0)
    args = p.parse_args(argv)

    if args.worker:
        emit_result(worker(json.loads(args.worker)))
        return 0

    quick = args.quick
    repeats = args.repeats if args.repeats is not None else (2 if quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    budget = args.budget if args.budget is not None else (2.0 if quick else 20.0)
    min_repeats = args.min_repeats if args.min_repeats is not None else (1 if quick else 5)
    if min(repeats, min_repeats, args.threads) < 1 or warmup < 0:
        p.error("--repeats, --min-repeats and --threads must be >= 1, --warmup >= 0")

    if args.cases is not None or not args.case:
        names = [n.strip() for n in (args.cases or ",".join(CASES)).split(",") if n.strip()]
        unknown = [n for n in names if n not in CASES]
        if unknown:
            p.error(f"unknown case(s) {unknown}; built-in: {', '.join(CASES)}")
        cases = [CASES[n] for n in names] + args.case
    else:
        cases = list(args.case)
    if len({c.name for c in cases}) != len(cases):
        p.error("case names must be unique")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not impls or any(i not in IMPLS for i in impls):
        p.error(f"--impls must be a subset of {','.join(IMPLS)}, got {args.impls!r}")
    notes = []
    if "lucidrains" in impls:
        if importlib.util.find_spec("deformable_attention") is None:
            impls.remove("lucidrains")
            notes.append("lucidrains' deformable-attention is not installed (pip install deformable-attention): "
                         "skipped.")
        else:
            notes.append(LUCIDRAINS_NOTE)
    notes.append(
        "Memory: each number is the peak resident-set growth of one full-size call in a fresh process (after a call "
        "on a tiny input, gc and malloc_trim): the kernel's VmHWM, reset through /proc/self/clear_refs right before "
        "the call, minus VmRSS right before it. Module parameters and the input are in the baseline; activations, "
        "workspace and (forward+backward) all gradients are in the growth."
    )

    env = thread_env(args.threads)
    base = dict(threads=args.threads, seed=args.seed, quick=quick)
    script = [sys.executable, str(Path(__file__).resolve()), "--worker"]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    log(f"machine limits ({args.threads} threads)")
    machine = run_worker(script + [json.dumps({**base, "kind": "machine"})], env=env, timeout_s=args.timeout)
    results: dict[tuple[str, str, str], dict] = {}
    for case in cases:
        for mode in MODES:
            for impl in impls:  # implementations interleaved per case and mode: slow drifts hit them alike
                spec = dict(base, kind="attention", case=dataclasses.asdict(case), impl=impl, mode=mode,
                            repeats=repeats, warmup=warmup, budget_s=budget, min_repeats=min_repeats)
                res = run_worker(script + [json.dumps(spec)], env=env, timeout_s=args.timeout)
                results[case.name, impl, mode] = res
                if "error" in res:
                    log(f"{case.name:>12} {impl:>10} {MODE_LABEL[mode]:>16}: ERROR {res['error']}")
                else:
                    log(f"{case.name:>12} {impl:>10} {MODE_LABEL[mode]:>16}: {res['median_ms']:9.1f} ms "
                        f"(n={res['repeats']}), peak {res['peak_mib']:8.1f} MiB")

    rows, by_key = [], {}
    for case in cases:
        for impl in impls:
            row: dict[str, Any] = {"case": case.name, "impl": impl}
            for mode in MODES:
                res = results[case.name, impl, mode]
                row[mode] = res
                row[f"{mode}_ms"] = res.get("median_ms")
                row[f"{mode}_peak_mib"] = res.get("peak_mib")
            rows.append(row)
            by_key[case.name, impl] = row
    for row in rows:
        for mode in MODES:
            ref = by_key.get((row["case"], "reference"), {}).get(f"{mode}_ms")
            row[f"speedup_{mode}"] = _ratio(ref, row[f"{mode}_ms"])

    case_info = {}
    for case in cases:
        hk = next((results[case.name, i, mo] for i in ("fast", "reference") if i in impls for mo in MODES
                   if "Hk" in results[case.name, i, mo]), None)
        Ns = hk["Hk"] * hk["Wk"] if hk else None
        if Ns is None:  # computed here only if no deformattn worker reported it
            sys.path.insert(0, str(REPO / "src"))
            Ns = math.prod(build("fast", case)[1])
        case_info[case.name] = {**dataclasses.asdict(case), "shape": case.shape(), "config": case.config(), "Ns": Ns,
                                "fwd_gflop": forward_gflop(case, Ns)}
        spec = dict(base, kind="gemm_floor", case=dataclasses.asdict(case), Ns=Ns)
        floor = run_worker(script + [json.dumps(spec)], env=env, timeout_s=args.timeout)
        case_info[case.name]["shape_floor"] = floor
        if "error" in floor:
            log(f"{case.name:>12} shape-aware matmul floor: ERROR {floor['error']}")
        else:
            log(f"{case.name:>12} shape-aware matmul floor: {floor['fwd_ms']:.1f} / {floor['fwdbwd_ms']:.1f} ms")

    report = {
        "benchmark": "attention",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/attention.py"] + (argv or sys.argv[1:])),
        "machine": machine,
        "settings": dict(threads=args.threads, repeats=repeats, warmup=warmup, budget_s=budget,
                         min_repeats=min_repeats, seed=args.seed, quick=quick,
                         env={k: v for k, v in os.environ.items() if k.startswith("DEFORMATTN_")}),
        "cases": case_info,
        "impls": impls,
        "rows": rows,
        "floor_bounds": (bounds := floor_bounds(case_info, by_key)),
        "targets": evaluate_targets(by_key, cases, impls, bounds),
        "notes": notes,
        "elapsed_s": time.perf_counter() - t_start,
    }
    report["attainable"] = attainable(report)
    report["table_markdown"] = render(report)
    print(report["table_markdown"])
    atomic_write_json(args.json, report)
    log(f"wrote {args.json}")

    failed = [(r["case"], r["impl"]) for r in rows if r["impl"] != "lucidrains" and
              any("error" in r[mo] for mo in MODES)]
    if failed or "error" in machine:
        return 1
    if args.check_targets and any(t["passed"] is False for t in report["targets"]):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
