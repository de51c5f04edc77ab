"""Training checkpoints: one dict, written atomically, readable without unpickling code.

Format ``"deformattn-train-v1"``::

    {"format": "deformattn-train-v1",
     "model": state_dict, "model_name": str, "model_kwargs": {"num_classes": int, "img_size": int, ...},
     "class_names": [str, ...], "config": {...},             # the resolved TrainConfig
     "epoch": int,                                            # completed epochs
     "optimizer": ..., "scheduler": ..., "scaler": ...,      # absent in weights-only exports (best.pt)
     "model_ema": state_dict | None, "rng": [per-rank RNG states], "history": [per-epoch metrics],
     "data": {...}}                                           # what eval / predict need to preprocess images

Everything in it is a tensor or a plain container, so ``torch.load(..., weights_only=True)`` reads it and
``deformattn.create_model(name, checkpoint_path=...)`` accepts it (state dict under ``"model"``).
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT",
    "CheckpointError",
    "atomic_write",
    "atomic_write_text",
    "capture_rng_state",
    "load_checkpoint_file",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "deformattn-train-v1"
REQUIRED_KEYS = ("model", "model_name", "model_kwargs", "epoch", "config", "class_names")
TRAINING_STATE_KEYS = ("optimizer", "scheduler", "scaler", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run (corrupt, truncated, other model...)."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` on a temporary file in the same folder, then ``os.replace``: a reader
    (or a run killed half-way) sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_checkpoint(path: str | Path, checkpoint: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint dict (``"format"`` is filled in)."""
    obj = {"format": FORMAT, **checkpoint}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint_file(path: str | Path, *, what: str = "--checkpoint", training_state: bool = False) -> dict:
    """Read and check a training checkpoint; every failure is a :class:`CheckpointError` (or FileNotFoundError)
    that names ``what`` (the argument it came from) and the file.

    Args:
        training_state: also require the optimizer / scheduler / scaler / RNG states (``--resume``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what}: {str(path)!r} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what}: checkpoint {str(path)!r} is empty (0 bytes): corrupt or truncated")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip / pickle errors of a damaged file, or foreign pickled objects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{what}: cannot read checkpoint {str(path)!r}: the file is corrupt, truncated or not a PyTorch "
            f"checkpoint of plain tensors ({type(exc).__name__}: {first[:200]})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{what}: {str(path)!r} holds a {type(obj).__name__}, not a deformattn training checkpoint"
        )
    if obj.get("format") != FORMAT:
        hint = (" (it looks like a bare state_dict or an official checkpoint: load it with "
                "create_model(name, checkpoint_path=...))")
        raise CheckpointError(
            f"{what}: {str(path)!r} is not a deformattn training checkpoint: format {obj.get('format')!r}, expected "
            f"{FORMAT!r}{hint if 'format' not in obj else ''}"
        )
    needed = REQUIRED_KEYS + (TRAINING_STATE_KEYS if training_state else ())
    missing = [k for k in needed if k not in obj or obj[k] is None]
    if missing:
        extra = " (a weights-only export such as best.pt cannot be resumed; use last.pt)" if training_state else ""
        raise CheckpointError(f"{what}: checkpoint {str(path)!r} lacks {', '.join(missing)}{extra}")
    if not isinstance(obj["model"], Mapping) or not all(torch.is_tensor(v) for v in obj["model"].values()):
        raise CheckpointError(f"{what}: checkpoint {str(path)!r}: 'model' is not a state_dict of tensors")
    return obj


# -- RNG state ------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The generators a training step may draw from: torch (CPU and CUDA), numpy's global one, Python's ``random``.
    Stored as tensors / plain containers (numpy arrays become tensors) so the checkpoint stays weights-only."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _to_plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch
        pass
    else:
        s = np.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": s["bit_generator"],
            "key": torch.from_numpy(s["state"]["key"].astype(np.int64)),
            "pos": int(s["state"]["pos"]),
            "has_gauss": int(s["has_gauss"]),
            "gauss": float(s["gauss"]),
        }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        s = state["numpy"]
        np.random.set_state({
            "bit_generator": s["bit_generator"],
            "state": {"key": s["key"].numpy().astype(np.uint32), "pos": s["pos"]},
            "has_gauss": s["has_gauss"],
            "gauss": s["gauss"],
        })


def _to_plain(x: Any) -> Any:
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (tuple, list)) else x
