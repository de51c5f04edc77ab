"""Speed and memory of multi-scale deformable attention (Deformable DETR): the official pure-PyTorch core (our
``reference`` path, ``ms_deform_attn_core_pytorch``'s algorithm) against the ``fast`` path.

    python benchmarks/msda.py                    # encoder + decoder scale, all cores (~10 min on 2 cores)
    python benchmarks/msda.py --quick --scale 4  # smoke test: maps 4x smaller per side, seconds

Cases (one 800x1066 image, ``N = 1``): levels 100x134, 50x67, 25x34, 13x17 (``S = 17821``), ``d_model = 256``,
8 heads, 4 points, 4 levels. ``encoder``: every token a query (``Lq = S``), reference points at the pixel centres
of each level (Deformable DETR's encoder). ``decoder``: 300 queries, reference points uniform in ``[0, 1]``.

Scopes: ``core`` times :func:`deformattn.functional.multi_scale_deformable_attention` alone (value, locations and
weights prepared once by the module); ``module`` times the whole ``MultiScaleDeformableAttention`` call (the four
projections, softmax and locations included). The module is the official initialisation with the offset and weight
projections perturbed (N(0, 0.02) weights) so that every query samples its own locations, a few pixels around its
reference point as after training.

Each (case, scope, implementation, mode) is measured in a fresh worker process: inputs built, one call on a
tiny input (lazy initialisation), one full-size call under ``PeakRSS`` (peak resident-set growth over the call, see
``_common.py``), then warm-up and timed repeats (median). Forward runs under ``torch.inference_mode``;
forward+backward takes gradients w.r.t. value, locations and weights (core) or query, input and every parameter
(module), with a fixed random output gradient.

The *matmul floor* of the call is the four projections of the module (``value_proj``, ``sampling_offsets``,
``attention_weights``, ``output_proj``: ``nn.Linear`` at the case's shapes) timed alone, forward and
forward+backward: what a module call costs if the sampling took no time.

Goals (issue 17, encoder scale, core scope): forward >= 2.5x and forward+backward >= 2x the reference,
forward+backward peak memory <= 1/3 of the reference's. Output: markdown on stdout, JSON at ``--json`` (default
``benchmarks/results/msda.json``, written atomically).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PeakRSS,
    add_harness_args,
    atomic_write_json,
    emit_result,
    machine_info,
    machine_limits,
    markdown_table,
    release_free_memory,
    run_worker,
    setup_torch,
    thread_env,
    time_fn,
)

REPO = Path(__file__).resolve().parents[1]
LEVELS = ((100, 134), (50, 67), (25, 34), (13, 17))
D_MODEL, HEADS, POINTS = 256, 8, 4
CASES = {"encoder": None, "decoder": 300}  # queries: None = every token
IMPLS = ("reference", "fast")
SCOPES = ("core", "module")
MODES = ("fwd", "fwdbwd")
MODE_LABEL = {"fwd": "forward", "fwdbwd": "forward+backward"}
GOALS = {"fwd": 2.5, "fwdbwd": 2.0, "peak": 1 / 3}


def levels(scale: int) -> list[tuple[int, int]]:
    return [(max(1, -(-h // scale)), max(1, -(-w // scale))) for h, w in LEVELS]


def encoder_reference_points(shapes, torch):
    """Pixel centres of every level, in [0, 1] (x, y), repeated over levels (no padding: valid ratios 1)."""
    pts = []
    for H, W in shapes:
        y, x = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")
        pts.append(torch.stack([x.reshape(-1), y.reshape(-1)], -1))
    ref = torch.cat(pts, 0)  # S, 2
    return ref[None, :, None, :].expand(1, -1, len(shapes), 2).contiguous()


def build(case: str, scale: int, seed: int):
    import torch

    from deformattn import MultiScaleDeformableAttention

    torch.manual_seed(seed)
    shapes = levels(scale)
    S = sum(h * w for h, w in shapes)
    m = MultiScaleDeformableAttention(D_MODEL, len(shapes), HEADS, POINTS)
    with torch.no_grad():
        m.sampling_offsets.weight.normal_(0, 0.02)
        m.attention_weights.weight.normal_(0, 0.02)
    x = torch.randn(1, S, D_MODEL)
    if CASES[case] is None:
        query, ref = x.clone(), encoder_reference_points(shapes, torch)
    else:
        query, ref = torch.randn(1, CASES[case], D_MODEL), torch.rand(1, CASES[case], len(shapes), 2)
    shapes_t = torch.tensor(shapes)
    start = torch.cumsum(shapes_t.prod(1), 0) - shapes_t.prod(1)
    return m, query, ref, x, shapes_t, start


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch = setup_torch(spec["threads"], spec["seed"])
    if spec["kind"] == "machine":
        return {**machine_info(), **machine_limits(spec["threads"], quick=spec["quick"])}
    sys.path.insert(0, str(REPO / "src"))  # measure this checkout
    import deformattn
    from deformattn.functional import multi_scale_deformable_attention as msda

    m, query, ref, x, shapes, start = build(spec["case"], spec["scale"], spec["seed"])
    mode, grad = spec["mode"], spec["mode"] == "fwdbwd"
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    g_out = torch.randn(1, query.shape[1], D_MODEL, generator=gen)

    if spec["kind"] == "floor":
        linears = [(m.value_proj, x), (m.sampling_offsets, query), (m.attention_weights, query),
                   (m.output_proj, query)]
        ins = [t.detach().clone().requires_grad_(grad) for _, t in linears]
        gs = [torch.randn(t.shape[0], t.shape[1], lin.out_features, generator=gen) for (lin, t) in linears]

        def call():
            if grad:
                for (lin, _), t, g in zip(linears, ins, gs):
                    lin(t).backward(g)
            else:
                with torch.inference_mode():
                    for (lin, _), t in zip(linears, ins):
                        lin(t)

        def setup():
            m.zero_grad(set_to_none=True)
            for t in ins:
                t.grad = None

        call()
        return time_fn(call, setup=setup, warmup=spec["warmup"], repeats=spec["repeats"],
                       budget_s=spec["budget_s"], min_repeats=spec["min_repeats"])

    impl, scope = spec["impl"], spec["scope"]
    m.backend = impl
    if scope == "core":
        cap = {}
        real = deformattn.msda.multi_scale_deformable_attention

        def spy(value, shp, loc, w, **kw):
            cap.update(value=value.detach(), loc=loc.detach(), w=w.detach())
            return real(value, shp, loc, w, **kw)

        deformattn.msda.multi_scale_deformable_attention = spy
        with torch.no_grad():
            m(query, ref, x, shapes, start)
        deformattn.msda.multi_scale_deformable_attention = real
        leaves = [cap["value"].contiguous(), cap["loc"].contiguous(), cap["w"].contiguous()]
        del cap
        for t in leaves:
            t.requires_grad_(grad)
        g_core = torch.randn(1, query.shape[1], D_MODEL, generator=gen)

        def run(v, loc, w, g):
            out = msda(v, shapes, loc, w, backend=impl)
            if grad:
                out.backward(g)

        tiny = [t[:, :1].detach().clone().requires_grad_(grad) for t in leaves]
        tiny[0] = leaves[0].detach().clone().requires_grad_(grad)  # value must cover every level

        def call():
            run(*leaves, g_core)

        run(*tiny, g_core[:, :1])
    else:
        for t in (query, x):
            t.requires_grad_(grad)

        def call():
            out = m(query, ref, x, shapes, start)
            if grad:
                out.backward(g_out)

        with torch.no_grad() if not grad else torch.enable_grad():
            o = m(query[:, :1], ref[:, :1], x, shapes, start)
            if grad:
                o.backward(g_out[:, :1])
        leaves = [query, x]

    def setup():
        m.zero_grad(set_to_none=True)
        for t in leaves:
            t.grad = None

    def timed():
        if grad:
            call()
        else:
            with torch.inference_mode():
                call()

    setup()
    release_free_memory()
    with PeakRSS() as mem:
        timed()
    timing = time_fn(timed, setup=setup, warmup=spec["warmup"], repeats=spec["repeats"], budget_s=spec["budget_s"],
                     min_repeats=spec["min_repeats"])
    return {**timing, **mem.as_dict()}


def _r(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def evaluate(rows: dict, cases: list[str]) -> list[dict[str, Any]]:
    """The issue's goals at encoder scale (core scope), and the same ratios reported for every case and scope."""
    out = []
    if "encoder" not in cases:
        return out
    get = lambda impl, mode, key="median_ms": rows.get(("encoder", "core", impl, mode), {}).get(key)  # noqa: E731
    for mode in MODES:
        v = _r(get("reference", mode), get("fast", mode))
        out.append({"name": f"encoder core {MODE_LABEL[mode]}: fast x reference", "value": v, "goal": GOALS[mode],
                    "passed": None if v is None else v >= GOALS[mode]})
    v = _r(get("fast", "fwdbwd", "peak_mib"), get("reference", "fwdbwd", "peak_mib"))
    out.append({"name": "encoder core forward+backward peak memory: fast / reference", "value": v,
                "goal": GOALS["peak"], "passed": None if v is None else v <= GOALS["peak"]})
    return out


