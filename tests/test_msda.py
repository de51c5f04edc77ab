"""Multi-scale deformable attention: official fixtures on both paths, fast vs reference on awkward inputs, gradcheck,
autocast, empty inputs, validation and backend choice."""
from __future__ import annotations

import logging
import math

import pytest
import torch

import deformattn
from deformattn import MultiScaleDeformableAttention
from deformattn.backends import msda_fast
from deformattn.functional import multi_scale_deformable_attention as msda
from deformattn.ops import msda as msda_ops

from conftest import fixture_files, fixtures_dir

FIXTURE_FILES = fixture_files(("msda_",), kind="msda")
BACKENDS = ("reference", "fast")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.fixture(autouse=True)
def _one_thread(one_thread_module):
    yield


def _require_fixtures() -> None:
    fixtures_dir("msda", "msda_*.pt")  # skips when absent, fails under CI=true


@pytest.fixture(params=["bordered", "direct"])
def form(request):
    """Both forms of the fast path whatever the sizes: the zero-bordered table with the sorted value gradient
    (many points per key) and the direct reads with ``index_add_`` (few points per key)."""
    with msda_fast.tuning(direct_ratio=0.0 if request.param == "bordered" else math.inf):
        yield request.param


def _functions_run(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``out`` (which custom Function ran)."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or type(fn).__name__ in seen:
            continue
        seen.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return seen


def test_fast_form_follows_points_per_key():
    """The direct form runs iff the corner reads number at most ``direct_ratio`` (2) per value row."""
    shapes = [(6, 7), (3, 4)]  # S = 54
    for Lq, expected in ((3, "direct"), (30, "bordered")):  # 3 * M * L * P * 4 = 96 <= 2 * S * M = 216 < 960
        assert msda_fast.fast_form(1, Lq, 2, 2, 2, 54) == expected
        value, loc, attn = _inputs(shapes, N=1, Lq=Lq, M=2, D=3, P=2)
        out = msda(value.requires_grad_(), shapes, loc, attn, backend="fast")
        ran = _functions_run(out)
        names = ["_DirectFunctionBackward", "_SampleFunctionBackward"]
        if expected != "direct":
            names.reverse()
        assert names[0] in ran and names[1] not in ran, ran


def test_tuning_restores_and_checks():
    """``tuning`` changes the knobs inside the block only and rejects bad values, naming them."""
    assert msda_fast.fast_form(1, 30, 2, 2, 2, 54) == "bordered"
    with msda_fast.tuning(direct_ratio=math.inf, fwd_block_points=7, bwd_block_points=5):
        assert msda_fast.fast_form(1, 30, 2, 2, 2, 54) == "direct"
    assert msda_fast.fast_form(1, 30, 2, 2, 2, 54) == "bordered"
    bad = (({"fwd_block_points": 0}, "fwd_block_points"), ({"bwd_block_points": 2.5}, "bwd_block_points"),
           ({"direct_ratio": -1.0}, "direct_ratio"), ({"direct_ratio": math.nan}, "direct_ratio"))
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            with msda_fast.tuning(**kwargs):
                pass


def test_fixture_folder_helper(tmp_path, monkeypatch):
    """One helper for every fixture kind: $DEFORMATTN_FIXTURES_ROOT/<kind>; missing skips, under CI=true fails."""
    monkeypatch.delenv("DEFORMATTN_FIXTURES", raising=False)
    monkeypatch.setenv("DEFORMATTN_FIXTURES_ROOT", str(tmp_path))
    (tmp_path / "msda").mkdir()
    (tmp_path / "msda" / "msda_a.pt").write_bytes(b"x")
    assert fixtures_dir("msda", "msda_*.pt") == tmp_path / "msda"
    assert fixture_files(("msda_",), kind="msda") == [tmp_path / "msda" / "msda_a.pt"]
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="official_dat fixture folder not found"):
        fixtures_dir("official_dat")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="official_dat fixture folder not found"):
        fixtures_dir("official_dat")
    monkeypatch.setenv("DEFORMATTN_FIXTURES", str(tmp_path / "msda"))  # the kind's own variable wins
    assert fixtures_dir("official_dat") == tmp_path / "msda"


def _inputs(shapes, N=2, Lq=7, M=3, D=5, P=3, dtype=torch.float64, spread=(-0.25, 1.25), seed=0):
    """Random inputs (never zeros); locations spread beyond [0, 1] so that some corners fall outside."""
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    lo, hi = spread
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=dtype) + 0.1
    return value, loc, attn


