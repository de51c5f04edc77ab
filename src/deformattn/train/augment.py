"""Batch-level augmentation of the DAT papers' recipe, with timm's flag names: mixup / cutmix (torchvision's
``MixUp`` / ``CutMix``, which take any batch size) and, for the built-in digits, random erasing (timm's
``RandomErasing``; ImageFolder images get it per image in timm's ``create_transform``, see ``data.py``).

The DAT papers' ImageNet values (official ``config.py``): ``--mixup 0.8 --cutmix 1.0 --smoothing 0.1 --aa
rand-m9-mstd0.5-inc1 --reprob 0.25 --color-jitter 0.4`` (color jitter is inactive with RandAugment, as in timm).
All are off by default: on a few thousand images they cost more accuracy than they add in a short run.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .._utils import optional_import

__all__ = ["BatchAugment"]


class BatchAugment:
    """``(images, labels) -> (images, targets)`` for one training batch: targets are class probabilities
    ``Tensor[B, num_classes]`` when mixup / cutmix is on, else the labels unchanged.

    Args:
        mixup, cutmix: Beta(alpha, alpha) parameters (0: off); with both, each batch takes one of the two.
        reprob: random-erasing probability per image (0: off), applied to the normalised batch.
        num_classes: classes of the run.
    """

    def __init__(self, *, mixup: float, cutmix: float, reprob: float, num_classes: int) -> None:
        self.mix: Any = None
        self.erase: Any = None
        if mixup > 0 or cutmix > 0:
            v2 = optional_import("torchvision.transforms.v2", "train", "--mixup / --cutmix")
            ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + (
                [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
            self.mix = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
        if reprob > 0:
            erasing = optional_import("timm.data.random_erasing", "train", "--reprob")
            self.erase = erasing.RandomErasing(probability=reprob, mode="pixel", device="cpu")

    @property
    def active(self) -> bool:
        return self.mix is not None or self.erase is not None

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.erase is not None:
            self.erase.device = images.device  # noise drawn where the batch lives
            images = self.erase(images.clone())
        if self.mix is not None:
            images, labels = self.mix(images, labels)
        return images, labels
