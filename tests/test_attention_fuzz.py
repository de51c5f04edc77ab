"""Property-based fuzzing of DeformableAttention2d over its configuration space and input shapes.

Each draw either runs - right shape, finite values, fast path equal to the reference (forward and input gradient)
- or raises the documented ValueError/TypeError naming the argument. Further draws run every mode of the fast path
(inference blocks, the kept attention matrix, the recomputing backward) against the reference in float64, and both
paths under bfloat16 / float16 CPU autocast. ``DEFORMATTN_FUZZ_EXAMPLES`` raises the number of examples (default
150, half of it for autocast: a few seconds on one thread, within the CI budget).
"""
from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deformattn.backends.fast as fast_backend
from deformattn import DeformableAttention2d

EXAMPLES = int(os.environ.get("DEFORMATTN_FUZZ_EXAMPLES", "150"))

# messages must name the argument at fault
NAMED = re.compile(
    r"(dim|num_heads|offset_groups|stride|offset_kernel_size|offset_padding|q_size|kv_size|pos_bias|version|"
    r"sampler|x|fixed)"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny problems: one thread (see conftest.one_thread_module)."""


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


# ---------------------------------------------------------------------------------------------------------------
# the fast path's other modes: inference blocks (window table gather, SDPA) and the recomputing custom backward
# ---------------------------------------------------------------------------------------------------------------
# (block elements, save elements): autograd keeps the matrix / one recomputed block / many blocks / one row each
FAST_MODES = [(1 << 19, 1 << 23), (1 << 22, 0), (64, 0), (1, 0)]


def _fast_mode(block: int, save: int):
    """Run the fast path with these block / keep-the-matrix thresholds (hypothesis forbids function fixtures)."""
    return fast_backend.tuning(block_elems=block, save_elems=save)


def _randomise(m, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # large enough that offsets, biases and LayerNorm all matter
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.sampled_from(FAST_MODES), st.booleans())
def test_fast_modes_equal_reference(cfg, mode, grad):
    """Every fast-path mode (and inference without autograd) equals the reference in float64, with gradients."""
    kwargs, (B, H, W, _) = cfg
    try:
        m = DeformableAttention2d(**kwargs).double()
    except (ValueError, TypeError):
        return  # the first fuzz test checks the messages
    _randomise(m, 0)
    x = torch.randn(B, m.dim, H, W, dtype=torch.float64) * 2 + 0.5
    g = torch.randn_like(x)

    def run(backend):
        m.backend = backend
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y, pos, _ = m(xx, return_sampling=True)
        if not grad:
            return y, pos, None, {}
        (y * g).sum().backward()
        return y.detach(), pos.detach(), xx.grad, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    try:
        y_ref, pos_ref, gx_ref, gp_ref = run("reference")
    except ValueError as exc:
        assert kwargs["pos_bias"] == "fixed", str(exc)
        return
    block, save = mode
    with _fast_mode(block, save):
        y, pos, gx, gp = run("fast")
    tol = dict(rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(pos, pos_ref, **tol)
    if grad:
        torch.testing.assert_close(gx, gx_ref, **tol)
        assert set(gp) == set(gp_ref)  # the same parameters get gradients (batch 0 too)
        scale = max([1.0] + [t.abs().max().item() for t in gp_ref.values() if t.numel()])
        for name, t in gp_ref.items():
            torch.testing.assert_close(gp[name], t, rtol=1e-7, atol=1e-7 * scale, msg=lambda s, n=name: f"{n}: {s}")


# ---------------------------------------------------------------------------------------------------------------
# low precision: bfloat16 / float16 under autocast (where the device supports it)
# ---------------------------------------------------------------------------------------------------------------
def _autocast_supported(device: str, dtype: torch.dtype) -> bool:
    try:
        with torch.autocast(device, dtype=dtype):
            out = torch.nn.functional.linear(torch.ones(2, 2, device=device), torch.ones(2, 2, device=device))
        return out.dtype == dtype
    except (RuntimeError, ValueError):
        return False


AUTOCAST_DTYPES = [d for d in (torch.bfloat16, torch.float16) if _autocast_supported("cpu", d)]
# error relative to max(1, |y|) against float32: bfloat16 keeps 8 mantissa bits, float16 11
AUTOCAST_TOL = {torch.bfloat16: 0.1, torch.float16: 0.025}


@pytest.mark.skipif(not AUTOCAST_DTYPES, reason="no low-precision autocast on this CPU build")
@settings(max_examples=max(EXAMPLES // 2, 10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.sampled_from(AUTOCAST_DTYPES or [torch.bfloat16]), st.sampled_from(FAST_MODES[:3]))
def test_autocast_low_precision(cfg, dtype, mode):
    """Under CPU autocast both paths run (no dtype clash between float32 tables / MLPs and half positions), give
    finite outputs and gradients, agree with each other and stay close to the float32 result."""
    kwargs, (B, H, W, _) = cfg
    try:
        m = DeformableAttention2d(**kwargs)
    except (ValueError, TypeError):
        return
    torch.manual_seed(0)
    x = torch.randn(B, m.dim, H, W) * 2 + 0.5
    try:
        m.backend = "reference"
        y32 = m(x).detach()
    except ValueError as exc:
        assert kwargs["pos_bias"] == "fixed", str(exc)
        return
    outs = {}
    with _fast_mode(*mode):
        for backend in ("reference", "fast"):
            m.backend = backend
            xx = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=dtype):
                y = m(xx)
            assert y.shape == x.shape
            y.float().square().sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(xx.grad).all()
            outs[backend] = y.detach().float()
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype):  # the inference path too
                y_inf = m(x)
            assert torch.isfinite(y_inf).all()
    scale = max(1.0, y32.abs().max().item()) if y32.numel() else 1.0
    tol = AUTOCAST_TOL[dtype] * scale
    torch.testing.assert_close(outs["fast"], outs["reference"], rtol=0, atol=tol)
    torch.testing.assert_close(outs["fast"], y32, rtol=0, atol=tol)
