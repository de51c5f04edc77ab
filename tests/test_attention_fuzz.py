"""Property-based fuzzing of DeformableAttention2d over its configuration space and input shapes.

Each draw either runs - right shape, finite values, fast path equal to the reference (forward and input gradient)
- or raises the documented ValueError/TypeError naming the argument. ``DEFORMATTN_FUZZ_EXAMPLES`` raises the
number of examples (default keeps CI fast).
"""
from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deformattn import DeformableAttention2d

EXAMPLES = int(os.environ.get("DEFORMATTN_FUZZ_EXAMPLES", "150"))

# messages must name the argument at fault
NAMED = re.compile(
    r"(dim|num_heads|offset_groups|stride|offset_kernel_size|offset_padding|q_size|kv_size|pos_bias|version|"
    r"sampler|x|fixed)"
)


@st.composite
def configs(draw):
    nH = draw(st.sampled_from([1, 2, 3, 4]))
    G = draw(st.sampled_from([1, 2, 3, 4]))
    hc = draw(st.sampled_from([1, 2, 4]))
    dim = nH * hc * draw(st.sampled_from([1, 1, 1, 2])) + draw(st.sampled_from([0, 0, 0, 0, 1]))
    version = draw(st.sampled_from(["pp", "v1"]))
    kind = draw(st.sampled_from(["table", "fixed", "dwc", "log_cpb", "none"]))
    stride = draw(st.sampled_from([1, 2, 3, 4, 8]))
    ksize = draw(st.sampled_from([None, 1, 2, 3, 5, 9]))
    orf = draw(st.sampled_from([-1.0, 0.0, 0.5, 2.0, 4.0]))
    no_off = draw(st.booleans())
    H = draw(st.integers(1, 13))
    W = draw(st.integers(1, 13))
    q = draw(st.sampled_from([None, (H, W), (draw(st.integers(1, 9)), draw(st.integers(1, 9)))]))
    B = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return dict(dim=dim, num_heads=nH, offset_groups=G, stride=stride, offset_kernel_size=ksize,
                offset_range_factor=orf, pos_bias=kind, q_size=q, no_off=no_off, version=version), (B, H, W, dtype)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_module_either_runs_correctly_or_raises_clearly(cfg):
    kwargs, (B, H, W, dtype) = cfg
    try:
        m = DeformableAttention2d(**kwargs).to(dtype)
    except (ValueError, TypeError) as exc:
        assert "DeformableAttention2d" in str(exc) and NAMED.search(str(exc)), str(exc)
        return
    torch.manual_seed(0)
    x = torch.randn(B, m.dim, H, W, dtype=dtype) * 2 + 0.5
    try:
        m.backend = "reference"
        xr = x.clone().requires_grad_(True)
        y_ref, pos_ref, _ = m(xr, return_sampling=True)
    except (ValueError, TypeError) as exc:
        assert "DeformableAttention2d" in str(exc) and NAMED.search(str(exc)), str(exc)
        assert kwargs["pos_bias"] == "fixed", str(exc)  # only the fixed-size bias rejects an input size
        return
    Hk, Wk = m.key_grid_size(H, W)
    assert y_ref.shape == x.shape and pos_ref.shape == (B, m.offset_groups, Hk, Wk, 2)
    assert torch.isfinite(y_ref).all() and torch.isfinite(pos_ref).all()
    m.backend = "fast"
    xf = x.clone().requires_grad_(True)
    y, pos, _ = m(xf, return_sampling=True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(pos, pos_ref, **tol)
    g = torch.randn_like(y)
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    assert torch.isfinite(xf.grad).all()
    torch.testing.assert_close(xf.grad, xr.grad, **tol)


@pytest.mark.parametrize("scale", [1e4, 1e-4])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_extreme_input_scales_stay_finite(scale, backend):
    m = DeformableAttention2d(16, 4, offset_groups=2, stride=2, q_size=8, backend=backend)
    x = (torch.randn(2, 16, 8, 8) * scale).requires_grad_(True)
    y = m(x)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("version,orf", [("pp", 2.0), ("v1", 0.0), ("pp", -1.0)])
def test_offsets_far_outside_the_map(backend, version, orf):
    """Every sample outside the map: keys are all zeros (projection bias only) - still finite, with gradients."""
    m = DeformableAttention2d(8, 2, stride=2, q_size=8, offset_range_factor=orf, version=version, backend=backend)
    with torch.no_grad():
        m.conv_offset[3].weight.fill_(50.0)
        if version == "pp" and orf > 0:
            m.offset_range_factor = 1e3  # tanh saturates: offsets of ~1000 grid steps
    x = (torch.rand(2, 8, 8, 8) + 0.1).requires_grad_(True)
    y, pos, _ = m(x, return_sampling=True)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_constant_input(backend):
    m = DeformableAttention2d(8, 2, offset_groups=2, stride=1, q_size=5, backend=backend)
    x = torch.full((1, 8, 5, 5), 3.0, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
