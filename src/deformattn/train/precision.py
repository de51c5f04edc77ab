"""Numeric precision of training and inference: ``--precision {auto,fp32,bf16,fp16}``.

* ``fp32``: no autocast.
* ``bf16``: ``torch.autocast(device, torch.bfloat16)`` on any device (CPU included); no loss scaling (bfloat16 has
  float32's exponent range).
* ``fp16``: ``torch.autocast(device, torch.float16)`` with a ``GradScaler`` (float16 gradients underflow without
  loss scaling). The same autocast / scaler code runs on the CPU and on CUDA, so CPU tests exercise it.
* ``auto``: the historical ``--amp`` rule: on CUDA bf16 where supported, else fp16; fp32 on the CPU (or with
  ``--no-amp``).

The weights stay float32 (autocast casts per op); the deformable layers compute positions, interpolation weights
and position biases in float32 whatever the autocast dtype.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

__all__ = ["PRECISIONS", "autocast", "grad_scaler", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device, *, amp: bool = True) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``precision`` on ``device`` (``auto``: see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if not amp or device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The autocast context of a resolved ``precision`` (``fp32``: none)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for ``fp16`` only (a disabled one passes ``scale``/``step``/``update`` through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
