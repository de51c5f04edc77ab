"""Shared helpers for the benchmarks: timing, peak-memory measurement, machine limits, worker processes, output.

Everything here is plain Python + torch so that any benchmark script can import it (``benchmarks/`` is not a
package: scripts add their own folder to ``sys.path``; ``python benchmarks/x.py`` does that already).

Peak memory (CPU): :class:`PeakRSS`
-----------------------------------
What a measurement reports is the growth of the process's resident set size (RSS) during one call:
``peak RSS during the call - RSS right before it``. It is measured in a fresh worker process per measurement so
that nothing earlier (another implementation's allocations, allocator caches, the timing loop) is counted or hides
anything. Before the baseline is read, the caller runs the code once on a tiny input (this loads the lazily
initialised kernels and thread pools), the garbage collector runs, and glibc is asked to hand freed heap memory
back to the OS (``malloc_trim(0)``), so the baseline is the live data (module parameters, the input) and the growth
is what the call itself needs. The peak comes from the kernel, not from sampling:

1. ``/proc/self/clear_refs`` <- ``"5"`` resets the kernel's high-water mark ``VmHWM`` to the current RSS (Linux >=
   4.0); after the call ``VmHWM`` is the exact peak RSS over the call, however short the spike was.
2. A sampling thread reads ``VmRSS`` every ~0.5 ms as a cross-check (``sampled_peak``; it can only be lower: it
   misses spikes shorter than its period, and it needs the GIL, which torch releases inside its kernels).
3. Where ``clear_refs`` cannot be written, ``ru_maxrss`` (the lifetime peak, not resettable) stands in when it grew
   during the call (then it is that call's peak), else the sampled peak does; ``method`` records which was used.

RSS counts every resident page, also file-backed ones (shared-library code paged in on first use). Their growth
over the call is reported separately (``file_growth``) so that it can be told apart; after the tiny warm-up call it
is ~0.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

MiB = 1024.0 * 1024.0
RESULT_MARKER = "BENCH_RESULT "  # a worker's result line on stdout: the marker, then one line of JSON


# ---------------------------------------------------------------------------------------------------------------
# Process set-up
# ---------------------------------------------------------------------------------------------------------------
def default_threads() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a worker that must use ``threads`` threads (set before torch is imported)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def setup_torch(threads: int, seed: int):
    """Import torch, fix the thread count and seed everything; returns the torch module."""
    import random

    import torch

    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    return torch


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------
def proc_status_kb(*fields: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in kB (e.g. ``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``); {} off Linux."""
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


def rss_bytes() -> int:
    return proc_status_kb("VmRSS").get("VmRSS", 0) * 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    status = proc_status_kb("VmRSS", "VmHWM")
    # a kernel that accepts the write but ignores "5" leaves VmHWM above VmRSS
    return bool(status) and status["VmHWM"] <= status["VmRSS"] + 64


