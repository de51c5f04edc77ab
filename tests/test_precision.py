"""Low precision: bfloat16 / float16 layers and models against the float32 ones, on both backends, both samplers and
both memory formats; and the guard that our code never hands ``grid_sample`` a half-precision input.

Tolerance table (max |low - fp32| / max |fp32|, per dtype): the bound a layer or a small model meets when only its
matrix products, activations and storage are rounded (positions, bilinear weights and biases are float32). A
layer rounds its input, weights, q, k, v and logits once each, so the error is a few units of the dtype's epsilon
(bfloat16 2^-8, float16 2^-11) times the number of roundings; a model compounds its blocks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deformattn import DeformableAttention2d
from deformattn.layers import NeighborhoodAttention2d
from deformattn.layers.window_attention import WindowAttention
from deformattn.models import create_model

LOW = [torch.bfloat16, torch.float16]
# relative max error vs the float32 module: one layer / a whole (small) model
LAYER_TOL = {torch.bfloat16: 4e-2, torch.float16: 8e-3}
MODEL_TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
# gradients pass the softmax's cancellation (P * (dP - sum P dP)): compared by direction (cosine similarity)
GRAD_COS = {torch.bfloat16: 0.96, torch.float16: 0.99}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Small problems: one thread (see conftest.one_thread_module)."""


