"""Smoke test of benchmarks/models.py: the whole harness (worker processes, fast/reference alternation, per-kind
timing hooks, FLOP counts, torch.compile capture, JSON) on the smallest variant, at 32x32 and batch 2."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "models.py"


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_quick_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "models.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--models", "dat_v1_nano", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=420, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temporary file"
    report = json.loads(out.read_text())

    s = report["settings"]
    assert s["quick"] and s["threads"] == 1 and s["batch"] == 2 and s["img_size"] == 32 and s["compile"] == "eager"
    assert s["models"] == ["dat_v1_nano"] and s["dtype"] == "float32" and s["device"] == "cpu"
    assert _positive(report["machine"]["matmul_gflops"]) and _positive(report["matmul_gflops_used"])
    assert "2 FLOPs per multiply-add" in report["flops_convention"]

    (row,) = report["models"]
    assert row["model"] == "dat_v1_nano"
    for mode in ("infer", "train"):
        res = row[mode]
        assert "error" not in res, res
        assert res["params"] > 0
        if mode == "infer":
            assert res["two_path_layers"] == 2  # dat_v1_nano: stage_spec LS, LS, LD, D (two D layers, no N)
        flops = res["flops_per_image"]
        assert flops["fast"] == flops["reference"] > 0  # both paths do the same counted work
        for path in ("fast", "reference"):
            p = res["paths"][path]
            assert p["repeats"] >= 1 and len(p["samples_ms"]) == p["repeats"]
            for key in ("median_ms", "img_per_s", "gflops_per_s", "matmul_fraction"):
                assert _positive(p[key]), (mode, path, key, p[key])
            assert p["img_per_s"] == s["batch"] / (p["median_ms"] / 1e3)
            kinds = p["kinds_ms"]
            assert {"D", "L/S", "FFN", "norm", "rest"} <= set(kinds), kinds  # v1: window + deformable blocks
            assert all(_positive(kinds[k]) for k in ("D", "L/S", "FFN"))
            if mode == "train":
                assert _positive(kinds["optimizer"]) and all(math.isfinite(x) for x in p["losses"])
        assert _positive(res["speedup"]["median"]) and _positive(res["amdahl_bound"]) and res["amdahl_bound"] > 1
        assert _positive(res["deformable_speedup"])
    # a training step (forward + backward) counts about 3x the forward's matmul work
    assert 2.5 < row["train"]["flops_per_image"]["fast"] / row["infer"]["flops_per_image"]["fast"] < 3.5

    comp = row["compile"]
    assert "error" not in comp, comp
    assert comp["backend"] == "eager" and comp["regions"] > 0 and comp["compile_s"] > 0
    assert comp["max_abs_diff"] <= 1e-5
    assert _positive(comp["gain"]["median"])
    assert all(_positive(comp["paths"][k]["img_per_s"]) for k in ("eager", "compiled"))

    prec = row["precision"]
    assert "error" not in prec, prec
    assert _positive(prec["matmul_gflops"]["fp32"]) and _positive(prec["matmul_gflops"]["bf16"])
    for p in ("fp32", "bf16-autocast", "bf16-weights"):
        assert prec["infer"][p]["finite"] and prec["infer"][p]["top1_agree"] >= 0.5
        assert prec["infer"][p]["logits_rel_err"] < 0.1 and prec["train"][p]["grad_cosine"] > 0.9
        assert _positive(prec["infer_speedup"][p]["median"]) and _positive(prec["train_speedup"][p]["median"])
    assert prec["infer"]["fp32"]["logits_rel_err"] == 0 and prec["infer_speedup"]["fp32"]["median"] == 1.0
    assert "## Precision" in report["table_markdown"] and "| dat_v1_nano | bf16-weights |" in proc.stdout

    names = [t["name"] for t in report["targets"]]
    assert len(names) == 3 and all(t["passed"] in (True, False) for t in report["targets"])
    assert "| dat_v1_nano | inference |" in report["table_markdown"] and "| dat_v1_nano | inference |" in proc.stdout
    assert "Amdahl" in proc.stdout and "torch.compile" in proc.stdout