def _close(a, b, dtype, what):
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= TOL[dtype] * max(1.0, b.abs().max().item() if b.numel() else 1.0), f"{what}: max abs err {err}"


# ---------------------------------------------------------------------------------------------------------------
# Official fixtures
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", FIXTURE_FILES or [None], ids=lambda p: p.stem if p else "missing")
@pytest.mark.usefixtures("form")
def test_official_fixture(path, backend, monkeypatch):
    _require_fixtures()
    fx = torch.load(path, weights_only=True)
    assert fx["kind"] == "msda"
    m = MultiScaleDeformableAttention(**fx["config"], backend=backend).double()
    m.load_state_dict(fx["state_dict"], strict=True)
    captured = {}
    core = deformattn.msda.multi_scale_deformable_attention

    def spy(value, shapes, locations, weights, **kw):
        captured["sampling_locations"], captured["attention_weights"] = locations.detach(), weights.detach()
        return core(value, shapes, locations, weights, **kw)

    monkeypatch.setattr(deformattn.msda, "multi_scale_deformable_attention", spy)
    inputs = {k: (v.clone().requires_grad_() if k in ("query", "reference_points", "input_flatten") else v)
              for k, v in fx["inputs"].items()}
    out = m(**inputs)
    for key, got in (("output", out.detach()), ("sampling_locations", captured["sampling_locations"]),
                     ("attention_weights", captured["attention_weights"])):
        assert (got - fx[key]).abs().max().item() <= 1e-10, key
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(fx["grad_seed"]), dtype=out.dtype)
    (out * g).sum().backward()
    grads = {k: inputs[k].grad for k in ("query", "reference_points", "input_flatten")}
    grads.update({name: p.grad for name, p in m.named_parameters()})
    assert set(fx["grads"]) == set(grads)
    for name, expected in fx["grads"].items():
        assert (grads[name] - expected).abs().max().item() <= 1e-10, name


def test_fixture_cases_cover_the_readme_list():
    _require_fixtures()
    names = {torch.load(p, weights_only=True)["name"] for p in FIXTURE_FILES}
    assert {"ddetr_default_4lvl", "two_level_boxes", "tiny_levels_1x1", "encoder_self_attn"} <= names


# ---------------------------------------------------------------------------------------------------------------
# Fast path vs reference
# ---------------------------------------------------------------------------------------------------------------
SHAPE_CASES = {
    "odd_nonsquare": [(5, 7), (3, 2), (1, 1)],
    "one_level": [(6, 4)],
    "tall_thin": [(9, 1), (1, 6)],
    "empty_level": [(4, 3), (0, 5), (2, 2)],
    "empty_last_level": [(3, 3), (2, 0)],
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
@pytest.mark.usefixtures("form")
def test_fast_matches_reference(case, dtype):
    shapes = SHAPE_CASES[case]
    value, loc, attn = _inputs(shapes, dtype=dtype)
    outs, grads = {}, {}
    g = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=dtype)
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = msda(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
        outs[backend] = out.detach()
        grads[backend] = torch.autograd.grad(out, leaves, g)
    _close(outs["fast"], outs["reference"], dtype, "output")
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), grads["fast"], grads["reference"]):
        _close(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("Lq", [1, 3, 60])
@pytest.mark.usefixtures("form")
def test_fast_value_gradient_both_ways(Lq):
    """Few queries on a large map take the direct scatter of the value gradient (corner contributions <= rows of
    the zero-bordered table: 2*Lq*2*2*3*4 vs 2*(11*13 + 7*8)*2 = 796), many take the sorted gather."""
    shapes = [(9, 11), (5, 6)]
    value, loc, attn = _inputs(shapes, N=2, Lq=Lq, M=2, D=3, P=3)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = msda(leaves[0], shapes, leaves[1], leaves[2], backend="reference")
    fast = msda(leaves[0], shapes, leaves[1], leaves[2], backend="fast")
    _close(fast, ref, torch.float64, "output")
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, leaves, g), torch.autograd.grad(ref, leaves, g)):
        _close(a, b, torch.float64, "grad")


