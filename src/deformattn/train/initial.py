"""Fine-tuning starts: ``deformattn train --initial-checkpoint PATH`` (timm's flag) loads pretrained weights into a
fresh run.

Two steps, kept apart so that the file reading stays in one place:

* :func:`select_weights` takes an already-loaded checkpoint dict and finds the weights in it, whatever its
  format: an official classification checkpoint (``{"model": ...}``), this library's training checkpoint (``model``
  or ``model_ema``), timm's train checkpoint (``state_dict`` / ``state_dict_ema``), a bare state dict, or the backbone
  of an official detection / segmentation checkpoint (mmdet / mmseg: ``{"state_dict": {"backbone.<key>": ...}}``,
  every other key ignored).
* :func:`load_initial_weights` puts them into the model through the checkpoint filter (prefixes stripped, relative
  position tables resized to the run's ``--img-size``), all or nothing: a classifier of another class count (and a
  ``cls_norm`` that a backbone checkpoint lacks) keeps its fresh initialisation, keys the model does not have are
  ignored, and anything else that does not fit raises before a single tensor is copied.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import FORMAT, CheckpointError

__all__ = ["InitialWeights", "load_initial_checkpoint", "load_initial_weights", "select_weights"]

FLAG = "--initial-checkpoint"
BACKBONE_PREFIX = "backbone."
# the classifier side of the model: re-initialised when the checkpoint has none (backbones) or another class count
HEAD_PREFIXES = ("cls_head.", "cls_norm.")


@dataclass
class InitialWeights:
    """The weights found in a checkpoint: ``state_dict``, a ``source`` naming the format, the top-level keys it
    set aside (``ignored``: e.g. an mmdet checkpoint's neck and heads) and the model name it was saved from (if
    the file says)."""

    state_dict: dict[str, Tensor]
    source: str
    ignored: list[str] = field(default_factory=list)
    model_name: str | None = None


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(torch.is_tensor(v) for v in value.values())


def select_weights(checkpoint: Any, *, ema: bool = True, what: str = FLAG) -> InitialWeights:
    """The weights inside an already-loaded checkpoint (see the module docstring for the formats).

    Args:
        checkpoint: what ``torch.load`` returned.
        ema: take the EMA weights of a training checkpoint when it has them (``model_ema`` / ``state_dict_ema``).
        what: the argument named in errors.

    Raises:
        CheckpointError: no state dict of tensors in it (not a model checkpoint).
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(what, f"the file holds a {type(checkpoint).__name__}, not a checkpoint dict")
    name = checkpoint.get("model_name") if isinstance(checkpoint.get("model_name"), str) else None
    if checkpoint.get("format") == FORMAT and _tensor_dict(checkpoint.get("model")):
        use_ema = ema and _tensor_dict(checkpoint.get("model_ema"))
        key = "model_ema" if use_ema else "model"
        return InitialWeights(dict(checkpoint[key]), f"deformattn training checkpoint ({key})", model_name=name)
    ema_key = next((k for k in ("model_ema", "state_dict_ema") if _tensor_dict(checkpoint.get(k))), None)
    for key in ("model", "state_dict"):
        inner = checkpoint.get(key)
        if not _tensor_dict(inner):
            continue
        if ema and ema_key is not None:
            key, inner = ema_key, checkpoint[ema_key]
        backbone = [k for k in inner if k.startswith(BACKBONE_PREFIX)]
        if backbone:  # mmdet / mmseg: the backbone's keys, everything else (neck, heads) ignored
            weights = {k[len(BACKBONE_PREFIX):]: inner[k] for k in backbone}
            ignored = [k for k in inner if not k.startswith(BACKBONE_PREFIX)]
            return InitialWeights(weights, f"detection / segmentation checkpoint ({BACKBONE_PREFIX}* keys)",
                                  ignored, name)
        return InitialWeights(dict(inner), f"checkpoint ({key})", model_name=name)
    if _tensor_dict(checkpoint):
        return InitialWeights(dict(checkpoint), "state dict", model_name=name)
    tensors = {k: v for k, v in checkpoint.items() if torch.is_tensor(v)}
    if tensors and len(tensors) < len(checkpoint):
        raise CheckpointError(what, f"the dict mixes tensors with other entries "
                              f"({', '.join(repr(k) for k in list(checkpoint)[:5])}, ...) and holds no state dict "
                              "under 'model' or 'state_dict'")
    keys = ", ".join(repr(k) for k in list(checkpoint)[:6]) or "none"
    raise CheckpointError(what, f"not a model checkpoint: no state dict of tensors in it (top-level keys: {keys})")


# -- what architecture a state dict comes from ---------------------------------------------------------------------
def _block_letter(params: set[str]) -> str | None:
    """The block kind of one ``stages.i.attns.j`` from its parameter names (L and S share their weights: "L")."""
    if "conv_offset.0.weight" in params:
        return "D"
    if "rpb" in params:
        return "N"
    if "relative_position_bias_table" in params:
        return "L"
    return None


