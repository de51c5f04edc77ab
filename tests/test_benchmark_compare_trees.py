"""Smoke test of benchmarks/compare_trees.py: alternating workers on two trees (here both this checkout), each
importing deformattn from its tree, JSON and table written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare_trees.py"


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--threads", "1", *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def test_quick_run_alternates_trees_and_records_imports(tmp_path):
    out = tmp_path / "compare.json"
    proc = _run("--quick", "--base", str(REPO), "--new", str(REPO), "--attention", "pp_stage3:fast:fwd",
                "--models", "dat_nano", "--batch", "1", "--img-size", "32", "--json", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["results"]] == ["pp_stage3:fast:fwd", "dat_nano"]
    assert data["machine"]["matmul_gflops"] > 0 and data["settings"]["threads"] == 1
    for res in data["results"]:
        for tree in ("base", "new"):
            (worker,) = res["rounds"][tree]
            assert worker["imported"] == str(REPO / "src" / "deformattn" / "__init__.py")
            assert worker["median_ms"] > 0 and worker["cpu_median_ms"] > 0 and worker["faults_per_call"] >= 0
        ratio = res["summary"]["median_ms"]
        assert ratio["new_over_base"] == ratio["new"] / ratio["base"]
    assert "| pp_stage3:fast:fwd |" in proc.stdout and "| dat_nano |" in proc.stdout


def test_bad_item_and_tree_are_named(tmp_path):
    proc = _run("--quick", "--base", str(REPO), "--attention", "pp_stage3:fast:sideways", tmp_path=tmp_path)
    assert proc.returncode != 0 and "case:impl:mode" in proc.stderr and "sideways" in proc.stderr
    proc = _run("--quick", "--base", str(tmp_path), "--models", "dat_nano", tmp_path=tmp_path)
    assert proc.returncode != 0 and "has no src/deformattn" in proc.stderr
