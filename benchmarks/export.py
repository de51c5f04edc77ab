"""Inference throughput on the CPU: onnxruntime vs PyTorch eager vs torch.compile, for one model (default
``dat_pp_tiny`` at 224).

    python benchmarks/export.py                                   # dat_pp_tiny, 224, batches 1 and 8, all cores
    python benchmarks/export.py --onnx /tmp/dat_pp_tiny.onnx      # keep the exported file (+ FILE.export.json) ...
    python benchmarks/export.py --onnx /tmp/dat_pp_tiny.onnx --reuse-onnx       # ... and time it again later
    python benchmarks/export.py --quick                           # smoke test: dat_nano at 32 (a few minutes)

What is measured, per batch size (``images/s = batch / median wall time of one forward pass``):

* ``pytorch-eager``: the model in eval mode under ``torch.inference_mode()``, as built (deformable layers on their
  default backend and ``grid_sample`` sampler).
* ``torch.compile``: ``torch.compile(model, fullgraph=True)`` (Inductor, default mode), compiled once per batch size
  before timing; the compile time is reported apart. A cold compile of dat_pp_tiny takes 10-20 min on two cores;
  Inductor's on-disk cache makes later runs take well under a minute.
* ``onnxruntime``: the file of ``deformattn.export.export_model(model, "onnx", dynamic="batch")`` (the default
  exporter: torch.jit.trace + torch.onnx.export(dynamo=False), opset 18, gather sampler: no GridSample node;
  verified against PyTorch at export)
  in an ``InferenceSession`` on the CPU execution provider, all graph optimisations, ``intra_op_num_threads`` =
  ``--threads``. One file serves every batch size. The export time (RESULTS.md has it) is
  reported apart; ``--onnx FILE --reuse-onnx`` times an earlier export again.

Every runtime gets the same random input per batch size (fixed seed); its output is compared with eager's (max abs
diff in the table). Weights are random (the speed does not depend on them). Timing: per batch size the runtimes are
timed in ``--rounds`` interleaved rounds (eager, compile, onnxruntime, eager, ...) so that a change of load on a
shared machine hits them alike; each round is one ``_common.time_fn`` (garbage collector off) of
``--repeats / --rounds`` calls, the first after ``--warmup`` calls; the table reports the median of the round
medians and their range.

Threads: on a machine shared with other jobs, ``--threads`` = all cores oversubscribes them and PyTorch's OpenMP
regions wait for preempted threads (dat_pp_tiny eager at batch 1 measured 3-7 s with 2 threads, 0.7 s with 1, on
the same 2-core machine); ``--threads 1`` gives stable numbers there.

``--dynamic`` (issue 14's table): every ``--models`` entry (default dat_pp_tiny, dat_tiny and timm's Swin-T as the
yardstick) exported with ``export_model(model, "onnx", dynamic=True)`` by each of ``--exporters``, in
``--export-rounds`` interleaved rounds (every model once per round); the table has each model's median export time,
its ratio to Swin-T's median, the node count and op types, then eager vs onnxruntime at ``--sizes`` and
``--batch-sizes`` on the last round's file.

Output: a markdown table on stdout and JSON at ``--json`` (default ``benchmarks/results/export.json``, written
atomically).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))
from _common import (  # noqa: E402
    atomic_write_json,
    default_threads,
    machine_info,
    machine_limits,
    markdown_table,
    setup_torch,
    time_fn,
)

RUNTIMES = ("pytorch-eager", "torch.compile", "onnxruntime")


def _log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def _onnx_session(args, model, H: int, W: int, t0: float, extra: dict[str, Any], tmp: str):
    """Export (or, with ``--reuse-onnx``, reuse) the ONNX file and open it in onnxruntime; ``(session, export_s)``."""
    import onnxruntime as ort

    from deformattn.export import export_model

    path = Path(args.onnx or Path(tmp) / f"{args.model}.onnx")
    sidecar = path.with_name(path.name + ".export.json")  # what the export reported, for --reuse-onnx
    if args.reuse_onnx and path.is_file():
        info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        if info and (info.get("model"), info.get("input_shape", [0, 0, 0, 0])[2:]) != (args.model, [H, W]):
            raise SystemExit(f"--reuse-onnx: {path} was exported from {info.get('model')} at "
                             f"{info.get('input_shape')}, not {args.model} at {H}x{W}")
        export_s = info.get("export_wall_s")
        extra["onnx"] = {**info, "reused_file": str(path)}
        _log(t0, f"reusing {path} (exported in {export_s or float('nan'):.0f} s; its outputs are compared with "
                 "eager's below)")
    else:
        _log(t0, f"exporting {args.model} to ONNX (dynamic batch) ...")
        t_export = time.perf_counter()
        result = export_model(model, "onnx", img_size=(H, W), dynamic="batch", output=path)
        export_s = time.perf_counter() - t_export
        _log(t0, f"exported in {export_s:.0f} s: {result.file_bytes / 2**20:.1f} MiB, "
                 f"{sum(result.op_counts.values())} nodes, GridSample {result.op_counts.get('GridSample', 0)}, "
                 f"verification max abs diff {result.max_abs_diff:.1e}")
        extra["onnx"] = {"model": args.model, **{k: v for k, v in result.as_dict().items() if k != "path"},
                         "export_wall_s": export_s}
        if args.onnx:
            atomic_write_json(sidecar, extra["onnx"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), export_s


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Per batch size: set every runtime up, then time them in interleaved rounds (eager, compile, onnxruntime,
    eager, ...), so that a change of load on a shared machine hits each runtime alike."""
    torch = setup_torch(args.threads, args.seed)
    from deformattn.models import create_model

    t0 = time.perf_counter()
    model = create_model(args.model).eval()
    H = W = args.img_size
    gen = torch.Generator().manual_seed(args.seed)
    inputs = {b: torch.randn(b, 3, H, W, generator=gen) for b in args.batch_sizes}
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        session, export_s = (_onnx_session(args, model, H, W, t0, extra, tmp) if "onnxruntime" in args.runtimes
                             else (None, None))
        for b, x in inputs.items():
            with torch.inference_mode():
                ref = model(x)
            fns: dict[str, Any] = {}  # runtime -> (call, setup seconds)
            if "pytorch-eager" in args.runtimes:
                def eager(x=x):
                    with torch.inference_mode():
                        return model(x)
                fns["pytorch-eager"] = (eager, None)
            if "torch.compile" in args.runtimes:
                import torch._dynamo

                # each batch size compiled on its own: after reset() the first compilation specialises every shape
                # (the fastest code); the default dynamic=None shares Inductor's cache with a plain torch.compile
                torch._dynamo.reset()
                compiled = torch.compile(model, fullgraph=True)
                _log(t0, f"compiling for batch {b} ...")
                t_compile = time.perf_counter()
                with torch.inference_mode():
                    compiled(x)
                compile_s = time.perf_counter() - t_compile
                _log(t0, f"compiled in {compile_s:.0f} s")

                def comp(x=x, compiled=compiled):
                    with torch.inference_mode():
                        return compiled(x)
                fns["torch.compile"] = (comp, compile_s)
            if session is not None:
                feed = {session.get_inputs()[0].name: x.numpy()}
                fns["onnxruntime"] = (lambda feed=feed: torch.from_numpy(session.run(None, feed)[0]), export_s)
            diffs = {rt: float((fn() - ref).abs().max()) for rt, (fn, _) in fns.items()}
            per_round = max(1, -(-args.repeats // args.rounds))
            medians: dict[str, list[float]] = {rt: [] for rt in fns}
            counts = dict.fromkeys(fns, 0)
            for r in range(args.rounds):
                for rt, (fn, _) in fns.items():
                    t = time_fn(fn, warmup=args.warmup if r == 0 else 0, repeats=per_round,
                                budget_s=args.budget / args.rounds, min_repeats=args.min_repeats)
                    medians[rt].append(t["median_ms"])
                    counts[rt] += t["repeats"]
            for rt, (fn, setup_s) in fns.items():
                med = statistics.median(medians[rt])
                rows.append({"runtime": rt, "batch": b, "median_ms": med, "round_medians_ms": medians[rt],
                             "min_round_ms": min(medians[rt]), "max_round_ms": max(medians[rt]),
                             "repeats": counts[rt], "rounds": args.rounds, "images_per_s": b / (med * 1e-3),
                             "max_abs_diff_vs_eager": diffs[rt], "setup_s": setup_s})
                _log(t0, f"{rt} batch {b}: {med:.1f} ms ({b / (med * 1e-3):.2f} images/s; rounds "
                         f"{', '.join(f'{m:.0f}' for m in medians[rt])} ms), max abs diff vs eager {diffs[rt]:.1e}")
    return {"rows": rows, **extra}


SWIN = "swin_tiny_patch4_window7_224"


def _build(name: str):
    """A registered deformattn variant, or timm's Swin-T (random weights) as the yardstick."""
    if name == SWIN:
        import timm

        return timm.create_model(SWIN, pretrained=False).eval()
    from deformattn.models import create_model

    return create_model(name).eval()


def run_dynamic(args: argparse.Namespace) -> dict[str, Any]:
    """Issue 14's table: per model, ``export_model(model, "onnx", dynamic=True)`` (median time of the interleaved
    rounds, nodes, op types, what is dynamic), then eager vs onnxruntime at every batch size and every size the file
    accepts."""
    import onnxruntime as ort

    torch = setup_torch(args.threads, args.seed)
    from deformattn.export import export_model

    t0 = time.perf_counter()
    exports: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for exporter in args.exporters:
            # the export times: --export-rounds interleaved rounds (every model once per round, so a change of load
            # hits them alike); each model's median and the last round's file, which the timings below use
            models = {}
            for name in args.models:
                torch.manual_seed(args.seed)
                models[name] = _build(name)
            times: dict[str, list[float]] = {name: [] for name in models}
            last: dict[str, Any] = {}
            for r in range(args.export_rounds):
                for name, model in models.items():
                    path = Path(tmp) / f"{name}.{exporter}.onnx"
                    _log(t0, f"exporting {name} (dynamic=True, exporter {exporter}, round {r + 1} of "
                             f"{args.export_rounds}) ...")
                    t_export = time.perf_counter()
                    result = export_model(model, "onnx", img_size=args.sizes[0], dynamic=True, output=path,
                                          exporter=None if exporter == "auto" else exporter,
                                          progress=lambda line, name=name: _log(t0, f"  {name}: {line}"))
                    last[name] = (result, time.perf_counter() - t_export, path)
                    times[name].append(result.export_seconds)
            for name, model in models.items():
                result, wall, path = last[name]
                export_s = statistics.median(times[name])
                ops = dict(sorted(result.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
                exports.append({"model": name, "exporter": exporter, "method": result.method,
                                "export_s": export_s, "export_rounds_s": times[name],
                                "capture_s": result.capture_seconds, "translate_s": result.translate_seconds,
                                "optimize_s": result.optimize_seconds, "verify_s": result.verify_seconds,
                                "wall_s": wall, "nodes": sum(ops.values()), "op_types": ops,
                                "dynamic_spatial": result.dynamic_spatial, "spatial_note": result.spatial_note,
                                "file_mib": result.file_bytes / 2**20, "checks": result.checks,
                                "max_abs_diff": result.max_abs_diff})
                _log(t0, f"{name}: export {export_s:.1f} s (median of "
                         f"{', '.join(f'{t:.1f}' for t in times[name])}; last: capture "
                         f"{result.capture_seconds:.1f}, translate {result.translate_seconds:.1f}, optimize "
                         f"{result.optimize_seconds:.1f}), {sum(ops.values())} nodes, spatial: {result.spatial_note}")
                _time_runtimes(args, ort, torch, model, name, exporter, result, path, rows, t0)
            del models, last
            if args.partial_json:  # a long run leaves what it has measured so far
                atomic_write_json(args.partial_json, {"exports": exports, "rows": rows, "partial": True})
    for e in exports:  # Swin-T exported the same way
        swin = next((s["export_s"] for s in exports if s["model"] == SWIN and s["exporter"] == e["exporter"]), None)
        e["vs_swin"] = e["export_s"] / swin if swin else None
    return {"exports": exports, "rows": rows}


def _time_runtimes(args: argparse.Namespace, ort: Any, torch: Any, model: Any, name: str, exporter: str,
                   result: Any, path: Path, rows: list[dict[str, Any]], t0: float) -> None:
    """Eager vs onnxruntime on the exported file at every batch size and every size it accepts (rows appended)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    for H, W in args.sizes:
        if not result.dynamic_spatial and (H, W) != tuple(result.input_shape[2:]):
            continue
        for b in args.batch_sizes:
            x = torch.randn(b, 3, H, W, generator=torch.Generator().manual_seed(args.seed))
            with torch.inference_mode():
                ref = model(x)

            def eager(x=x):
                with torch.inference_mode():
                    return model(x)

            feed = {input_name: x.numpy()}
            fns = {"pytorch-eager": eager,
                   "onnxruntime": lambda feed=feed: torch.from_numpy(session.run(None, feed)[0])}
            diff = float((fns["onnxruntime"]() - ref).abs().max())
            scale = float(ref.abs().max())
            medians: dict[str, list[float]] = {rt: [] for rt in fns}
            for r in range(args.rounds):
                for rt, fn in fns.items():
                    t = time_fn(fn, warmup=args.warmup if r == 0 else 0,
                                repeats=max(1, -(-args.repeats // args.rounds)),
                                budget_s=args.budget / args.rounds, min_repeats=args.min_repeats)
                    medians[rt].append(t["median_ms"])
            eager_ms = statistics.median(medians["pytorch-eager"])
            ort_ms = statistics.median(medians["onnxruntime"])
            rows.append({"model": name, "exporter": exporter, "H": H, "W": W, "batch": b, "eager_ms": eager_ms,
                         "ort_ms": ort_ms, "ort_speedup": eager_ms / ort_ms, "max_abs_diff": diff,
                         "rel_diff": diff / max(scale, 1e-30), "rounds_ms": medians})
            _log(t0, f"{name} ({exporter}) {H}x{W} batch {b}: eager {eager_ms:.0f} ms, onnxruntime {ort_ms:.0f} ms "
                     f"({eager_ms / ort_ms:.2f}x), max abs diff {diff:.1e} ({diff / max(scale, 1e-30):.1e} "
                     "of max|logit|)")


def _exporter_label(e: dict[str, Any]) -> str:
    """``auto`` with the exporter it chose (the method starts with ``torch.jit.trace`` or ``torch.export``)."""
    if e["exporter"] != "auto":
        return e["exporter"]
    return "auto: " + ("torchscript" if e["method"].startswith("torch.jit") else "dynamo")


def format_dynamic(result: dict[str, Any]) -> str:
    body = []
    for e in result["exports"]:
        vs = "-" if e["vs_swin"] is None else f"{e['vs_swin']:.2f}x"
        top = ", ".join(f"{k} {v}" for k, v in list(e["op_types"].items())[:8])
        more = len(e["op_types"]) - 8
        steps = f"{e['capture_s']:.1f} + {e['translate_s']:.1f} + {e['optimize_s']:.1f}"
        body.append([e["model"], _exporter_label(e), f"{e['export_s']:.1f}", steps, vs,
                     e["nodes"], "dynamic" if e["dynamic_spatial"] else "fixed",
                     top + (f", +{more} more types" if more > 0 else ""), e["op_types"].get("GridSample", 0)])
    t1 = markdown_table(["model", "exporter", "export s", "capture + translate + optimize s", "vs Swin-T", "nodes",
                         "H, W", "op types (most frequent)", "GridSample"], body, align="llrrrrlll")
    methods = {(e["model"], e["exporter"]): e for e in result["exports"]}
    body = [[r["model"], _exporter_label(methods[r["model"], r["exporter"]]), f"{r['H']}x{r['W']}", r["batch"], _ms(r["eager_ms"]), _ms(r["ort_ms"]),
             f"{r['ort_speedup']:.2f}x", f"{r['rel_diff']:.1e}"] for r in result["rows"]]
    t2 = markdown_table(["model", "exporter", "size", "batch", "eager ms", "onnxruntime ms", "ort speed-up",
                         "max abs diff / max|logit|"], body, align="llrrrrrr")
    return t1 + "\n\n" + t2


def main_dynamic(args: argparse.Namespace) -> int:
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    limits = machine_limits(args.threads, quick=True)
    result = run_dynamic(args)
    import importlib.metadata

    import torch

    info = {**machine_info(), "threads": args.threads, "onnxruntime": importlib.metadata.version("onnxruntime"),
            "matmul_gflops": limits["matmul_gflops"]}
    table = format_dynamic(result)
    threads = f"{args.threads} thread" + ("s" if args.threads != 1 else "")
    title = (f"dynamic ONNX export (export_model(..., dynamic=True), opset 18, gather sampler) and inference on the "
             f"CPU ({threads}), {created[:10]}; {info['cpu']}, {info['cores']} cores, float32 matmul "
             f"{info['matmul_gflops']:.0f} GFLOP/s; torch {torch.__version__}, "
             f"onnxruntime {info['onnxruntime']}")
    report = {"benchmark": "export_dynamic", "created": created, "machine": info,
              "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
              "title": title, "table_markdown": table, **result}
    print(title)
    print()
    print(table)
    atomic_write_json(args.json, report)
    Path(args.partial_json).unlink(missing_ok=True)
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    eager = {r["batch"]: r["median_ms"] for r in rows if r["runtime"] == "pytorch-eager"}
    order = {rt: i for i, rt in enumerate(RUNTIMES)}
    body = []
    for r in sorted(rows, key=lambda r: (r["batch"], order[r["runtime"]])):
        speedup = f"{eager[r['batch']] / r['median_ms']:.2f}x" if r["batch"] in eager else "-"
        setup = "-" if r["setup_s"] is None else f"{r['setup_s']:.0f}"
        body.append([r["runtime"], r["batch"], _ms(r["median_ms"]),
                     f"{_ms(r['min_round_ms'])}-{_ms(r['max_round_ms'])}", f"{r['images_per_s']:.2f}", speedup,
                     f"{r['max_abs_diff_vs_eager']:.1e}", setup, r["repeats"]])
    return markdown_table(["runtime", "batch", "median ms", "round medians ms", "images/s", "vs eager",
                           "max abs diff", "export / compile s", "calls"], body, align="lrrrrrrrr")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="registered variant (default dat_pp_tiny; quick: dat_nano)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default 224; quick: 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES), help="which runtimes")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per runtime and batch (default 9)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds the repeats are split into (default 3; the median of the round medians "
                        "is reported)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls before the first round (default 2)")
    p.add_argument("--min-repeats", type=int, default=1, help="calls per round whatever the budget (default 1)")
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds per runtime and batch, all rounds together (default 30)")
    p.add_argument("--threads", type=int, default=default_threads(), help="threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--onnx", metavar="FILE", default=None,
                   help="keep the exported ONNX file here (and what the export reported in FILE.export.json)")
    p.add_argument("--reuse-onnx", action="store_true",
                   help="use the existing --onnx FILE instead of exporting again (the export of dat_pp_tiny takes "
                        "minutes); its outputs are still compared with eager's")
    p.add_argument("--quick", action="store_true", help="dat_nano at 32, 2 repeats: a smoke test")
    p.add_argument("--json", default=None,
                   help="where to write the results (default results/export.json; --dynamic: export_dynamic.json)")
    p.add_argument("--dynamic", action="store_true",
                   help="issue 14's table: export --models with dynamic=True (time vs Swin-T, nodes, op types), "
                        "then eager vs onnxruntime at --sizes and --batch-sizes")
    p.add_argument("--models", nargs="+", default=["dat_pp_tiny", "dat_tiny", SWIN],
                   help="--dynamic: models to export (default dat_pp_tiny dat_tiny and timm's Swin-T)")
    p.add_argument("--exporters", nargs="+", choices=("auto", "torchscript", "dynamo"),
                   default=["torchscript", "dynamo"],
                   help="--dynamic: ONNX exporters (export_model's exporter), each model exported with each, so that "
                        "Swin-T is exported the same way as the DAT models (default: torchscript dynamo; auto would "
                        "take torch.export for Swin-T, whose trace cannot have a dynamic size)")
    p.add_argument("--export-rounds", type=int, default=3,
                   help="--dynamic: interleaved export rounds (every model once per round); the table has each "
                        "model's median (default 3)")
    p.add_argument("--sizes", nargs="+", type=lambda t: tuple(int(v) for v in t.split("x")),
                   default=[(224, 224), (257, 319)], metavar="HxW",
                   help="--dynamic: input sizes; the first is the export size (default 224x224 257x319)")
    args = p.parse_args(argv)
    if args.dynamic:
        if args.quick:
            args.models = ["dat_nano", "dat_v1_nano"]
            args.sizes = [(32, 32), (41, 57)]
            args.repeats, args.rounds, args.warmup, args.min_repeats = 2, 2, 1, 1
            args.export_rounds = 1
        if args.export_rounds < 1:
            p.error("--export-rounds must be >= 1")
        args.json = args.json or str(HERE / "results" / "export_dynamic.json")
        args.partial_json = args.json + ".partial"
        return main_dynamic(args)
    args.json = args.json or str(HERE / "results" / "export.json")
    if args.quick:
        args.model = args.model or "dat_nano"
        args.img_size = args.img_size or 32
        args.repeats, args.rounds, args.warmup, args.min_repeats = 2, 2, 1, 1
    args.model = args.model or "dat_pp_tiny"
    args.img_size = args.img_size or 224
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.rounds < 1:
        p.error("--batch-sizes, --repeats and --rounds must be >= 1")
    if args.reuse_onnx and not args.onnx:
        p.error("--reuse-onnx needs --onnx FILE")

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    result = run(args)
    import importlib.metadata

    import torch

    try:
        ort_version = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        ort_version = None
    info = {**machine_info(), "threads": args.threads, "onnxruntime": ort_version}
    table = format_table(result["rows"])
    threads = f"{args.threads} thread" + ("s" if args.threads != 1 else "")
    title = (f"{args.model} at {args.img_size}x{args.img_size}, inference on the CPU ({threads}), "
             f"{created[:10]}; {info['cpu']}, {info['cores']} cores; torch {torch.__version__}, onnxruntime "
             f"{info['onnxruntime']}")
    report = {
        "benchmark": "export", "created": created, "machine": info,
        "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "title": title, "table_markdown": table, **result,
    }
    print(title)
    print()
    print(table)
    atomic_write_json(args.json, report)
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
