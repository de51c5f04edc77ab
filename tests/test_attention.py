"""DeformableAttention2d: fast path vs reference, gradients, degenerate sizes, argument validation."""
from __future__ import annotations

import itertools

import pytest
import torch

import deformattn.backends.fast as fast
from deformattn import DeformableAttention2d
from deformattn import functional as DF

# per-dtype tolerance of fast vs reference (outputs and gradients)
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}

# (version, pos_bias, offset_range_factor, stride, ksize, H, W, q_size, groups, heads)
CONFIGS = [
    ("pp", "table", -1, 1, 3, 8, 8, 8, 2, 4),
    ("pp", "table", -1, 2, 5, 9, 7, (9, 7), 2, 4),  # odd, non-square, integer table step
    ("pp", "table", 2, 2, 5, 6, 10, (6, 10), 1, 2),  # tanh-bounded offsets
    ("pp", "table", -1, 8, 9, 17, 24, (17, 24), 1, 2),  # stride 8
    ("pp", "table", -1, 1, 3, 5, 5, 9, 2, 4),  # input smaller than the table: step 2
    ("pp", "table", -1, 1, 3, 11, 6, 7, 2, 2),  # input larger: fractional step (general gather)
    ("pp", "table", -1, 4, 4, 3, 13, (3, 13), 1, 2),  # ksize == stride, map shorter than the kernel
    ("pp", "table", 1, 1, 3, 1, 6, (1, 6), 2, 2),  # single query row
    ("pp", "table", -1, 1, 3, 1, 1, 4, 1, 2),  # 1x1 map
    ("v1", "table", 2, 1, 3, 7, 7, 7, 2, 4),
    ("v1", "table", -1, 1, 5, 6, 9, (6, 9), 1, 2),
    ("v1", "table", 0, 2, 5, 8, 8, 8, 2, 2),
    ("pp", "log_cpb", -1, 2, 3, 8, 8, 8, 2, 4),
    ("pp", "fixed", 1, 2, 3, 8, 8, 8, 2, 4),
    ("pp", "dwc", 3, 1, 3, 5, 7, None, 2, 4),
    ("pp", "none", 1, 1, 3, 4, 3, None, 4, 4),
    ("v1", "dwc", -1, 2, 5, 7, 5, None, 2, 2),
]


def make(cfg, dim=16, dtype=torch.float64, **kw):
    version, kind, orf, s, k, H, W, q, G, nH = cfg
    torch.manual_seed(0)
    m = DeformableAttention2d(
        dim, nH, offset_groups=G, stride=s, offset_kernel_size=k, offset_range_factor=orf, pos_bias=kind,
        q_size=q, version=version, **kw,
    ).to(dtype)
    with torch.no_grad():
        for p in m.parameters():  # large enough that offsets, biases and LayerNorm all matter
            p.copy_(torch.randn_like(p) * 0.5)
    return m, (H, W)


def run(m, x, backend, grad_out):
    m.backend = backend
    m.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y, pos, ref = m(xx, return_sampling=True)
    (y * grad_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return y.detach(), pos.detach(), ref, xx.grad.clone(), grads


def ids(cfg):
    return "-".join(str(c).replace(" ", "") for c in cfg)


# fast-path modes: autograd keeps the (small) attention matrix; or the custom recomputing backward with one block
# or many blocks of query rows (what large maps use)
MODES = {"keep": (1 << 22, 1 << 23), "recompute-one-block": (1 << 22, 0), "recompute-blocks": (64, 0)}


@pytest.fixture(params=list(MODES))
def fast_mode(request):
    block, save = MODES[request.param]
    with fast.tuning(block_elems=block, save_elems=save):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_fast_equals_reference(cfg, dtype, fast_mode):
    m, (H, W) = make(cfg, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, H, W, generator=g, dtype=dtype)
    grad_out = torch.randn(2, 16, H, W, generator=g, dtype=dtype)
    a = run(m, x, "reference", grad_out)
    b = run(m, x, "fast", grad_out)
    tol = TOL[dtype]
    torch.testing.assert_close(b[0], a[0], **tol)
    torch.testing.assert_close(b[1], a[1], **tol)
    torch.testing.assert_close(b[2], a[2], rtol=0, atol=0)
    torch.testing.assert_close(b[3], a[3], **tol)
    assert set(b[4]) == set(a[4])
    scale = max(g.abs().max().item() for g in a[4].values())
    for name in a[4]:
        torch.testing.assert_close(b[4][name], a[4][name], rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale),
                                   msg=lambda s, n=name: f"{n}: {s}")


