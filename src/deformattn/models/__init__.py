"""DAT / DAT++ backbones: the model, its registered variants, checkpoint loading and the official-code bridge."""
from __future__ import annotations

from ._helpers import CheckpointError, check_state_dict, load_checkpoint, read_checkpoint
from .dat import DAT, MODEL_CONFIGS, TransformerStage, checkpoint_filter_fn, default_cfgs
from .registry import (
    create_model,
    is_model,
    list_models,
    model_entrypoint,
    register_model,
    timm_register,
)

__all__ = [
    "CheckpointError",
    "DAT",
    "MODEL_CONFIGS",
    "TransformerStage",
    "check_state_dict",
    "checkpoint_filter_fn",
    "create_model",
    "default_cfgs",
    "is_model",
    "list_models",
    "load_checkpoint",
    "model_entrypoint",
    "read_checkpoint",
    "register_model",
    "timm_register",
]