def release_free_memory() -> None:
    """Collect garbage and return freed heap memory to the OS (glibc ``malloc_trim``), so RSS = live data."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # kB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakRSS:
    """Context manager: peak RSS growth over its body (see the module docstring for the method).

    After exit: ``growth`` (bytes, peak - baseline), ``baseline``, ``peak``, ``sampled_peak``, ``file_growth``,
    ``method`` and :meth:`as_dict`.
    """

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.baseline = self.peak = self.sampled_peak = self.growth = self.file_growth = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        peak = 0
        while not self._stop.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(self.interval_s)
        self.sampled_peak = max(peak, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()  # before the baseline: the thread's own stack is not the call's memory
        time.sleep(0.01)
        release_free_memory()
        status = proc_status_kb("VmRSS", "RssFile")
        self.baseline = status.get("VmRSS", 0) * 1024
        self._file0 = status.get("RssFile", 0) * 1024
        self._maxrss0 = _maxrss_bytes()
        self._hwm_ok = reset_hwm()
        return self

    def __exit__(self, *exc) -> None:
        status = proc_status_kb("VmHWM", "RssFile")
        maxrss = _maxrss_bytes()
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.file_growth = status.get("RssFile", 0) * 1024 - self._file0
        if self._hwm_ok:
            self.peak, self.method = max(status["VmHWM"] * 1024, self.sampled_peak), "VmHWM (reset via clear_refs)"
        elif maxrss > self._maxrss0:
            self.peak, self.method = max(maxrss, self.sampled_peak), "ru_maxrss (grew during the call)"
        else:
            self.peak, self.method = self.sampled_peak, "VmRSS sampling (0.5 ms)"
        self.growth = max(self.peak - self.baseline, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_mib": self.growth / MiB,
            "baseline_mib": self.baseline / MiB,
            "sampled_peak_mib": max(self.sampled_peak - self.baseline, 0) / MiB,
            "file_growth_mib": self.file_growth / MiB,
            "memory_method": self.method,
        }


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int,
    repeats: int,
    budget_s: float = math.inf,
    min_repeats: int = 3,
    setup: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` calls.

    ``setup()`` (untimed) runs before every call. ``budget_s`` bounds the time spent: warm-up stops after a quarter
    of it, and the repeats are cut to what fits in the budget at the warm-up's speed, but never below
    ``min_repeats`` (so slow measurements still get a median).
    """
    t_start = time.perf_counter()
    per_call = []
    for _ in range(warmup):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        per_call.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s / 4:
            break
    if per_call and math.isfinite(budget_s):
        est = statistics.median(per_call)
        repeats = max(min(repeats, int(budget_s / max(est, 1e-9))), min(min_repeats, repeats))
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "q1_ms": q[0],
        "q3_ms": q[2],
        "repeats": len(samples),
        "warmup": len(per_call),
    }


# ---------------------------------------------------------------------------------------------------------------
# Machine limits: what the hardware can do, to judge results against
# ---------------------------------------------------------------------------------------------------------------
def machine_limits(threads: int, *, quick: bool = False) -> dict[str, Any]:
    """Measured float32 matmul GFLOP/s (square n x n, n = 2048; 1024 too) and copy bandwidth (GB/s).

    Bandwidth counts the bytes read plus the bytes written by ``dst.copy_(src)`` of a 256 MiB tensor (32 MiB with
    ``quick``), far larger than any cache.
    """
    import torch

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads}
    sizes = (512,) if quick else (1024, 2048)
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        t = time_fn(lambda: torch.mm(a, b, out=c), warmup=2, repeats=3 if quick else 10)
        out[f"matmul{n}_gflops"] = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e9
    out["matmul_gflops"] = max(out[f"matmul{n}_gflops"] for n in sizes)
    numel = (32 if quick else 256) * 2**20 // 4
    src, dst = torch.randn(numel), torch.empty(numel)
    t = time_fn(lambda: dst.copy_(src), warmup=2, repeats=3 if quick else 10)
    out["copy_gbps"] = 2 * numel * 4 / (t["median_ms"] * 1e-3) / 1e9
    return out


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return {
        "cpu": cpu,
        "cores": default_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------------------------
def add_harness_args(p, *, results: str, quick_help: str, timeout_s: float) -> None:
    """The options every worker-based benchmark script shares (threads, seed, quick, timeout, JSON path, target
    check, and the hidden ``--worker`` of the child processes); ``results`` names ``results/<results>.json``."""
    import argparse

    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--timeout", type=float, default=timeout_s, help="seconds before a worker is killed")
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / f"{results}.json"),
                   help="where to write the results")
    p.add_argument("--check-targets", action="store_true", help="exit status 2 when a measured target fails")
    p.add_argument("--worker", help=argparse.SUPPRESS)


def emit_result(obj: dict[str, Any]) -> None:
    """Worker side: print the result line the parent looks for."""
    sys.stdout.write(RESULT_MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_worker(argv: Sequence[str], *, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run ``argv`` (a worker) and return its result dict, or ``{"error": ...}`` when it failed."""
    try:
        proc = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    if proc.returncode < 0:
        reason = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        reason = f"exit status {proc.returncode}"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": reason + (": " + " | ".join(tail) if tail else "")}


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` atomically, through the package's one atomic writer."""
    from deformattn._utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def geomean(values: Sequence[float]) -> float:
    values = list(values)
    if not values:
        return math.nan
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one char per column (``l`` or ``r``; default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
