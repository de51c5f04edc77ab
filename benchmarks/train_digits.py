"""The README's first command, measured: ``deformattn train --output-dir runs/digits`` as a user runs it.

    flock /tmp/bench.lock python benchmarks/train_digits.py            # train (minutes on 2 cores), then viz
    python benchmarks/train_digits.py --skip-train                      # only redraw docs/viz_digits.png

Runs the command in a subprocess with the default options, times it end to end, and writes
``benchmarks/results/train_digits.json``: wall time, the run's own training seconds, images per second (median over
epochs of the run's ``metrics.json``), test accuracy, the date, the CPU model, its measured float32 matmul rate
(before the run) and the load average before and after (other jobs on the machine slow the run down). Then it draws
the README's figure, ``deformattn viz --checkpoint runs/digits/last.pt --output docs/viz_digits.png --dpi 150``,
and records the figure's test digit and prediction in the same file. ``tests/test_readme_numbers.py`` checks that
the README quotes these figures.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _common import atomic_write_json, machine_info, machine_limits  # noqa: E402


def _run(argv: list[str]) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/digits", help="the run folder (default: the README's)")
    p.add_argument("--json", default=str(HERE / "results" / "train_digits.json"))
    p.add_argument("--figure", default="docs/viz_digits.png", help="relative to the repository root")
    p.add_argument("--skip-train", action="store_true", help="reuse the run in --output-dir; redraw the figure only")
    p.add_argument("--skip-viz", action="store_true", help="train only")
    args = p.parse_args()

    path = Path(args.json)
    report = json.loads(path.read_text()) if args.skip_train and path.is_file() else {}
    cli = [sys.executable, "-m", "deformattn"]
    if not args.skip_train:
        import torch

        limits = machine_limits(torch.get_num_threads(), quick=True)
        load_before = os.getloadavg()
        wall, _ = _run([*cli, "train", "--output-dir", args.output_dir])
        load_after = os.getloadavg()
        report = {
            "command": f"deformattn train --output-dir {args.output_dir}",
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {**machine_info(), "matmul_gflops": round(limits["matmul_gflops"], 1),
                        "matmul_threads": limits["threads"],
                        "loadavg_1min_before": round(load_before[0], 2), "loadavg_1min_after": round(load_after[0], 2)},
            "wall_seconds": round(wall, 1),
        }
    run = REPO / args.output_dir
    summary = json.loads((run / "summary.json").read_text())
    history = json.loads((run / "metrics.json").read_text())
    report.update({
        "model": summary["model"],
        "epochs": summary["epochs"],
        "threads": summary.get("threads"),
        "train_seconds": round(summary["seconds"], 1),
        "images_per_second_median": round(statistics.median(r["images_per_second"] for r in history), 1),
        "images_per_second_range": [round(min(r["images_per_second"] for r in history), 1),
                                    round(max(r["images_per_second"] for r in history), 1)],
        "test_accuracy": summary["test_accuracy"],
        "test_top5": summary["test_top5"],
        "test_images": summary.get("num_eval"),
    })
    if args.skip_viz:
        atomic_write_json(path, report)
        print(json.dumps(report, indent=1))
        return 0
    viz_json = REPO / Path(args.figure).with_suffix(".json")
    _run([*cli, "viz", "--checkpoint", str(Path(args.output_dir) / "last.pt"), "--output", args.figure,
          "--dpi", "150", "--json", str(viz_json)])
    report["viz"] = {"command": f"deformattn viz --checkpoint {Path(args.output_dir) / 'last.pt'} --output "
                                f"{args.figure} --dpi 150",
                     **json.loads(viz_json.read_text())}
    atomic_write_json(path, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
