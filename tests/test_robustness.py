"""Robustness of the library surface: numerical stability, low precision, determinism, empty and 1x1 inputs, bounded
memory, and the model-level errors (wrong inputs, bad checkpoints).

The property-based fuzzing of ``DeformableAttention2d`` over its configuration space lives in
``test_attention_fuzz.py``; the tests here pin the cases a random draw rarely reaches. The memory test is marked
``slow`` (``DEFORMATTN_SLOW=1``).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deformattn.backends.fast as fast
from deformattn import DeformableAttention2d
from deformattn import functional as DF
from deformattn.models import create_model, list_models, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
KINDS = ["table", "fixed", "dwc", "log_cpb", "none"]
# (block elements, save elements) of the fast path: autograd keeps the matrix / one recomputed block / many blocks
MODES = {"keep": (1 << 19, 1 << 23), "recompute": (1 << 22, 0), "blocks": (64, 0)}
# "reference" plus the fast path in every mode
PATHS = ["reference", *(f"fast-{m}" for m in MODES)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny problems: one thread (see conftest.one_thread_module)."""


@pytest.fixture
def use_path():
    """``use_path(m, path)`` sets the module's backend and, for the fast path, the block / save thresholds (through
    ``fast.tuning``, undone when the test ends)."""
    with contextlib.ExitStack() as stack:

        def apply(m: DeformableAttention2d, path: str) -> DeformableAttention2d:
            backend, _, mode = path.partition("-")
            m.backend = backend
            block, save = MODES[mode or "keep"]
            stack.enter_context(fast.tuning(block_elems=block, save_elems=save))
            return m

        yield apply


def make(kind="table", version="pp", orf=-1.0, *, dim=16, heads=4, groups=2, stride=2, q=8, dtype=torch.float64,
         seed=0, **kw) -> DeformableAttention2d:
    q = q if kind in ("table", "fixed") else None
    if kind == "fixed" and "kv_size" not in kw:  # the fixed bias is built for the key grid of a q-sized map
        probe = DeformableAttention2d(dim, heads, offset_groups=groups, stride=stride, pos_bias="none",
                                      version=version, offset_kernel_size=kw.get("offset_kernel_size"))
        kw["kv_size"] = probe.key_grid_size(*((q, q) if isinstance(q, int) else q))
    torch.manual_seed(seed)
    m = DeformableAttention2d(dim, heads, offset_groups=groups, stride=stride, offset_range_factor=orf,
                              pos_bias=kind, q_size=q, version=version, **kw)
    with torch.no_grad():  # large enough that offsets, biases and LayerNorm all matter
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m.to(dtype)


def forward_backward(m, x, grad_out=None):
    """Output, sampling positions, input gradient and parameter gradients of one forward + backward pass."""
    m.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y, pos, _ = m(xx, return_sampling=True)
    (y * (grad_out if grad_out is not None else 1.0)).sum().backward()
    return y.detach(), pos.detach(), xx.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def all_finite(*tensors) -> bool:
    return all(torch.isfinite(t).all().item() for t in tensors)


def configs_for(kinds=KINDS, versions=("pp", "v1")):
    return [(k, v) for k in kinds for v in versions if not (k == "log_cpb" and v == "v1")]