def rel_err(low: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(low).all(), "non-finite values"
    return ((low.float() - ref).abs().max() / ref.abs().max()).item()


def low_copy(m: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(m).to(dtype)


# (pos_bias, version, offset_range_factor, no_off): every bias kind and both offset regimes
DEFORMABLE = [
    ("table", "pp", -1.0, False),
    ("table", "pp", 2.0, False),
    ("table", "v1", 2.0, False),
    ("log_cpb", "pp", -1.0, False),
    ("fixed", "pp", -1.0, False),
    ("dwc", "pp", -1.0, True),
    ("none", "v1", -1.0, False),
]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("sampler", ["grid_sample", "gather"])
@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("cfg", DEFORMABLE, ids=lambda c: "-".join(map(str, c)))
def test_deformable_low_precision_matches_float32(cfg, dtype, backend, sampler, fmt):
    kind, version, orf, no_off = cfg
    torch.manual_seed(0)
    # a 30 x 26 map with stride 1: large enough for half-precision pixel coordinates to be off by a fraction of a
    # pixel (and for grid_sample's channels_last defect to show on the layers that fed it half precision)
    H, W = 30, 26
    m = DeformableAttention2d(32, 4, offset_groups=2, stride=1, pos_bias=kind, version=version,
                              offset_range_factor=orf, no_off=no_off, q_size=(H, W), backend=backend,
                              sampler=sampler).eval()
    with torch.no_grad():
        m.conv_offset[-1].weight.mul_(20.0)  # offsets of several pixels, not ~0
    x = torch.randn(2, 32, H, W)
    with torch.no_grad():
        ref = m(x)
        low = low_copy(m, dtype)(x.to(dtype).contiguous(memory_format=FORMATS[fmt]))
    assert low.dtype == dtype
    assert rel_err(low, ref) <= LAYER_TOL[dtype]


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_deformable_low_precision_gradients(dtype, backend):
    """A training step in half precision: finite gradients close to the float32 ones."""
    torch.manual_seed(0)
    m = DeformableAttention2d(32, 4, offset_groups=2, stride=2, pos_bias="table", q_size=24, backend=backend)
    x = torch.randn(2, 32, 24, 24)
    m(x).square().mean().backward()
    low = low_copy(m, dtype)
    low.zero_grad()
    low(x.to(dtype).contiguous(memory_format=torch.channels_last)).float().square().mean().backward()
    for (name, p), q in zip(m.named_parameters(), low.parameters()):
        assert q.grad is not None and q.grad.dtype == dtype and torch.isfinite(q.grad).all(), name
    # the direction of the whole gradient (what the optimiser follows); single small gradients (biases summed
    # over cancelling terms, proj_k.bias whose exact gradient is 0) are rounding noise in half precision
    full = torch.cat([p.grad.flatten() for p in m.parameters()])
    half = torch.cat([p.grad.float().flatten() for p in low.parameters()])
    cos = F.cosine_similarity(half, full, dim=0).item()
    assert cos >= GRAD_COS[dtype], f"cosine similarity {cos:.4f}"


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_neighborhood_low_precision_matches_float32(dtype, backend, fmt):
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(32, 7, 4, backend=backend).eval()
    x = torch.randn(2, 32, 19, 23)
    with torch.no_grad():
        ref = m(x)
        low = low_copy(m, dtype)(x.to(dtype).contiguous(memory_format=FORMATS[fmt]))
    assert low.dtype == dtype
    assert rel_err(low, ref) <= LAYER_TOL[dtype]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shift", [0, 4])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_window_low_precision_matches_float32(dtype, shift, fmt):
    torch.manual_seed(0)
    m = WindowAttention(32, 4, 7, shift_size=shift, fmap_size=14 if shift else None).eval()
    x = torch.randn(2, 32, 14, 17)  # 17: padded keys (masked with -100) as well
    with torch.no_grad():
        ref = m(x)
        low = low_copy(m, dtype)(x.to(dtype).contiguous(memory_format=FORMATS[fmt]))
    assert low.dtype == dtype
    assert rel_err(low, ref) <= LAYER_TOL[dtype]


def _model_pair(name: str, backend: str):
    torch.manual_seed(0)
    m = create_model(name, num_classes=10).eval()
    for mod in m.modules():
        if isinstance(mod, (DeformableAttention2d, NeighborhoodAttention2d)):
            mod.backend = backend
    return m


# the released variants at a small input size (96: stage-1 maps of 24 x 24 carry the channels_last tensors that
# broke grid_sample); the full-size check is in benchmarks/models.py
@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", ["dat_pp_tiny", "dat_tiny", "dat_nano", "dat_v1_nano"])
def test_models_low_precision_match_float32(name, dtype, backend):
    m = _model_pair(name, backend)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = m(x)
        low = low_copy(m, dtype)(x.to(dtype))
    assert rel_err(low, ref) <= MODEL_TOL[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", ["dat_pp_small", "dat_small", "dat_pp_base", "dat_base"])
def test_large_models_low_precision_match_float32(name, dtype):
    m = _model_pair(name, "fast")
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = m(x)
        low = low_copy(m, dtype)(x.to(dtype))
    assert rel_err(low, ref) <= MODEL_TOL[dtype]


def test_grid_sample_never_sees_half_precision(monkeypatch):
    """Regression guard: PyTorch's CPU ``grid_sample`` in bfloat16 / float16 computes pixel coordinates in half
    precision and returns garbage on channels_last inputs (docs/grid_sample_channels_last_lowp.md). A DAT++ model
    in bfloat16 fed a channels_last image (its stage-1 deformable layer receives channels_last features) must
    only ever call it with float32 inputs and grids."""
    calls = []
    real = F.grid_sample

    def spy(input, grid, *args, **kwargs):
        calls.append((input.dtype, grid.dtype, input.is_contiguous(memory_format=torch.channels_last)
                      and not input.is_contiguous()))
        return real(input, grid, *args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", spy)
    x = torch.randn(1, 3, 96, 96).bfloat16().contiguous(memory_format=torch.channels_last)
    for backend in ("fast", "reference"):
        m = _model_pair("dat_pp_tiny", backend).bfloat16()
        with torch.no_grad():
            m(x)
        y = m.train()(x)
        y.float().sum().backward()
    assert calls, "the spy saw no grid_sample call: the guard tests nothing"
    bad = [c for c in calls if c[0] not in (torch.float32, torch.float64) or c[1] != c[0]]
    assert not bad, f"grid_sample called with half-precision tensors: {bad[:3]}"
