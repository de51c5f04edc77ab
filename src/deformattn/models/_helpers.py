"""Checkpoint helpers shared by every model and every entry point (timm's ``_helpers``): read a file, clean its keys,
check it against a model and load it all or nothing. Only the model-specific conversion (``checkpoint_filter_fn``)
lives in the model file.

One reader, :func:`safe_load`, opens every checkpoint the package reads (``create_model(checkpoint_path=
...)``, ``load_checkpoint``, the training checkpoints of ``deformattn train`` and every CLI command). It tells two
failures apart:

* the file is not a PyTorch checkpoint, or is truncated or damaged (zip archive incomplete, a CRC mismatch, a pickle
  that does not parse): a :class:`CheckpointError` says so and nothing else - unpickling it could not help;
* the file is intact but pickles Python objects besides tensors and plain containers (e.g. the yacs config the
  official training script saves): the error names the objects and says that a file one trusts can be read with
  ``weights_only=False``.
"""
from __future__ import annotations

import importlib
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import InvalidArgumentError

__all__ = [
    "CheckpointError",
    "check_state_dict",
    "clean_key",
    "describe_report",
    "load_checkpoint",
    "safe_load",
    "read_checkpoint",
    "unwrap_state_dict",
]

_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class CheckpointError(InvalidArgumentError):
    """A checkpoint file that cannot be used: corrupt, truncated, not a checkpoint, of another model or run.

    ``argument`` names the argument the file came from (``checkpoint_path``, ``checkpoint``, ``resume``); the CLI
    replaces it by the option's flag. ``pickled_objects`` lists the Python objects an intact file pickles besides
    tensors (empty for every other failure): only then is reading it with ``weights_only=False`` a remedy.
    """

    def __init__(self, argument: str, message: str, *, pickled_objects: Sequence[str] = (), path: str = ""):
        super().__init__(argument, message)
        self.pickled_objects = tuple(pickled_objects)
        self.path = path


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
def _damage(path: Path) -> str | None:
    """Why ``path`` is not an intact PyTorch checkpoint, or None. Reads the file once; runs no pickled code."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head[:1] == b"\x80":  # the legacy (pre-1.6) format is a bare pickle stream: torch.load checks it
            return None
        if head[:2] == b"PK":
            return "it is a truncated or damaged zip archive (its directory at the end is missing)"
        return "it is not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # CRC-32 of every member: torch.load itself does not check them
            if bad is not None:
                return f"it is damaged (member {bad!r} fails its CRC check)"
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                return "it is a zip archive but not a PyTorch checkpoint (no data.pkl)"
            for _ in pickletools.genops(zf.read(pkl[0])):  # parse without executing: ends at STOP or raises
                pass
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        return f"it is truncated or damaged ({type(exc).__name__})"
    return None


def safe_load(path: str | Path, *, weights_only: bool = True, argument: str = "checkpoint_path") -> Any:
    """The object saved in a checkpoint file (``torch.load`` on the CPU), with errors that diagnose the file.

    Args:
        weights_only: refuse pickled Python objects (tensors and plain containers only). Pass False only for a
            file you trust: unpickling runs code named in the file.
        argument: the argument name used in error messages.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: empty, truncated, damaged or not a checkpoint; or (``weights_only=True``) an intact file
            that pickles objects besides tensors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{argument}: checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(argument, f"{str(path)!r} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(argument, f"checkpoint {str(path)!r} is empty (0 bytes): the file is truncated")
    damage = _damage(path)
    if damage is not None:
        raise CheckpointError(argument, f"cannot read checkpoint {str(path)!r}: {damage}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's weights_only notice for trusted loads
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED_GLOBAL.findall(str(exc))
        if weights_only and found:
            raise CheckpointError(
                argument,
                f"checkpoint {str(path)!r} is intact but pickles Python objects besides tensors ({', '.join(found)}), "
                "which a weights-only read refuses. Loading it runs code named in the file: only if you trust it, "
                "read it with weights_only=False (create_model: checkpoint_weights_only=False)",
                pickled_objects=found, path=str(path),
            ) from None
        raise CheckpointError(argument, f"cannot read checkpoint {str(path)!r}: its pickled data is damaged or is not "
                                        "a PyTorch checkpoint") from None
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError, ImportError, KeyError, IndexError) as exc:
        # a legacy-format stream that breaks off, or a member whose bytes do not fit the recorded storage
        raise CheckpointError(argument, f"cannot read checkpoint {str(path)!r}: it is truncated or damaged "
                                        f"({type(exc).__name__})") from None


def clean_key(key: str) -> str:
    """A state_dict key without wrapper prefixes (``module.`` of DistributedDataParallel, ``_orig_mod.`` of
    ``torch.compile``)."""
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state_dict inside an official / training checkpoint dict (``"model"`` or ``"state_dict"``)."""
    for key in ("model", "state_dict"):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping) and any(torch.is_tensor(v) for v in inner.values()):
            return inner
    return checkpoint


def read_checkpoint(path: str | Path, *, weights_only: bool = True, argument: str = "checkpoint_path"
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint file: returns ``(state_dict, metadata)``.

    Accepts a bare state_dict, an official checkpoint (state_dict under ``"model"``) and the library's training
    checkpoints (``{"model": state_dict, "model_name": ..., "model_kwargs": ..., ...}``); ``metadata`` holds the
    other top-level entries. Errors: see :func:`safe_load`.
    """
    obj = safe_load(path, weights_only=weights_only, argument=argument)
    if not isinstance(obj, Mapping):
        raise CheckpointError(argument, f"{str(path)!r} holds a {type(obj).__name__}, expected a dict / state_dict")
    inner = unwrap_state_dict(obj)
    if not any(torch.is_tensor(v) for v in inner.values()):
        raise CheckpointError(argument, f"{str(path)!r} holds no tensors: not a model checkpoint")
    meta = {} if inner is obj else {k: v for k, v in obj.items() if v is not inner}
    return dict(inner), meta


# ---------------------------------------------------------------------------------------------------------------
# checking and loading
# ---------------------------------------------------------------------------------------------------------------
def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, list]:
    """Compare a (filtered) state_dict with the model's: ``{"missing", "unexpected", "mismatched"}`` lists
    (``mismatched`` holds ``(key, checkpoint_shape, model_shape)``)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own or not torch.is_tensor(state_dict[k])]
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in state_dict.items()
        if k in own and torch.is_tensor(v) and v.shape != own[k].shape
    ]
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def describe_report(report: dict[str, list], limit: int = 8) -> str:
    """One line per kind of problem, at most ``limit`` keys each."""
    parts = []
    for name in ("missing", "unexpected", "mismatched"):
        items = report[name]
        if not items:
            continue
        if name == "mismatched":
            shown = [f"{k} (checkpoint {c} vs model {m})" for k, c, m in items[:limit]]
        else:
            shown = list(items[:limit])
        more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
        parts.append(f"{len(items)} {name} key(s): " + ", ".join(shown) + more)
    return "; ".join(parts)


def _model_filter_fn(model: nn.Module) -> Callable[[Mapping[str, Any], nn.Module], dict[str, Tensor]] | None:
    """The ``checkpoint_filter_fn`` of the module that defines ``model``'s class (timm's convention), if any."""
    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, Any],
    *,
    strict: bool = True,
    weights_only: bool = True,
    skip_mismatched_head: bool = False,
    filter_fn: Callable[[Mapping[str, Any], nn.Module], dict[str, Tensor]] | None = None,
) -> dict[str, list]:
    """Load an official or own checkpoint (path or dict) into ``model``, all or nothing.

    The checkpoint goes through ``filter_fn`` (default: the ``checkpoint_filter_fn`` of the model's own module,
    e.g. :func:`deformattn.models.dat.checkpoint_filter_fn`); then every key and shape is checked *before*
    anything is copied, so a checkpoint of another variant raises a ``ValueError`` that lists the missing,
    unexpected and shape-mismatched keys and leaves the model untouched.

    Args:
        strict: with False, missing / unexpected keys are tolerated (shape mismatches never are).
        weights_only: see :func:`safe_load`.
        skip_mismatched_head: leave ``cls_head`` at its initialisation when its shape differs (fine-tuning to
            another number of classes); a warning says so.

    Returns:
        The report of :func:`check_state_dict` after filtering (all lists empty for a full load).
    """
    meta: dict[str, Any] = {}
    if isinstance(checkpoint, (str, Path)):
        state_dict, meta = read_checkpoint(checkpoint, weights_only=weights_only, argument="checkpoint")
    elif isinstance(checkpoint, Mapping):
        state_dict = dict(unwrap_state_dict(checkpoint))
        meta = {k: v for k, v in checkpoint.items() if k in ("model_name", "model_kwargs")}
    else:
        raise TypeError(f"load_checkpoint: checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    filter_fn = filter_fn or _model_filter_fn(model)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    else:
        state_dict = {clean_key(k): v for k, v in state_dict.items()}
    report = check_state_dict(model, state_dict)
    if skip_mismatched_head and report["mismatched"]:
        head = [m for m in report["mismatched"] if m[0].startswith("cls_head.")]
        if head:
            warnings.warn(
                f"load_checkpoint: classifier shape differs (checkpoint {head[0][1]} vs model {head[0][2]}); "
                "cls_head keeps its initialisation",
                stacklevel=2,
            )
            for k, _, _ in head:
                state_dict.pop(k)
            report = check_state_dict(model, state_dict)
            report["missing"] = [k for k in report["missing"] if not k.startswith("cls_head.")]
    if report["mismatched"] or (strict and (report["missing"] or report["unexpected"])):
        source = f" (saved from {meta['model_name']!r})" if meta.get("model_name") else ""
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        raise ValueError(
            f"load_checkpoint: the checkpoint{source} does not fit model {name!r}; nothing was loaded. "
            f"{describe_report(report)}"
        )
    if report["unexpected"]:
        for k in report["unexpected"]:
            state_dict.pop(k)
    model.load_state_dict(state_dict, strict=not (report["missing"] or skip_mismatched_head))
    return report