@pytest.mark.usefixtures("form")
def test_fast_matches_reference_many_blocks():
    """Blocks of a few points: the query blocking and the sorted value scatter across blocks."""
    shapes = [(6, 5), (3, 3)]
    value, loc, attn = _inputs(shapes, N=3, Lq=23, M=2, D=4, P=2)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = msda(*leaves[:1], shapes, *leaves[1:], backend="reference")
    g = torch.randn_like(ref)
    with msda_fast.tuning(fwd_block_points=50, bwd_block_points=37):
        fast = msda(*leaves[:1], shapes, *leaves[1:], backend="fast")
        _close(fast, ref, torch.float64, "output")
        for a, b in zip(torch.autograd.grad(fast, leaves, g), torch.autograd.grad(ref, leaves, g)):
            _close(a, b, torch.float64, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.usefixtures("form")
def test_non_contiguous_inputs(backend):
    shapes = [(4, 5), (2, 3)]
    value, loc, attn = _inputs(shapes, N=2, Lq=6, M=3, D=4, P=2)
    expected = msda(value, shapes, loc, attn, backend="reference")
    v = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # N, S, M, D with heads outermost in memory
    lc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    at = attn.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (v.is_contiguous() or lc.is_contiguous() or at.is_contiguous())
    leaves = [t.requires_grad_() for t in (v, lc, at)]
    out = msda(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
    _close(out, expected, torch.float64, "output")
    g = torch.randn(out.shape[::-1], dtype=out.dtype).permute(2, 1, 0)  # a strided output gradient too
    ref_leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    ref = msda(ref_leaves[0], shapes, ref_leaves[1], ref_leaves[2], backend="reference")
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, ref_leaves, g)):
        _close(a, b, torch.float64, "grad")


def test_gather_form_matches_reference():
    """The plain-operation form that export and compile run."""
    shapes = [(5, 7), (0, 3), (2, 3), (1, 1)]
    value, loc, attn = _inputs(shapes, spread=(-0.6, 1.6))
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = msda(leaves[0], shapes, leaves[1], leaves[2], backend="reference")
    got = msda_ops.msda_gather(leaves[0], torch.tensor(shapes), leaves[1], leaves[2])
    _close(got, ref, torch.float64, "output")
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(ref, leaves, g)):
        _close(a, b, torch.float64, "grad")


