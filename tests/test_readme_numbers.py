"""The README quotes what the results files say: stale numbers are bugs.

Each headline figure of README.md is compared with the file the script that measured it wrote:

* the first command's training run: ``benchmarks/results/train_digits.json`` (``benchmarks/train_digits.py``);
* the viz figure's prediction: the same file (``viz``) and ``docs/viz_digits.json``;
* the FLOPs table: ``benchmarks/results/flops_table.json`` (``benchmarks/flops_table.py``);
* the complexity table: ``docs/complexity.json`` (``deformattn complexity``);
* the backbone speed table: ``benchmarks/results/models.json`` (``benchmarks/models.py``);
* the export times: ``benchmarks/results/export_dynamic.json`` (``benchmarks/export.py --dynamic``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _load(relative: str) -> dict:
    path = REPO / relative
    if not path.is_file():
        pytest.fail(f"{relative} is missing: the README quotes it")
    return json.loads(path.read_text(encoding="utf-8"))


def _section(title: str) -> str:
    """The README text from a heading containing ``title`` to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) [^\n]*{re.escape(title)}[^\n]*\n", README, flags=re.M)
    assert m, f"README has no section {title!r}"
    level = len(m.group(1))
    end = re.search(rf"^#{{1,{level}}} ", README[m.end():], flags=re.M)
    return README[m.end(): m.end() + end.start() if end else len(README)]


