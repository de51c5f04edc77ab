"""One call from a model and an image to the figure: run the model once while recording, then draw."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .coords import image_to_relative
from .images import fit_size, prepare_input
from .plot import draw_sampling, layer_stride
from .record import LayerSampling, record_sampling

__all__ = ["VizResult", "visualize"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VizResult:
    """What :func:`visualize` made: the figure, the drawn coordinates (see :func:`~deformattn.viz.draw_sampling`),
    the records, the model's output, the image drawn (the model's input before normalisation), the query in its
    pixels (y, x) and the total stride of every drawn layer."""

    figure: Any
    drawn: list[dict[str, Any]]
    records: list[LayerSampling]
    output: torch.Tensor
    image: np.ndarray
    query: tuple[float, float]
    strides: list[tuple[float, float]]
    summary: dict[str, Any] | None = None  # filled by ``deformattn viz``: image, prediction, query, layers


def _reduction(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    if info:
        return int(info[-1]["reduction"])
    return 1


def visualize(
    model: nn.Module,
    image: np.ndarray,
    *,
    img_size: int | Sequence[int] | None = None,
    query: Sequence[float] | None = None,
    layers: str | Sequence[str] | None = None,
    title: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> VizResult:
    """Run ``model`` on ``image`` once, recording every deformable layer, and draw the figure.

    Args:
        model: any model containing :class:`~deformattn.DeformableAttention2d` layers; run in eval mode (its
            mode is restored afterwards).
        image: ``[H, W, 3]`` in ``[0, 1]``.
        img_size: model input size: ``S`` (the shorter side becomes ``S``, aspect kept, both sides rounded to a
            multiple of the model's total stride) or ``(h, w)`` exactly. Default: the model's ``pretrained_cfg``
            input size (else 224).
        query: the query, ``(y, x)`` in pixels of the resized image (the one drawn); default its centre.
        layers: ``fnmatch`` patterns of the layers to draw (default all).
        mean, std: normalisation (default the model's ``pretrained_cfg``, else ImageNet's).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if img_size is None:
        img_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    if isinstance(img_size, int):
        size = fit_size(image.shape[:2], img_size, _reduction(model))
    else:
        size = (int(img_size[0]), int(img_size[1]))
    shown, x = prepare_input(image, size, mean or cfg.get("mean", _IMAGENET_MEAN), std or cfg.get("std", _IMAGENET_STD))
    h, w = size
    if query is None:
        query = ((h - 1) / 2.0, (w - 1) / 2.0)
    if not (-0.5 <= query[0] <= h - 0.5 and -0.5 <= query[1] <= w - 0.5):
        raise ValueError(
            f"visualize: the query (y, x) = {tuple(query)} lies outside the {h}x{w} image the model sees (pixels of "
            "the resized image; its centre is the default)"
        )
    rel = image_to_relative(query, (h, w))
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_sampling(model, queries=[rel], layers=layers) as rec:
            output = model(x)
    finally:
        model.train(was_training)
    records = rec.last()
    strides = [layer_stride(model, r.name, r.input_size, (h, w)) for r in records]
    fig, drawn = draw_sampling(records, shown, strides, title=title, requested_query=query)
    return VizResult(fig, drawn, records, output, shown, (float(query[0]), float(query[1])), strides)