@pytest.mark.usefixtures("form")
def test_locations_on_pixel_borders_and_far_outside():
    """Integer pixel coordinates (floor boundaries), the map edges, and locations far outside / huge."""
    shapes = [(4, 5), (2, 3)]
    value, loc, attn = _inputs(shapes, N=1, Lq=6, M=2, P=4)
    W = torch.tensor([5.0, 3.0], dtype=torch.float64).view(1, 1, 1, 2, 1)
    H = torch.tensor([4.0, 2.0], dtype=torch.float64).view(1, 1, 1, 2, 1)
    loc[0, 0, ..., 0], loc[0, 0, ..., 1] = (torch.arange(4.0, dtype=torch.float64) + 0.5) / W[0], 0.5 / H[0]
    loc[0, 1] = 0.0
    loc[0, 2] = 1.0
    loc[0, 3, ..., 0] = -0.5 / W[0]  # exactly one pixel left of the first centre: x0 = -1, fx = 0
    loc[0, 4] = 1e6
    loc[0, 5] = -1e6
    outs, grads = {}, {}
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = msda(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
        outs[backend] = out.detach()
        grads[backend] = torch.autograd.grad(out.sum(), leaves)
    _close(outs["fast"], outs["reference"], torch.float64, "output")
    assert outs["fast"][0, 4:].abs().max() == 0  # far outside reads zeros
    for a, b in zip(grads["fast"], grads["reference"]):
        _close(a, b, torch.float64, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.usefixtures("form")
def test_gradcheck(backend):
    shapes = [(3, 4), (2, 1)]
    value, loc, attn = _inputs(shapes, N=2, Lq=3, M=2, D=2, P=2, spread=(-0.1, 1.1))
    leaves = tuple(t.clone().requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(lambda v, l, a: msda(v, shapes, l, a, backend=backend), leaves, eps=1e-6,
                                    atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, Lq", [(0, 4), (2, 0), (0, 0)])
@pytest.mark.usefixtures("form")
def test_empty_batch_or_queries(backend, N, Lq):
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = _inputs(shapes, N=N, Lq=Lq)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = msda(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
    assert out.shape == (N, Lq, value.shape[2] * value.shape[3])
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    for leaf, grad in zip(leaves, grads):
        assert grad is None or (grad.shape == leaf.shape and not grad.any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.usefixtures("form")
def test_all_levels_empty(backend):
    shapes = [(0, 3), (2, 0)]
    value, loc, attn = _inputs(shapes, N=2, Lq=3)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = msda(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
    assert out.shape == (2, 3, value.shape[2] * value.shape[3]) and not out.any()
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(not g.any() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_batch_zero(backend):
    m = MultiScaleDeformableAttention(d_model=16, n_levels=2, n_heads=2, n_points=2, backend=backend)
    shapes = torch.tensor([[3, 4], [2, 2]])
    out = m(torch.randn(0, 5, 16), torch.rand(0, 5, 2, 2), torch.randn(0, 16, 16), shapes, torch.tensor([0, 12]))
    assert out.shape == (0, 5, 16)


# ---------------------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_sample_in_float32(backend, low):
    shapes = [(5, 6), (3, 3)]
    value, loc, attn = _inputs(shapes, dtype=torch.float32)
    v16, l16, a16 = value.to(low), loc.to(low), attn.to(low)
    out = msda(v16, shapes, l16, a16, backend=backend)
    assert out.dtype == low
    expected = msda(v16.float(), shapes, l16.float(), a16.float(), backend=backend)
    assert torch.equal(out, expected.to(low))  # computed in float32, rounded once


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_under_autocast(backend, monkeypatch):
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(d_model=32, n_levels=2, n_heads=4, n_points=2, backend=backend)
    with torch.no_grad():
        m.sampling_offsets.weight.normal_(0, 0.05)
        m.attention_weights.weight.normal_(0, 0.05)
    shapes = torch.tensor([[6, 5], [3, 3]])
    q, x = torch.randn(2, 9, 32), torch.randn(2, 39, 32)
    ref = torch.rand(2, 9, 2, 2)
    dtypes = {}
    attr = "msda_fast" if backend == "fast" else "msda_reference"
    real = getattr(msda_ops, attr)

    def spy(value, *args):
        dtypes["value"], dtypes["autocast"] = value.dtype, torch.is_autocast_enabled("cpu")
        return real(value, *args)

    monkeypatch.setattr(msda_ops, attr, spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(q, ref, x, shapes, torch.tensor([0, 30]))
    assert dtypes == {"value": torch.float32, "autocast": False}
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.no_grad():
        full = m(q, ref, x, shapes)
    assert (out.float() - full).abs().max() < 0.05 * full.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# Module: official parameters and initialisation
# ---------------------------------------------------------------------------------------------------------------
def test_official_parameter_names_shapes_and_init():
    m = MultiScaleDeformableAttention(d_model=64, n_levels=3, n_heads=4, n_points=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (48, 64), "sampling_offsets.bias": (48,),
        "attention_weights.weight": (24, 64), "attention_weights.bias": (24,),
        "value_proj.weight": (64, 64), "value_proj.bias": (64,),
        "output_proj.weight": (64, 64), "output_proj.bias": (64,),
    }
    assert not m.sampling_offsets.weight.any() and not m.attention_weights.weight.any()
    assert not m.attention_weights.bias.any() and not m.value_proj.bias.any() and not m.output_proj.bias.any()
    bias = m.sampling_offsets.bias.view(4, 3, 2, 2)  # M, L, P, (x, y)
    for h in range(4):
        theta = 2 * math.pi * h / 4
        d = torch.tensor([math.cos(theta), math.sin(theta)])
        d = d / d.abs().max()
        for p in range(2):
            assert torch.allclose(bias[h, :, p], (p + 1) * d.expand(3, 2), atol=1e-6)
    bound = math.sqrt(6 / 128)  # xavier_uniform on 64 x 64
    assert m.value_proj.weight.abs().max() <= bound and m.value_proj.weight.std() > bound / 3


def test_initial_module_samples_on_a_ring_around_the_reference_point(monkeypatch):
    m = MultiScaleDeformableAttention(d_model=16, n_levels=1, n_heads=4, n_points=2)
    seen = {}
    core = deformattn.msda.multi_scale_deformable_attention

    def spy(value, shapes, loc, weights, **kw):
        seen["loc"], seen["w"] = loc, weights
        return core(value, shapes, loc, weights, **kw)

    monkeypatch.setattr(deformattn.msda, "multi_scale_deformable_attention", spy)
    shapes = torch.tensor([[8, 10]])
    m(torch.randn(1, 1, 16), torch.full((1, 1, 1, 2), 0.5), torch.randn(1, 80, 16), shapes)
    pixels = (seen["loc"][0, 0, :, 0] - 0.5) * torch.tensor([10.0, 8.0])  # M, P, 2 offsets in pixels
    assert torch.allclose(pixels[0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]), atol=1e-6)  # head 0 points along +x
    assert torch.allclose(seen["w"], torch.full_like(seen["w"], 0.5))  # uniform over L * P = 2


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
def _good():
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = _inputs(shapes, N=2, Lq=5, M=2, D=4, P=3, dtype=torch.float32)
    return value, torch.tensor(shapes), loc, attn


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: a.update(value=a["value"][0]), ValueError, r"value must have shape \(N, S, M, D\)"),
    (lambda a: a.update(value=a["value"].numpy()), TypeError, "value must be a torch.Tensor"),
    (lambda a: a.update(value=a["value"].long()), TypeError, "value must be a floating-point"),
    (lambda a: a.update(value=a["value"][:, :-1]), ValueError,
     r"cover sum\(H \* W\) = 16 keys but value has S = 15"),
    (lambda a: a.update(spatial_shapes=a["spatial_shapes"].float()), TypeError, "spatial_shapes must be an integer"),
    (lambda a: a.update(spatial_shapes=a["spatial_shapes"].view(-1)), ValueError,
     r"spatial_shapes must have shape \(L, 2\)"),
    (lambda a: a.update(spatial_shapes=torch.tensor([[3, 4], [2, 2], [0, 0]])), ValueError, "has 2 levels"),
    (lambda a: a.update(spatial_shapes=torch.tensor([[4, 4], [-1, 0]])), ValueError, "non-negative"),
    (lambda a: a.update(spatial_shapes="3x4"), TypeError, "spatial_shapes must be a Tensor"),
    (lambda a: a.update(sampling_locations=a["sampling_locations"][..., :1]), ValueError, "2 coordinates"),
    (lambda a: a.update(sampling_locations=a["sampling_locations"][:1]), ValueError, "in N and M"),
    (lambda a: a.update(sampling_locations=a["sampling_locations"][:, :, :1]), ValueError, "in N and M"),
    (lambda a: a.update(sampling_locations=a["sampling_locations"][0]), ValueError, r"\(N, Lq, M, L, P, 2\)"),
    (lambda a: a.update(attention_weights=a["attention_weights"][..., :2]), ValueError, "attention_weights must"),
    (lambda a: a.update(attention_weights=a["attention_weights"][:, :4]), ValueError, "attention_weights must"),
    (lambda a: a.update(level_start_index=torch.tensor([0, 11])), ValueError, r"\[0, 12\]"),
    (lambda a: a.update(level_start_index=torch.tensor([0])), ValueError, r"level_start_index must have shape \(2,\)"),
    (lambda a: a.update(level_start_index=torch.tensor([0.0, 12.0])), TypeError, "level_start_index must be an int"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend must be None or one of"),
])
def test_functional_validation(mutate, exc, match):
    value, shapes, loc, attn = _good()
    args = {"value": value, "spatial_shapes": shapes, "sampling_locations": loc, "attention_weights": attn,
            "level_start_index": torch.tensor([0, 12]), "backend": None}
    mutate(args)
    with pytest.raises(exc, match=match):
        msda(args.pop("value"), args.pop("spatial_shapes"), args.pop("sampling_locations"),
             args.pop("attention_weights"), **args)


def _module_args():
    q = torch.randn(2, 5, 16)
    return {"query": q, "reference_points": torch.rand(2, 5, 2, 2), "input_flatten": torch.randn(2, 16, 16),
            "input_spatial_shapes": torch.tensor([[3, 4], [2, 2]]), "input_level_start_index": torch.tensor([0, 12]),
            "input_padding_mask": torch.zeros(2, 16, dtype=torch.bool)}


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: a.update(query=a["query"][..., :8]), ValueError, "query must have d_model = 16"),
    (lambda a: a.update(query=a["query"][0]), ValueError, r"query must have shape \(N, Len_q, C\)"),
    (lambda a: a.update(input_flatten=a["input_flatten"][:1]), ValueError, "input_flatten must have shape"),
    (lambda a: a.update(input_flatten=a["input_flatten"][:, :-1], input_padding_mask=None), ValueError,
     r"cover sum\(H \* W\) = 16 keys but input_flatten has Len_in = 15"),
    (lambda a: a.update(reference_points=torch.rand(2, 5, 2, 3)), ValueError, "2 or 4"),
    (lambda a: a.update(reference_points=torch.rand(2, 5, 3, 2)), ValueError, "n_levels, 2 or 4"),
    (lambda a: a.update(reference_points=torch.rand(2, 4, 2, 2)), ValueError, "reference_points must have shape"),
    (lambda a: a.update(input_spatial_shapes=torch.tensor([[16, 1]])), ValueError, "n_levels = 2 rows"),
    (lambda a: a.update(input_level_start_index=torch.tensor([0, 10])), ValueError, "level_start_index"),
    (lambda a: a.update(input_padding_mask=torch.zeros(2, 16)), TypeError, "input_padding_mask must be a bool"),
    (lambda a: a.update(input_padding_mask=torch.zeros(2, 15, dtype=torch.bool)), ValueError, r"\(N, Len_in\)"),
    (lambda a: a.update(query=a["query"].double()), TypeError, "query has dtype torch.float64 but the module's"),
])
def test_module_validation(mutate, exc, match):
    m = MultiScaleDeformableAttention(d_model=16, n_levels=2, n_heads=2, n_points=2)
    args = _module_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        m(**args)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"d_model": 30, "n_heads": 4}, ValueError, r"d_model \(30\) must be divisible by n_heads \(4\)"),
    ({"n_points": 0}, ValueError, "n_points must be >= 1"),
    ({"n_levels": 2.0}, TypeError, "n_levels must be an int"),
    ({"backend": "cuda"}, ValueError, "backend must be None or one of"),
])
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MultiScaleDeformableAttention(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------------------------
def test_backend_choice_through_the_one_dispatcher(caplog, monkeypatch):
    from deformattn.backends import backend_names, select_backend
    from deformattn.backends.dispatch import Problem

    assert backend_names(msda_ops.MSDA_OP) == ("fast", "reference")
    monkeypatch.delenv("DEFORMATTN_BACKEND", raising=False)
    shapes = [(4, 5), (2, 3)]
    value, loc, attn = _inputs(shapes, N=1, Lq=3, M=2, D=2, P=2)
    with caplog.at_level(logging.DEBUG, logger="deformattn.backends"):
        msda(value, shapes, loc, attn)
        assert "multi_scale_deformable_attention: backend 'fast' (first in preference order)" in caplog.text
        msda(value, shapes, loc, attn, backend="reference")
        assert "backend 'reference', requested by backend" in caplog.text
    # $DEFORMATTN_BACKEND is the dispatcher's: it picks the reference here, and the reference really runs
    monkeypatch.setenv("DEFORMATTN_BACKEND", "reference")
    calls = []
    real = msda_ops.msda_reference
    monkeypatch.setattr(msda_ops, "msda_reference", lambda *a: calls.append(1) or real(*a))
    msda(value, shapes, loc, attn)
    assert calls == [1]
    monkeypatch.setenv("DEFORMATTN_BACKEND", "turbo")
    with pytest.raises(ValueError, match=r"multi_scale_deformable_attention: \$DEFORMATTN_BACKEND must be one of"):
        msda(value, shapes, loc, attn)
    monkeypatch.delenv("DEFORMATTN_BACKEND")
    with pytest.raises(ValueError, match="backend must be None or one of"):
        msda(value, shapes, loc, attn, backend="turbo")
    with pytest.raises(ValueError, match="MultiScaleDeformableAttention: backend must be None or one of"):
        MultiScaleDeformableAttention(d_model=8, n_levels=1, n_heads=2, n_points=1, backend="turbo")
    integer = Problem(torch.device("cpu"), torch.int64)
    for name in ("fast", "reference"):
        with pytest.raises(ValueError, match="cannot run this input: needs floating-point inputs"):
            select_backend(msda_ops.MSDA_OP, integer, name)


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (1, 2)])
@pytest.mark.parametrize("Lq", [2, 40])  # the value gradient's direct scatter and sorted gather
@pytest.mark.usefixtures("form")
def test_fast_gradients_of_some_inputs(which, Lq):
    shapes = [(6, 7), (3, 4)]
    value, loc, attn = _inputs(shapes, N=1, Lq=Lq, M=2, D=3, P=2)
    grads = {}
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_(i in which) for i, t in enumerate((value, loc, attn))]
        out = msda(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
        grads[backend] = torch.autograd.grad(out.square().sum(), [leaves[i] for i in which])
    for a, b in zip(grads["fast"], grads["reference"]):
        _close(a, b, torch.float64, "grad")
