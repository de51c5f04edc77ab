"""Use a training checkpoint: evaluate it on a split, or predict the classes of image files."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .._utils import InvalidArgumentError
from .checkpoint import CheckpointError, load_checkpoint_file
from .config import TrainConfig
from .data import DataSpec, build_splits, load_images
from .distributed import DistEnv, resolve_device
from ..models.registry import check_model_name
from .engine import evaluate
from .precision import autocast, resolve_precision

__all__ = ["evaluate_checkpoint", "load_trained_model", "predict_images"]


def load_trained_model(checkpoint: str | Path, *, ema: bool = False, device: str = "cpu"
                       ) -> tuple[nn.Module, dict[str, Any], DataSpec]:
    """``(model in eval mode, checkpoint dict, data spec)`` of a training checkpoint (``ema``: the EMA weights)."""
    from ..models import create_model

    ckpt = load_checkpoint_file(checkpoint, argument="checkpoint")
    name = ckpt["model_name"]
    try:
        check_model_name(name, argument="model_name")
    except ValueError as exc:
        raise CheckpointError("checkpoint", f"{str(checkpoint)!r} holds {exc}") from None
    model = create_model(name, **ckpt["model_kwargs"])
    state = ckpt.get("model_ema") if ema else ckpt["model"]
    if state is None:
        raise CheckpointError("ema", f"checkpoint {str(checkpoint)!r} has no EMA weights (trained without EMA)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError("checkpoint", f"the weights in {str(checkpoint)!r} do not fit {name} with "
                              f"{ckpt['model_kwargs']} ({str(exc).splitlines()[0]})") from None
    if "data" not in ckpt:
        raise CheckpointError("checkpoint", f"{str(checkpoint)!r} lacks the 'data' preprocessing description")
    dev = resolve_device(device)
    return model.to(dev).eval(), ckpt, DataSpec.from_dict(ckpt["data"])


def evaluate_checkpoint(checkpoint: str | Path, *, split: str | None = None, data: str | None = None,
                        batch_size: int = 128, ema: bool = False, device: str = "auto", workers: int = 2,
                        max_samples: int | None = None, precision: str = "fp32") -> dict[str, Any]:
    """Loss, top-1 and top-5 of a checkpoint on ``split`` (default: the split it was evaluated on in training) of
    its training data, or of another ImageFolder root ``data`` with the same classes; ``precision``: autocast
    precision (:mod:`.precision`)."""
    if batch_size < 1:
        raise InvalidArgumentError("batch_size", f"must be >= 1, got {batch_size}")
    model, ckpt, spec = load_trained_model(checkpoint, ema=ema, device=device)
    values = dict(ckpt["config"])
    values.update(max_train_samples=None, max_eval_samples=max_samples, workers=workers, resume=None)
    if data is not None:
        values["data"] = str(data)
    config = TrainConfig.from_dict(values, source=f"--checkpoint {str(checkpoint)!r}: config")
    splits = build_splits(config, eval_split=split, train=False)
    if splits.class_names != ckpt["class_names"]:
        raise InvalidArgumentError("data", f"the classes {splits.class_names} differ from the checkpoint's {ckpt['class_names']}")
    dev = next(model.parameters()).device
    loader = DataLoader(splits.eval, batch_size=batch_size, shuffle=False,
                        num_workers=workers if spec.kind != "digits" else 0)
    precision = resolve_precision(precision, dev)
    metrics = evaluate(model, loader, spec, DistEnv(device=dev), precision=precision)
    return {"checkpoint": str(checkpoint), "model": ckpt["model_name"], "epoch": ckpt["epoch"],
            "dataset": "digits" if spec.kind == "digits" else str(config.data), "split": splits.eval_name,
            "ema": ema, "precision": precision, **metrics}


@torch.no_grad()
def predict_images(checkpoint: str | Path, images: Sequence[str | Path], *, topk: int = 5, ema: bool = False,
                   device: str = "auto", batch_size: int = 64, precision: str = "fp32") -> list[dict[str, Any]]:
    """For each image: ``{"image": path, "top": [(class_name, probability), ...]}`` (``topk`` classes, best first),
    plus ``"warning"`` when a digits checkpoint gets an image that looks inverted (dark ink on a light background);
    ``precision``: autocast precision (:mod:`.precision`)."""
    if topk < 1:
        raise InvalidArgumentError("topk", f"must be >= 1, got {topk}")
    if not images:
        raise InvalidArgumentError("images", "give at least one image file")
    model, ckpt, spec = load_trained_model(checkpoint, ema=ema, device=device)
    dev = next(model.parameters()).device
    precision = resolve_precision(precision, dev)
    names = ckpt["class_names"]
    k = min(topk, len(names))
    results = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        with autocast(dev, precision):
            logits = model(load_images(chunk, spec).to(dev))
        probs = logits.float().softmax(dim=1)  # B, num_classes
        p, idx = probs.topk(k, dim=1)
        for path, pi, ii in zip(chunk, p.tolist(), idx.tolist(), strict=True):
            result = {"image": str(path), "top": [(names[i], prob) for i, prob in zip(ii, pi, strict=True)]}
            if spec.kind == "digits" and looks_inverted(path):
                result["warning"] = (f"{str(path)!r} looks like a dark digit on a light background; the digits "
                                     "model expects a light digit on a dark background (as scikit-learn's digits): "
                                     "invert the image (PIL.ImageOps.invert) for a meaningful prediction")
            results.append(result)
    return results


def looks_inverted(path: str | Path) -> bool:
    """True when a digit image's border is mostly light (mean grey > 0.5): dark ink on light paper, the opposite of
    the digits data."""
    from PIL import Image

    with Image.open(path) as img:
        gray = torch.frombuffer(bytearray(img.convert("L").tobytes()), dtype=torch.uint8)
        gray = gray.view(img.height, img.width).float() / 255.0
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return bool(border.mean() > 0.5)
