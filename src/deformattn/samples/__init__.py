"""Sample images that ship with the package, so that examples and ``deformattn viz`` / ``predict`` run without
downloads or extra packages.

* ``digit.png``: scikit-learn's handwritten test digit #1364 (label 2; the first digit of the test split that
  ``deformattn train`` holds out), 8x8 upscaled bilinearly to 64x64 grey: a **light digit on a dark background**,
  what the digits models expect.
* ``photo.jpg``: scikit-learn's ``flower.jpg`` sample (CC BY 2.0, by vultilion on Flickr; shipped in
  ``sklearn/datasets/images``) resized to 320x214.

``path("digit")`` gives a file's path; ``copy_to(folder)`` writes both files into ``folder`` (what
``deformattn samples`` does).
"""
from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["SAMPLES", "copy_to", "path"]

_HERE = Path(__file__).resolve().parent
SAMPLES = {"digit": "digit.png", "photo": "photo.jpg"}


def path(name: str) -> Path:
    """The path of sample ``name`` (``"digit"`` or ``"photo"``)."""
    if name not in SAMPLES:
        raise ValueError(f"samples.path: name must be one of {', '.join(map(repr, SAMPLES))}, got {name!r}")
    return _HERE / SAMPLES[name]


def copy_to(folder: str | Path) -> list[Path]:
    """Copy every sample into ``folder`` (created if needed); returns the written paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(path(name), folder / file)) for name, file in SAMPLES.items()]
