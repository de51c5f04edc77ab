"""Where a model's inference time goes in float32 and bfloat16: matrix products vs everything else.

Profiles one forward (torch.profiler, CPU, self time per op) per dtype and splits the ops into

* ``matmul``: the ops that run on the matrix units (``mm``, ``addmm``, ``bmm``, SDPA, dense convolutions);
* ``other``: depthwise convolutions, softmax, gathers / index, element-wise ops, norms, copies, ... - memory- or
  latency-bound, so bfloat16 gains little there.

The split bounds the bf16 speed-up (Amdahl): even with free matrix products, ``bf16 ≤ fp32 total / bf16 other``.

    python benchmarks/precision_profile.py --models dat_tiny,dat_pp_tiny --json benchmarks/results/precision_profile.json

Times are per forward, averaged over ``--repeats`` profiled forwards (a shared machine's load moves single runs).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu"}
_CONV_OPS = {"aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::thnn_conv2d", "aten::_convolution"}


def _category(key: str, shapes) -> str:
    if key in _MATMUL_OPS:
        return "matmul"
    if key in _CONV_OPS:
        w = shapes[1] if len(shapes) > 1 else []
        return "matmul" if len(w) == 4 and w[1] > 1 else "other"  # depthwise (1 input channel per group): other
    return "other"


def _matmul_rate(torch, dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def profile_model(torch, create_model, name: str, batch: int, img: int, repeats: int = 1) -> dict:
    """Self CPU time per op of ``repeats`` profiled forwards (per forward), float32 and bfloat16 weights."""
    from torch.profiler import ProfilerActivity, profile

    base = create_model(name).eval()
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(0))
    out = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m, xin = copy.deepcopy(base).to(dtype), x.to(dtype)
        with torch.inference_mode():
            m(xin)  # warm-up
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(repeats):
                    m(xin)
        split: dict[str, float] = defaultdict(float)
        ops: dict[str, float] = defaultdict(float)
        for ev in prof.key_averages(group_by_input_shape=True):
            ms = ev.self_cpu_time_total / 1e3 / repeats
            cat = _category(ev.key, ev.input_shapes)
            split[cat] += ms
            ops[f"{cat}: {ev.key}"] += ms
        total = sum(split.values())
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
        out[label] = {"total_ms": total, "matmul_ms": split["matmul"], "other_ms": split["other"],
                      "other_share": split["other"] / total, "top_ops_ms": dict(top), "ops_ms": dict(ops)}
    f32, b16 = out["fp32"], out["bf16"]
    # the non-matmul ops side by side: which of them bfloat16 does not speed up
    others = sorted((k for k in b16["ops_ms"] if k.startswith("other: ")), key=lambda k: -b16["ops_ms"][k])[:10]
    out["other_ops_fp32_bf16_ms"] = {k[len("other: "):]: [f32["ops_ms"].get(k, 0.0), b16["ops_ms"][k]] for k in others}
    for d in (f32, b16):
        del d["ops_ms"]
    out["speedup"] = f32["total_ms"] / b16["total_ms"]
    out["matmul_speedup"] = f32["matmul_ms"] / b16["matmul_ms"]
    out["other_speedup"] = f32["other_ms"] / b16["other_ms"]
    out["bound_free_matmul"] = f32["total_ms"] / b16["other_ms"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="dat_tiny,dat_pp_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="profiled forwards per dtype (times are per forward)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    from deformattn import create_model

    torch.set_num_threads(args.threads)
    rates = {"fp32": _matmul_rate(torch, torch.float32), "bf16": _matmul_rate(torch, torch.bfloat16)}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    report = {"benchmark": "precision_profile", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/precision_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                          "matmul1024_gflops": rates, "loadavg_1m": os.getloadavg()[0]},
              "settings": {"batch": args.batch, "img_size": args.img_size, "repeats": args.repeats}, "models": {}}
    print(f"{cpu}; 1024² matmul fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s")
    print("| model | dtype | total ms | matmul ms | other ms | other share |")
    print("|---|---|---:|---:|---:|---:|")
    for name in [m for m in args.models.split(",") if m]:
        r = report["models"][name] = profile_model(torch, create_model, name, args.batch, args.img_size, args.repeats)
        for d in ("fp32", "bf16"):
            print(f"| {name} | {d} | {r[d]['total_ms']:.0f} | {r[d]['matmul_ms']:.0f} | {r[d]['other_ms']:.0f} "
                  f"| {r[d]['other_share']:.0%} |")
        print(f"  {name}: bf16 × fp32 {r['speedup']:.2f} (matmul {r['matmul_speedup']:.2f}, other "
              f"{r['other_speedup']:.2f}); bound with free matmul {r['bound_free_matmul']:.2f}")
        print("  top bf16 ops:", ", ".join(f"{k} {v:.0f} ms" for k, v in list(r["bf16"]["top_ops_ms"].items())[:8]))
        print("  non-matmul ops, fp32 -> bf16 ms:", ", ".join(
            f"{k} {a:.0f} -> {b:.0f}" for k, (a, b) in r["other_ops_fp32_bf16_ms"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
