"""Shape-polymorphic size code (issue 14): the branch-free forms equal what they replaced, and the general branches
that a traced dynamic size takes (``deformattn._shapes.is_symbolic``) compute what eager mode computes.

The symbolic branches are run on the CPU through ``torch.compile(dynamic=True, backend="eager")``: Dynamo traces
the sizes as ``SymInt`` s (the same branches ``torch.export`` takes) and then runs the captured graph on real
tensors, so their values are compared with eager mode's at odd and non-square sizes.
"""
from __future__ import annotations

import pytest
import torch

from deformattn import DeformableAttention2d
from deformattn import functional as DF
from deformattn._shapes import ceil_div, is_symbolic, sym_max, sym_min
from deformattn.layers import NeighborhoodAttention2d, WindowAttention
from deformattn.layers.neighborhood_attention import neighborhood_tiles
from deformattn.layers.window_attention import window_attention_mask


def test_shape_helpers_on_ints():
    assert not is_symbolic(3, 4.0) and sym_max(3, 5) == 5 and sym_min(3, 5) == 3
    assert [ceil_div(a, 4) for a in range(0, 10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def _official_mask(H: int, W: int, ws: int, s: int) -> torch.Tensor | None:
    """The mask written the official way (label slices), plus key padding: what the arithmetic form replaced."""
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    if s == 0 and (Hp, Wp) == (H, W):
        return None
    N = ws * ws

    def part(t):
        return t.reshape(Hp // ws, ws, Wp // ws, ws).transpose(1, 2).reshape(-1, N)

    mask = torch.zeros((Hp // ws) * (Wp // ws), N, N)
    if s:
        label = torch.zeros(Hp, Wp)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                label[hs, wsl] = cnt
                cnt += 1
        lw = part(label)
        mask = torch.where(lw[:, None, :] != lw[:, :, None], -100.0, 0.0)
    if (Hp, Wp) != (H, W):
        valid = torch.zeros(Hp, Wp, dtype=torch.bool)
        valid[:H, :W] = True
        if s:
            valid = torch.roll(valid, shifts=(-s, -s), dims=(0, 1))
        mask = mask + torch.where(part(valid), 0.0, -100.0)[:, None, :]
    return mask


@pytest.mark.parametrize("ws", [2, 3, 4, 7])
def test_window_mask_arithmetic_equals_the_official_slices(ws):
    for s in range(ws):
        for H in (1, ws - 1, ws, ws + 1, 2 * ws + 3):
            for W in (1, ws, 3 * ws - 1):
                if H < 1 or W < 1:
                    continue
                want, got = _official_mask(H, W, ws, s), window_attention_mask(H, W, ws, s)
                assert (want is None) == (got is None), (H, W, ws, s)
                if want is not None:
                    assert torch.equal(got, want), (H, W, ws, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_grid_arange_is_the_official_linspace(dtype):
    """``arange + 0.5`` is ``linspace(0.5, n - 0.5, n)`` bit for bit, so the float64 fixtures still agree to the ulp;
    length-1 grids keep their documented values (+inf clamped later, or the centre)."""
    for n in range(2, 300):
        lin = torch.linspace(0.5, n - 0.5, n, dtype=dtype)
        want_pp = lin.div(n - 1.0).mul(2.0).sub(1.0)
        want_v1 = lin.div(float(n)).mul(2.0).sub(1.0)
        got_pp = DF.reference_points(n, 1, version="pp", dtype=dtype)[:, 0, 0]
        got_v1 = DF.reference_points(n, 1, version="v1", dtype=dtype)[:, 0, 0]
        assert torch.equal(got_pp, want_pp) and torch.equal(got_v1, want_v1), n
        q = DF.query_grid(n, 1, version="pp", dtype=dtype)[:, 0, 0]
        assert torch.equal(q, torch.arange(0, n, dtype=dtype).div(n - 1.0).mul(2.0).sub(1.0)), n
    assert DF.reference_points(1, 1, version="pp", offset_range_factor=-1)[0, 0, 0] == float("inf")
    assert DF.reference_points(1, 1, version="pp", offset_range_factor=2)[0, 0, 0] == 0.0
    assert DF.query_grid(1, 1, version="pp")[0, 0, 0] == 0.0


def test_neighborhood_tiles_cover_every_neighbourhood():
    """Every query's k keys lie in its tile's key region (plain-int tiling, every length up to 40)."""
    for k in (3, 5, 7):
        for L in range(k, 41):
            query, key, valid, rel, out = neighborhood_tiles(L, k)
            assert torch.equal(valid.sum(-1), torch.full(valid.shape[:2], k))
            flat = query.reshape(-1)
            assert torch.equal(flat[out], torch.arange(L))


def _compiled_matches_eager(module: torch.nn.Module, shapes) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(module, dynamic=True, backend="eager", fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), module(x), atol=1e-5, rtol=1e-5)


def test_symbolic_branches_window_attention():
    torch.manual_seed(0)
    m = WindowAttention(16, 2, 4, shift_size=2, fmap_size=8).eval()
    _compiled_matches_eager(m, [(2, 16, 9, 13), (1, 16, 15, 8), (3, 16, 8, 8), (1, 16, 3, 21)])


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_symbolic_branches_neighborhood_attention(kernel_size):
    """The padded tiling of a symbolic size (tiles of max(k, 7), the axis padded to the key region) gives eager
    mode's output, on maps shorter than the kernel, than a key region, and longer than two tiles."""
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(16, kernel_size, 2, backend="fast").eval()
    _compiled_matches_eager(m, [(2, 16, 9, 13), (1, 16, 17, 30), (1, 16, 2, 11), (2, 16, 31, 5)])


@pytest.mark.parametrize("version", ["pp", "v1"])
def test_symbolic_branches_deformable_attention(version):
    torch.manual_seed(0)
    m = DeformableAttention2d(16, 4, offset_groups=2, stride=2, q_size=12, pos_bias="table", version=version,
                              offset_range_factor=2.0 if version == "v1" else -1.0, sampler="gather").eval()
    _compiled_matches_eager(m, [(2, 16, 9, 13), (1, 16, 17, 6), (1, 16, 2, 3)])


def test_shared_computes_once_per_scope_and_not_outside():
    """``shared``: one computation per key inside a ``shared_sizes`` scope (nested scopes have their own cache),
    a fresh one every call outside."""
    from deformattn._shapes import shared, shared_sizes

    calls = []

    def compute():
        calls.append(1)
        return torch.arange(len(calls))

    shared(("grid", 3), compute)
    shared(("grid", 3), compute)
    assert len(calls) == 2
    with shared_sizes():
        a, b = shared(("grid", 3), compute), shared(("grid", 3), compute)
        c = shared(("grid", 4), compute)
        with shared_sizes():
            d = shared(("grid", 3), compute)
        assert shared(("grid", 3), compute) is a
    assert a is b and c is not a and d is not a and len(calls) == 5


class _BlocksOnly(torch.nn.Module):
    """A stage's blocks run without the stage's shared-sizes scope."""

    def __init__(self, stage: torch.nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage._blocks(x)


def test_stage_shares_the_tile_plan_between_blocks(monkeypatch):
    """While a graph is captured (torch.export), a stage's neighborhood blocks get one tile plan (built by the first
    block), and the exported stage equals blocks that each build their own (outside any scope) and the eager stage."""
    import deformattn.layers.neighborhood_attention as na
    from deformattn.models.dat import DAT

    torch.manual_seed(0)
    model = DAT(version="pp", img_size=32, num_classes=10, patch_size=2, conv_stem=False, dims=(24, 48, 96, 192),
                stage_spec=("NNN", "ND", "ND", "D"), num_heads=(1, 2, 4, 8), nat_kernel_sizes=(5, 5, 3, 3),
                offset_groups=(1, 1, 2, 4), strides=(4, 2, 1, 1), offset_kernel_sizes=(7, 5, 3, 3)).eval()
    x = torch.randn(2, 3, 41, 53, generator=torch.Generator().manual_seed(1))
    plans = []
    original = na.tile_plan
    monkeypatch.setattr(na, "tile_plan", lambda *a, **k: plans.append(a[:2]) or original(*a, **k))
    stage = model.stages[0]
    with torch.no_grad():
        feats = model.patch_proj(x)
        na._cached_tiled_plan.cache_clear()
        eager = stage(feats)
        stage(feats)
        assert len(plans) == 1  # eager calls build the plan once per size and keep it
        plans.clear()
        per_block = torch.export.export(_BlocksOnly(stage), (feats,), strict=False).module()  # no scope
        assert len(plans) == 3
        whole = torch.export.export(stage, (feats,), strict=False).module()
        assert len(plans) == 4  # one more for the whole stage
        got, want = whole(feats), per_block(feats)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# torch.jit.trace: sizes are 0-dim tensors while tracing; one trace must hold the code of every size
# ---------------------------------------------------------------------------------------------------------------
def _traced_matches_eager(module: torch.nn.Module, trace_shape, shapes, traced_hook=None) -> None:
    """Trace ``module`` at ``trace_shape`` with the tracer's warnings as errors (a warning = a size the trace fixed),
    (call ``traced_hook()``), then run the trace at ``shapes`` against eager mode."""
    import warnings

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        traced = torch.jit.trace(module, (torch.randn(*trace_shape, generator=gen),), check_trace=False)
    if traced_hook is not None:
        traced_hook()
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), module(x), atol=1e-5, rtol=1e-5)


def test_shape_helpers_on_traced_sizes():
    """sym_max / sym_min / ceil_div on traced sizes are recorded (the trace gives the right value at other sizes);
    concrete() reads the example's value without the tracer's warning."""
    import warnings

    from deformattn._shapes import concrete

    seen = []

    def f(x):
        H, W = x.shape[2:]
        seen.append((is_symbolic(H, W), concrete(H), concrete(W)))
        n = sym_max(ceil_div(H, 4), sym_min(W, 5)) + sym_max(3, H - 20) + sym_min(H, W)
        return x.new_zeros(1).expand(n)

    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        traced = torch.jit.trace(f, (torch.randn(1, 1, 9, 13),), check_trace=False)
    assert seen == [(True, 9, 13)]  # traced sizes are tensors; concrete() gives their example values
    for H, W in [(9, 13), (30, 2), (3, 40), (21, 21)]:
        want = max(-(-H // 4), min(W, 5)) + max(3, H - 20) + min(H, W)
        assert traced(torch.randn(1, 1, H, W)).shape == (want,) == f(torch.randn(1, 1, H, W)).shape
    assert concrete(7) == 7 and not is_symbolic(3, 4.0)


def test_traced_branches_window_attention():
    torch.manual_seed(0)
    m = WindowAttention(16, 2, 4, shift_size=2, fmap_size=8).eval()
    _traced_matches_eager(m, (2, 16, 11, 13), [(2, 16, 9, 13), (1, 16, 15, 8), (3, 16, 8, 8), (1, 16, 3, 21)])


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_traced_branches_neighborhood_attention(kernel_size):
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(16, kernel_size, 2, backend="fast").eval()
    _traced_matches_eager(m, (2, 16, 19, 23), [(2, 16, 9, 13), (1, 16, 17, 30), (1, 16, 2, 11), (2, 16, 31, 5)])


@pytest.mark.parametrize("version", ["pp", "v1"])
def test_traced_branches_deformable_attention(version):
    torch.manual_seed(0)
    m = DeformableAttention2d(16, 4, offset_groups=2, stride=2, q_size=12, pos_bias="table", version=version,
                              offset_range_factor=2.0 if version == "v1" else -1.0, sampler="gather").eval()
    _traced_matches_eager(m, (2, 16, 13, 15), [(2, 16, 9, 13), (1, 16, 17, 6), (1, 16, 2, 3)])


def test_trace_shares_the_tile_plan_between_blocks(monkeypatch):
    """Under torch.jit.trace a stage's neighborhood blocks also get one tile plan (sizes keyed by their value at the
    example, see deformattn._shapes), and the trace matches eager mode at other sizes."""
    import deformattn.layers.neighborhood_attention as na
    from deformattn.models.dat import DAT

    torch.manual_seed(0)
    model = DAT(version="pp", img_size=32, num_classes=10, patch_size=2, conv_stem=False, dims=(24, 48, 96, 192),
                stage_spec=("NNN", "ND", "ND", "D"), num_heads=(1, 2, 4, 8), nat_kernel_sizes=(5, 5, 3, 3),
                offset_groups=(1, 1, 2, 4), strides=(4, 2, 1, 1), offset_kernel_sizes=(7, 5, 3, 3)).eval()
    plans, counts = [], []
    original = na.tile_plan
    monkeypatch.setattr(na, "tile_plan", lambda *a, **k: plans.append(a[:2]) or original(*a, **k))
    stage = model.stages[0]
    with torch.no_grad():
        feats = model.patch_proj(torch.randn(2, 3, 41, 53, generator=torch.Generator().manual_seed(1)))
        _traced_matches_eager(stage, tuple(feats.shape), [(1, 24, 17, 30), (2, 24, 9, 12)],
                              traced_hook=lambda: counts.append(len(plans)))
    assert counts == [1]  # one plan in the trace of three neighborhood blocks


def test_input_checks_hold_while_tracing():
    """The size checks read the example's values while torch.jit.trace records (no size fixed, no warning) and still
    refuse a bad input."""
    import warnings

    from deformattn.export import set_sampler
    from deformattn.models import create_model

    model = create_model("dat_nano", num_classes=3).eval()
    set_sampler(model, "gather")  # plain ops, as the exports trace it
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        with pytest.raises(ValueError, match="too small"):
            torch.jit.trace(model, (torch.randn(1, 3, 8, 40),), check_trace=False)
        with pytest.raises(ValueError, match="channels"):
            torch.jit.trace(model, (torch.randn(1, 4, 40, 40),), check_trace=False)
        torch.jit.trace(model, (torch.randn(1, 3, 40, 44),), check_trace=False)  # a valid size traces cleanly


def test_trace_example_is_the_smallest_generic_size():
    """A dynamic export traces at the smallest generic size, not at the export size: 6 total strides for a DAT without
    window attention, 8 where shifted windows need two windows of 7 in every stage map (and for other modules)."""
    from deformattn.export.trace import capture, trace_steps
    from deformattn.export.verify import spatial_step
    from deformattn.models import create_model

    pp, v1 = create_model("dat_nano").eval(), create_model("dat_v1_nano").eval()
    assert (trace_steps(pp), trace_steps(v1), trace_steps(torch.nn.Conv2d(3, 3, 1))) == (6, 8, 8)
    shapes = []
    _, xt, info = capture(pp, torch.randn(2, 3, 320, 320), True, lambda x, dyn: shapes.append(tuple(x.shape)), "t")
    step = spatial_step(pp)
    assert shapes == [tuple(xt.shape)] == [(2, 3, 6 * step + 3, 7 * step + 5)]  # below the export size 320
    assert info["dynamic_spatial"]
