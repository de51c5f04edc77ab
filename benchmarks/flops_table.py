"""Parameters and FLOPs of every released DAT / DAT++ variant, next to the papers' figures.

    python benchmarks/flops_table.py                       # all released variants (~1 min on 2 cores)
    python benchmarks/flops_table.py --models dat_nano --json /tmp/f.json

For each variant at 224x224 (and at 384x384 for the ``*_384`` variants) it counts parameters and multiply-adds with
:func:`deformattn.analysis.model_cost` (``torch.utils.flop_counter.FlopCounterMode``, MACs = FLOPs / 2; it counts matrix
products, convolutions and SDPA, not ``grid_sample``, softmax, norms or activations - see
:mod:`deformattn.analysis.flops`), the deformable layers' and their offset networks' share, and puts the published
params / GMACs beside them (``default_cfgs``: the DAT paper and the DAT++ README) and, where the official-code
manifests are found (``$DEFORMATTN_FIXTURES`` or ``../shared/fixtures/official_dat``), the official code's exact
parameter count.

Output: a markdown table on stdout and JSON at ``--json`` (default ``benchmarks/results/flops_table.json``).
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

RELEASED = ["dat_tiny", "dat_small", "dat_base", "dat_base_384", "dat_pp_tiny", "dat_pp_small", "dat_pp_base",
            "dat_pp_base_384"]
PAPER_NAMES = {"dat_tiny": "DAT-T", "dat_small": "DAT-S", "dat_base": "DAT-B", "dat_base_384": "DAT-B 384",
               "dat_pp_tiny": "DAT-T++", "dat_pp_small": "DAT-S++", "dat_pp_base": "DAT-B++",
               "dat_pp_base_384": "DAT-B++ 384"}


# DAT-B++ 384 is built at 224 like DAT-B++ (the official config): same parameters. DAT-B 384 (window 12, tables for
# 384) has no manifest.
_MANIFEST = {"dat_pp_base_384": "dat_pp_base"}

# Published figures only a secondary source gives (PAPER_FACTS.md: "unverified"); marked with a dagger in the table.
UNVERIFIED = {"dat_base_384": ("gmacs",), "dat_pp_base_384": ("params_m",)}


def official_params(name: str) -> int | None:
    """Exact parameter count of the official code, from its manifest; None when there is none."""
    root = Path(os.environ.get("DEFORMATTN_FIXTURES", REPO.parent / "shared" / "fixtures" / "official_dat"))
    path = root / f"manifest_{_MANIFEST.get(name, name)}.json"
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["num_params"])
    except (KeyError, ValueError, TypeError):
        return None


def measure(name: str) -> dict[str, Any]:
    from deformattn.models import create_model, default_cfgs
    from deformattn.analysis import model_cost

    cfg = default_cfgs.get(name, {})
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    t0 = time.perf_counter()
    model = create_model(name)
    report = model_cost(model, size, name=name)
    d_flops = sum(r["flops"] for r in report.deformable)
    off_flops = sum(r["offset_flops"] for r in report.deformable)
    d_params = sum(r["params"] for r in report.deformable)
    off_params = sum(r["offset_params"] for r in report.deformable)
    return {
        "model": name,
        "paper_name": PAPER_NAMES.get(name, name),
        "img_size": size,
        "params": report.params,
        "macs": report.macs,
        "flops": report.flops,
        "paper_params_m": cfg.get("params_m"),
        "paper_gmacs": cfg.get("gmacs"),
        "paper_unverified": list(UNVERIFIED.get(name, ())),
        "official_params": official_params(name) if name in RELEASED else None,
        "deformable_layers": len(report.deformable),
        "deformable_params": d_params,
        "deformable_macs": d_flops // 2,
        "offset_params": off_params,
        "offset_macs": off_flops // 2,
        "seconds": time.perf_counter() - t0,
        "report": report.as_dict(),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    def opt(v: Any, fmt: str, dagger: bool = False) -> str:
        return "-" if v is None else format(v, fmt) + ("†" if dagger else "")

    lines = [
        "| model | input | params (M) | paper params (M) | official code params | GMACs | paper GMACs | ratio | "
        "deformable layers: GMACs (share) | offset nets: MMACs (share) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r["macs"] / 1e9
        ratio = f"{g / r['paper_gmacs']:.3f}" if r["paper_gmacs"] else "-"
        off = "-" if r["official_params"] is None else (
            f"{r['official_params'] / 1e6:.3f}" + (" (=)" if r["official_params"] == r["params"] else " (differs)"))
        unverified = r.get("paper_unverified", [])
        lines.append(
            f"| {r['paper_name']} (`{r['model']}`) | {r['img_size']}² | {r['params'] / 1e6:.3f} | "
            f"{opt(r['paper_params_m'], '.0f', 'params_m' in unverified)} | {off} | {g:.3f} | "
            f"{opt(r['paper_gmacs'], '.1f', 'gmacs' in unverified)} | {ratio} | "
            f"{r['deformable_macs'] / 1e9:.3f} ({r['deformable_macs'] / r['macs']:.1%}) | "
            f"{r['offset_macs'] / 1e6:.2f} ({r['offset_macs'] / r['macs']:.2%}) |"
        )
    return "\n".join(lines)


NOTES = (
    "Convention: GMACs = `torch.utils.flop_counter.FlopCounterMode` FLOPs / 2 (FlopCounterMode counts 2 FLOPs per "
    "multiply-add; the papers quote multiply-adds). Counted: matrix products, convolutions, SDPA; not counted: "
    "grid_sample, softmax, norms, activations, element-wise adds. One image, eval mode. Paper figures: DAT paper "
    "(v1) and DAT++ README; † = only a secondary source gives the figure (unverified). `official code params`: "
    "exact count of the official code (its manifests), \"(=)\" when identical to ours. The 384² models: DAT-B 384 "
    "(window 12, tables for 384) counted at 384²; DAT-B++ 384 is built at 224 like the official config (same "
    "parameters as DAT-B++) and counted at 384²."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=RELEASED, help="variants (default: every released one)")
    p.add_argument("--json", default=str(HERE / "results" / "flops_table.json"), help="where to write the JSON")
    args = p.parse_args(argv)
    import torch

    torch.manual_seed(0)
    rows = []
    for name in args.models:
        row = measure(name)
        rows.append(row)
        print(f"{name}: {row['params'] / 1e6:.3f} M params, {row['macs'] / 1e9:.3f} GMACs at {row['img_size']}² "
              f"({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
    sys.path.insert(0, str(HERE))
    from _common import atomic_write_json, machine_info

    info = machine_info()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    header = (f"FLOPs / parameters of the released variants (benchmarks/flops_table.py), {created}, torch "
              f"{info['torch']}, {info['cpu']}")
    table = markdown(rows)
    print(header)
    print()
    print(table)
    print()
    print(NOTES)
    atomic_write_json(args.json, {"created": created, "machine": info, "torch": torch.__version__,
                                  "convention": NOTES, "rows": rows, "table_markdown": table})
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