def test_every_parameter_gets_a_gradient():
    for cfg in CONFIGS:
        m, (H, W) = make(cfg)
        if (H, W) == (1, 1):
            continue  # a 1x1 key grid in clamp mode sits on the border: no gradient reaches the offsets (official)
        m(torch.randn(2, 16, H, W, dtype=torch.float64)).square().sum().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (cfg, name)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize(
    "cfg",
    [c for c in CONFIGS if c[1] != "none" or c[0] == "v1"] + [("pp", "none", -1, 2, 3, 5, 4, None, 2, 2)],
    ids=ids,
)
def test_gradcheck(cfg, backend, fast_mode):
    if backend == "reference" and fast_mode != "keep":
        pytest.skip("the mode only changes the fast path")
    version, kind, orf, s, k, H, W, q, G, nH = cfg
    m, _ = make(cfg, dim=8 if nH <= 4 and 8 % nH == 0 else 16)
    m.backend = backend
    dim = m.dim
    H, W = min(H, 6), min(W, 6)
    if kind == "fixed":
        H, W = 8, 8
    x = torch.randn(1, dim, H, W, dtype=torch.float64, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(  # noqa: SLF001 - test-only reparametrisation
            m, {n: p for (n, _), p in zip([(n, p) for n, p in m.named_parameters() if p.requires_grad], ps)}
        ):
            return m(x)

    ps = [p.detach().clone().requires_grad_(True) for p in params]
    assert torch.autograd.gradcheck(f, (x, *ps), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_gradcheck_through_offsets():
    """Gradients reach the sampling positions: check d(bias, samples)/d(offset) on the functional pieces."""
    torch.manual_seed(0)
    table = torch.randn(2, 9, 9, dtype=torch.float64, requires_grad=True)
    q_grid = DF.query_grid(5, 5, dtype=torch.float64)
    raw = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    ref = DF.reference_points(3, 3, dtype=torch.float64, offset_range_factor=2.0)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)

    def f(raw, table, x):
        pos = DF.bound_offsets(raw, ref, offset_range_factor=2.0)
        return DF.table_bias(table, q_grid, pos, 2), DF.sample_keys(x, pos, 2)

    assert torch.autograd.gradcheck(f, (raw, table, x))


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_batch_zero(backend):
    m = DeformableAttention2d(16, 4, offset_groups=2, stride=2, q_size=8, backend=backend)
    x = torch.randn(0, 16, 8, 8, requires_grad=True)
    y, pos, ref = m(x, return_sampling=True)
    assert y.shape == (0, 16, 8, 8) and pos.shape == (0, 2, 4, 4, 2) and ref.shape == (0, 2, 4, 4, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("H,W", [(1, 1), (1, 7), (5, 1), (2, 3), (15, 4)])
@pytest.mark.parametrize("version,orf", [("pp", -1), ("pp", 2), ("v1", 2), ("v1", -1), ("v1", 0)])
def test_any_size_runs_and_is_finite(H, W, version, orf):
    m = DeformableAttention2d(8, 2, stride=4, offset_range_factor=orf, q_size=8, version=version).double()
    x = torch.randn(2, 8, H, W, dtype=torch.float64, requires_grad=True)
    y, pos, ref = m(x, return_sampling=True)
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(pos).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    m.backend = "reference"
    torch.testing.assert_close(m(x), y)


def test_degenerate_axes_follow_the_documented_rules():
    # DAT++ clamp mode, key grid of height 1: official reference is +inf, the clamp samples the last row (+1)
    ref = DF.reference_points(1, 3, version="pp", offset_range_factor=-1)
    assert torch.isinf(ref[..., 0]).all() and ref[0, 1, 1] == 0.5  # (1.5 / 2) * 2 - 1
    raw = torch.randn(2, 2, 1, 3)
    pos = DF.bound_offsets(raw, ref, offset_range_factor=-1)
    assert (pos[..., 0] == 1).all()
    # DAT++ bounded mode: the official code divides by zero; here the centre and a range of one half-span
    ref = DF.reference_points(1, 3, version="pp", offset_range_factor=2)
    assert (ref[..., 0] == 0).all()
    pos = DF.bound_offsets(raw, ref, offset_range_factor=2)
    torch.testing.assert_close(pos[..., 0], 2 * raw[:, 0].tanh())
    # a query map of height 1 sits at the centre (official: 0/0 = NaN)
    assert (DF.query_grid(1, 4)[..., 0] == 0).all()
    # v1 grid: cell centres
    torch.testing.assert_close(DF.reference_points(2, 1, version="v1")[:, 0, 0], torch.tensor([-0.5, 0.5]))
    # DAT++ grid keeps the official (Hk - 1) normalisation: the last point lies outside the map
    torch.testing.assert_close(DF.reference_points(4, 1)[:, 0, 0], torch.tensor([-2 / 3, 0.0, 2 / 3, 4 / 3]))


def test_no_off_pools_and_samples_at_the_reference():
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    m = DeformableAttention2d(8, 2, stride=2, no_off=True, pos_bias="none").double()
    y, pos, ref = m(x, return_sampling=True)
    assert not any(p.requires_grad for p in m.conv_offset.parameters())
    Hk, Wk = m.key_grid_size(9, 7)
    assert pos.shape[2:4] == (Hk, Wk) == (5, 4)  # not divisible: adaptive pooling instead of the official assert
    torch.testing.assert_close(pos, ref.clamp(-1, 1))
    # divisible sizes: exactly avg_pool2d(x, stride), as in DAT++
    x8 = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    q = m.proj_q(x8)
    pos8, _ = m.sampling_positions(q)
    torch.testing.assert_close(
        m.sample_kv_input(x8, pos8), torch.nn.functional.avg_pool2d(x8, 2).reshape(2, 8, 16)
    )
    # v1 no_off: keys at the reference grid, bilinearly sampled (official crashes on Tensor.fill)
    v1 = DeformableAttention2d(8, 2, stride=1, no_off=True, offset_range_factor=2, q_size=6, version="v1").double()
    x6 = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    _, pos6, ref6 = v1(x6, return_sampling=True)
    torch.testing.assert_close(pos6, ref6)


def test_v1_fixed_pe_runs():
    """Official v1 crashes (self.n_sample); here the fixed bias is used as DAT++ does."""
    m = DeformableAttention2d(8, 2, stride=2, pos_bias="fixed", q_size=6, kv_size=3, version="v1",
                              offset_range_factor=2).double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    y = m(x)
    m.backend = "reference"
    torch.testing.assert_close(m(x), y)
    with pytest.raises(ValueError, match="fixed"):
        m(torch.randn(2, 8, 7, 7, dtype=torch.float64))


def test_dropout_only_in_training():
    m = DeformableAttention2d(16, 4, stride=2, q_size=8, attn_drop=0.5, proj_drop=0.5)
    x = torch.randn(2, 16, 8, 8)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    assert not torch.allclose(a, b)
    a.sum().backward()  # dropout path has gradients too


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_deterministic(backend):
    m = DeformableAttention2d(16, 4, offset_groups=2, stride=2, q_size=8, backend=backend)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(m(x), m(x))


# ---------------------------------------------------------------------------------------------- validation ----
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(dim=30, num_heads=4), ValueError, r"dim \(30\) must be divisible by num_heads \(4\)"),
        (dict(dim=32, num_heads=4, offset_groups=3), ValueError, r"num_heads \(4\) must be divisible by offset_groups"),
        (dict(dim=32, num_heads=4, stride=4, offset_kernel_size=2, offset_padding=0), ValueError,
         r"offset_kernel_size \(2\) must be >= stride \(4\)"),
        (dict(dim=32, num_heads=4, pos_bias="rpe"), ValueError, "pos_bias must be one of"),
        (dict(dim=32, num_heads=4, version="v3"), ValueError, "version must be one of"),
        (dict(dim=32, num_heads=4, pos_bias="table"), ValueError, "needs q_size"),
        (dict(dim=32, num_heads=4, pos_bias="log_cpb", version="v1", q_size=8), ValueError, "log_cpb"),
        (dict(dim=32.0, num_heads=4), TypeError, "dim must be an int"),
        (dict(dim=32, num_heads=0), ValueError, "num_heads must be >= 1"),
        (dict(dim=32, num_heads=4, stride=0), ValueError, "stride must be >= 1"),
        (dict(dim=32, num_heads=4, backend="cuda-magic", pos_bias="none"), ValueError, "backend"),
        (dict(dim=32, num_heads=4, q_size=(8, 8, 8)), TypeError, "q_size"),
        (dict(dim=32, num_heads=4, attn_drop=1.5, pos_bias="none"), ValueError, "attn_drop"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DeformableAttention2d(**kwargs)


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (torch.randn(16, 8, 8), ValueError, r"shape \(B, C, H, W\).*got 3 dims"),
        (torch.randn(2, 12, 8, 8), ValueError, "must have 16 channels"),
        (torch.randint(0, 5, (2, 16, 8, 8)), TypeError, "floating-point"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(x, exc, match):
    m = DeformableAttention2d(16, 4, stride=2, q_size=8)
    with pytest.raises(exc, match=match):
        m(x)


def test_official_names_for_every_bias_kind():
    for kind, expected in [("table", torch.nn.Parameter), ("fixed", torch.nn.Parameter),
                           ("dwc", torch.nn.Conv2d), ("log_cpb", torch.nn.Sequential)]:
        m = DeformableAttention2d(16, 4, stride=2, q_size=8, pos_bias=kind)
        assert isinstance(m.rpe_table, expected)
    assert DeformableAttention2d(16, 4, pos_bias="none").rpe_table is None


def test_backend_env_override(monkeypatch):
    from deformattn.backends import DEFORMABLE_OP, Problem, get_backend, select_backend

    problem = Problem.of(torch.randn(1, 4, 64, 4))
    assert select_backend(DEFORMABLE_OP, problem) is get_backend(DEFORMABLE_OP, "fast")
    monkeypatch.setenv("DEFORMATTN_BACKEND", "reference")
    assert select_backend(DEFORMABLE_OP, problem) is get_backend(DEFORMABLE_OP, "reference")
    m = DeformableAttention2d(16, 4, stride=2, q_size=8)
    x = torch.randn(1, 16, 8, 8)
    monkeypatch.setenv("DEFORMATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"DeformableAttention2d: \$DEFORMATTN_BACKEND must be one of .*'nope'"):
        m(x)


def test_table_resolution_independent_at_built_size():
    """Table bias sampled at a different resolution is the same continuous function: the fast general gather
    equals grid_sample for many query/table size combinations."""
    torch.manual_seed(0)
    for (H, W), (qh, qw), version in itertools.product([(4, 4), (7, 3), (9, 12)], [(4, 4), (7, 9)], ["pp", "v1"]):
        m = DeformableAttention2d(8, 2, stride=1, q_size=(qh, qw), kv_size=(qh, qw), version=version).double()
        with torch.no_grad():
            m.rpe_table.normal_()
        x = torch.randn(1, 8, H, W, dtype=torch.float64)
        m.backend = "reference"
        a = m(x)
        m.backend = "fast"
        torch.testing.assert_close(m(x), a, rtol=1e-10, atol=1e-10)


def test_gather_sampler_equals_grid_sample():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 9, dtype=torch.float64, requires_grad=True)
    # points inside, on the border, partly and fully outside the map
    grid = (torch.rand(3, 4, 6, 2, dtype=torch.float64) * 3.0 - 1.5).requires_grad_(True)
    grid.data[0, 0, 0] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    grid.data[0, 0, 1] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    b = DF.grid_sample_gather(x, grid)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, (x, grid), g)
    gb = torch.autograd.grad(b, (x, grid), g)
    for u, w in zip(ga, gb):
        torch.testing.assert_close(w, u, rtol=1e-10, atol=1e-10)
    # gradcheck away from the kinks (integer pixel positions, where finite differences straddle two cells)
    smooth_grid = (torch.rand(1, 3, 4, 2, dtype=torch.float64) * 2.4 - 1.2).requires_grad_(True)
    assert torch.autograd.gradcheck(DF.grid_sample_gather, (x.detach()[:1, :2].requires_grad_(), smooth_grid))


@pytest.mark.parametrize("B, G, H, W", [(3, 2, 7, 9), (1, 3, 5, 4), (0, 2, 6, 5)])
def test_gather_keys_and_table_bias_equal_grid_sample(B, G, H, W):
    """The gather sampler's own paths for the keys (rows of channels, (y, x) read as given) and for the bias table
    (rows of the table, not one copy per image) give grid_sample's values and gradients: positions inside, on the
    border and outside the map, several groups, batch 0."""
    torch.manual_seed(1)
    C, nH, Hk, Wk = 6 * G, 2 * G, 3, 4
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    pos = (torch.rand(B * G, Hk, Wk, 2, dtype=torch.float64) * 2.6 - 1.3).requires_grad_(True)
    if B:
        pos.data[0, 0, 0] = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    table = torch.randn(nH, 2 * H - 1, 2 * W - 1, dtype=torch.float64, requires_grad=True)
    q_grid = DF.query_grid(H, W, dtype=torch.float64)
    for fn, args in ((DF.sample_keys, (x, pos, G)), (DF.table_bias, (table, q_grid, pos, G))):
        a, b = fn(*args, sampler="grid_sample"), fn(*args, sampler="gather")
        assert b.shape == a.shape and b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        if B:
            g = torch.randn_like(a)
            inputs = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
            for u, w in zip(torch.autograd.grad(a, inputs, g), torch.autograd.grad(b, inputs, g)):
                torch.testing.assert_close(w, u, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[1] in ("table", "none")][:6], ids=ids)
def test_gather_sampler_module(cfg):
    m, (H, W) = make(cfg)
    x = torch.randn(2, 16, H, W, dtype=torch.float64)
    m.backend = "reference"
    a = m(x)
    g = DeformableAttention2d(**{**_kwargs(m), "sampler": "gather"}).double()
    g.load_state_dict(m.state_dict())
    torch.testing.assert_close(g(x), a, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="sampler"):
        DeformableAttention2d(16, 4, pos_bias="none", sampler="nearest")


def _kwargs(m):
    return dict(dim=m.dim, num_heads=m.num_heads, offset_groups=m.offset_groups, stride=m.stride,
                offset_kernel_size=m.offset_kernel_size, offset_range_factor=m.offset_range_factor,
                pos_bias=m.pos_bias, q_size=m.q_size, kv_size=m.kv_size, no_off=m.no_off, version=m.version)


# ---------------------------------------------------------------------------------------------------------------
# the window gather of the table bias, on its own: every integer step, blocks, positions inside and outside
# ---------------------------------------------------------------------------------------------------------------
def _window_case(S: int, H: int, W: int, B: int = 2, G: int = 2, hg: int = 2, Ns: int = 5, seed: int = 0):
    """A table whose query step is ``S`` cells for an ``H x W`` map (pp convention; ``S = 0``: a table of one row
    and one column, every query reads the same cells) and key positions that reach past the table's border on
    every side (clamped windows must still give zeros there)."""
    g = torch.Generator().manual_seed(seed)
    T = S * 2 * (H - 1) + 1 if H > 1 else 5
    Tw = S * 2 * (W - 1) + 1 if W > 1 else 5
    table = torch.randn(G, hg, T, Tw, generator=g, dtype=torch.float64)
    pos = (torch.rand(B, G, Ns, 2, generator=g, dtype=torch.float64) * 2.0 - 1.0) * 1.6  # some outside [-1, 1]
    return table, pos


@pytest.mark.parametrize("S", [0, 1, 2, 3])
@pytest.mark.parametrize("H,W", [(4, 5), (1, 3), (3, 1), (6, 6)])
def test_window_table_bias_equals_grid_sample(S, H, W):
    table, pos = _window_case(S, H, W)
    G, hg, T, Tw = table.shape
    B, _, Ns, _ = pos.shape
    qg = DF.query_grid(H, W, version="pp", dtype=torch.float64)
    qy, qx = qg[:, 0, 0], qg[0, :, 1]
    step_y, step_x = fast._table_step(T, H, "pp"), fast._table_step(Tw, W, "pp")
    assert (step_y, step_x) == (S if H > 1 else 0, S if W > 1 else 0)
    cy = (T - 1) / 4.0 * (qy[0] - pos[..., 0] + 2.0)
    cx = (Tw - 1) / 4.0 * (qx[0] - pos[..., 1] + 2.0)
    want = fast._general_table_bias(table, qy, qx, pos)  # B, G, hg, H*W, Ns
    for rows in (1, 2, H):  # blocks of query rows, the last one shorter
        plan = fast._WindowPlan(table, cy, cx, step_y, step_x, H, W)
        got = torch.cat(
            [fast._WindowTableBias.apply(table, cy, cx, r0, min(H, r0 + rows), plan) for r0 in range(0, H, rows)], 3
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    # gradients with respect to the table and the positions (through cy, cx), one block and several
    for rows in (H, 1):
        def f(t, a, b):
            plan = fast._WindowPlan(t, a, b, step_y, step_x, H, W)
            return torch.cat(
                [fast._WindowTableBias.apply(t, a, b, r0, min(H, r0 + rows), plan) for r0 in range(0, H, rows)], 3
            )

        # off the cell boundaries, where the bilinear weights have a kink (a one-cell table puts every key on one)
        inputs = (table.clone().requires_grad_(), (cy + 0.37).requires_grad_(), (cx + 0.61).requires_grad_())
        assert torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-6, rtol=1e-5, fast_mode=True)
