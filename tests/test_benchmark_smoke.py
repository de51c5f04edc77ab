"""Smoke test of benchmarks/attention.py: the whole harness (worker processes, memory probe, JSON) on a tiny case."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "attention.py"
# output of 2*32*24*24 floats (144 KiB) is above glibc's mmap threshold: the call always takes fresh pages
TINY = "tiny=2,32,24,24,2,1,2,3,-1"
HAS_LUCIDRAINS = importlib.util.find_spec("deformable_attention") is not None


def bench_categories():
    return _load_bench().CATEGORIES


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_expected_rows(tmp_path):
    out = tmp_path / "attention.json"
    impls = "fast,reference,lucidrains" if HAS_LUCIDRAINS else "fast,reference"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--case", TINY, "--impls", impls, "--threads", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temporary file"

    expected = impls.split(",")
    assert report["impls"] == expected
    assert [(r["case"], r["impl"]) for r in report["rows"]] == [("tiny", i) for i in expected]
    for row in report["rows"]:
        for mode in ("fwd", "fwdbwd"):
            assert "error" not in row[mode], row[mode]
            assert row[f"{mode}_ms"] > 0 and math.isfinite(row[f"{mode}_ms"])
            assert row[f"{mode}_peak_mib"] > 0, row[mode]
            assert row[mode]["repeats"] >= 1
            assert row[mode]["faults_per_call"] >= 0
            assert row[mode]["Hk"] * row[mode]["Wk"] == report["cases"]["tiny"]["Ns"]
            if row["impl"] != "lucidrains":  # profiled op breakdown: categories add up to the total
                bd = row[mode]["breakdown_ms"]
                assert set(bd) == set(bench_categories()) | {"total"}
                assert bd["total"] > 0 and bd["total"] == pytest.approx(sum(bd[c] for c in bench_categories()))
                assert bd["matmul"] + bd["fused attention"] > 0 and bd["sampling"] > 0  # projections, grid_sample
    ref = next(r for r in report["rows"] if r["impl"] == "reference")
    assert ref["speedup_fwd"] == pytest.approx(1.0)
    att = report["attainable"]["tiny"]
    for mode in ("fwd", "fwdbwd"):
        a = att[mode]
        assert a["bound_ms"] == pytest.approx(a["floor_ms"] + a["non_matmul_ms"]) and a["bound_ms"] > 0
        fast = next(r for r in report["rows"] if r["impl"] == "fast")
        assert 0 < a["non_matmul_ms"] < fast[f"{mode}_ms"]  # a share of the timed call
        assert a["ref_over_bound"] == pytest.approx(ref[f"{mode}_ms"] / a["bound_ms"])
    assert "Attainable bound" in report["table_markdown"]

    # the shape-aware matmul floor: the products of case_gemms, timed alone; their FLOPs are the forward's
    sf = report["cases"]["tiny"]["shape_floor"]
    assert "error" not in sf, sf
    assert sf["fwd_gflop"] == pytest.approx(report["cases"]["tiny"]["fwd_gflop"])
    assert all(g["ms"] > 0 for g in sf["gemms"])
    assert sf["fwd_ms"] == pytest.approx(sum(g["fwd"] * g["ms"] for g in sf["gemms"]))
    assert sf["fwdbwd_ms"] == pytest.approx(sum((g["fwd"] + g["bwd"]) * g["ms"] for g in sf["gemms"]))
    for mode in ("fwd", "fwdbwd"):
        assert att[mode]["floor_ms"] == pytest.approx(sf[f"{mode}_ms"])
        assert report["floor_bounds"][mode]["per_case"]["tiny"] == pytest.approx(ref[f"{mode}_ms"] / sf[f"{mode}_ms"])
        assert report["floor_bounds"][mode]["geomean"] is None  # defined over the four issue cases only
    assert "shape-aware matmul floor" in report["table_markdown"]

    machine = report["machine"]
    assert machine["matmul_gflops"] > 0 and machine["copy_gbps"] > 0
    assert report["settings"]["threads"] == 1 and report["settings"]["quick"]
    assert report["cases"]["tiny"]["Ns"] == 144  # 24x24 at stride 2 -> 12x12 keys
    assert report["cases"]["tiny"]["fwd_gflop"] > 0
    assert "| tiny | fast |" in report["table_markdown"] and "| tiny | fast |" in proc.stdout
    # targets: "ahead of" per compared implementation, judged from the rows; the geometric means are defined over
    # the four issue cases only, so a run of the tiny case reports them unjudged
    by_impl = {r["impl"]: r for r in report["rows"]}
    others = [i for i in expected if i != "fast"]
    assert len(report["targets"]) == len(others) + 2
    targets = {t["name"]: t for t in report["targets"]}
    for other in others:
        t = targets[f"tiny: fast ahead of {other} (forward and forward+backward)"]
        ratios = [by_impl[other][f"{m}_ms"] / by_impl["fast"][f"{m}_ms"] for m in ("fwd", "fwdbwd")]
        assert t["value"] == pytest.approx(min(ratios))
        assert t["passed"] is (min(ratios) > 1)
    geo = [t for t in report["targets"] if t["name"].startswith("geometric-mean")]
    assert len(geo) == 2 and all(t["value"] is None and t["passed"] is None and "not judged" in t["name"] for t in geo)


def test_case_parsing_and_lucidrains_mapping():
    bench = _load_bench()
    case = bench.parse_case("x=8,64,56,56,2,1,8,9,-1")
    assert case == bench.CASES["pp_stage1"].__class__("x", 8, 64, 56, 56, 2, 1, 8, 9, -1.0, "pp")
    assert bench.parse_case("y=8,384,14,14,12,3,1,3,2,v1").version == "v1"
    for bad in ("noequals", "z=1,2,3", "z=1,2,3,4,5,6,7,8,x", "z=1,2,3,4,5,6,7,8,1,v2"):
        with pytest.raises(Exception, match="--case"):
            bench.parse_case(bad)

    # lucidrains needs (kernel - stride) even: 9 at stride 8 -> 10, 5 at stride 2 -> 6, with DAT's key grid
    kw = bench.lucidrains_kwargs(bench.CASES["pp_stage1"])
    assert kw["offset_kernel_size"] == 10 and kw["downsample_factor"] == 8 and kw["dim_head"] == 32
    assert bench.lucidrains_kwargs(bench.CASES["pp_stage3"])["offset_kernel_size"] == 6
    v1 = bench.lucidrains_kwargs(bench.CASES["v1_stage3"])
    assert v1["offset_kernel_size"] == 3 and v1["offset_scale"] == 1.0 and v1["offset_groups"] == 3
    assert not v1["group_queries"] and not v1["group_key_values"]
    if HAS_LUCIDRAINS:
        for case in bench.CASES.values():
            _, grid_l = bench.build("lucidrains", case)
            sys.path.insert(0, str(REPO / "src"))
            _, grid_d = bench.build("fast", case)
            assert grid_l == grid_d, case.name


_PROBE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from _common import PeakRSS
torch.ones(8).sum()  # lazy initialisation outside the probe
with PeakRSS() as mem:
    t = torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MiB, touched, freed before the probe ends
    del t
print(json.dumps(mem.as_dict()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_probe_sees_a_known_transient_allocation():
    # a fresh process, as the benchmark measures: threads and heaps left by other tests would blur the peak
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(REPO / "benchmarks")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mem["memory_method"]  # which probe was used (VmHWM wherever /proc/self/clear_refs can be written)
    assert 60 <= mem["peak_mib"] <= 72, mem
