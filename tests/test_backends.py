"""The data path: backends are functions of tensors chosen by one dispatcher; the CUDA-only branches forced on the
CPU; inputs in every memory layout (channels_last, non-contiguous) give the contiguous result."""
from __future__ import annotations

import logging
import pytest
import torch

import deformattn.backends.fast as fast
import deformattn.backends.reference as reference
from deformattn import DeformableAttention2d
from deformattn import functional as DF
from deformattn.backends import DEFORMABLE_OP, Problem, backend_names, get_backend, register_backend, select_backend
from deformattn.layers import NeighborhoodAttention2d, neighborhood_attention2d
from deformattn.layers.neighborhood_attention import NEIGHBORHOOD_OP
from deformattn.layers.window_attention import WindowAttention


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Small problems: one thread (see conftest.one_thread_module)."""


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("DEFORMATTN_BACKEND", raising=False)


# ---------------------------------------------------------------------------------------------------------------
# the dispatcher
# ---------------------------------------------------------------------------------------------------------------
def _toy_op(name: str):
    """A private op with a backend that refuses float64 and one that runs anything."""
    picky = register_backend(name, "picky", lambda t: t + 1,
                             lambda p: "no float64" if p.dtype == torch.float64 else None)
    plain = register_backend(name, "plain", lambda t: t + 2, plain_ops=True)
    return picky, plain


def test_dispatcher_picks_the_first_backend_that_can_run_and_logs_why(caplog):
    picky, plain = _toy_op("toy_first")
    caplog.set_level(logging.DEBUG, logger="deformattn.backends")
    assert select_backend("toy_first", Problem.of(torch.ones(2))) is picky
    assert select_backend("toy_first", Problem.of(torch.ones(2, dtype=torch.float64))) is plain
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["toy_first: backend 'picky' (first in preference order)",
                     "toy_first: backend 'plain' ('picky' skipped: no float64)"]
    # plain ops asked for: the automatic choice skips the others, a named one still runs
    assert select_backend("toy_first", Problem.of(torch.ones(2), plain_ops=True)) is plain
    assert select_backend("toy_first", Problem.of(torch.ones(2), plain_ops=True), "picky") is picky


def test_dispatcher_errors_name_the_backend_and_the_reason(monkeypatch):
    _toy_op("toy_errors")
    f64 = Problem.of(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"owner: backend 'picky' \(from backend\) cannot run this input: no float64"):
        select_backend("toy_errors", f64, "picky", owner="owner")
    with pytest.raises(ValueError, match=r"toy_errors: backend must be one of \('picky', 'plain'\), got 'fast'"):
        select_backend("toy_errors", f64, "fast")
    with pytest.raises(ValueError, match="no backend is registered for op 'no_such_op'"):
        select_backend("no_such_op", f64)
    # $DEFORMATTN_BACKEND: a name of this op is a request; a name only other ops know is ignored; else an error
    monkeypatch.setenv("DEFORMATTN_BACKEND", "picky")
    with pytest.raises(ValueError, match=r"from \$DEFORMATTN_BACKEND\) cannot run this input: no float64"):
        select_backend("toy_errors", f64)
    monkeypatch.setenv("DEFORMATTN_BACKEND", "plain")
    assert select_backend("toy_errors", f64).name == "plain"
    assert select_backend(DEFORMABLE_OP, f64).name == "fast"  # 'plain' is not a deformable backend
    monkeypatch.setenv("DEFORMATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"\$DEFORMATTN_BACKEND must be one of"):
        select_backend(DEFORMABLE_OP, f64)


def test_unknown_backend_names_raise_for_both_layers():
    x = torch.randn(1, 8, 9, 9)
    for make in (lambda b: DeformableAttention2d(8, 2, q_size=9, backend=b),
                 lambda b: NeighborhoodAttention2d(8, 3, 2, backend=b)):
        with pytest.raises(ValueError, match=r"backend must be None or one of \('fast', 'reference'\), got 'cuda'"):
            make("cuda")
        m = make(None)
        m.backend = "cuda"  # set after construction: the dispatcher catches it at the call
        with pytest.raises(ValueError, match=r"backend must be one of \('fast', 'reference'\), got 'cuda'"):
            m(x)
    assert backend_names(DEFORMABLE_OP) == backend_names(NEIGHBORHOOD_OP) == ("fast", "reference")


def test_a_named_backend_that_cannot_run_raises():
    q = torch.randn(1, 2, 5, 5, 4)
    for backend in ("fast", "reference"):
        with pytest.raises(ValueError, match=r"backend 'fast'|backend 'reference'") as err:
            neighborhood_attention2d(q, q, q, None, 7, backend=backend)
        assert "must be at least kernel_size x kernel_size (7x7)" in str(err.value)
    with pytest.raises(ValueError, match="no backend can run this input"):
        neighborhood_attention2d(q, q, q, None, 7)


def test_sampler_gather_runs_the_plain_reference_unless_named(caplog):
    m = DeformableAttention2d(16, 4, stride=2, q_size=8, sampler="gather")
    x = torch.randn(1, 16, 8, 8)
    caplog.set_level(logging.DEBUG, logger="deformattn.backends")
    m(x)
    assert "deformable_attention: backend 'reference' ('fast' skipped: not plain ops" in caplog.records[-1].getMessage()
    m.backend = "fast"
    m(x)
    assert caplog.records[-1].getMessage() == "deformable_attention: backend 'fast', requested by backend"


def test_backends_import_nothing_above_them():
    """backends/ imports only torch, the standard library, functional.py, _shapes.py and each other: no module class, no
    layer, no model (no cycle back up the data path)."""
    import ast
    from pathlib import Path

    allowed = {"functional", "_shapes", "fast", "reference", "dispatch"}  # _shapes: a leaf
    for path in Path(fast.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    assert name.split(".")[0] in allowed, f"{path.name} imports .{name}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not (mod or "").startswith("deformattn"), f"{path.name} imports {mod}"
    assert "fast" in backend_names(DEFORMABLE_OP)


# ---------------------------------------------------------------------------------------------------------------
# the backends as functions of tensors
# ---------------------------------------------------------------------------------------------------------------
def _tensors(kind: str, dtype=torch.float64, B=2, nH=4, G=2, H=6, W=7, Hk=3, Wk=4, hc=5):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = r(B, nH, H * W, hc), r(B, nH, Hk * Wk, hc), r(B, nH, Hk * Wk, hc)
    pos = (torch.rand(B * G, Hk, Wk, 2, generator=g, dtype=dtype) * 2.2 - 1.1).requires_grad_(True)
    params = {"table": (r(nH, 2 * H - 1, 2 * W - 1),), "fixed": (r(nH, H * W, Hk * Wk),),
              "log_cpb": (r(32, 2), r(32), r(nH // G, 32))}[kind]
    return q, k, v, pos, DF.PositionBias(kind, params, G)


@pytest.mark.parametrize("kind", ["table", "fixed", "log_cpb"])
def test_fast_and_reference_are_functions_of_tensors(kind):
    q, k, v, pos, bias = _tensors(kind)
    outs = {}
    for name, fn in (("reference", reference.forward), ("fast", fast.forward)):
        y = fn(q, k, v, pos, bias, H=6, W=7, scale=0.3)
        grads = torch.autograd.grad(y.square().sum(), (q, k, v, pos, *bias.params), allow_unused=True,
                                    materialize_grads=True)  # the fixed bias does not read the positions
        outs[name] = (y, *grads)
    for a, b in zip(outs["reference"], outs["fast"]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["table", "log_cpb"])
def test_generic_attention_branch_forced_on_cpu(kind, monkeypatch):
    """The recomputing backward's attention without the private CPU kernel: the branch CUDA and other devices run."""
    calls = []
    real = torch.logsumexp
    monkeypatch.setattr(torch, "logsumexp", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, pos, bias = _tensors(kind)
    ref = reference.forward(q, k, v, pos, bias, H=6, W=7, scale=0.3)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, pos, *bias.params))
    with fast.tuning(save_elems=0, block_elems=64, cpu_flash=False):
        y = fast.forward(q, k, v, pos, bias, H=6, W=7, scale=0.3)
        grads = torch.autograd.grad(y.square().sum(), (q, k, v, pos, *bias.params))
    assert calls, "the generic branch did not run"
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    assert fast._CPU_FLASH and fast._SAVE_ELEMS > 0  # restored


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_inference_arena_gives_the_bits_of_separate_allocations(dtype):
    """In inference the output and the window gather's per-block intermediates are views of one allocation: the
    same bits as allocating them one by one, over blocks of rows whose last one is shorter, and the result is the
    reference's; the heads merge back into channels with a view."""
    q, k, v, pos, bias = (t.detach() if isinstance(t, torch.Tensor) else t for t in _tensors("table", dtype=dtype,
                                                                                           H=7, W=5))
    bias = DF.PositionBias("table", tuple(p.detach() for p in bias.params), bias.groups)
    outs = {}
    with torch.inference_mode():
        for arena_bytes in (1 << 30, 0):
            with fast.tuning(block_elems=2 * 4 * 5 * 12 * 3, min_rows=0, arena_bytes=arena_bytes):  # blocks of 3 rows
                outs[arena_bytes] = fast.forward(q, k, v, pos, bias, H=7, W=5, scale=0.3)
        ref = reference.forward(q, k, v, pos, bias, H=7, W=5, scale=0.3)
    one, separate = outs[1 << 30], outs[0]
    assert torch.equal(one, separate)
    nbytes = one.numel() * one.element_size()
    assert one.untyped_storage().nbytes() > nbytes, "the output did not share its allocation"
    assert separate.untyped_storage().nbytes() == nbytes
    for y in (one, separate):
        assert y.transpose(1, 2).is_contiguous()  # B, H*W, nH, hc: the caller's head merge is a view
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(one, ref, rtol=tol, atol=tol)
    assert fast._ARENA_MAX_BYTES == 32 << 20  # restored