# ---------------------------------------------------------------------------------------------------------------
# numerical stability
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS[1:])
@pytest.mark.parametrize("scale", [1e4, 1e-4])
@pytest.mark.parametrize("kind,version", configs_for())
def test_extreme_scales_finite_and_fast_equals_reference(kind, version, scale, path, use_path):
    """Inputs x1e4 (logits ~1e8: a naive softmax overflows) and x1e-4 (LayerNorm of the offset net near its eps):
    finite outputs and gradients on every path, and the fast path still equals the reference (float64)."""
    m = make(kind, version, orf=2.0 if version == "v1" else -1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64) * scale
    grad_out = torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64)
    ref = forward_backward(use_path(m, "reference"), x, grad_out)
    out = forward_backward(use_path(m, path), x, grad_out)
    assert all_finite(out[0], out[2], *out[3].values())
    amax = ref[0].abs().max().item()
    torch.testing.assert_close(out[0], ref[0], rtol=1e-7, atol=1e-9 * max(amax, 1.0))
    # logits of ~1e8 carry float64 rounding of ~1e-8 (absolute): gradients agree to that relative to their size
    torch.testing.assert_close(out[2], ref[2], rtol=1e-6, atol=1e-7 * max(ref[2].abs().max().item(), 1.0))
    # float32: still finite (no overflow of exp, no 0/0 of LayerNorm)
    m32 = use_path(make(kind, version, orf=2.0 if version == "v1" else -1.0, dtype=torch.float32), path)
    y32, _, gx32, gp32 = forward_backward(m32, x.float(), grad_out.float())
    assert all_finite(y32, gx32, *gp32.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shift", [1e4, -1e4])
@pytest.mark.parametrize("path", PATHS)
def test_softmax_is_computed_stably(path, shift, dtype):
    """Adding the same constant to every logit of a query changes nothing (softmax is shift invariant) - also when
    the constant alone overflows exp (e^1e4) or underflows it to 0 (0/0), on the reference einsum path and on every
    fast path (SDPA, the kept matrix, the recomputing backward that reuses the saved log-sum-exp)."""
    B, nH, H, W, Ns, hc = 2, 2, 3, 4, 5, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, nH, n, hc, generator=g, dtype=dtype) for n in (H * W, Ns, Ns))
    bias = torch.randn(B, nH, H * W, Ns, generator=g, dtype=dtype)
    # float32: e^200 overflows and e^-200 underflows to 0 as well, and 200 keeps the logits' precision
    c = shift if dtype == torch.float64 else shift / 50
    backend, _, mode = path.partition("-")
    stack = contextlib.ExitStack()
    if backend == "fast":
        block, save = MODES[mode]
        stack.enter_context(fast.tuning(block_elems=block, save_elems=save))

    def attention(shift_by, with_grad):
        qq, kk, vv, bb = (t.clone().requires_grad_(with_grad) for t in (q, k, v, bias))
        with torch.set_grad_enabled(with_grad):
            if backend == "reference":
                out = DF.attention_core(qq.transpose(-1, -2), kk.transpose(-1, -2), vv.transpose(-1, -2), bb + shift_by,
                                        scale=0.5).transpose(-1, -2)
            else:
                def bias_fn(r0, r1, tensors):
                    return tensors[0][:, :, r0 * W : r1 * W] + shift_by

                out = fast.attend(qq, kk, vv, bias_fn, [bb], H=H, W=W, scale=0.5)
        if not with_grad:
            return out, []
        out.square().sum().backward()
        return out.detach(), [qq.grad, kk.grad, vv.grad, bb.grad]

    tol = dict(rtol=1e-8, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    with stack:
        for with_grad in (False, True):
            base, base_grads = attention(0.0, with_grad)
            out, grads = attention(c, with_grad)
            assert all_finite(out, *grads)
            torch.testing.assert_close(out, base, **tol)
            for a, b in zip(grads, base_grads):
                torch.testing.assert_close(a, b, **tol)


def _push_every_sample_out(m: DeformableAttention2d) -> None:
    """Offsets of +~40 cells (offset net: LayerNorm -> constant 1, GELU(1) * 50 per channel), and for bounded modes
    a range factor of 1e3 so that the tanh-saturated offsets reach ~1e3 half-steps: every key leaves the map."""
    with torch.no_grad():
        ln = m.conv_offset[1].norm
        ln.weight.zero_()
        ln.bias.fill_(1.0)
        m.conv_offset[3].weight.fill_(50.0)
    if m.offset_range_factor > 0:
        m.offset_range_factor = 1e3


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind,version,orf", [(k, v, o) for k, v in configs_for() for vv, o in
                                              [("pp", 2.0), ("v1", 0.0), ("v1", 2.0)] if vv == v])