def _f(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def render(report: dict[str, Any]) -> str:
    """The results table (the README quotes it verbatim)."""
    mach = report["machine"]
    lines = [f"Measured {report['created'][:10]} on {mach.get('cpu', '?')} ({report['settings']['threads']} "
             f"thread(s); float32 matmul {mach.get('matmul_gflops', 0):.0f} GFLOP/s), torch {mach.get('torch', '?')}"
             f"{', machine shared with other jobs' if report['settings'].get('shared') else ''}"
             + (f" (1-min load average {load['start']:.1f} at the start, {load['end']:.1f} at the end)"
                if (load := report.get("load_average")) else "") + ".", ""]
    rows = {(r["case"], r["scope"], r["impl"], r["mode"]): r for r in report["rows"]}
    table = []
    for case in report["cases"]:
        floor = report["floor"].get(case, {})
        for scope in SCOPES:
            for impl in IMPLS:
                cells = [case, scope, impl]
                for mode in MODES:
                    r = rows.get((case, scope, impl, mode), {})
                    ref = rows.get((case, scope, "reference", mode), {})
                    cells += [_f(r.get("median_ms")), _f(r.get("peak_mib")),
                              _f(_r(ref.get("median_ms"), r.get("median_ms")), 2)]
                table.append(cells)
        table.append([case, "matmul floor", "4 projections", _f(floor.get("fwd", {}).get("median_ms")), "", "",
                      _f(floor.get("fwdbwd", {}).get("median_ms")), "", ""])
    lines.append(markdown_table(["case", "scope", "impl", "fwd ms", "fwd peak MiB", "fwd x ref", "fwd+bwd ms",
                                 "fwd+bwd peak MiB", "fwd+bwd x ref"], table, "lllrrrrrr"))
    if report["targets"]:
        lines.append("")
        for t in report["targets"]:
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
            rel = "<=" if "memory" in t["name"] else ">="
            lines.append(f"- {verdict} {t['name']}: {_f(t['value'], 2)} (goal {rel} {t['goal']:.2f})")
    return "\n".join(lines)


def _git_commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it (None outside git)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--scopes", default=",".join(SCOPES), help=f"comma-separated subset of {','.join(SCOPES)}")
    p.add_argument("--scale", type=int, default=1, help="divide every level's height and width by this (smoke tests)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 1)")
    p.add_argument("--budget", type=float, default=None, help="seconds per measurement (default 20; quick 2)")
    p.add_argument("--min-repeats", type=int, default=None, help="repeats kept whatever the budget (default 3)")
    p.add_argument("--shared", action="store_true", help="record that the machine ran other jobs meanwhile")
    add_harness_args(p, results="msda", quick_help="few repeats, quick machine probe: a smoke test", timeout_s=900.0)
    args = p.parse_args(argv)
    if args.worker:
        emit_result(worker(json.loads(args.worker)))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    if not cases or any(c not in CASES for c in cases) or not scopes or any(s not in SCOPES for s in scopes):
        p.error(f"--cases must be a subset of {','.join(CASES)} and --scopes of {','.join(SCOPES)}")
    if args.scale < 1:
        p.error("--scale must be >= 1")
    quick = args.quick
    reps = dict(repeats=args.repeats or (2 if quick else 10), warmup=1 if args.warmup is None else args.warmup,
                budget_s=args.budget or (2.0 if quick else 20.0), min_repeats=args.min_repeats or (1 if quick else 3))
    env = thread_env(args.threads)
    base = dict(threads=args.threads, seed=args.seed, quick=quick, scale=args.scale, **reps)
    script = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]  # 1-minute load average: how shared the machine was

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    machine = run_worker(script + [json.dumps({**base, "kind": "machine"})], env=env, timeout_s=args.timeout)
    log(f"machine: {machine.get('cpu')}, matmul {machine.get('matmul_gflops', 0):.0f} GFLOP/s")
    rows, floor, failed = [], {}, False
    for case in cases:
        floor[case] = {}
        for mode in MODES:
            res = run_worker(script + [json.dumps({**base, "kind": "floor", "case": case, "mode": mode})], env=env,
                             timeout_s=args.timeout)
            floor[case][mode] = res
            log(f"{case:>8} matmul floor {MODE_LABEL[mode]:>16}: {res.get('median_ms', res.get('error'))}")
            for scope in scopes:
                for impl in IMPLS:  # interleaved: slow drifts of a shared machine hit both alike
                    spec = {**base, "kind": "msda", "case": case, "scope": scope, "impl": impl, "mode": mode}
                    res = run_worker(script + [json.dumps(spec)], env=env, timeout_s=args.timeout)
                    failed |= "error" in res
                    rows.append({"case": case, "scope": scope, "impl": impl, "mode": mode, **res})
                    log(f"{case:>8} {scope:>6} {impl:>9} {MODE_LABEL[mode]:>16}: "
                        + (f"ERROR {res['error']}" if "error" in res else
                           f"{res['median_ms']:9.1f} ms (n={res['repeats']}), peak {res['peak_mib']:8.1f} MiB"))
    by_key = {(r["case"], r["scope"], r["impl"], r["mode"]): r for r in rows}
    report = {
        "benchmark": "msda",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/msda.py"] + (argv if argv is not None else sys.argv[1:])),
        "commit": _git_commit(),
        "machine": machine,
        "settings": {"threads": args.threads, "seed": args.seed, "quick": quick, "scale": args.scale,
                     "shared": args.shared, **reps,
                     "env": {k: v for k, v in os.environ.items() if k.startswith("DEFORMATTN_")}},
        "cases": {c: {"levels": levels(args.scale), "queries": CASES[c] or sum(h * w for h, w in levels(args.scale)),
                      "d_model": D_MODEL, "heads": HEADS, "points": POINTS} for c in cases},
        "rows": rows,
        "floor": floor,
        "targets": evaluate(by_key, cases) if "core" in scopes else [],
        "elapsed_s": time.perf_counter() - t0,
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
    }
    report["table_markdown"] = render(report)
    print(report["table_markdown"])
    atomic_write_json(args.json, report)
    log(f"wrote {args.json}")
    if failed or "error" in machine:
        return 1
    if args.check_targets and any(t["passed"] is False for t in report["targets"]):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
