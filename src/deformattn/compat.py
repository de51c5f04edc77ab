"""Bridge to the official LeapLabTHU/DAT code: its constructor keyword arguments and state_dict names.

``attention_from_official`` builds a :class:`~deformattn.DeformableAttention2d` from the keyword arguments of the
official ``DAttentionBaseline`` (DAT++ HEAD: ``version="pp"``; CVPR 2022 code: ``version="v1"``);
``backbone_from_official`` and ``neighborhood_attention_from_official`` do the same for the official ``DAT`` and
``NeighborhoodAttention2D``. Parameter names are the official ones, so an official state_dict loads strictly as it
is. The implementation lives in :mod:`deformattn.models._official`; this module is its public name.
"""
from __future__ import annotations

from .models._official import (
    attention_from_official,
    backbone_from_official,
    native_kwargs_from_official,
    neighborhood_attention_from_official,
)

__all__ = [
    "native_kwargs_from_official",
    "attention_from_official",
    "backbone_from_official",
    "neighborhood_attention_from_official",
]