def test_every_sample_outside_the_map(kind, version, orf, path, use_path):
    """All keys sampled outside the map read zeros: keys and values are the projection biases, so whatever the
    attention weights, every output pixel is ``proj_out(proj_v.bias)`` (plus the LePE term for "dwc"). Finite, with
    finite gradients."""
    m = use_path(make(kind, version, orf), path)
    _push_every_sample_out(m)
    x = torch.rand(2, 16, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    y, pos, gx, gp = forward_backward(m, x)
    assert (pos.abs() > 1.0 + 1e-6).any(-1).all(), "some sample stayed on the map"
    v = m.proj_v.bias.detach().view(1, -1, 1, 1).expand_as(x)
    with torch.no_grad():
        expected = m.proj_out(v + (m.rpe_table(m.proj_q(x)) if kind == "dwc" else 0.0))
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    assert all_finite(y, gx, *gp.values())


@pytest.mark.parametrize("path", ["reference", "fast-keep", "fast-blocks"])
@pytest.mark.parametrize("version", ["pp", "v1"])
def test_offsets_beyond_the_border_are_clamped_or_squashed(version, path, use_path):
    """Raw offsets (range factor < 0) of ~1e3: DAT++ clamps the samples to the border, v1 squashes them with tanh;
    finite either way."""
    m = use_path(make("table", version, -1.0), path)
    _push_every_sample_out(m)
    x = torch.rand(2, 16, 8, 8, dtype=torch.float64) + 0.1
    y, pos, gx, gp = forward_backward(m, x)
    assert pos.abs().max() <= 1.0
    assert all_finite(y, gx, *gp.values())


@pytest.mark.parametrize("path", ["reference", "fast-keep", "fast-blocks"])
@pytest.mark.parametrize("value", [0.0, 3.0])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups,heads", [(2, 4), (4, 4)])  # 4 groups of 4 channels / 1 channel per head group
def test_constant_inputs(groups, heads, kind, value, path, use_path):
    """Constant (and all-zero) maps: the offset net's LayerNorm sees no variance in space; one channel per group
    (dim = groups) makes it see none across channels either. Finite outputs and gradients."""
    dim = 4 if groups == 4 else 16
    m = use_path(make(kind, "pp", -1.0, dim=dim, heads=heads, groups=groups, stride=1, q=5), path)
    x = torch.full((2, dim, 5, 5), value, dtype=torch.float64)
    y, pos, gx, gp = forward_backward(m, x)
    assert y.shape == x.shape and all_finite(y, pos, gx, *gp.values())


@pytest.mark.parametrize("path", ["reference", "fast-keep", "fast-blocks"])
def test_constant_input_without_offsets_or_bias_gives_a_constant_map(path, use_path):
    """no_off (DAT++ pools the keys) and no position bias: a constant input has identical keys everywhere, so the
    output is constant in space and equals the projections of that constant."""
    m = use_path(make("none", "pp", -1.0, stride=2, no_off=True), path)
    x = torch.full((1, 16, 6, 6), 0.7, dtype=torch.float64)
    y, _, gx, _ = forward_backward(m, x)
    with torch.no_grad():
        expected = m.proj_out(m.proj_v(x[:, :, :1, :1]))
    torch.testing.assert_close(y, expected.expand_as(y), rtol=1e-12, atol=1e-12)
    assert all_finite(gx)


# ---------------------------------------------------------------------------------------------------------------
# low precision: every bias kind x path under CPU autocast (the fuzz test samples these sparsely)
# ---------------------------------------------------------------------------------------------------------------
def _autocast_ok(dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            return F.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == dtype
    except (RuntimeError, ValueError):
        return False


LOW = [d for d in (torch.bfloat16, torch.float16) if _autocast_ok(d)]


@pytest.mark.skipif(not LOW, reason="no low-precision autocast on this CPU build")
@pytest.mark.parametrize("dtype", LOW or [torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind,version", configs_for())
def test_autocast_every_kind_and_path(kind, version, path, dtype, use_path):
    """Under autocast the offset convs emit half-precision positions while the tables / MLPs stay float32: inference
    (window gather) and training (kept matrix, recomputing backward) must not mix them up. Output close to float32."""
    m = make(kind, version, 2.0, dtype=torch.float32)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    y32 = use_path(m, "reference")(x).detach()
    use_path(m, path)
    xx = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = m(xx)
        with torch.no_grad():
            y_inf = m(x)
    y.float().square().sum().backward()
    tol = (0.1 if dtype == torch.bfloat16 else 0.025) * max(1.0, y32.abs().max().item())
    assert all_finite(y, y_inf, xx.grad)
    torch.testing.assert_close(y.float(), y32, rtol=0, atol=tol)
    torch.testing.assert_close(y_inf.float(), y32, rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind,version", configs_for())
def test_bitwise_repeatable(kind, version, path, use_path):
    """Same input, same seed: bitwise-identical outputs, positions and gradients on CPU over two calls."""
    m = use_path(make(kind, version, -1.0, dtype=torch.float32, q=(7, 9)), path)
    x = torch.randn(2, 16, 7, 9)
    a, b = forward_backward(m, x), forward_backward(m, x)
    for t, u in zip(a[:3], b[:3]):
        assert torch.equal(t, u)
    assert a[3].keys() == b[3].keys() and all(torch.equal(a[3][n], b[3][n]) for n in a[3])
    with torch.no_grad():
        assert torch.equal(m(x), m(x))


@pytest.mark.parametrize("path", ["reference", "fast-keep", "fast-blocks"])
def test_dropout_repeatable_under_the_same_seed(path, use_path):
    m = use_path(make("table", "pp", -1.0, dtype=torch.float32, attn_drop=0.3, proj_drop=0.2), path).train()
    x = torch.randn(2, 16, 8, 8)
    torch.manual_seed(5)
    a = forward_backward(m, x)
    torch.manual_seed(5)
    b = forward_backward(m, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    torch.manual_seed(6)
    assert not torch.equal(forward_backward(m, x)[0], a[0])


def test_documented_backend_equivalences_are_bitwise(monkeypatch):
    """``backend=None`` is the fast path; ``$DEFORMATTN_BACKEND`` picks the named one; ``sampler="gather"`` with
    ``backend=None`` runs the reference path (and the gather sampler equals grid_sample to rounding only)."""
    x = torch.randn(2, 16, 8, 8)
    m = make("table", "pp", -1.0, dtype=torch.float32)
    outs = {}
    for backend in (None, "fast", "reference"):
        m.backend = backend
        outs[backend] = m(x)
    assert torch.equal(outs[None], outs["fast"])
    m.backend = None
    monkeypatch.setenv("DEFORMATTN_BACKEND", "reference")
    assert torch.equal(m(x), outs["reference"])
    monkeypatch.delenv("DEFORMATTN_BACKEND")
    m.sampler = "gather"
    gathered = m(x)
    m.backend = "reference"
    assert torch.equal(gathered, m(x))
    torch.testing.assert_close(gathered, outs["reference"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["reference", "fast-keep", "fast-blocks"])
def test_module_train_and_eval_differ_only_through_dropout(path, use_path):
    x = torch.randn(2, 16, 8, 8)
    m = use_path(make("log_cpb", "pp", -1.0, dtype=torch.float32), path)
    m.eval()
    with torch.no_grad():
        ref = m(x)
    m.train()
    assert torch.equal(forward_backward(m, x)[0], forward_backward(m.eval(), x)[0])
    with torch.no_grad():
        assert torch.equal(m.train()(x), ref)
        m.attn_drop, m.proj_drop = 0.3, 0.3
        assert torch.equal(m.eval()(x), ref) and not torch.equal(m.train()(x), ref)


@pytest.mark.parametrize("name", ["dat_nano", "dat_v1_nano"])
def test_model_train_and_eval_differ_only_through_dropout_and_drop_path(name):
    rates = dict(drop_rate=0.2, attn_drop_rate=0.1, drop_path_rate=0.3)
    torch.manual_seed(0)
    noisy = create_model(name, **rates)
    torch.manual_seed(0)
    clean = create_model(name, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    sd_noisy, sd_clean = noisy.state_dict(), clean.state_dict()
    assert sd_noisy.keys() == sd_clean.keys() and all(torch.equal(sd_noisy[k], sd_clean[k]) for k in sd_noisy)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = noisy.eval()(x)
        assert torch.equal(clean.train()(x), ref)  # no dropout / drop path configured: train mode changes nothing
        assert torch.equal(clean.eval()(x), ref)
        assert not torch.equal(noisy.train()(x), ref)


# ---------------------------------------------------------------------------------------------------------------
# batch 0 and 1x1 maps
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind,version", configs_for())
def test_batch_zero(kind, version, path, use_path):
    """An empty batch returns empty outputs, with and without autograd, and the same parameters get (zero)
    gradients on every path (DDP expects every parameter to take part)."""
    m = make(kind, version, 2.0)
    x = torch.randn(0, 16, 8, 8, dtype=torch.float64)
    ref = forward_backward(use_path(m, "reference"), x)
    y, pos, gx, gp = forward_backward(use_path(m, path), x)
    Hk, Wk = m.key_grid_size(8, 8)
    assert y.shape == (0, 16, 8, 8) and pos.shape == (0, 2, Hk, Wk, 2) and gx.shape == x.shape
    assert gp.keys() == ref[3].keys() and all(not t.any() for t in gp.values())
    with torch.no_grad():
        assert m(x).shape == x.shape


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("name", ["dat_nano", "dat_v1_nano"])
def test_model_batch_zero(name, backend):
    """Every block kind (window with a shift mask and padding, neighborhood, deformable) takes an empty batch."""
    model = create_model(name, backend=backend)
    x = torch.randn(0, 3, 37, 50, requires_grad=True)
    out = model(x)
    assert out.shape == (0, model.num_classes)
    out.sum().backward()
    assert x.grad.shape == x.shape and all(p.grad is not None for p in model.parameters())
    feats = model.forward_intermediates(x.detach(), intermediates_only=True)
    sizes = model._stage_sizes(37, 50)
    assert [tuple(f.shape) for f in feats] == [(0, d, h, w) for d, (h, w) in zip(model.dims, sizes)]


@pytest.mark.parametrize("path", ["reference", "fast-keep", "fast-blocks"])
@pytest.mark.parametrize("kind,version", configs_for())
@pytest.mark.parametrize("orf", [-1.0, 0.0, 2.0])
@pytest.mark.parametrize("stride,ksize", [(1, 3), (1, 2), (4, 4), (8, 9)])
def test_one_by_one_map(stride, ksize, orf, kind, version, path, use_path):
    """A 1x1 map has a single pixel: every key samples it (align_corners maps any position there), every value is
    ``proj_v(x)``, so the output is ``proj_out(proj_v(x))`` (+ LePE) whatever the offsets, bias or key grid."""
    m = use_path(make(kind, version, orf, stride=stride, offset_kernel_size=ksize, q=1), path)
    x = torch.randn(3, 16, 1, 1, dtype=torch.float64)
    y, pos, gx, gp = forward_backward(m, x)
    with torch.no_grad():
        expected = m.proj_out(m.proj_v(x) + (m.rpe_table(m.proj_q(x)) if kind == "dwc" else 0.0))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert all_finite(y, gx, *gp.values())


# ---------------------------------------------------------------------------------------------------------------
# memory: linear in the number of queries at a fixed number of keys (benchmark-style, fresh process per size)
# ---------------------------------------------------------------------------------------------------------------
_MEMORY_WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from _common import PeakRSS, setup_torch
size, mode, keys = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch = setup_torch(2, 0)
from deformattn import DeformableAttention2d
m = DeformableAttention2d(32, 2, stride=size // keys, q_size=size, pos_bias="table", backend="fast")
x = torch.randn(1, 32, size, size)
warm = torch.randn(1, 32, 16, 16, requires_grad=True)
m(warm).sum().backward()  # lazy kernels and thread pools outside the probe
m.zero_grad(set_to_none=True)
xx = x.clone().requires_grad_(mode == "fwdbwd")
t0 = time.perf_counter()
with PeakRSS() as mem:
    if mode == "fwd":
        with torch.no_grad():
            m(xx)
    else:
        m(xx).sum().backward()
print(json.dumps(dict(size=size, mode=mode, key_grid=m.key_grid_size(size, size), seconds=time.perf_counter() - t0,
                      **mem.as_dict())))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_fast_path_memory_is_linear_in_queries(mode, record_property):
    """Peak RSS growth of one call, 128x128 vs 256x256 queries over the same 32x32 key grid (stride 4 vs 8): 4x the
    queries may cost at most ~4x the memory (asserted <= 4.4), and the 256x256 call stays far below the dense
    (B, nH, Nq, Ns) attention matrix the reference path materialises."""
    keys = 32
    results = {}
    for size in (128, 256):
        env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONPATH=str(REPO / "src"))
        proc = subprocess.run([sys.executable, "-c", _MEMORY_WORKER, str(REPO / "benchmarks"), str(size), mode,
                               str(keys)], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[size] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert tuple(results[size]["key_grid"]) == (keys, keys)
    small, big = results[128]["peak_mib"], results[256]["peak_mib"]
    ratio = big / small
    dense_mib = 1 * 2 * 256 * 256 * keys * keys * 4 / 2**20  # float32 attention matrix at 256x256
    figures = dict(mode=mode, keys=keys * keys, peak_mib_128=small, peak_mib_256=big, ratio=ratio,
                   dense_attention_mib_256=dense_mib, seconds={s: r["seconds"] for s, r in results.items()},
                   method=results[256]["memory_method"])
    record_property("memory", figures)
    print("memory", json.dumps(figures))
    assert ratio <= 4.4, figures
    assert big < (0.5 if mode == "fwd" else 1.0) * dense_mib, figures


# ---------------------------------------------------------------------------------------------------------------
# model level: input errors of every registered variant, all-or-nothing checkpoint loading
# ---------------------------------------------------------------------------------------------------------------
def test_every_variant_rejects_wrong_channels_and_too_small_images():
    for name in list_models():
        model = create_model(name)
        need = model.min_input_size()
        ok = max(need, 32)
        for call in (model, model.forward_features, model.forward_intermediates):
            with pytest.raises(ValueError, match=r"x must have 3 channels \(dim 1\), got shape \(1, 4, "):
                call(torch.randn(1, 4, ok, ok))
            with pytest.raises(ValueError, match=rf"size {need - 1}x{ok} is too small.*H, W >= {need}"):
                call(torch.randn(1, 3, need - 1, ok))
            with pytest.raises(ValueError, match=rf"size {ok}x{need - 1} is too small"):
                call(torch.randn(1, 3, ok, need - 1))
            with pytest.raises(TypeError, match="x must be a floating-point tensor"):
                call(torch.zeros(1, 3, ok, ok, dtype=torch.int64))
        del model
    gray = create_model("dat_nano", in_chans=1)
    with pytest.raises(ValueError, match="x must have 1 channels"):
        gray(torch.randn(1, 3, 32, 32))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot) -> bool:
    now = model.state_dict()
    return now.keys() == snapshot.keys() and all(torch.equal(now[k], snapshot[k]) for k in now)


def _bad_checkpoints():
    torch.manual_seed(1)
    donor = create_model("dat_nano").state_dict()  # same variant, other weights: loading it would change the model
    keys = list(donor)
    # a plain weight half-way through (position tables would be resized by load_checkpoint)
    mid = next(k for k in keys[len(keys) // 2 :] if k.endswith("proj_q.weight"))
    sliced = dict(donor, **{mid: donor[mid][:-1]})
    # the classifier is the last key: every other tensor fits, so torch alone would have copied all of them
    head = dict(donor, **{"cls_head.weight": torch.zeros(3, 192), "cls_head.bias": torch.zeros(3)})
    return {
        "truncated": ({k: donor[k] for k in keys[: len(keys) // 2]}, [keys[len(keys) // 2], "missing"]),
        "tensor_cut": (sliced, [mid]),
        "other_head": (head, ["cls_head.weight"]),
        "wrong_variant": (create_model("dat_v1_nano").state_dict(), ["missing", "unexpected"]),
        "extra_key": (dict(donor, **{"stages.0.extra.weight": torch.zeros(1)}), ["stages.0.extra.weight"]),
        "ddp_prefix": ({f"module.{k}": v for k, v in donor.items()}, ["module.", "load_checkpoint"]),
        "not_a_tensor": (dict(donor, **{keys[0]: [1.0, 2.0]}), [keys[0], "not holding a tensor"]),
    }


@pytest.mark.parametrize("case", ["truncated", "tensor_cut", "other_head", "wrong_variant", "extra_key", "ddp_prefix",
                                  "not_a_tensor"])
def test_bad_state_dict_fails_clearly_and_leaves_the_model_unchanged(case):
    state_dict, named = _bad_checkpoints()[case]
    torch.manual_seed(0)
    model = create_model("dat_nano")
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="nothing was loaded") as info:
        model.load_state_dict(state_dict)
    for word in named:
        assert word in str(info.value), str(info.value)
    assert _unchanged(model, before)
    if case == "ddp_prefix":  # load_checkpoint strips wrapper prefixes: the same dict loads there
        load_checkpoint(model, state_dict)
        assert _unchanged(model, {k[len("module."):]: v for k, v in state_dict.items()})
        return
    with pytest.raises(ValueError, match="nothing was loaded"):
        load_checkpoint(model, {"model": state_dict})
    assert _unchanged(model, before)


def test_state_dict_loading_semantics_otherwise_unchanged():
    torch.manual_seed(1)
    donor = create_model("dat_nano")
    model = create_model("dat_nano")
    result = model.load_state_dict(donor.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert _unchanged(model, _snapshot(donor))
    # strict=False: a subset loads (torch semantics), shape mismatches still fail and change nothing
    fresh = create_model("dat_nano")
    part = {k: v for k, v in donor.state_dict().items() if k.startswith("patch_proj.")}
    result = fresh.load_state_dict(part, strict=False)
    assert result.unexpected_keys == [] and len(result.missing_keys) == len(fresh.state_dict()) - len(part)
    assert torch.equal(fresh.patch_proj[0].weight, donor.patch_proj[0].weight)
    before = _snapshot(fresh)
    bad = dict(part, **{"cls_head.bias": torch.zeros(3)})
    with pytest.raises(RuntimeError, match=r"cls_head.bias \(checkpoint \(3,\) vs model \(10,\)\)"):
        fresh.load_state_dict(bad, strict=False)
    assert _unchanged(fresh, before)
    # derived buffers of shifted windows are recomputed, never loaded: another map size's attn_mask is accepted
    v1 = create_model("dat_v1_nano")
    other = create_model("dat_v1_nano", img_size=48).state_dict()
    other = {k: v for k, v in other.items() if k.endswith(("attn_mask", "relative_position_index"))}
    assert any(v.shape != v1.state_dict()[k].shape for k, v in other.items())
    before = _snapshot(v1)
    v1.load_state_dict(other, strict=False)
    assert _unchanged(v1, before)


# -- bad checkpoint files: one diagnosis at every entry point -------------------------------------------------------
TRUST_WORDS = ("weights_only", "trust", "Re-running", "unpickl")  # advice that belongs to intact pickling files only


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """A real training checkpoint and the three kinds of bad file: random bytes, the real file cut in half, and the
    real file with a pickled Python object in it (intact, but not weights-only readable)."""
    import argparse

    from deformattn.train.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("bad_checkpoints")
    model = create_model("dat_nano", num_classes=10)
    ckpt = {"model": model.state_dict(), "model_name": "dat_nano", "model_kwargs": {"num_classes": 10},
            "class_names": [str(i) for i in range(10)], "config": {}, "epoch": 1}
    good = folder / "good.pt"
    save_checkpoint(good, ckpt)
    data = good.read_bytes()
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (folder / "random.pt").write_bytes(bytes(noise.tolist()))
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    save_checkpoint(folder / "pickled.pt", {**ckpt, "args": argparse.Namespace(lr=1e-3)})
    return {"random": folder / "random.pt", "truncated": folder / "truncated.pt", "pickled": folder / "pickled.pt"}


def _check_diagnosis(kind: str, message: str) -> None:
    if kind == "pickled":
        assert "argparse.Namespace" in message and "intact" in message and "trust" in message, message
    else:
        assert any(w in message for w in ("truncated", "damaged", "not a PyTorch checkpoint")), message
        assert not any(w in message for w in TRUST_WORDS), message


def _api_entry_points():
    from deformattn.export.cli import load_export_model
    from deformattn.models import read_checkpoint
    from deformattn.train import evaluate_checkpoint, load_checkpoint_file, predict_images

    return {
        "create_model": lambda p: create_model("dat_nano", checkpoint_path=p),
        "load_checkpoint": lambda p: load_checkpoint(create_model("dat_nano"), p),
        "read_checkpoint": lambda p: read_checkpoint(p),
        "load_checkpoint_file": lambda p: load_checkpoint_file(p, argument="resume", training_state=True),
        "evaluate_checkpoint": lambda p: evaluate_checkpoint(p),
        "predict_images": lambda p: predict_images(p, ["digit.png"]),
        "load_export_model": lambda p: load_export_model(None, str(p)),
    }


@pytest.mark.parametrize("kind", ["random", "truncated", "pickled"])
@pytest.mark.parametrize("entry", ["create_model", "load_checkpoint", "read_checkpoint", "load_checkpoint_file",
                                   "evaluate_checkpoint", "predict_images", "load_export_model"])
def test_bad_checkpoint_file_api(bad_files, kind, entry):
    from deformattn.models import CheckpointError

    if entry in ("evaluate_checkpoint", "predict_images"):
        pytest.importorskip("sklearn")
    with pytest.raises(CheckpointError) as info:
        _api_entry_points()[entry](bad_files[kind])
    _check_diagnosis(kind, str(info.value))
    assert bool(info.value.pickled_objects) == (kind == "pickled")
    assert not str(info.value).startswith("--"), "library errors name arguments, not flags"


@pytest.mark.parametrize("kind", ["random", "truncated", "pickled"])
@pytest.mark.parametrize("command", [
    ["eval", "--checkpoint", "{}"], ["predict", "--checkpoint", "{}", "digit.png"], ["info", "--checkpoint", "{}"],
    ["viz", "--checkpoint", "{}", "--output", "{out}/viz.png"],
    ["export", "--checkpoint", "{}", "--format", "onnx", "--output", "{out}/model.onnx"],
    ["train", "--resume", "{}", "--output-dir", "{out}/run"],
])
def test_bad_checkpoint_file_cli(bad_files, kind, command, tmp_path, capsys):
    from deformattn.cli import main

    if command[0] in ("eval", "predict", "train"):
        pytest.importorskip("sklearn")
    flag = command[1]
    argv = [a.format(str(bad_files[kind]), out=tmp_path) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"deformattn {command[0]}: error: {flag}: ") and "\n" not in err, err
    assert err.count(f"deformattn {command[0]}") == 1, err
    _check_diagnosis(kind, err)
    if kind == "pickled":  # the remedy the command line can offer: convert a trusted file once in Python
        assert "weights_only=False" in err
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.onnx"))


def test_checkpoint_with_a_damaged_member_is_refused(bad_files, tmp_path):
    """torch.load does not check CRCs: a flipped byte in the tensor data would load as silently wrong weights."""
    from deformattn.models import CheckpointError, read_checkpoint
    from deformattn.train.checkpoint import save_checkpoint

    path = tmp_path / "flipped.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(64, 64)}})
    data = bytearray(path.read_bytes())
    at = data.index(b"data/0") + 200  # inside the stored tensor bytes
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC") as info:
        read_checkpoint(path)
    _check_diagnosis("damaged", str(info.value))
