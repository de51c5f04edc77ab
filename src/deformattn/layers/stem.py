"""Stems, down-sampling layers and the local perception unit of DAT / DAT++ (all ``Tensor[B, C, H, W]``).

The stems and down-sampling layers are ``nn.Sequential`` subclasses whose children sit at the official indices
(``patch_proj.0`` conv, ``patch_proj.1.norm`` LayerNorm, ...), so official checkpoints load unchanged, and they
are plain strided convolutions exactly as in the official code: the output size is
``floor((H + 2 * padding - kernel) / stride) + 1`` (the non-overlapping 2x2 / patchify convs drop a trailing
row or column that does not fill a patch; the 3x3 ones round up). :func:`conv_output_size` computes it.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .._utils import check_int
from .norm import LayerNormProxy

__all__ = ["PatchifyStem", "ConvStem", "Downsample", "LocalPerceptionUnit", "conv_output_size"]


def conv_output_size(size: int, module: nn.Module) -> int:
    """Spatial size (one axis, square kernels) after the ``Conv2d`` layers inside ``module``, applied in order."""
    convs = [module] if isinstance(module, nn.Conv2d) else [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        size = (size + 2 * p - k) // s + 1
    return size


class PatchifyStem(nn.Sequential):
    """Non-overlapping ``patch_size x patch_size`` patches -> LayerNorm (DAT v1; DAT++ without conv stem).

    Shape: ``Tensor[B, in_chans, H, W] -> Tensor[B, dim, H // p, W // p]``.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4):
        patch_size = check_int(patch_size, "patch_size", "PatchifyStem", minimum=1)
        super().__init__(nn.Conv2d(in_chans, dim, patch_size, patch_size, 0), LayerNormProxy(dim))
        self.reduction = patch_size


class ConvStem(nn.Sequential):
    """Overlapping convolutional stem.

    * ``version="pp"`` (DAT++): ``conv3x3 -> LN -> GELU -> conv3x3 -> LN`` with ``dim // 2`` hidden channels.
      As in the official code each conv has stride ``patch_size // 2``, so the stem reduces by
      ``(patch_size // 2) ** 2`` (4 for the released ``patch_size=4``).
    * ``version="v1"`` (DAT): one ``conv7x7`` with stride ``patch_size`` and padding 3 -> LN.

    Shape: ``Tensor[B, in_chans, H, W] -> Tensor[B, dim, ceil(H / r), ceil(W / r)]``, ``r = self.reduction``.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4, version: str = "pp"):
        patch_size = check_int(patch_size, "patch_size", "ConvStem", minimum=1)
        if version == "pp":
            if patch_size < 2 or patch_size % 2:
                raise ValueError(f"ConvStem: the DAT++ conv stem needs an even patch_size >= 2, got {patch_size}")
            if dim % 2:
                raise ValueError(f"ConvStem: dim ({dim}) must be even (the first conv has dim // 2 channels)")
            s = patch_size // 2
            super().__init__(
                nn.Conv2d(in_chans, dim // 2, 3, s, 1),
                LayerNormProxy(dim // 2),
                nn.GELU(),
                nn.Conv2d(dim // 2, dim, 3, s, 1),
                LayerNormProxy(dim),
            )
            self.reduction = s * s
        elif version == "v1":
            super().__init__(nn.Conv2d(in_chans, dim, 7, patch_size, 3), LayerNormProxy(dim))
            self.reduction = patch_size
        else:
            raise ValueError(f"ConvStem: version must be 'pp' or 'v1', got {version!r}")


class Downsample(nn.Sequential):
    """Stage transition: ``conv2x2/2`` (patchify models) or ``conv3x3/2`` (conv-stem models), no bias -> LN.

    Shape: ``Tensor[B, dim_in, H, W] -> Tensor[B, dim_out, H', W']`` with ``H' = H // 2`` (2x2) or
    ``ceil(H / 2)`` (3x3).
    """

    def __init__(self, dim_in: int, dim_out: int, overlapping: bool = False):
        if overlapping:
            conv = nn.Conv2d(dim_in, dim_out, 3, 2, 1, bias=False)
        else:
            conv = nn.Conv2d(dim_in, dim_out, 2, 2, 0, bias=False)
        super().__init__(conv, LayerNormProxy(dim_out))


class LocalPerceptionUnit(nn.Conv2d):
    """DAT++'s local perception unit: ``x + dwconv3x3(x)`` before each block.

    A ``Conv2d`` subclass so that its parameters keep the official names (``local_perception_units.j.weight``).
    """

    def __init__(self, dim: int):
        super().__init__(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)
