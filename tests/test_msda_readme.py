"""The README's multi-scale deformable attention section: its examples run as written, and its benchmark table is
exactly what benchmarks/msda.py rendered from benchmarks/results/msda.json (no stale numbers). Plus a smoke test of
the benchmark harness itself."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SCRIPT = REPO / "benchmarks" / "msda.py"
RESULTS = REPO / "benchmarks" / "results" / "msda.json"
HEADING = "## Multi-scale deformable attention"


def _section() -> str:
    text = README.read_text()
    assert HEADING in text, f"README.md has no '{HEADING}' section"
    body = text.split(HEADING, 1)[1]
    return body.split("\n## ", 1)[0]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_msda", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", _section(), re.S) if README.exists() else []


@pytest.mark.parametrize("index", range(max(len(_blocks()), 1)))
def test_section_examples_run(index, tmp_path):
    blocks = _blocks()
    assert blocks, "the section has no python example"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", blocks[index]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for expected in re.findall(r"print\(.*\)  # (torch\.Size\(\[[0-9, ]+\]\))", blocks[index]):
        assert expected in proc.stdout  # the shapes the comments promise


def test_readme_quotes_the_benchmark_json():
    report = json.loads(RESULTS.read_text())
    assert report["benchmark"] == "msda"
    assert not report["settings"]["quick"] and report["settings"]["scale"] == 1, "README must quote a full run"
    bench = _bench()
    table = bench.render(report)
    assert table == report["table_markdown"]
    assert table in _section(), "README's MSDA table differs from benchmarks/results/msda.json (re-render it)"
    rows = {(r["case"], r["scope"], r["impl"], r["mode"]) for r in report["rows"] if "error" not in r}
    assert {(c, s, i, m) for c in ("encoder", "decoder") for s in ("core", "module") for i in ("reference", "fast")
            for m in ("fwd", "fwdbwd")} <= rows
    assert report["machine"]["cpu"] in table and "GFLOP/s" in table


@pytest.mark.slow
def test_benchmark_quick_run(tmp_path):
    out = tmp_path / "msda.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--scale", "8", "--cases", "decoder", "--threads",
                           "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 8 and all("median_ms" in r and r["peak_mib"] >= 0 for r in report["rows"])
    assert set(report["floor"]["decoder"]) == {"fwd", "fwdbwd"}
    assert report["table_markdown"] in proc.stdout
