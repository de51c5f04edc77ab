"""Progress display of a training / evaluation loop: a tqdm bar on a terminal, plain lines otherwise (logs, CI,
pipes), nothing on ranks other than 0."""
from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """``update(images, loss=..., acc=...)`` once per step; shows running loss, accuracy, images/s and the ETA.

    Args:
        mode: ``"bar"`` (tqdm), ``"plain"`` (a line every ``log_interval`` steps), ``"none"``, or ``"auto"``: a bar
            when stderr is a terminal and tqdm is installed, else plain lines.
        plain: with False, show a bar or nothing (short loops such as evaluation would only add noise to logs).
    """

    def __init__(self, total_steps: int, desc: str, *, mode: str = "auto", log_interval: int = 0,
                 enabled: bool = True, plain: bool = True) -> None:
        self.total = total_steps
        self.desc = desc
        self.step = 0
        self.images = 0
        self.start = time.perf_counter()
        self.interval = log_interval or max(1, total_steps // 10)
        self.bar: Any = None
        if not enabled:
            mode = "none"
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() and _has_tqdm() else "plain"
        if mode == "plain" and not plain:
            mode = "none"
        if mode == "bar":
            from .._utils import optional_import

            tqdm = optional_import("tqdm", "train", "--progress bar").tqdm
            self.bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True, leave=False)
        self.mode = mode

    def update(self, images: int, **metrics: float) -> None:
        self.step += 1
        self.images += images
        elapsed = time.perf_counter() - self.start
        rate = self.images / elapsed if elapsed > 0 else 0.0
        shown = {k: (f"{v:.2%}" if k.startswith("acc") else f"{v:.4f}") for k, v in metrics.items()}
        if self.mode == "bar":
            self.bar.set_postfix(**shown, img_s=f"{rate:.0f}", refresh=False)
            self.bar.update(1)
        elif self.mode == "plain" and (self.step % self.interval == 0 or self.step == self.total):
            eta = elapsed / self.step * (self.total - self.step)
            parts = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"{self.desc} step {self.step}/{self.total} {parts} {rate:.0f} img/s eta {format_seconds(eta)}",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _has_tqdm() -> bool:
    import importlib.util

    return importlib.util.find_spec("tqdm") is not None