def _minutes(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def test_training_run_figures():
    r = _load("benchmarks/results/train_digits.json")
    text = _section("Training")
    m = r["machine"]
    expected = [
        f"**{r['test_accuracy']:.2%}** top-1", f"{r['test_top5']:.2%} top-5", f"after {r['epochs']} epochs",
        f"({r['test_images']} held-out digits)",
        f"**{_minutes(r['wall_seconds'])}** wall", f"({r['train_seconds']:.0f} s of training and evaluation)",
        f"median **{r['images_per_second_median']:.0f} img/s**",
        f"({r['images_per_second_range'][0]:.0f}–{r['images_per_second_range'][1]:.0f} img/s",
        f"{m['cpu']}, {m['cores']} cores", f"float32 matmul {m['matmul_gflops']:.1f} GFLOP/s",
        f"load average {m['loadavg_1min_before']:.2f} before and {m['loadavg_1min_after']:.2f} after",
        r["created"],
    ]
    missing = [e for e in expected if e not in text]
    assert not missing, f"the Training section does not quote benchmarks/results/train_digits.json: {missing}"
    assert r["command"] == "deformattn train --output-dir runs/digits"  # the README's first command, as written
    assert "one training thread" not in text or r["threads"] == 1


def test_viz_figure_prediction():
    r = _load("benchmarks/results/train_digits.json")["viz"]
    shown = _load("docs/viz_digits.json")
    assert {k: shown[k] for k in ("predicted", "probability", "image")} == \
        {k: r[k] for k in ("predicted", "probability", "image")}
    text = _section("Where it looks")
    digit = re.search(r"#(\d+)", r["image"]).group(1)
    quoted = f"test digit\n#{digit}" if f"test digit\n#{digit}" in text else f"test digit #{digit}"
    assert quoted in text, f"README does not name the figure's digit #{digit}"
    assert f"predicted {r['predicted']} with {r['probability']:.2%}" in text
    assert r["command"].replace("\n", " ") in " ".join(text.split()), "README does not show the command that drew it"


def test_flops_table():
    rows = [line for line in _load("benchmarks/results/flops_table.json")["table_markdown"].splitlines()
            if line.startswith("| ") and "---" not in line]
    assert rows, "flops_table.json has no table"
    missing = [line for line in rows if line not in README]
    assert not missing, f"README's FLOPs table differs from benchmarks/results/flops_table.json: {missing[:3]}"


def _close(quoted: str, value: float, rel: float = 0.006) -> bool:
    number = float(quoted.replace(",", ""))
    return abs(number - value) <= rel * abs(value) + 0.5 * 10 ** -max(0, len(quoted.split(".")[1]) if "." in quoted
                                                                          else 0)


def test_complexity_table():
    rows = _load("docs/complexity.json")
    kinds = ["dense", "window", "spatial_reduction", "neighborhood", "deformable"]
    text = _section("What it costs")
    checked = 0
    for line in text.splitlines():
        m = re.match(r"\| (\d+)² \(\d+\) \|(.*)\|\s*$", line)
        if not m:
            continue
        side = int(m.group(1))
        cells = [c.strip() for c in m.group(2).split("|")]
        assert len(cells) == len(kinds), line
        for kind, cell in zip(kinds, cells):
            row = next(r for r in rows if r["side"] == side and r["kind"] == kind)
            g, ms, mib = re.match(r"([\d.,]+) G · ([\d.,]+) ms · ([\d.,]+) MiB", cell).groups()
            assert _close(g, row["macs"] / 1e9), (side, kind, g, row["macs"] / 1e9)
            assert _close(ms, row["ms"]), (side, kind, ms, row["ms"])
            assert _close(mib, row["peak_mib"]), (side, kind, mib, row["peak_mib"])
            checked += 1
    assert checked >= 10, "README's complexity table not found"


def test_backbone_speed_table():
    report = _load("benchmarks/results/models.json")
    text = _section("Speed of the backbones")
    table, header = {}, None
    for line in report["table_markdown"].splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if "fast img/s" in cells:
            header = cells  # the main table: model, mode, ..., fast img/s, reference img/s, fast × ref, ...
            continue
        if not line.startswith("|") or "---" in line:
            header = header if line.startswith("|") else None
            continue
        if header and len(cells) == len(header):
            col = dict(zip(header, cells))
            table[(col["model"], col["mode"])] = (col["fast img/s"], col["reference img/s"], col["fast × ref"])
    assert table, "models.json has no table"
    for (model, mode), (fast, ref, ratio) in table.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{model}` |")), None)
        assert row is not None, f"README's speed table has no row for {model}"
        assert f"{fast} / {ref}" in row and ratio in row, (model, mode, fast, ref, ratio, row)


def export_figures(report: dict) -> list[str]:
    """The strings the Deploy section quotes from ``export_dynamic.json``: per exporter the seconds and node counts
    of each model with its ratio to Swin-T, the range of onnxruntime / eager, the date and the machine."""
    m = report["machine"]
    out = [report["created"][:10], f"{m['cpu']}", f"float32 matmul {m['matmul_gflops']:.0f} GFLOP/s"]
    for e in report["exports"]:
        out.append(f"{e['model']}` {e['export_s']:.1f} s" if e["vs_swin"] is None or e["model"].startswith("swin")
                   else f"{e['model']}` {e['export_s']:.1f} s ({e['vs_swin']:.2f}x, {e['nodes']} nodes)")
    speedups = [r["ort_speedup"] for r in report["rows"] if not r["model"].startswith("swin")]
    out.append(f"{min(speedups):.2f}x to {max(speedups):.2f}x")
    return out


def test_export_figures():
    report = _load("benchmarks/results/export_dynamic.json")
    text = " ".join(_section("Deploy").split())
    missing = [f for f in export_figures(report) if f not in text]
    assert not missing, f"the Deploy section does not quote benchmarks/results/export_dynamic.json: {missing}"


def test_extras_table_matches_pyproject():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = _section("Optional extras")
    quoted = {}
    for line in text.splitlines():
        m = re.match(r"\| `(\w+)` \|[^|]*\| ([^|]*) \|", line)
        if m:
            quoted[m.group(1)] = {p.strip() for p in m.group(2).split(",")}
    assert quoted.keys() == extras.keys(), (sorted(quoted), sorted(extras))
    for name, packages in extras.items():
        assert quoted[name] == {re.split(r"[<>=!~ ]", p)[0] for p in packages}, name
