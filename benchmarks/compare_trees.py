"""Before / after: the same measurements on two source trees, in alternating fresh processes.

    git worktree add --detach /tmp/base <commit>
    python benchmarks/compare_trees.py --base /tmp/base --threads 1 --rounds 4 \\
        --attention v1_stage3:fast:fwd,pp_stage1:reference:fwd --models dat_tiny,dat_pp_tiny
    python benchmarks/compare_trees.py --base /tmp/base --quick      # smoke test, seconds

A regression check needs both sides measured in one session: on a shared machine the load moves more than most
code changes do. Every (item, tree, round) runs in a fresh worker process that imports ``deformattn`` from that
tree's ``src`` (``PYTHONPATH``; the worker records the file it imported), and the trees alternate within each item
(``base, new``, then ``new, base``, ...), so a load change hits both sides alike. Per worker: median wall time of
``--repeats`` calls after ``--warmup`` calls, the median thread CPU time of the same calls (preemption by other
jobs does not count in it) and the minor page faults per call (fresh pages glibc handed back to the kernel after
the previous call, paid inside the timed call).

Items:

* ``--attention case:impl:mode``: a case of ``benchmarks/attention.py`` (``CASES``, built by its ``build``), impl
  ``fast`` / ``reference``, mode ``fwd`` (``torch.inference_mode``) or ``fwdbwd`` (input and parameters take
  gradients; a fixed random output gradient).
* ``--models name``: float32 eager inference (``torch.inference_mode``, batch ``--batch``, ``--img-size``) of a
  registered variant at its default backends.

``--malloc-pinned`` runs the workers with glibc's heap thresholds pinned (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``): the heap is then never returned to the kernel between calls, which removes the page
faults and leaves the work of the kernels themselves.

Output: a markdown table on stdout and JSON at ``--json`` (written atomically): per item and tree the per-round
results, their medians, and ``new / base`` as the median over rounds of the ratio within a round.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    add_harness_args,
    atomic_write_json,
    emit_result,
    machine_info,
    machine_limits,
    markdown_table,
    run_worker,
    setup_torch,
    thread_env,
)

MODES = ("fwd", "fwdbwd")
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 26), "MALLOC_TRIM_THRESHOLD_": str(1 << 28)}


def parse_attention(spec: str) -> dict[str, str]:
    from attention import CASES

    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in CASES or parts[1] not in ("fast", "reference") or parts[2] not in MODES:
        raise ValueError(f"--attention: expected case:impl:mode with case in {sorted(CASES)}, impl fast or "
                         f"reference, mode in {MODES}; got {spec!r}")
    return {"kind": "attention", "case": parts[0], "impl": parts[1], "mode": parts[2], "label": spec}


# ---------------------------------------------------------------------------------------------------------------
# Worker: one item in a fresh process, deformattn from PYTHONPATH
# ---------------------------------------------------------------------------------------------------------------
def _attention_call(torch, spec: dict[str, Any]):
    from attention import CASES, build

    case = CASES[spec["case"]]
    module, _ = build(spec["impl"], case)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    x = torch.randn(case.B, case.C, case.H, case.W, generator=gen)
    if spec["mode"] == "fwd":
        module.eval()

        def call():
            with torch.inference_mode():
                module(x)

        return call
    module.train()  # dropout is 0: same function, autograd on
    x.requires_grad_(True)
    grad_out = torch.randn(case.B, case.C, case.H, case.W, generator=gen)

    def call():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad_out)

    return call


def _model_call(torch, spec: dict[str, Any]):
    from deformattn.models import create_model

    model = create_model(spec["model"]).eval()
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    x = torch.randn(spec["batch"], 3, spec["img_size"], spec["img_size"], generator=gen)

    def call():
        with torch.inference_mode():
            model(x)

    return call


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    torch = setup_torch(spec["threads"], spec["seed"])
    if spec["kind"] == "machine":
        return {**machine_info(), **machine_limits(spec["threads"], quick=spec["quick"])}
    import deformattn

    call = _attention_call(torch, spec) if spec["kind"] == "attention" else _model_call(torch, spec)
    for _ in range(spec["warmup"]):
        call()
    wall, cpu = [], []
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(spec["repeats"]):
        t0, c0 = time.perf_counter(), time.thread_time()
        call()
        cpu.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / spec["repeats"]
    return {"median_ms": statistics.median(wall), "min_ms": min(wall), "cpu_median_ms": statistics.median(cpu),
            "faults_per_call": faults, "repeats": len(wall), "imported": deformattn.__file__}


# ---------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------
def _load() -> float:
    return os.getloadavg()[0]


def _git_head(tree: Path) -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run(args) -> dict[str, Any]:
    trees = {"base": Path(args.base).resolve(), "new": Path(args.new).resolve()}
    for name, tree in trees.items():
        if not (tree / "src" / "deformattn" / "__init__.py").is_file():
            raise SystemExit(f"compare_trees: --{name} {tree} has no src/deformattn")
    items = [parse_attention(s) for s in args.attention.split(",") if s.strip()] if args.attention else []
    items += [{"kind": "model", "model": m.strip(), "label": m.strip()} for m in (args.models or "").split(",")
              if m.strip()]
    if not items:
        raise SystemExit("compare_trees: nothing to measure (give --attention and/or --models)")
    base_spec = dict(threads=args.threads, seed=args.seed, quick=args.quick, warmup=args.warmup,
                     repeats=args.repeats, batch=args.batch, img_size=args.img_size)
    env_extra = PINNED_MALLOC if args.malloc_pinned else {}

    def launch(tree: Path | None, spec: dict[str, Any]) -> dict[str, Any]:
        env = {**thread_env(args.threads), **env_extra}
        env.pop("PYTHONPATH", None)
        if tree is not None:
            env["PYTHONPATH"] = str(tree / "src")
        res = run_worker([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env=env,
                         timeout_s=args.timeout)
        if tree is not None and "imported" in res and not res["imported"].startswith(str(tree / "src")):
            res = {"error": f"imported {res['imported']}, not the tree's {tree / 'src'}"}
        return res

    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = _load()
    machine = launch(None, {**base_spec, "kind": "machine"})
    results = []
    for item in items:
        rounds: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
        for r in range(args.rounds):
            for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
                res = launch(trees[name], {**base_spec, **item, "load": _load()})
                res["load"] = _load()
                rounds[name].append(res)
                print(f"[{(time.perf_counter() - t_start):7.1f} s] {item['label']:<28} {name:<4} "
                      + (f"{res['median_ms']:8.1f} ms (cpu {res['cpu_median_ms']:.1f}, "
                         f"{res['faults_per_call']:.0f} faults/call)" if "error" not in res else res["error"]),
                      file=sys.stderr, flush=True)
        summary: dict[str, Any] = {}
        for key in ("median_ms", "cpu_median_ms", "faults_per_call"):
            ok = [(b, n) for b, n in zip(rounds["base"], rounds["new"]) if "error" not in b and "error" not in n]
            if not ok:
                continue
            summary[key] = {"base": statistics.median(b[key] for b, _ in ok),
                            "new": statistics.median(n[key] for _, n in ok)}
            if key != "faults_per_call":
                summary[key]["new_over_base"] = statistics.median(n[key] / b[key] for b, n in ok)
        results.append({**item, "rounds": rounds, "summary": summary})
    return {
        "script": "benchmarks/compare_trees.py",
        "argv": sys.argv[1:],
        "started": started.isoformat(timespec="seconds"),
        "minutes": round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds() / 60, 1),
        "trees": {name: {"path": str(tree), "commit": _git_head(tree)} for name, tree in trees.items()},
        "malloc_pinned": args.malloc_pinned,
        "load_average_1min": {"start": load_start, "end": _load()},
        "machine": machine,
        "settings": base_spec,
        "results": results,
    }


def report(out: dict[str, Any]) -> str:
    m = out["machine"]
    lines = [
        f"Before / after, {out['started']} ({out['minutes']} min): base {out['trees']['base']['commit']}, new "
        f"{out['trees']['new']['commit']}; {m.get('cpu', '?')}, {out['settings']['threads']} thread(s), float32 "
        f"matmul {m.get('matmul_gflops', float('nan')):.0f} GFLOP/s; 1-min load average "
        f"{out['load_average_1min']['start']:.1f} at the start, {out['load_average_1min']['end']:.1f} at the end"
        + ("; glibc heap thresholds pinned" if out["malloc_pinned"] else "") + ".",
        "",
    ]
    rows = []
    for res in out["results"]:
        s = res["summary"]
        if not s:
            rows.append([res["label"], "error", "", "", "", "", "", ""])
            continue
        w, c, f = s["median_ms"], s["cpu_median_ms"], s["faults_per_call"]
        rows.append([res["label"], f"{w['base']:.1f}", f"{w['new']:.1f}", f"{w['new_over_base']:.2f}",
                     f"{c['base']:.1f}", f"{c['new']:.1f}", f"{c['new_over_base']:.2f}",
                     f"{f['base']:.0f} / {f['new']:.0f}"])
    lines.append(markdown_table(["item", "base ms", "new ms", "new / base", "base cpu ms", "new cpu ms",
                                 "cpu new / base", "page faults / call base / new"], rows))
    lines += ["", f"(median over {len(out['results'][0]['rounds']['base'])} rounds of each worker's median; "
              "`new / base`: median over rounds of the ratio within a round; cpu: thread CPU time.)"]
    return "\n".join(lines)


t_start = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the source tree to compare against (a worktree of the older commit)")
    p.add_argument("--new", default=str(REPO), help="the tree under test (default: this checkout)")
    p.add_argument("--attention", help="comma-separated case:impl:mode items (cases of benchmarks/attention.py)")
    p.add_argument("--models", help="comma-separated registered variants: float32 eager inference")
    p.add_argument("--rounds", type=int, default=4, help="workers per tree and item, alternating (default 4)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per worker (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per worker first (default 3)")
    p.add_argument("--batch", type=int, default=8, help="model batch (default 8)")
    p.add_argument("--img-size", type=int, default=224, help="model image side (default 224)")
    p.add_argument("--malloc-pinned", action="store_true", help="pin glibc's heap thresholds in the workers")
    add_harness_args(p, results="compare_trees", quick_help="one round of one call each: a smoke test",
                     timeout_s=1800.0)
    args = p.parse_args(argv)
    if args.worker:
        emit_result(worker(json.loads(args.worker)))
        return 0
    if not args.base:
        p.error("--base is required")
    if args.quick:
        args.rounds, args.repeats, args.warmup = 1, 1, 0
    try:
        out = run(args)
    except ValueError as e:
        p.error(str(e))
    print(report(out))
    atomic_write_json(args.json, out)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0 if all(r["summary"] for r in out["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