def test_tuning_validates_its_arguments():
    with pytest.raises(ValueError, match="tuning: block_elems must be an int >= 0, got -1"):
        with fast.tuning(block_elems=-1):
            pass


# ---------------------------------------------------------------------------------------------------------------
# memory layouts: channels_last and non-contiguous inputs give the contiguous result, forward and backward
# ---------------------------------------------------------------------------------------------------------------
def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    B, C, H, W = x.shape
    wide = torch.zeros(B, C, H, 2 * W, dtype=x.dtype)
    wide[..., ::2] = x
    return {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": wide[..., ::2],  # every other column of a wider map
        "permuted": x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) * 1.0,
        "expanded-batch": x[:1].expand(B, C, H, W) if B > 0 else x,
    }


def _forward_backward(m: torch.nn.Module, x: torch.Tensor):
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = m(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
    return [y.detach(), x.grad] + [p.grad for p in m.parameters() if p.grad is not None]


LAYERS = {
    "deformable-table-fast": lambda: DeformableAttention2d(16, 4, offset_groups=2, stride=2, q_size=(9, 11),
                                                           backend="fast"),
    "deformable-table-reference": lambda: DeformableAttention2d(16, 4, offset_groups=2, stride=2, q_size=(9, 11),
                                                                backend="reference"),
    "deformable-log_cpb-fast": lambda: DeformableAttention2d(16, 4, offset_groups=2, stride=2, pos_bias="log_cpb",
                                                             backend="fast"),
    "deformable-gather": lambda: DeformableAttention2d(16, 4, offset_groups=2, stride=1, q_size=(9, 11),
                                                       version="v1", sampler="gather"),
    "neighborhood-fast": lambda: NeighborhoodAttention2d(16, 5, 4, backend="fast"),
    "neighborhood-reference": lambda: NeighborhoodAttention2d(16, 5, 4, backend="reference"),
    "window-shifted": lambda: WindowAttention(16, 4, 4, shift_size=2, fmap_size=(9, 11)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layouts_give_the_contiguous_result(layer):
    torch.manual_seed(0)
    m = LAYERS[layer]().double()
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    if layer.startswith("deformable"):
        with torch.no_grad():
            m.conv_offset[-1].weight.mul_(10.0)  # offsets of a few pixels
    base = _forward_backward(m, x.contiguous())
    for name, xl in _layouts(x).items():
        if name == "expanded-batch":
            base_e = _forward_backward(m, x[:1].expand_as(x).contiguous())
            got = _forward_backward(m, xl)
            for a, b in zip(base_e, got):
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
            continue
        got = _forward_backward(m, xl)
        for a, b in zip(base, got):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


def test_the_selected_backend_runs():
    """The module calls the backend the dispatcher returns (and nothing else)."""
    seen = []
    ref = get_backend(DEFORMABLE_OP, "reference")
    m = DeformableAttention2d(16, 4, stride=2, q_size=8, backend="reference")
    x = torch.randn(1, 16, 8, 8)
    original = reference.forward
    register_backend(DEFORMABLE_OP, "reference", lambda *a, **kw: seen.append(1) or original(*a, **kw),
                     ref.can_run, plain_ops=True)
    try:
        m(x)
    finally:
        register_backend(DEFORMABLE_OP, "reference", original, ref.can_run, plain_ops=True)
    assert seen == [1]
