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

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._utils import atomic_write
from ..models._helpers import CheckpointError, safe_load

__all__ = [
    "FORMAT",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint_file",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "deformattn-train-v1"
REQUIRED_KEYS = ("model", "model_name", "model_kwargs", "epoch", "config", "class_names")
TRAINING_STATE_KEYS = ("optimizer", "scheduler", "scaler", "rng")


def save_checkpoint(path: str | Path, checkpoint: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint dict (``"format"`` is filled in)."""
    obj = {"format": FORMAT, **checkpoint}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint_file(path: str | Path, *, argument: str = "checkpoint", training_state: bool = False) -> dict:
    """Read and check a training checkpoint (through the package's one reader,
    :func:`deformattn.models._helpers.safe_load`, weights only); every failure is a :class:`CheckpointError` (or
    FileNotFoundError) that names ``argument`` and the file.

    Args:
        training_state: also require the optimizer / scheduler / scaler / RNG states (``resume``).
    """
    obj = safe_load(path, argument=argument)
    path = Path(path)
    if not isinstance(obj, dict):
        raise CheckpointError(argument, f"{str(path)!r} holds a {type(obj).__name__}, not a deformattn training "
                                        "checkpoint")
    if obj.get("format") != FORMAT:
        hint = (" (it looks like a bare state_dict or an official checkpoint: load it with "
                "create_model(name, checkpoint_path=...))")
        raise CheckpointError(
            argument, f"{str(path)!r} is not a deformattn training checkpoint: format {obj.get('format')!r}, "
                      f"expected {FORMAT!r}{hint if 'format' not in obj else ''}"
        )
    needed = REQUIRED_KEYS + (TRAINING_STATE_KEYS if training_state else ())
    missing = [k for k in needed if k not in obj or obj[k] is None]
    if missing:
        extra = " (a weights-only export such as best.pt cannot be resumed; use last.pt)" if training_state else ""
        raise CheckpointError(argument, f"checkpoint {str(path)!r} lacks {', '.join(missing)}{extra}")
    if not isinstance(obj["model"], Mapping) or not all(torch.is_tensor(v) for v in obj["model"].values()):
        raise CheckpointError(argument, f"checkpoint {str(path)!r}: 'model' is not a state_dict of tensors")
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
