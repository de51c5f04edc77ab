"""How attention cost grows with the map: dense, window, spatial-reduction, neighborhood and deformable attention.

One attention layer of the same width and heads (default ``C = 128``, ``nH = 4``: a DAT++-T stage-2 layer) on a
square map of growing side, batch 1, forward pass without gradients. Every kind maps ``Tensor[B, C, H, W]`` to
itself and includes its input and output projections:

======================  ===========================================================================================
kind                    what runs, and its cost in multiply-adds (``N = HW`` tokens)
======================  ===========================================================================================
``dense``               ViT multi-head self-attention over all tokens (explicit ``softmax(q k^T) v``, as in ViT):
                        ``4 N C^2 + 2 N^2 C``
``window``              Swin window attention, window ``M = 7`` (:class:`deformattn.layers.WindowAttention`):
                        ``4 N C^2 + 2 N M^2 C``
``spatial_reduction``   PVT spatial-reduction attention, ratio ``r = 8`` (an ``r x r`` stride-``r`` conv makes
                        ``Ns = (H // r)^2`` keys): ``2 N C^2 + 2 Ns C^2 + Ns r^2 C^2 + 2 N Ns C``
``neighborhood``        neighborhood attention, kernel 7 (:class:`deformattn.layers.NeighborhoodAttention2d`):
                        ``4 N C^2 + 2 N k^2 C``
``deformable``          :class:`deformattn.DeformableAttention2d` with key-grid stride ``r = 8`` (offset kernel 9,
                        DAT++'s choice for stride 8), ``G = 2`` offset groups, the table position bias:
                        ``Ns = (ceil(H / 8))^2`` keys and ``2 N C^2 + 2 Ns C^2 + 2 N Ns C + (k^2 + 2) Ns C``
======================  ===========================================================================================

Why stride 8 for both PVT and DAT: that is the key-grid stride of the first stage in PVT (sr ratio 8) and in DAT++
(stride 8 at 56x56 for 224x224 images): a layer of that stage seeing a larger image keeps its stride, so its keys
grow as ``(H / 8)^2`` and its attention term as ``N^2 / 64`` - quadratic like dense attention, 64x smaller. (Across
the stages of a 224x224 model, DAT++ and PVT shrink the stride 8 -> 4 -> 2 -> 1 as the map halves, which keeps 7x7
keys everywhere.) Window and neighborhood attention are linear in ``N``.

Measured per row: ``flops`` counted with :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per
multiply-add; matrix products, convolutions and SDPA only, see :mod:`deformattn.analysis.flops`), ``macs = flops / 2``,
``formula_macs`` (the formula above, a check), ``ms`` (median wall time of the forward pass on this machine) and
``peak_mib`` (peak memory the forward pass adds: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the growth
of the process's peak resident set size over the call, read from the kernel's ``VmHWM`` after resetting it, with
freed heap memory handed back to the OS first; None where that is not supported). Time is measured before memory,
and ``deformattn complexity`` first makes glibc keep freed memory for reuse (:func:`keep_freed_memory`), so that
the timed calls do not fault fresh pages in on every call (on a virtual machine that alone varied timings tenfold).
Dense attention runs last at each size: its gigabytes must not precede the other measurements.
"""
from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import check_image_tensor, check_int
from ..attention import DeformableAttention2d
from .flops import count_flops, dmha_macs

__all__ = [
    "KINDS",
    "DenseAttention",
    "SpatialReductionAttention",
    "build_layer",
    "formula_macs",
    "key_count",
    "measure_layer",
    "run_complexity",
    "format_complexity_table",
    "keep_freed_memory",
    "DEFAULT_SIDES",
    "QUICK_SIDES",
]

KINDS = ("dense", "window", "spatial_reduction", "neighborhood", "deformable")
DEFAULT_SIDES = (14, 28, 56, 84, 112)
QUICK_SIDES = (14, 28)
LABELS = {
    "dense": "dense MHSA (ViT)",
    "window": "window attention (Swin, M=7)",
    "spatial_reduction": "spatial-reduction attention (PVT, r=8)",
    "neighborhood": "neighborhood attention (k=7)",
    "deformable": "deformable attention (DAT++, r=8, with offset net)",
}


