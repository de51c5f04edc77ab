"""Training tools: ``train(TrainConfig(...))`` (what ``deformattn train`` runs), checkpoint evaluation and
prediction. Optional packages (scikit-learn, torchvision, tqdm, matplotlib, PyYAML: ``pip install
'deformattn[train]'``) are imported only where used."""
from __future__ import annotations

from .checkpoint import FORMAT, CheckpointError, load_checkpoint_file, save_checkpoint
from .config import TrainConfig, load_config_file
from .engine import ModelEma, evaluate, param_groups, train
from .inference import evaluate_checkpoint, load_trained_model, predict_images

__all__ = [
    "FORMAT",
    "CheckpointError",
    "ModelEma",
    "TrainConfig",
    "evaluate",
    "evaluate_checkpoint",
    "load_checkpoint_file",
    "load_config_file",
    "load_trained_model",
    "param_groups",
    "predict_images",
    "save_checkpoint",
    "train",
]
