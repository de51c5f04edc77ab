"""From a deformable layer's normalised coordinates to pixels of the input image.

Three coordinate systems meet here, all ordered **(y, x)**:

* **normalised** (what :class:`~deformattn.DeformableAttention2d` returns): ``[-1, 1]`` over the layer's input map
  with ``align_corners=True``: ``-1`` is the centre of the first feature pixel, ``+1`` the centre of the last one
  (see :mod:`deformattn.functional`).
* **feature pixels**: ``f = (c + 1) / 2 * (h - 1)`` on a map of ``h`` rows (``w`` columns for x); pixel ``i`` has its
  centre at ``f = i``.
* **image pixels** (matplotlib's ``imshow`` convention): pixel ``j`` of the image has its centre at ``j`` and covers
  ``[j - 0.5, j + 0.5]``. A feature pixel of a stage with total stride ``s`` covers ``s`` image pixels, so its centre
  sits at ``p = (f + 0.5) * s - 0.5``: feature pixel 0 of a stride-16 stage covers image pixels 0..15 and has its
  centre at 7.5.

Worked example: a 64 x 96 image (H x W) seen by a stride-8 stage gives an 8 x 12 map. The normalised point
``(-1, -1)`` is feature pixel ``(0, 0)``, image point ``(3.5, 3.5)``; ``(1, 1)`` is feature pixel ``(7, 11)``, image
point ``(59.5, 91.5)``; ``(0, 0)`` is feature point ``(3.5, 5.5)``, image point ``(31.5, 47.5)`` - the image centre.
Points outside ``[-1, 1]`` (the DAT++ reference grid's last row, before offsets move it) map outside the image.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["normalized_to_feature", "feature_to_image", "normalized_to_image", "relative_to_feature_index",
           "image_to_relative"]


def _pair(value: float | Sequence[float], name: str, owner: str) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), float(value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        return float(value[0]), float(value[1])
    raise TypeError(f"{owner}: {name} must be a number or a (y, x) pair, got {value!r}")


def _check_coords(coords: Tensor, owner: str) -> None:
    if not isinstance(coords, Tensor):
        raise TypeError(f"{owner}: coords must be a torch.Tensor, got {type(coords).__name__}")
    if coords.shape[-1:] != (2,):
        raise ValueError(f"{owner}: coords must end in a (y, x) pair (shape [..., 2]), got {tuple(coords.shape)}")


def normalized_to_feature(coords: Tensor, feature_size: Sequence[int]) -> Tensor:
    """Normalised ``align_corners=True`` (y, x) -> feature-pixel (y, x) on a map of ``feature_size = (h, w)``.

    Args:
        coords (Tensor[..., 2]): normalised (y, x).
        feature_size: ``(h, w)`` of the map the coordinates refer to (the layer's input).

    Returns:
        Tensor[..., 2]: ``(c + 1) / 2 * (n - 1)`` per axis (``n = h`` for y, ``w`` for x); a length-1 axis maps
        everything to its only pixel, 0.
    """
    _check_coords(coords, "normalized_to_feature")
    h, w = (int(v) for v in feature_size)
    if h < 1 or w < 1:
        raise ValueError(f"normalized_to_feature: feature_size must be >= 1, got {tuple(feature_size)}")
    scale = coords.new_tensor([(h - 1) / 2.0, (w - 1) / 2.0])
    return (coords + 1.0) * scale


def feature_to_image(coords: Tensor, stride: float | Sequence[float]) -> Tensor:
    """Feature-pixel (y, x) -> image-pixel (y, x) for a stage of total stride ``stride`` (int or ``(sy, sx)``):
    ``(f + 0.5) * s - 0.5`` (the centre of the ``s x s`` block of image pixels the feature pixel covers)."""
    _check_coords(coords, "feature_to_image")
    sy, sx = _pair(stride, "stride", "feature_to_image")
    if sy <= 0 or sx <= 0:
        raise ValueError(f"feature_to_image: stride must be > 0, got {(sy, sx)}")
    s = coords.new_tensor([sy, sx])
    return (coords + 0.5) * s - 0.5


def normalized_to_image(coords: Tensor, feature_size: Sequence[int], stride: float | Sequence[float]) -> Tensor:
    """Normalised (y, x) of a layer whose input map is ``feature_size = (h, w)`` -> image pixels (y, x), for a
    stage of total stride ``stride`` (int or ``(sy, sx)``). See the module docstring for the worked example.

    Returns:
        Tensor[..., 2], same dtype and device as ``coords``.
    """
    return feature_to_image(normalized_to_feature(coords, feature_size), stride)


def image_to_relative(point: Sequence[float], image_size: Sequence[int]) -> tuple[float, float]:
    """Image pixel (y, x) -> relative (y, x) in ``[0, 1]`` (0 = top/left edge, 1 = bottom/right edge) of an image
    of ``image_size = (H, W)``: ``(p + 0.5) / n``. The relative point lies in the same feature pixel at every stage
    (when the stride divides the image), which is how one query is followed through a hierarchy."""
    y, x = (float(v) for v in point)
    H, W = (int(v) for v in image_size)
    if not (-0.5 <= y <= H - 0.5 and -0.5 <= x <= W - 0.5):
        raise ValueError(f"image_to_relative: point {(y, x)} lies outside the {H}x{W} image")
    return (y + 0.5) / H, (x + 0.5) / W


def relative_to_feature_index(point: Sequence[float], feature_size: Sequence[int]) -> tuple[int, int]:
    """Relative (y, x) in ``[0, 1]`` -> the (row, col) of the feature pixel containing it on an ``(h, w)`` map."""
    h, w = (int(v) for v in feature_size)
    ry, rx = (float(v) for v in point)
    if not (0.0 <= ry <= 1.0 and 0.0 <= rx <= 1.0):
        raise ValueError(f"relative_to_feature_index: a query must lie in [0, 1] x [0, 1] (relative), got {(ry, rx)}")
    return min(int(math.floor(ry * h)), h - 1), min(int(math.floor(rx * w)), w - 1)
