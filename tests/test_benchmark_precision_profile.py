"""benchmarks/precision_profile.py: a small run writes a consistent report; the op split is right."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "precision_profile.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_precision_profile", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_op_categories():
    cat = _load()._category
    assert cat("aten::bmm", [[4, 5, 6], [4, 6, 7]]) == "matmul"
    assert cat("aten::mkldnn_convolution", [[8, 256, 14, 14], [1024, 256, 1, 1], [1024]]) == "matmul"
    assert cat("aten::mkldnn_convolution", [[8, 256, 14, 14], [256, 1, 3, 3], [256]]) == "other"  # depthwise
    assert cat("aten::_softmax", [[8, 196, 49], [], []]) == "other"
    assert cat("aten::index", [[8, 2, 56, 56, 32], []]) == "other"


def test_small_run_writes_a_consistent_report(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "dat_nano", "--batch", "2", "--img-size", "32", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.glob("*.tmp"))
    report = json.loads(out.read_text())
    assert report["machine"]["matmul1024_gflops"]["bf16"] > 0
    r = report["models"]["dat_nano"]
    for d in ("fp32", "bf16"):
        assert r[d]["matmul_ms"] > 0 and r[d]["other_ms"] > 0
        assert abs(r[d]["matmul_ms"] + r[d]["other_ms"] - r[d]["total_ms"]) < 1e-6 * r[d]["total_ms"] + 1e-9
        assert 0 < r[d]["other_share"] < 1
    assert abs(r["speedup"] - r["fp32"]["total_ms"] / r["bf16"]["total_ms"]) < 1e-9
    assert r["bound_free_matmul"] >= r["speedup"]
    side = r["other_ops_fp32_bf16_ms"]
    assert side and all(not k.startswith(("other: ", "matmul: ")) and b > 0 for k, (a, b) in side.items())
    assert sum(b for _, b in side.values()) <= r["bf16"]["other_ms"] * (1 + 1e-9)


def _readme_section(title: str) -> str:
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n", readme, flags=re.M)
    assert m, f"README has no section {title!r}"
    end = re.search(r"^## ", readme[m.end():], flags=re.M)
    return readme[m.end(): m.end() + end.start() if end else len(readme)]


def test_readme_precision_section_quotes_the_results():
    """The README's Precision table and profile figures are those of the recorded JSON files."""
    text = _readme_section("Precision")
    speed = json.loads((REPO / "benchmarks/results/models_precision.json").read_text())
    for row in speed["models"]:
        p = row["precision"]
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| `{row['model']}` |")), None)
        assert line, f"no README row for {row['model']}"
        figures = [p["infer_speedup"]["bf16-weights"]["median"], p["train_speedup"]["bf16-weights"]["median"],
                   p["infer_speedup"]["bf16-autocast"]["median"], p["train_speedup"]["bf16-autocast"]["median"]]
        for f in figures:
            assert f"{f:.2f}×" in line, (row["model"], f, line)
        assert f"{p['infer']['bf16-weights']['logits_rel_err']:.3f}" in line, line
    prof = json.loads((REPO / "benchmarks/results/precision_profile.json").read_text())
    for name, r in prof["models"].items():
        assert f"{r['bf16']['other_share']:.0%}" in text and f"{r['bound_free_matmul']:.2f}×" in text, name