# ---------------------------------------------------------------------------------------------------------------
# the two layers the library does not otherwise have
# ---------------------------------------------------------------------------------------------------------------
class DenseAttention(nn.Module):
    """ViT multi-head self-attention over every token of a ``Tensor[B, C, H, W]`` map (explicit softmax, no fused
    kernel, so time and memory show the ``(HW)^2`` attention matrix)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DenseAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        check_image_tensor(x, "x", "DenseAttention")
        B, C, H, W = x.shape
        nH = self.num_heads
        t = x.flatten(2).transpose(1, 2)  # B, N, C
        q, k, v = self.qkv(t).reshape(B, H * W, 3, nH, C // nH).permute(2, 0, 3, 1, 4).unbind(0)  # B, nH, N, hd
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B, nH, N, N
        out = (attn @ v).transpose(1, 2).reshape(B, H * W, C)  # B, N, C
        return self.proj(out).transpose(1, 2).reshape(B, C, H, W)


class SpatialReductionAttention(nn.Module):
    """PVT's spatial-reduction attention: queries from every token, keys and values from the map reduced by an
    ``r x r`` stride-``r`` conv and a LayerNorm (``Ns = (H // r) * (W // r)`` keys; ``r = 1`` is dense)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SpatialReductionAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.sr_ratio = check_int(sr_ratio, "sr_ratio", "SpatialReductionAttention", minimum=1)
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        check_image_tensor(x, "x", "SpatialReductionAttention")
        B, C, H, W = x.shape
        nH, hd = self.num_heads, C // self.num_heads
        q = self.q(x.flatten(2).transpose(1, 2)).reshape(B, H * W, nH, hd).transpose(1, 2)  # B, nH, N, hd
        if self.sr_ratio > 1:
            if H < self.sr_ratio or W < self.sr_ratio:
                raise ValueError(
                    f"SpatialReductionAttention: the map ({H}x{W}) must be at least sr_ratio ({self.sr_ratio})"
                )
            kv_in = self.norm(self.sr(x).flatten(2).transpose(1, 2))  # B, Ns, C
        else:
            kv_in = x.flatten(2).transpose(1, 2)
        Ns = kv_in.shape[1]
        k, v = self.kv(kv_in).reshape(B, Ns, 2, nH, hd).permute(2, 0, 3, 1, 4).unbind(0)  # B, nH, Ns, hd
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B, nH, N, Ns
        out = (attn @ v).transpose(1, 2).reshape(B, H * W, C)
        return self.proj(out).transpose(1, 2).reshape(B, C, H, W)


# ---------------------------------------------------------------------------------------------------------------
# the layers compared
# ---------------------------------------------------------------------------------------------------------------
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"complexity: kind must be one of {KINDS}, got {kind!r}")


def build_layer(kind: str, *, dim: int = 128, num_heads: int = 4, side: int = 56, window_size: int = 7,
                kernel_size: int = 7, ratio: int = 8, offset_groups: int = 2) -> nn.Module:
    """One attention layer of ``kind`` (see the module docstring), for a ``side x side`` map."""
    from ..layers import NeighborhoodAttention2d, WindowAttention

    _check_kind(kind)
    if kind == "dense":
        return DenseAttention(dim, num_heads)
    if kind == "window":
        return WindowAttention(dim, num_heads, window_size)
    if kind == "spatial_reduction":
        return SpatialReductionAttention(dim, num_heads, ratio)
    if kind == "neighborhood":
        return NeighborhoodAttention2d(dim, kernel_size, num_heads)
    return DeformableAttention2d(dim, num_heads, offset_groups=offset_groups, stride=ratio, q_size=side)


def key_count(kind: str, side: int, *, window_size: int = 7, kernel_size: int = 7, ratio: int = 8) -> int:
    """Keys each query attends to."""
    _check_kind(kind)
    if kind == "dense":
        return side * side
    if kind == "window":
        return window_size * window_size
    if kind == "neighborhood":
        return kernel_size * kernel_size
    if kind == "spatial_reduction":
        return (side // ratio) ** 2
    k = {1: 3, 2: 5, 4: 7, 8: 9}.get(ratio, ratio + 1 + ratio % 2)
    from ..functional import key_grid_size

    return key_grid_size(side, k, ratio, k // 2) ** 2


def formula_macs(kind: str, side: int, *, dim: int = 128, window_size: int = 7, kernel_size: int = 7,
                 ratio: int = 8) -> int:
    """The analytic multiply-adds of one layer (the module docstring's formulas; biases not counted)."""
    N, C = side * side, dim
    Ns = key_count(kind, side, window_size=window_size, kernel_size=kernel_size, ratio=ratio)
    if kind in ("dense", "window", "neighborhood"):
        if kind == "window" and side % window_size:
            N_pad = math.ceil(side / window_size) ** 2 * window_size**2
            return 4 * N_pad * C * C + 2 * N_pad * Ns * C
        return 4 * N * C * C + 2 * N * Ns * C
    if kind == "spatial_reduction":
        sr = Ns * ratio * ratio * C * C if ratio > 1 else 0
        return 2 * N * C * C + 2 * Ns * C * C + sr + 2 * N * Ns * C
    k = {1: 3, 2: 5, 4: 7, 8: 9}.get(ratio, ratio + 1 + ratio % 2)
    return dmha_macs(side, side, C, Ns, k)["total"]


# ---------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------
def _proc_kb(*fields: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[key] = int(rest.split()[0])
    except OSError:  # pragma: no cover - not Linux
        pass
    return out


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory ``fn()`` adds, in MiB (see the module docstring); None where it cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _release_free_memory()
    base = _proc_kb("VmRSS").get("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    status = _proc_kb("VmRSS", "VmHWM")
    if base is None or not status or status["VmHWM"] > status["VmRSS"] + 1024:
        return None  # the kernel ignored the reset
    fn()
    peak = _proc_kb("VmHWM").get("VmHWM", 0)
    return max(peak - base, 0) / 1024.0


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (mmap threshold at its 32 MiB maximum, trim threshold 1 GiB) instead
    of returning each large block to the OS on ``free``; False where that is not glibc.

    Then repeated calls reuse pages already mapped, as PyTorch's caching allocator does on a GPU. Without it every
    call of a layer faults fresh pages in, which on a virtual machine can cost more than the arithmetic and make
    timings vary tenfold. Process-wide and permanent: ``deformattn complexity`` calls it, the library does not.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_layer(kind: str, side: int, *, dim: int = 128, num_heads: int = 4, repeats: int = 5,
                  budget_s: float = 2.0, device: str | torch.device = "cpu", measure_memory: bool = True,
                  **layer_kwargs: Any) -> dict[str, Any]:
    """Build one layer and measure it on a ``Tensor[1, dim, side, side]`` input.

    Returns:
        A row ``{"kind", "side", "tokens", "keys", "flops", "macs", "formula_macs", "ms", "peak_mib", "params"}``.
    """
    device = torch.device(device)
    geometry = {k: v for k, v in layer_kwargs.items() if k in ("window_size", "kernel_size", "ratio")}
    layer = build_layer(kind, dim=dim, num_heads=num_heads, side=side, **layer_kwargs).to(device).eval()
    x = torch.randn(1, dim, side, side, device=device)
    flops = count_flops(layer, x)[""]

    def run() -> None:
        with torch.no_grad():
            layer(x)

    run()  # warm-up: kernels, thread pools, caches
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 1 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    # memory last: it hands freed memory back to the OS first, which the timed calls should not pay for
    peak = _peak_memory_mib(run, device) if measure_memory else None
    return {
        "kind": kind,
        "side": side,
        "tokens": side * side,
        "keys": key_count(kind, side, **geometry),
        "flops": int(flops),
        "macs": int(flops) // 2,
        "formula_macs": int(formula_macs(kind, side, dim=dim, **geometry)),
        "ms": statistics.median(times) * 1e3,
        "peak_mib": peak,
        "params": sum(p.numel() for p in layer.parameters()),
    }


def run_complexity(sides: Sequence[int] = DEFAULT_SIDES, kinds: Sequence[str] = KINDS, *, dim: int = 128,
                   num_heads: int = 4, repeats: int = 5, budget_s: float = 2.0, device: str = "cpu",
                   log: Callable[[str], None] | None = None, **layer_kwargs: Any) -> list[dict[str, Any]]:
    """Measure every ``kind`` at every ``side``; returns the rows of :func:`measure_layer`."""
    for kind in kinds:
        _check_kind(kind)
    rows = []
    # dense attention last at each size: its large allocations (GBs at 112x112) must not precede the others'
    # measurements (on a VM, memory just handed back can slow the next page faults down a lot)
    ordered = [k for k in kinds if k != "dense"] + [k for k in kinds if k == "dense"]
    for side in sides:
        check_int(side, "side", "run_complexity", minimum=1)
        for kind in ordered:
            row = measure_layer(kind, side, dim=dim, num_heads=num_heads, repeats=repeats, budget_s=budget_s,
                                device=device, **layer_kwargs)
            rows.append(row)
            if log is not None:
                log(f"{kind:>18s} {side:4d}x{side:<4d} {row['macs'] / 1e9:9.3f} GMACs {row['ms']:9.2f} ms "
                    f"{_fmt_mib(row['peak_mib'])} MiB")
            gc.collect()
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(rows, key=lambda r: (r["side"], order[r["kind"]]))


def _fmt_mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def format_complexity_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per (side, kind), GMACs counted (and by formula), time and peak memory."""
    lines = [
        "| map | tokens | kind | keys / query | GMACs (counted) | GMACs (formula) | ms | peak MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['side']}x{r['side']} | {r['tokens']} | {r['kind']} | {r['keys']} | {r['macs'] / 1e9:.3f} | "
            f"{r['formula_macs'] / 1e9:.3f} | {r['ms']:.2f} | {_fmt_mib(r['peak_mib'])} |"
        )
    return "\n".join(lines)
