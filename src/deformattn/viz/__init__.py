"""Where deformable attention looks and what it costs.

* :func:`record_sampling`: a context manager (forward hooks) recording, for every deformable layer of a model, the
  reference points, the deformed sampling positions per group and the attention weights of chosen queries, without
  changing the model's outputs.
* :mod:`~deformattn.viz.coords`: normalised ``align_corners=True`` coordinates -> image pixels.
* :func:`draw_sampling` / :func:`visualize`: the figure (matplotlib, ``pip install 'deformattn[viz]'``).
* :mod:`~deformattn.viz.complexity_plot`: the figure of :mod:`deformattn.analysis.complexity` (cost analysis, with
  :func:`deformattn.analysis.model_cost`, lives in :mod:`deformattn.analysis`).

matplotlib and scikit-learn are imported only by the functions that need them; the drawing helpers
(which need numpy) are loaded on first access, so importing the package (and the CLI) needs torch only.
"""
from __future__ import annotations

import importlib
from typing import Any

from .coords import (
    feature_to_image,
    image_to_relative,
    normalized_to_feature,
    normalized_to_image,
    relative_to_feature_index,
)
from .record import LayerSampling, SamplingRecorder, deformable_layers, record_sampling

_LAZY = {
    "draw_sampling": "plot",
    "layer_stride": "plot",
    "sampling_points": "plot",
    "save_figure": "plot",
    "VizResult": "figure",
    "visualize": "figure",  # a module named like the function would shadow it once imported
}

__all__ = [
    "LayerSampling",
    "SamplingRecorder",
    "VizResult",
    "deformable_layers",
    "draw_sampling",
    "feature_to_image",
    "image_to_relative",
    "layer_stride",
    "normalized_to_feature",
    "normalized_to_image",
    "record_sampling",
    "relative_to_feature_index",
    "sampling_points",
    "save_figure",
    "visualize",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