def _signature(keys: set[str], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """Stem kind, stage widths and block letters of a DAT state dict (official key names); None when not one."""
    dims, spec = [], []
    for i in range(4):
        norm = shapes.get(f"stages.{i}.layer_norms.0.norm.weight")
        if norm is None:
            return None
        dims.append(norm[0])
        blocks: dict[int, set[str]] = {}
        for k in keys:
            parts = k.split(".", 4)
            if len(parts) == 5 and parts[:3] == ["stages", str(i), "attns"] and parts[3].isdigit():
                blocks.setdefault(int(parts[3]), set()).add(parts[4])
        spec.append("".join(_block_letter(blocks[j]) or "?" for j in sorted(blocks)))
    return {"dims": tuple(dims), "spec": tuple(spec), "conv_stem": "patch_proj.3.weight" in shapes}


def guess_architecture(state_dict: Mapping[str, Any]) -> str | None:
    """The registered variant(s) whose layout (stem, stage widths, block kinds) a state dict has, e.g.
    ``'dat_pp_small'`` or ``'dat_base or dat_base_384'``; None when it is not a DAT state dict."""
    from ..models import list_models
    from ..models._helpers import clean_key
    from ..models.dat import MODEL_CONFIGS

    shapes = {clean_key(k): tuple(v.shape) for k, v in state_dict.items() if torch.is_tensor(v)}
    sig = _signature(set(shapes), shapes)
    if sig is None:
        return None
    found = []
    for name in list_models():
        cfg = MODEL_CONFIGS.get(name)
        if cfg is None:
            continue
        spec = tuple("".join(s).replace("S", "L") for s in cfg["stage_spec"])
        if tuple(cfg["dims"]) == sig["dims"] and spec == sig["spec"] and cfg["conv_stem"] == sig["conv_stem"]:
            found.append(name)
    if found:
        return " or ".join(found)
    return (f"a DAT with stage widths {'-'.join(map(str, sig['dims']))} and blocks {'/'.join(sig['spec'])} "
            "(no registered variant)")


# -- loading ---------------------------------------------------------------------------------------------------------
def load_initial_weights(model: nn.Module, weights: InitialWeights, *, what: str = FLAG,
                         path: str | None = None) -> dict[str, Any]:
    """Load ``weights`` into ``model`` (all or nothing, see the module docstring) and report what happened.

    Returns:
        ``{"path", "format", "loaded", "reinitialised", "ignored", "reinitialised_keys", "ignored_keys", "resized"}``
        (counts of tensors, and the keys: the classifier keys re-initialised, the checkpoint keys not used).

    Raises:
        CheckpointError: the checkpoint is of another architecture (its name when it can be told) or misses
            parameters of the model's body; the model is then unchanged.
    """
    from ..layers.window_attention import DERIVED_BUFFERS
    from ..models._helpers import clean_key
    from ..models.dat import checkpoint_filter_fn

    source_shapes = {clean_key(k): tuple(v.shape) for k, v in weights.state_dict.items()}
    filtered = checkpoint_filter_fn(weights.state_dict, model)
    own = model.state_dict()
    loaded: dict[str, Tensor] = {}
    reinit: list[str] = []
    ignored = list(weights.ignored)
    mismatched, resized = [], []
    for key, value in filtered.items():
        if key not in own or not torch.is_tensor(value):
            ignored.append(key)
        elif value.shape != own[key].shape:
            (reinit if key.startswith(HEAD_PREFIXES) else mismatched).append(key)
        else:
            loaded[key] = value
            derived = key.rsplit(".", 1)[-1] in DERIVED_BUFFERS  # the model's own, never the checkpoint's
            if not derived and source_shapes.get(key) not in (None, tuple(value.shape)):
                resized.append(key)
    missing = [k for k in own if k not in filtered and k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS]
    reinit += [k for k in missing if k.startswith(HEAD_PREFIXES)]
    missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    if mismatched or missing:
        body = [k for k in own if not k.startswith(HEAD_PREFIXES)]
        fitting = sum(1 for k in loaded if not k.startswith(HEAD_PREFIXES))
        looks = weights.model_name or guess_architecture(weights.state_dict)
        like = f"it looks like {looks}" if looks else "it does not look like a DAT checkpoint"
        if mismatched:
            k = mismatched[0]
            detail = (f"{len(mismatched)} shape mismatch(es), e.g. {k} (checkpoint {tuple(filtered[k].shape)} vs "
                      f"model {tuple(own[k].shape)})")
        else:
            detail = f"{len(missing)} model key(s) absent, e.g. {missing[0]}"
        raise CheckpointError(
            what, f"{path or 'the checkpoint'} ({weights.source}) does not fit --model {name}: {like}; "
            f"{fitting} of {len(body)} tensors fit, {detail}. Nothing was loaded"
        )
    state = dict(own)
    state.update(loaded)
    model.load_state_dict(state)  # DAT.load_state_dict checks everything before copying anything
    return {
        "path": path, "format": weights.source, "loaded": len(loaded), "reinitialised": len(reinit),
        "ignored": len(ignored), "reinitialised_keys": reinit, "ignored_keys": ignored, "resized": resized,
    }


def load_initial_checkpoint(model: nn.Module, path: str | Path, *, ema: bool = True,
                            what: str = FLAG) -> dict[str, Any]:
    """Read ``path`` with the library's checkpoint reader, then :func:`select_weights` and
    :func:`load_initial_weights`. Every failure is a :class:`CheckpointError` (or ``FileNotFoundError``) naming
    ``what`` and the file."""
    from ..models._helpers import safe_load

    path = Path(path)
    loaded = safe_load(path, weights_only=True, argument=what)  # diagnoses missing / damaged / pickling files
    weights = select_weights(loaded, ema=ema, what=what)
    return load_initial_weights(model, weights, what=what, path=str(path))
