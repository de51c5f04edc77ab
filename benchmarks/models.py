"""Whole-backbone speed on CPU: inference and training images/s, fast vs reference deformable attention, torch.compile.

    python benchmarks/models.py                     # dat_tiny and dat_pp_tiny at 224, batch 8, all cores
    python benchmarks/models.py --compile none      # eager only (~17 min at 1 thread on a shared 2-core machine)
    python benchmarks/models.py --quick             # smoke test: the 32x32 nano variants, batch 2 (about a minute)

Run time: the eager part takes ~17 min on a shared 2-core machine (1 thread); the default inductor comparison adds
the compilation, from a cold cache: there ~5 min for dat_tiny and ~33 min for dat_pp_tiny (51 min in all).

What is measured, per model (float32, CPU, ``--threads`` threads, batch ``--batch`` at ``--img-size``):

* **Inference**: ``model.eval()`` under ``torch.inference_mode()``, one forward pass of the batch.
* **Training step**: ``model.train()`` (the released drop-path rate), ``zero_grad`` + forward + cross-entropy
  against fixed random labels + backward + ``torch.optim.AdamW.step()``.
* **Fast vs reference, side by side**: both paths run in the *same worker process*, alternating call by call
  (rounds ``fast, reference`` then ``reference, fast``, ...), so that the load of a shared machine drifts over both
  alike. The fast path is the library default (``backend=None`` -> ``"fast"``); the reference path sets
  ``backend="reference"`` on every :class:`deformattn.DeformableAttention2d` (what ``DEFORMATTN_BACKEND=reference``
  does) on every :class:`deformattn.DeformableAttention2d` and :class:`deformattn.layers.NeighborhoodAttention2d`
  (the ``D`` and ``N`` layers: the two token mixers with two paths). Window attention (``L``/``S``: already the
  official matmul + softmax algorithm), the feed-forward layers, norms, stem and head run the same code on both. For inference the two paths share one
  model (same weights); for training each path has its own copy of the same initial weights and its own AdamW.
  The speed-up is the median over rounds of ``reference time / fast time`` of the same round.
* **Where the time goes**: module hooks time every deformable layer (``D``), neighborhood (``N``) and window
  attention (``L/S``), feed-forward layer (``FFN``), local perception unit (``LPU``) and layer norm (``norm``) in each
  timed call (training: forward hooks plus full backward hooks; the optimizer step is timed apart); ``rest`` is
  the remainder (stem, down-sampling, residual adds, head, loss, autograd bookkeeping). From that split the
  Amdahl bound follows: the end-to-end speed-up if the fast paths made the two-path layers (``D`` and ``N``)
  *free* is ``reference total / (reference total - reference D and N time)``.
* **FLOPs**: :func:`deformattn.analysis.flops.count_flops` (``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per
  multiply-add, matrix products / convolutions / SDPA only, see :mod:`deformattn.analysis.flops`) of one image, on both
  paths; training FLOPs are counted over forward + backward of one image (AdamW's element-wise work is not
  counted). The papers quote multiply-adds (GMACs = these FLOPs / 2). Achieved rate = FLOPs/image x images/s,
  reported as a fraction of the machine's float32 matmul rate (the faster of 1024² and 2048² ``torch.mm``)
  measured in the same run, before and after the model workers (the mean of the two is the reference; both are
  printed, since a shared machine drifts). A convolution's backward counts twice its forward (torch's own formula
  overcounts depthwise convolutions by their channel count; see :mod:`deformattn.analysis.flops`).
* **torch.compile** (``--compile``): the fast path in inference, ``inductor`` compiled per region (every token
  mixer and feed-forward module is compiled on its own, ``module.compile()``, so repeated blocks of one stage share
  one compiled graph; ``--compile inductor-full`` compiles the whole model as one ``torch.compile``), against the
  same model eager, alternating call by call. The first compiled call (compilation) is timed apart; the output is
  checked against eager.

* **Precision** (part ``precision``): per model, float32, bfloat16 autocast (float32 weights) and bfloat16
  weights (``model.to(torch.bfloat16)``), alternating call by call in one worker, for inference and a training step
  (AdamW), each with its accuracy beside it: the logits' max error relative to their scale and the top-1
  agreement with float32 (inference), the cosine similarity of the first step's gradient with float32's (training).
  The same worker measures the machine's float32 and bfloat16 matmul rates (1024² ``torch.mm``) first, so the
  bf16 speed-up can be read against what the matrix units allow.

    python benchmarks/models.py --skip infer,train --compile none --json benchmarks/results/models_precision.json

Every worker is a fresh process (``--worker``), seeded the same way. Output: a markdown report on stdout and JSON at
``--json`` (default ``benchmarks/results/models.json``, written atomically).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    atomic_write_json,
    add_harness_args,
    emit_result,
    machine_info,
    machine_limits,
    markdown_table,
    run_worker,
    setup_torch,
    thread_env,
)

DEFAULT_MODELS = ("dat_tiny", "dat_pp_tiny")
QUICK_MODELS = ("dat_v1_nano", "dat_nano")  # the small CPU variants (v1 and DAT++ layouts), built for 32x32
PATHS = ("fast", "reference")
KINDS = ("D", "N", "L/S", "FFN", "LPU", "norm")
TWO_PATH = ("D", "N")  # the layers with a fast and a reference path
KIND_LABEL = {"D": "deformable attn", "N": "neighborhood attn", "L/S": "window attn", "FFN": "feed-forward",
              "LPU": "LPU", "norm": "layer norms", "rest": "rest"}
COMPILE_MODES = ("inductor", "inductor-full", "aot_eager", "eager", "none")
SPEEDUP_TARGET = 1.5


# ---------------------------------------------------------------------------------------------------------------
# Worker helpers
# ---------------------------------------------------------------------------------------------------------------
def _import_model_code():
    sys.path.insert(0, str(REPO / "src"))  # measure this checkout, not some installed copy
    import deformattn
    from deformattn import DeformableAttention2d
    from deformattn.layers import ConvFFN, LocalPerceptionUnit, Mlp, NeighborhoodAttention2d, WindowAttention
    from deformattn.layers import LayerNormProxy

    def kind_of(module) -> str | None:
        if isinstance(module, DeformableAttention2d):
            return "D"
        if isinstance(module, NeighborhoodAttention2d):
            return "N"
        if isinstance(module, WindowAttention):
            return "L/S"
        if isinstance(module, (ConvFFN, Mlp)):
            return "FFN"
        if isinstance(module, LocalPerceptionUnit):
            return "LPU"
        if isinstance(module, LayerNormProxy):
            return "norm"
        return None

    return deformattn, (DeformableAttention2d, NeighborhoodAttention2d), kind_of


def set_path(model, path: str, cls) -> int:
    """Point every two-path layer (``cls``: D and N) at ``path`` ("fast": the default, "reference"); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, cls):
            m.backend = None if path == "fast" else "reference"
            n += 1
    return n


