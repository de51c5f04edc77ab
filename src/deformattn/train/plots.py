"""Training curves as a PNG (matplotlib with the Agg backend, imported only here)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._utils import optional_import

__all__ = ["plot_history"]


def plot_history(history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Loss, accuracy and learning rate per epoch (``history``: the rows of metrics.json) -> ``path``."""
    matplotlib = optional_import("matplotlib", "train", "Plotting training curves")
    matplotlib.use("Agg", force=True)
    plt = optional_import("matplotlib.pyplot", "train", "Plotting training curves")
    from .._utils import atomic_write

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("loss", (("train_loss", "train"), ("eval_loss", "eval"), ("ema_eval_loss", "eval (EMA)"))),
        ("accuracy", (("train_acc", "train"), ("eval_acc", "eval top-1"), ("ema_eval_acc", "eval top-1 (EMA)"))),
        ("learning rate", (("lr", "lr"),)),
    )
    for ax, (label, series) in zip(axes, panels, strict=True):
        for key, name in series:
            values = [row.get(key) for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if label != "learning rate":
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
