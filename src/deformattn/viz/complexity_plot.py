"""The figure and output files of :mod:`deformattn.analysis.complexity` (matplotlib: ``pip install 'deformattn[viz]'``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .._utils import atomic_write, atomic_write_text, optional_import
from ..analysis.complexity import KINDS, LABELS, format_complexity_table

__all__ = ["plot_complexity", "write_complexity"]

_STYLE = {
    "dense": dict(marker="o", color="#1f77b4"),
    "window": dict(marker="s", color="#ff7f0e", linestyle="--"),
    "spatial_reduction": dict(marker="^", color="#2ca02c"),
    "neighborhood": dict(marker="D", color="#d62728", markersize=4),
    "deformable": dict(marker="o", color="#9467bd", linewidth=2.5),
}


def plot_complexity(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Three log-log panels (GMACs, ms, peak MiB against tokens), one line per kind; written as a PNG."""
    matplotlib = optional_import("matplotlib", "viz", "deformattn complexity (the plot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=100)
    panels = [("macs", "multiply-adds (G)", 1e-9), ("ms", "forward time (ms)", 1.0), ("peak_mib", "peak memory (MiB)", 1.0)]
    for ax, (key, label, scale) in zip(axes, panels):
        for kind in kinds:
            pts = [(r["tokens"], r[key] * scale) for r in rows if r["kind"] == kind and r[key] is not None]
            pts = [(t, v) for t, v in pts if v > 0]
            if pts:
                ax.plot(*zip(*pts), label=LABELS[kind], **_STYLE[kind])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens HW (map side²)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        sides = sorted({r["side"] for r in rows})
        ax.set_xticks([s * s for s in sides])
        ax.set_xticklabels([f"{s}²" for s in sides])
        ax.minorticks_off()
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "one attention layer, C=128, 4 heads, batch 1, forward (this machine)")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def write_complexity(rows: Sequence[dict[str, Any]], output_dir: str | Path, *, title: str | None = None) -> dict[str, Path]:
    """``DIR/complexity.json`` (the rows), ``DIR/complexity.md`` (the table) and ``DIR/complexity.png``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "complexity.json", json.dumps(list(rows), indent=1) + "\n")
    atomic_write_text(out / "complexity.md", format_complexity_table(rows) + "\n")
    png = plot_complexity(rows, out / "complexity.png", title=title)
    return {"json": out / "complexity.json", "md": out / "complexity.md", "png": png}
