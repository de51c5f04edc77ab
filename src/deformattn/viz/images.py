"""Input images for the visualisation: files, the built-in defaults, and the resize/normalise step.

Defaults: the digits models (``dat_nano``, ``dat_v1_nano``, what ``deformattn train`` trains by default) get a test
image from scikit-learn's handwritten digits (8x8, upscaled to the model's input size the way the trainer does it:
bilinear, ``align_corners=False``, grey repeated to 3 channels; the package's own ``digit.png`` sample when
scikit-learn is not installed); every other model gets the photo that ships with the package
(:mod:`deformattn.samples`), so nothing beyond matplotlib is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import optional_import

__all__ = ["DIGITS_MODELS", "load_image", "digits_image", "photo_image", "default_image", "fit_size",
           "prepare_input"]

DIGITS_MODELS = ("dat_nano", "dat_v1_nano")


def load_image(path: str | Path) -> np.ndarray:
    """An image file as ``float32 [H, W, 3]`` in ``[0, 1]`` (grey images are repeated to 3 channels, alpha is
    dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image: {str(path)!r} is not a file")
    Image = optional_import("PIL.Image", "viz", "deformattn viz (reading images)")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return arr


def digits_image(index: int = 0, *, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, str]:
    """Test digit ``index`` of scikit-learn's handwritten digits, split as ``deformattn train`` splits them
    (stratified, ``test_fraction``, ``seed``): ``float32 [8, 8, 3]`` in ``[0, 1]`` (ink = 1) and a description."""
    datasets = optional_import("sklearn.datasets", "viz", "deformattn viz (the default digits image)")
    model_selection = optional_import("sklearn.model_selection", "viz", "deformattn viz (the default digits image)")
    digits = datasets.load_digits()
    # the same call as deformattn.train.data.load_digits_split, so the image is one the model was not trained on
    _, idx_test = model_selection.train_test_split(
        list(range(len(digits.target))), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    k = idx_test[index]
    img = digits.images[k].astype(np.float32) / 16.0
    return np.repeat(img[:, :, None], 3, axis=2), f"scikit-learn test digit #{k} (label {digits.target[k]})"


def photo_image() -> tuple[np.ndarray, str]:
    """The package's sample photo (``deformattn/samples/photo.jpg``, 214x320 RGB) in ``[0, 1]``."""
    from .. import samples

    return load_image(samples.path("photo")), "sample photo (scikit-learn's flower.jpg)"


def default_image(model_name: str | None, data: dict | None = None) -> tuple[np.ndarray, str]:
    """A test digit for models trained on the digits (``data["kind"] == "digits"``, the ``"data"`` entry of a
    ``deformattn train`` checkpoint, which also gives the split) and for the untrained digits models; the astronaut
    photo otherwise."""
    import importlib.util

    if data and data.get("kind") == "digits":
        return digits_image(test_fraction=float(data.get("test_fraction", 0.25)), seed=int(data.get("seed", 0)))
    if not data and model_name in DIGITS_MODELS:
        if importlib.util.find_spec("sklearn") is None:
            from .. import samples

            return load_image(samples.path("digit")), "sample digit.png (scikit-learn test digit #1364, label 2)"
        return digits_image()
    return photo_image()


def fit_size(image_size: Sequence[int], shorter_side: int, multiple: int = 1) -> tuple[int, int]:
    """``(H, W)`` with the shorter side ``shorter_side``, the aspect ratio kept, both rounded to a multiple of
    ``multiple`` (at least one multiple): so that every stage of a model with total stride ``multiple`` sees a
    whole map."""
    H, W = (int(v) for v in image_size)
    if H < 1 or W < 1 or shorter_side < 1 or multiple < 1:
        raise ValueError(f"fit_size: sizes must be >= 1, got image {(H, W)}, shorter side {shorter_side}, "
                         f"multiple {multiple}")
    scale = shorter_side / min(H, W)
    return tuple(max(multiple, int(n * scale / multiple + 0.5) * multiple) for n in (H, W))  # type: ignore


def prepare_input(image: np.ndarray, size: Sequence[int], mean: Sequence[float], std: Sequence[float]
                  ) -> tuple[np.ndarray, Tensor]:
    """Resize ``image`` (``[H, W, 3]`` in ``[0, 1]``) to ``size = (h, w)`` (bilinear, antialiased when shrinking)
    and normalise it.

    Returns:
        the resized image ``float32 [h, w, 3]`` in ``[0, 1]`` (what is drawn) and the model input
        ``Tensor[1, 3, h, w]`` (``(image - mean) / std``).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"prepare_input: image must be [H, W, 3], got shape {image.shape}")
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]  # 1, 3, H, W
    h, w = (int(v) for v in size)
    if (h, w) != tuple(t.shape[-2:]):
        shrink = h < t.shape[-2] or w < t.shape[-1]
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink).clamp(0.0, 1.0)
    shown = t[0].permute(1, 2, 0).numpy().copy()
    m = torch.tensor(list(mean), dtype=t.dtype).reshape(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=t.dtype).reshape(1, 3, 1, 1)
    return shown, (t - m) / s