class KindTimer:
    """Wall time per module kind within one call, from forward (and optionally full backward) hooks.

    Kinds never nest inside each other (a LayerNormProxy sits inside a deformable layer's offset network, so
    modules inside an already-timed module are skipped)."""

    def __init__(self, model, kind_of: Callable, backward: bool = False):
        self.acc: dict[str, float] = {}
        self.handles = []
        self._t0: dict[int, float] = {}
        self._tb: dict[int, float] = {}
        timed_prefixes: list[str] = []
        for name, m in model.named_modules():
            kind = kind_of(m)
            if kind is None or any(name.startswith(p + ".") for p in timed_prefixes):
                continue
            timed_prefixes.append(name)
            key = id(m)
            self.handles.append(m.register_forward_pre_hook(lambda mod, a, key=key: self._start(self._t0, key)))
            self.handles.append(m.register_forward_hook(
                lambda mod, a, o, key=key, k=kind: self._stop(self._t0, key, k)))
            if backward:
                self.handles.append(m.register_full_backward_pre_hook(
                    lambda mod, g, key=key: self._start(self._tb, key)))
                self.handles.append(m.register_full_backward_hook(
                    lambda mod, gi, go, key=key, k=kind: self._stop(self._tb, key, k)))

    def _start(self, table: dict, key: int) -> None:
        table[key] = time.perf_counter()

    def _stop(self, table: dict, key: int, kind: str) -> None:
        t0 = table.pop(key, None)
        if t0 is not None:
            self.acc[kind] = self.acc.get(kind, 0.0) + time.perf_counter() - t0

    def reset(self) -> None:
        self.acc = {}
        self._t0.clear()
        self._tb.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def alternate(fns: dict[str, Callable[[], Any]], *, rounds: int, warmup: int,
              after: Callable[[str], None] | None = None, budget_s: float = math.inf,
              min_rounds: int = 1) -> dict[str, list[float]]:
    """Time the callables of ``fns`` alternately: warm-up rounds, then timed rounds in alternating order
    (``a, b``, then ``b, a``, ...). Returns ``{name: [ms per timed round]}``; ``after(name)`` runs (untimed) after
    each timed call. Rounds stop early once ``budget_s`` is spent (never below ``min_rounds``)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    t_start = time.perf_counter()
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                fns[n]()
                samples[n].append((time.perf_counter() - t0) * 1e3)
            finally:
                gc.enable()
            if after is not None:
                after(n)
        if r + 1 >= min_rounds and time.perf_counter() - t_start > budget_s:
            break
    return samples


def summarise(ms: list[float], batch: int) -> dict[str, Any]:
    med = statistics.median(ms)
    return {"median_ms": med, "min_ms": min(ms), "max_ms": max(ms), "samples_ms": ms, "repeats": len(ms),
            "img_per_s": batch / (med / 1e3)}


def paired_speedup(samples: dict[str, list[float]], slow: str, fast: str) -> dict[str, Any]:
    ratios = [s / f for s, f in zip(samples[slow], samples[fast])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_round": ratios}


def _median_kinds(per_call: list[dict[str, float]], totals_ms: list[float]) -> dict[str, float]:
    """Median ms per kind over the timed calls, plus ``rest`` (total - the kinds)."""
    kinds = sorted({k for d in per_call for k in d})
    out = {k: statistics.median([d.get(k, 0.0) * 1e3 for d in per_call]) for k in kinds}
    out["rest"] = statistics.median([t - sum(d.values()) * 1e3 for d, t in zip(per_call, totals_ms)])
    return out


def count_model_flops(torch, model, x, *, train: bool) -> int:
    """FlopCounterMode FLOPs of one forward (``train=False``, no grad) or forward + backward (``train=True``)."""
    from deformattn.analysis.flops import count_flops, flop_counter, model_counting

    if not train:
        return count_flops(model, x)[""]
    with model_counting(model), flop_counter() as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights")


def matmul_rates(torch, n: int = 1024, repeats: int = 10) -> dict[str, float]:
    """GFLOP/s of an ``n x n`` ``torch.mm`` in float32 and bfloat16 (median of ``repeats``)."""
    rates = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        c = torch.empty(n, n, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b, out=c)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            ts.append(time.perf_counter() - t0)
        rates[label] = 2 * n**3 / statistics.median(ts) / 1e9
    return rates


def precision_worker(torch, create_model, name: str, x, gen, spec: dict[str, Any]) -> dict[str, Any]:
    """fp32 / bf16 autocast / bf16 weights: inference and a training step, alternating, with accuracy vs fp32."""
    import contextlib

    bf16 = torch.bfloat16
    out: dict[str, Any] = {"matmul_gflops": matmul_rates(torch)}
    base = create_model(name)
    B = x.shape[0]
    labels = torch.randint(0, base.num_classes, (B,), generator=gen)

    def setup(prec):
        m = copy.deepcopy(base)
        xin = x
        ctx = contextlib.nullcontext
        if prec == "bf16-weights":
            m, xin = m.to(bf16), x.to(bf16)
        elif prec == "bf16-autocast":
            ctx = lambda: torch.autocast("cpu", dtype=bf16)  # noqa: E731
        return m, xin, ctx

    # inference
    runs = {p: setup(p) for p in PRECISIONS}
    logits = {}
    for p, (m, xin, ctx) in runs.items():
        m.eval()
        with torch.inference_mode(), ctx():
            logits[p] = m(xin).float()
    ref = logits["fp32"]
    accuracy = {p: {"logits_rel_err": float((lg - ref).abs().max() / ref.abs().max()),
                    "finite": bool(torch.isfinite(lg).all()),
                    "top1_agree": float((lg.argmax(1) == ref.argmax(1)).float().mean())} for p, lg in logits.items()}

    def make_infer(p):
        m, xin, ctx = runs[p]

        def call():
            with torch.inference_mode(), ctx():
                m(xin)
        return call

    samples = alternate({p: make_infer(p) for p in PRECISIONS}, rounds=spec["rounds"], warmup=spec["warmup"],
                        budget_s=spec["budget_s"], min_rounds=spec["min_rounds"])
    out["infer"] = {p: {**summarise(samples[p], B), **accuracy[p]} for p in PRECISIONS}
    out["infer_speedup"] = {p: paired_speedup(samples, "fp32", p) for p in PRECISIONS}

    # training step: each precision its own copy of the same initial weights and its own AdamW
    runs = {p: setup(p) for p in PRECISIONS}
    grads = {}
    for p, (m, xin, ctx) in runs.items():
        m.train()
        torch.manual_seed(spec["seed"])  # the same drop-path draws
        with ctx():
            loss = torch.nn.functional.cross_entropy(m(xin).float(), labels)
        loss.backward()
        grads[p] = torch.cat([q.grad.float().flatten() for q in m.parameters() if q.grad is not None])
        m.zero_grad(set_to_none=True)
    opts = {p: torch.optim.AdamW(runs[p][0].parameters(), lr=1e-4, weight_decay=0.05) for p in PRECISIONS}

    def make_step(p):
        m, xin, ctx = runs[p]
        opt = opts[p]

        def step():
            opt.zero_grad(set_to_none=True)
            with ctx():
                loss = torch.nn.functional.cross_entropy(m(xin).float(), labels)
            loss.backward()
            opt.step()
        return step

    samples = alternate({p: make_step(p) for p in PRECISIONS}, rounds=spec["train_rounds"], warmup=spec["warmup"],
                        budget_s=spec["budget_s"], min_rounds=spec["min_rounds"])
    cos = torch.nn.functional.cosine_similarity
    out["train"] = {p: {**summarise(samples[p], B),
                        "grad_cosine": float(cos(grads[p].double(), grads["fp32"].double(), dim=0))}
                    for p in PRECISIONS}
    out["train_speedup"] = {p: paired_speedup(samples, "fp32", p) for p in PRECISIONS}
    return out


def render_precision(report: dict[str, Any]) -> str:
    """The precision table (fp32 / bf16 autocast / bf16 weights) with the matmul rates of the same run."""
    rows, lines = [], []
    for r in report["models"]:
        res = r.get("precision")
        if not res or "error" in res:
            continue
        mm = res["matmul_gflops"]
        lines.append(f"- {r['model']} worker: matmul 1024² float32 {mm['fp32']:.0f} GFLOP/s, bfloat16 "
                     f"{mm['bf16']:.0f} GFLOP/s (bf16 / fp32 = {mm['bf16'] / mm['fp32']:.2f}x)")
        for p in PRECISIONS:
            i, t = res["infer"][p], res["train"][p]
            rows.append([r["model"], p, f"{i['median_ms']:.0f}", f"{res['infer_speedup'][p]['median']:.2f}",
                         f"{i['logits_rel_err']:.3g}", f"{i['top1_agree']:.2f}", f"{t['median_ms']:.0f}",
                         f"{res['train_speedup'][p]['median']:.2f}", f"{t['grad_cosine']:.4f}"])
    if not rows:
        return ""
    head = ["model", "precision", "infer ms", "infer × fp32", "logits err", "top-1 agree", "train step ms",
            "train × fp32", "grad cosine"]
    s = report["settings"]
    return ("\n\n## Precision\n\n"
            f"Batch {s['batch']} at {s['img_size']}, {s['threads']} thread(s), CPU. `× fp32`: paired median of fp32 "
            "time / this time (alternating calls). `logits err`: max |logits - fp32 logits| / max |fp32 logits|; "
            "`grad cosine`: cosine similarity of the first training step's gradient with fp32's.\n\n"
            + markdown_table(head, rows) + "\n\n" + "\n".join(lines) + "\n")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch = setup_torch(spec["threads"], spec["seed"])
    kind = spec["kind"]
    if kind == "machine":
        return {**machine_info(), **machine_limits(spec["threads"], quick=spec["quick"]),
                "loadavg_1m": os.getloadavg()[0]}

    deformattn, DAttn, kind_of = _import_model_code()
    from deformattn.models import create_model

    name, B, S = spec["model"], spec["batch"], spec["img_size"]
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    x = torch.randn(B, 3, S, S, generator=gen)
    x1 = x[:1].clone()
    out: dict[str, Any] = {"model": name, "package": f"deformattn from {Path(deformattn.__file__).parent}"}

    if kind == "infer":
        model = create_model(name).eval()
        out["params"] = sum(p.numel() for p in model.parameters())
        out["two_path_layers"] = set_path(model, "fast", DAttn)
        flops = {}
        for path in PATHS:
            set_path(model, path, DAttn)
            flops[path] = count_model_flops(torch, model, x1, train=False)
        out["flops_per_image"] = flops
        timer = KindTimer(model, kind_of)
        per_call: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}

        def make(path):
            def call():
                set_path(model, path, DAttn)
                timer.reset()
                with torch.inference_mode():
                    model(x)
            return call

        with torch.inference_mode():  # lazy initialisation on a tiny input before the full-size warm-up
            model(x1)
        samples = alternate({p: make(p) for p in PATHS}, rounds=spec["rounds"], warmup=spec["warmup"],
                            after=lambda p: per_call[p].append(dict(timer.acc)), budget_s=spec["budget_s"],
                            min_rounds=spec["min_rounds"])
        timer.remove()
        out["paths"] = {p: {**summarise(samples[p], B), "kinds_ms": _median_kinds(per_call[p], samples[p])}
                        for p in PATHS}
        out["speedup"] = paired_speedup(samples, "reference", "fast")
        return out

    if kind == "precision":
        return {**out, **precision_worker(torch, create_model, name, x, gen, spec)}

    if kind == "train":
        base = create_model(name)
        out["params"] = sum(p.numel() for p in base.parameters())
        models = {p: copy.deepcopy(base) for p in PATHS}
        del base
        for p, m in models.items():
            set_path(m, p, DAttn)
            m.train()
        out["flops_per_image"] = {p: count_model_flops(torch, models[p], x1, train=True) for p in PATHS}
        labels = torch.randint(0, models["fast"].num_classes, (B,), generator=gen)
        opts = {p: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05) for p, m in models.items()}
        timers = {p: KindTimer(m, kind_of, backward=True) for p, m in models.items()}
        per_call: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
        losses: dict[str, list[float]] = {p: [] for p in PATHS}

        def make(path):
            m, opt, timer = models[path], opts[path], timers[path]

            def step():
                timer.reset()
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(m(x), labels)
                loss.backward()
                t0 = time.perf_counter()
                opt.step()
                timer.acc["optimizer"] = time.perf_counter() - t0
                losses[path].append(float(loss.detach()))
            return step

        samples = alternate({p: make(p) for p in PATHS}, rounds=spec["rounds"], warmup=spec["warmup"],
                            after=lambda p: per_call[p].append(dict(timers[p].acc)), budget_s=spec["budget_s"],
                            min_rounds=spec["min_rounds"])
        for t in timers.values():
            t.remove()
        out["paths"] = {p: {**summarise(samples[p], B), "kinds_ms": _median_kinds(per_call[p], samples[p]),
                            "losses": losses[p]} for p in PATHS}
        out["speedup"] = paired_speedup(samples, "reference", "fast")
        return out

    if kind == "compile":
        mode = spec["compile"]
        model = create_model(name).eval()
        with torch.inference_mode():
            y_eager = model(x)
        compiled = copy.deepcopy(model)
        dynamo = torch._dynamo.config
        for attr in ("recompile_limit", "cache_size_limit"):  # one entry per stage shape under regional compile
            if hasattr(dynamo, attr):
                setattr(dynamo, attr, max(getattr(dynamo, attr), 64))
        backend = "inductor" if mode.startswith("inductor") else mode
        if mode == "inductor-full":
            compiled = torch.compile(compiled, backend=backend)
            regions = 1
        else:
            regions = 0
            for m in compiled.modules():
                if kind_of(m) in ("D", "N", "L/S", "FFN"):
                    m.compile(backend=backend)
                    regions += 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = compiled(x)
        out["compile_s"] = time.perf_counter() - t0
        out["regions"] = regions
        out["backend"] = backend
        out["max_abs_diff"] = float((y - y_eager).abs().max())
        out["max_abs_out"] = float(y_eager.abs().max())

        def make(m):
            def call():
                with torch.inference_mode():
                    m(x)
            return call

        samples = alternate({"eager": make(model), "compiled": make(compiled)}, rounds=spec["rounds"],
                            warmup=spec["warmup"], budget_s=spec["budget_s"], min_rounds=spec["min_rounds"])
        out["paths"] = {k: summarise(v, B) for k, v in samples.items()}
        out["gain"] = paired_speedup(samples, "eager", "compiled")
        try:
            out["unique_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        except Exception:  # pragma: no cover - private counters
            pass
        return out
    raise ValueError(f"unknown worker kind {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Parent: report
# ---------------------------------------------------------------------------------------------------------------
def _fmt(v: Any, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{nd}f}"


def matmul_rate(report: dict[str, Any]) -> float | None:
    rates = [m["matmul_gflops"] for m in (report["machine"], report.get("machine_after") or {})
             if isinstance(m, dict) and m.get("matmul_gflops")]
    return statistics.mean(rates) if rates else None


def derive(report: dict[str, Any]) -> None:
    """Per-model derived figures (achieved GFLOP/s, fraction of the matmul rate, Amdahl bound) and the targets."""
    rate = matmul_rate(report)
    targets = []
    for r in report["models"]:
        for mode in ("infer", "train"):
            res = r.get(mode) or {}
            if "error" in res or not res:
                continue
            # the model's own work: neighborhood attention is counted on its reference path (model_counting), not
            # with the redundant multiply-adds of the fast path's tiles
            flops = res["flops_per_image"]["reference"]
            for path in PATHS:
                p = res["paths"][path]
                p["gflops_per_s"] = flops * p["img_per_s"] / 1e9
                p["matmul_fraction"] = p["gflops_per_s"] / rate if rate else None
                kinds = p["kinds_ms"]
                p["deformable_share"] = kinds.get("D", 0.0) / p["median_ms"]
                p["two_path_share"] = sum(kinds.get(k, 0.0) for k in TWO_PATH) / p["median_ms"]
            ref = res["paths"]["reference"]
            two_ref = sum(ref["kinds_ms"].get(k, 0.0) for k in TWO_PATH)
            res["amdahl_bound"] = (ref["median_ms"] / (ref["median_ms"] - two_ref)
                                   if ref["median_ms"] > two_ref else None)
            for kind, key in (("D", "deformable_speedup"), ("N", "neighborhood_speedup")):
                fast_k, ref_k = res["paths"]["fast"]["kinds_ms"].get(kind), ref["kinds_ms"].get(kind)
                res[key] = ref_k / fast_k if fast_k and ref_k else None
            sp = res["speedup"]["median"]
            # what the target would demand of the machine: 1.5x the reference's achieved share of the matmul rate
            res["target_matmul_fraction"] = (SPEEDUP_TARGET * ref["matmul_fraction"]
                                             if ref.get("matmul_fraction") else None)
            need = res["target_matmul_fraction"]
            targets.append(dict(
                name=f"{r['model']} {'inference' if mode == 'infer' else 'training step'}: fast / reference end to end",
                value=sp, threshold=f">= {SPEEDUP_TARGET}x", passed=sp >= SPEEDUP_TARGET,
                detail=(f"layers alone: D {_fmt(res['deformable_speedup'])}x"
                        + (f", N {_fmt(res['neighborhood_speedup'])}x" if res['neighborhood_speedup'] else "")
                        + f"; D+N are {ref['two_path_share']:.0%} of the reference time, so even free D/N layers "
                        f"give at most {_fmt(res['amdahl_bound'])}x"
                        + (f"; {SPEEDUP_TARGET}x would need {need:.0%} of the measured matmul rate (the "
                           f"reference runs at {ref['matmul_fraction']:.0%})" if need else "")),
            ))
        comp = r.get("compile")
        if comp is not None:
            ok = "error" not in comp
            tol = 1e-3 * max(1.0, comp.get("max_abs_out", 1.0))
            targets.append(dict(
                name=f"{r['model']}: torch.compile ({report['settings']['compile']}) runs and matches eager",
                value=comp.get("gain", {}).get("median") if ok else None, threshold="compiles; |diff| small",
                passed=ok and comp["max_abs_diff"] <= tol,
                detail=(f"gain {_fmt(comp['gain']['median'])}x, compile {comp['compile_s']:.0f} s, max |diff| "
                        f"{comp['max_abs_diff']:.1e}") if ok else comp["error"],
            ))
    report["targets"] = targets
    report["matmul_gflops_used"] = rate


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    m = report["machine"]
    lines = ["## Whole-model speed (benchmarks/models.py)", ""]
    elapsed = report.get("elapsed_s")
    lines.append(f"Run finished {report['created']}" + (f" after {elapsed / 60:.0f} min" if elapsed else "") +
                 f" — `{report['command']}`")
    if "error" in m:
        lines.append(f"Machine limits: not measured ({m['error']})")
    else:
        after = report.get("machine_after") or {}
        after_s = f", after the models: {after['matmul_gflops']:.1f}" if after.get("matmul_gflops") else ""
        lines.append(
            f"Machine: {m['cpu']}, {m['cores']} cores, {s['threads']} threads, torch {m['torch']}, Python "
            f"{m['python']}. float32 matmul (best of 1024² / 2048² mm) measured in this run: "
            f"{m['matmul_gflops']:.1f} GFLOP/s before"
            f"{after_s} (mean used: {_fmt(report['matmul_gflops_used'], 1)}); copy bandwidth "
            f"{m['copy_gbps']:.1f} GB/s."
        )
        loads = [x.get("loadavg_1m") for x in (m, after) if x.get("loadavg_1m") is not None]
        if loads:
            lines[-1] += (" Load average (1 min) before / after: " + " / ".join(f"{v:.1f}" for v in loads) +
                          f" on {m['cores']} cores (other processes share the machine).")
    lines += [
        f"Settings: batch {s['batch']}, {s['img_size']}², float32, CPU; inference up to {s['rounds']} rounds, "
        f"training up to {s['train_rounds']} rounds (after {s['warmup']} warm-up round(s)); each round runs fast and "
        f"reference once, alternating the order; medians. FLOPs: torch.utils.flop_counter (2 per multiply-add; "
        f"GMACs = FLOPs / 2), training = forward + backward.",
        "",
    ]
    rows = []
    for r in report["models"]:
        for mode, label in (("infer", "inference"), ("train", "train step")):
            res = r.get(mode)
            if not res:
                continue
            if "error" in res:
                rows.append([r["model"], label, "error", "", "", "", "", "", ""])
                continue
            f, ref = res["paths"]["fast"], res["paths"]["reference"]
            flops = res["flops_per_image"]["reference"]
            rows.append([
                r["model"], label, _fmt(flops / 1e9, 2), _fmt(f["img_per_s"]), _fmt(ref["img_per_s"]),
                f"**{_fmt(res['speedup']['median'])}×**", _fmt(f["gflops_per_s"], 1),
                "—" if f["matmul_fraction"] is None else f"{f['matmul_fraction']:.0%}",
                "—" if ref["matmul_fraction"] is None else f"{ref['matmul_fraction']:.0%}",
            ])
    lines += [markdown_table(
        ["model", "mode", "GFLOP/img", "fast img/s", "reference img/s", "fast × ref", "fast GFLOP/s",
         "fast % of matmul", "ref % of matmul"], rows, "llrrrrrrr"), ""]
    lines += ["(`fast × ref`: median over rounds of reference time / fast time in the same round. GFLOP/img: "
              "FlopCounterMode FLOPs of one image (the model's own work: neighborhood attention counted on its "
              "reference path, not with the redundant multiply-adds of the fast path's tiles), "
              "forward for inference, forward + backward for training; `% of matmul`: achieved GFLOP/s over the "
              "measured matmul rate.)", ""]

    brow = []
    for r in report["models"]:
        for mode, label in (("infer", "inference"), ("train", "train step")):
            res = r.get(mode)
            if not res or "error" in res:
                continue
            for path in PATHS:
                p = res["paths"][path]
                k = p["kinds_ms"]
                cells = [r["model"], label, path, _fmt(p["median_ms"] / 1e3, 2)]
                for kind in KINDS + ("optimizer", "rest"):
                    v = k.get(kind)
                    cells.append("—" if v is None else f"{v / 1e3:.2f} ({v / p['median_ms']:.0%})")
                brow.append(cells)
            nsp = res.get("neighborhood_speedup")
            brow.append([r["model"], label, "ref / fast", "", f"**{_fmt(res['deformable_speedup'])}×**",
                         f"**{_fmt(nsp)}×**" if nsp else "", "", "", "", "", "", f"Amdahl: ≤ {_fmt(res['amdahl_bound'])}×"])
    lines += ["Where the time goes (seconds per batch, share of the call; forward + backward for training):", "",
              markdown_table(["model", "mode", "path", "total s"] + [KIND_LABEL[k] for k in KINDS] +
                             ["AdamW step", "rest"], brow, "lllrrrrrrrrr"), ""]
    lines += ["(Amdahl: end-to-end speed-up if the two-path layers (deformable and neighborhood attention) cost "
              "nothing = reference total / (reference total - their reference time).)", ""]

    crow = []
    for r in report["models"]:
        c = r.get("compile")
        if c is None:
            continue
        if "error" in c:
            crow.append([r["model"], "error: " + c["error"][:120], "", "", "", ""])
            continue
        crow.append([r["model"], _fmt(c["paths"]["eager"]["img_per_s"]), _fmt(c["paths"]["compiled"]["img_per_s"]),
                     f"**{_fmt(c['gain']['median'])}×**", f"{c['compile_s']:.0f}", f"{c['max_abs_diff']:.1e}"])
    if crow:
        lines += [f"torch.compile, inference, fast path ({s['compile']}"
                  + (", one compiled region per token mixer / feed-forward module" if s["compile"] != "inductor-full"
                     else ", whole model") + f"; inductor cache: {s['compile_cache']}):", "",
                  markdown_table(["model", "eager img/s", "compiled img/s", "gain", "compile s (first call)",
                                  "max |compiled - eager|"], crow, "lrrrrr"), ""]
    lines += ["Targets:", ""]
    for t in report["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        lines.append(f"- {mark} {t['name']}: {_fmt(t['value'])} (target {t['threshold']}) — {t['detail']}")
    for note in report.get("notes", []):
        lines += ["", note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated registered variants (default "
                   f"{','.join(DEFAULT_MODELS)}; quick {','.join(QUICK_MODELS)})")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; quick 2)")
    p.add_argument("--img-size", type=int, default=None, help="image side (default 224; quick 32)")
    p.add_argument("--rounds", type=int, default=None, help="timed inference rounds (default 4; quick 1)")
    p.add_argument("--train-rounds", type=int, default=None, help="timed training rounds (default 3; quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per worker (default 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed rounds per worker before stopping early (default 300; quick 10)")
    p.add_argument("--compile", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode for the inference comparison (default inductor; quick: eager, i.e. "
                        "dynamo capture only)")
    p.add_argument("--compile-cache", choices=("fresh", "default"), default="fresh",
                   help="inductor cache: a fresh empty folder per model (default; compile time from cold) or "
                        "torch's default folder (warm after an earlier run)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: infer, train, precision")
    add_harness_args(p, results="models", timeout_s=2400.0,
                     quick_help="the 32x32 CPU variants (dat_v1_nano, dat_nano), batch 2, one round: a smoke test")
    p.add_argument("--note", action="append", default=[], help="a note to add to the report (repeatable)")
    args = p.parse_args(argv)

    if args.worker:
        emit_result(worker(json.loads(args.worker)))
        return 0

    q = args.quick
    batch = args.batch or (2 if q else 8)
    size = args.img_size or (32 if q else 224)
    rounds = args.rounds or (1 if q else 4)
    train_rounds = args.train_rounds or (1 if q else 3)
    budget = args.budget if args.budget is not None else (10.0 if q else 300.0)
    compile_mode = args.compile or ("eager" if q else "inductor")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - {"infer", "train", "precision"}:
        p.error(f"--skip takes infer, train and/or precision, got {args.skip!r}")
    models = [m.strip() for m in (args.models or ",".join(QUICK_MODELS if q else DEFAULT_MODELS)).split(",")
              if m.strip()]
    if min(batch, size, rounds, train_rounds, args.threads) < 1 or args.warmup < 0:
        p.error("--batch, --img-size, --rounds, --train-rounds and --threads must be >= 1, --warmup >= 0")
    sys.path.insert(0, str(REPO / "src"))
    from deformattn.models import list_models

    unknown = [m for m in models if m not in list_models()]
    if unknown or not models:
        p.error(f"unknown model(s) {unknown}; registered: {', '.join(list_models())}")

    env = thread_env(args.threads)
    script = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    base = dict(threads=args.threads, seed=args.seed, quick=q)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    def run(spec: dict[str, Any]) -> dict[str, Any]:
        return run_worker(script + [json.dumps({**base, **spec})], env=env, timeout_s=args.timeout)

    log(f"machine limits ({args.threads} threads)")
    machine = run({"kind": "machine"})
    results = []
    for name in models:
        row: dict[str, Any] = {"model": name}
        common = dict(model=name, batch=batch, img_size=size, warmup=args.warmup, budget_s=budget,
                      min_rounds=1 if q else 2)
        for kind, n in (("infer", rounds), ("train", train_rounds)):
            if kind in skip:
                continue
            res = row[kind] = run({**common, "kind": kind, "rounds": n})
            if "error" in res:
                log(f"{name:>12} {kind:>7}: ERROR {res['error']}")
            else:
                f, r = res["paths"]["fast"], res["paths"]["reference"]
                log(f"{name:>12} {kind:>7}: fast {f['img_per_s']:7.2f} img/s, reference {r['img_per_s']:7.2f} "
                    f"img/s, speed-up {res['speedup']['median']:.2f}x (n={f['repeats']})")
        if "precision" not in skip:
            res = row["precision"] = run({**common, "kind": "precision", "rounds": rounds,
                                          "train_rounds": train_rounds})
            if "error" in res:
                log(f"{name:>12} precision: ERROR {res['error']}")
            else:
                sp = {k: res["infer_speedup"][k]["median"] for k in PRECISIONS}
                log(f"{name:>12} precision: inference x fp32: bf16 autocast {sp['bf16-autocast']:.2f}, bf16 weights "
                    f"{sp['bf16-weights']:.2f}; matmul bf16/fp32 "
                    f"{res['matmul_gflops']['bf16'] / res['matmul_gflops']['fp32']:.2f}")
        if compile_mode != "none":
            spec = {**base, **common, "kind": "compile", "rounds": rounds, "compile": compile_mode}
            cenv = dict(env)
            with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
                if args.compile_cache == "fresh":  # compile time from a cold cache, not a hit of an earlier run
                    cenv["TORCHINDUCTOR_CACHE_DIR"] = cache
                res = row["compile"] = run_worker(script + [json.dumps(spec)], env=cenv, timeout_s=args.timeout)
            if "error" in res:
                log(f"{name:>12} compile: ERROR {res['error']}")
            else:
                log(f"{name:>12} compile: {res['compile_s']:.0f} s to compile, gain {res['gain']['median']:.2f}x, "
                    f"max |diff| {res['max_abs_diff']:.1e}")
        results.append(row)
    machine_after = None
    if not q:  # a shared machine drifts: the matmul rate once more, after the models
        log("machine limits again")
        machine_after = run({"kind": "machine"})

    notes = [
        "Deformable (D) and neighborhood (N) attention have a fast and a reference path (N: tiled matrix products "
        "vs the gathered neighbourhoods, both plain PyTorch, no NATTEN); window attention (already the official "
        "matmul + softmax), feed-forward layers, norms, stem and head are the same code on both, so the end-to-end "
        "speed-up is bounded by the D and N layers' share (Amdahl column).",
    ]
    notes += args.note
    if compile_mode in ("eager", "aot_eager"):
        notes.append(f"torch.compile backend {compile_mode!r}: graph capture only (no code generation), so its "
                     "'gain' is ~1 by construction; it checks that the models compile, not that they get faster.")
    report = {
        "benchmark": "models",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/models.py"] + list(argv or sys.argv[1:])),
        "machine": machine,
        "machine_after": machine_after,
        "settings": dict(models=models, batch=batch, img_size=size, dtype="float32", device="cpu",
                         threads=args.threads, rounds=rounds, train_rounds=train_rounds, warmup=args.warmup,
                         budget_s=budget, compile=compile_mode, compile_cache=args.compile_cache, seed=args.seed,
                         quick=q,
                         env={k: v for k, v in os.environ.items() if k.startswith("DEFORMATTN_")}),
        "flops_convention": "torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-add; matrix products, "
                            "convolutions and SDPA counted; grid_sample, softmax, norms, activations and the "
                            "optimizer not counted. GMACs (the papers' 'FLOPs') = FLOPs / 2.",
        "models": results,
        "notes": notes,
    }
    derive(report)
    report["elapsed_s"] = time.perf_counter() - t_start
    report["table_markdown"] = render(report) + render_precision(report)
    print(report["table_markdown"])
    atomic_write_json(args.json, report)
    log(f"wrote {args.json}")
    failed = [(r["model"], k) for r in results for k in ("infer", "train", "compile", "precision")
              if "error" in (r.get(k) or {})]
    if failed or "error" in machine:
        return 1
    if args.check_targets and any(t["passed"] is False for t in report["targets"]):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
