"""Export (issues 6, 14): ONNX through both exporters (the trace with torch.onnx.export(dynamo=False), and
torch.export + torch.onnx.export(dynamo=True)) run in onnxruntime, the gather-only sampler (no GridSample node),
TorchScript round trips at any size, torch.compile(fullgraph=True), and ``deformattn export``.

Every exported file is loaded back and compared with the PyTorch model on fresh random inputs. The models are small
variants covering every block kind (L, S, N, D) of each version, so the file runs in about three minutes on two
cores; the released ``dat_tiny`` / ``dat_pp_tiny`` are exported in the ``slow`` test (DEFORMATTN_SLOW=1) and in
``benchmarks/export.py``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deformattn import DeformableAttention2d
from deformattn.export import (
    DEFAULT_TOLERANCES,
    ExportVerificationError,
    export_model,
    onnx_op_counts,
    set_sampler,
)
from deformattn.models import create_model

ATOL = RTOL = 1e-4

# every block kind in each version: L (window), S (shifted window), N (neighborhood), D (deformable)
TINY = dict(stage_spec=("L", "S", "N", "D"), dims=(8, 16, 16, 32), stem_dim=8, num_heads=(1, 2, 2, 4),
            offset_groups=(1, 1, 1, 2), window_sizes=4, num_classes=5)
TINY_MODELS = {"v1": "dat_v1_nano", "pp": "dat_nano"}  # v1: table bias + tanh-bounded offsets; pp: clamped


def _tiny(version: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(TINY_MODELS[version], **TINY)
    _randomize_tables(model)
    return model


def _randomize_tables(model: nn.Module) -> None:
    """Bias tables start near zero; make them matter so that a wrong sampler would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DeformableAttention2d) and isinstance(m.rpe_table, nn.Parameter):
                m.rpe_table.normal_()


def _module() -> DeformableAttention2d:
    torch.manual_seed(0)
    m = DeformableAttention2d(16, 4, offset_groups=2, stride=2, q_size=12, pos_bias="table")
    _randomize_tables(m)
    return m


def _samplers(model: nn.Module) -> list[str]:
    return [m.sampler for m in model.modules() if isinstance(m, DeformableAttention2d)]


def _ort_session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_run(session, x: torch.Tensor) -> torch.Tensor:
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def _check_against_pytorch(run, model: nn.Module, shapes) -> list[float]:
    """Run ``run`` on fresh random inputs of ``shapes``; assert it matches the model, return the max abs diffs."""
    diffs = []
    gen = torch.Generator().manual_seed(123)
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            ref = model(x)
            got = run(x)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
        diffs.append(float((got - ref).abs().max()))
    return diffs


def _jit_load(path: Path):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load` is deprecated", category=FutureWarning)
        return torch.jit.load(str(path))


def _input_dims(path: Path) -> list:
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


# ---------------------------------------------------------------------------------------------------------------
# ONNX: the deformable module and small models of both versions
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def onnx_exports(request, tmp_path_factory):
    """Each model exported once per ONNX exporter with batch 2, dynamic=True, the default sampler ("gather")."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx")
    cases = {}
    for name, model, size in [("module", _module(), 12), ("v1", _tiny("v1"), 32), ("pp", _tiny("pp"), 32)]:
        model.train()  # export_model puts it in eval mode and must restore this
        before = _samplers(model)
        path = out / f"{name}.{request.param}.onnx"
        result = export_model(model, "onnx", img_size=size, dynamic=True, output=path, exporter=request.param)
        cases[name] = dict(model=model, result=result, size=size, samplers_before=before,
                           training_after=model.training, path=path, exporter=request.param)
    return cases


@pytest.mark.parametrize("name", ["module", "v1", "pp"])
def test_onnx_matches_pytorch_with_dynamic_batch(onnx_exports, name):
    case = onnx_exports[name]
    model, result, path, S = case["model"], case["result"], case["path"], case["size"]
    C = 16 if name == "module" else 3
    assert path.is_file() and result.path == str(path) and result.file_bytes == path.stat().st_size
    assert result.opset >= 16 and result.dynamic_batch and result.format == "onnx"
    assert result.method.startswith({"torchscript": "torch.jit.trace", "dynamo": "torch.export"}[case["exporter"]])
    # the export's own verification ran the file at batch 2, 1 and 3 and recorded real differences
    assert [c["shape"][0] for c in result.checks][:3] == [2, 1, 3]
    assert all(0.0 <= c["max_abs_diff"] <= c["tolerance"] for c in result.checks)
    assert _input_dims(path)[0] == "batch"  # a symbolic batch dimension in the graph
    # the model was restored: training flag and samplers as given
    assert case["training_after"] and _samplers(model) == case["samplers_before"]
    assert set(case["samplers_before"]) == {"grid_sample"}
    # independently: onnxruntime (CPU EP) at batch 1 and 3 of a file exported with batch 2, vs the PyTorch model
    model.eval()
    session = _ort_session(path)
    assert session.get_providers() == ["CPUExecutionProvider"]
    diffs = _check_against_pytorch(lambda x: _ort_run(session, x), model, [(1, C, S, S), (3, C, S, S)])
    assert max(diffs) > 0.0  # a real comparison of two implementations, not the same tensors
    model.train()


@pytest.mark.parametrize("name", ["module", "v1", "pp"])
def test_onnx_gather_sampler_has_no_gridsample(onnx_exports, name):
    counts = onnx_op_counts(onnx_exports[name]["path"])
    assert counts.get("GridSample", 0) == 0
    assert counts.get("GatherElements", 0) + counts.get("Gather", 0) > 0
    assert onnx_exports[name]["result"].op_counts == dict(counts)


def test_onnx_grid_sample_path_keeps_gridsample(tmp_path):
    """The contrast: exported with the model's own sampler, the graph has GridSample nodes (keys and bias table),
    and it still matches."""
    model = _module().eval()
    result = export_model(model, "onnx", img_size=12, output=tmp_path / "gs.onnx", sampler=None)
    # the fast backend's autograd function cannot be traced: the default exporter fell back to torch.export
    assert result.method.startswith("torch.export")
    counts = onnx_op_counts(tmp_path / "gs.onnx")
    assert counts["GridSample"] >= 2 and result.op_counts["GridSample"] == counts["GridSample"]
    session = _ort_session(tmp_path / "gs.onnx")
    _check_against_pytorch(lambda x: _ort_run(session, x), model, [(2, 16, 12, 12)])
    assert _input_dims(tmp_path / "gs.onnx") == [2, 16, 12, 12]  # dynamic=False: every size fixed


@pytest.mark.parametrize("name", ["module", "v1", "pp"])
def test_onnx_dynamic_height_and_width(onnx_exports, name):
    """Every block kind (L, S, N, D) exports with a dynamic height and width: the export itself verified the file at
    three other sizes, and onnxruntime matches PyTorch at three more (odd, non-square, not multiples of the
    model's stride), within 1e-4 relative to the outputs' scale."""
    case = onnx_exports[name]
    result, path, S, model = case["result"], case["path"], case["size"], case["model"].eval()
    C = 16 if name == "module" else 3
    assert result.dynamic_batch and result.dynamic_spatial, result.spatial_note
    assert _input_dims(path)[0] == "batch" and _input_dims(path)[2:] == ["height", "width"]
    checked = [tuple(c["shape"][2:]) for c in result.checks]
    assert len(checked) == 6 and len(set(checked[3:]) - {(S, S)}) == 3
    assert any(h % 2 and w % 2 for h, w in checked) and any(h != w for h, w in checked)
    session = _ort_session(path)
    shapes = [(1, C, S + 5, S + 5), (2, C, S + 3, S + 21), (1, C, S + 14, S + 7)]
    gen = torch.Generator().manual_seed(7)
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            ref = model(x)
        got = _ort_run(session, x)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-6
    case["model"].train()


def test_onnx_fixed_size_model_keeps_its_size(tmp_path):
    """A model whose code fixes the size (the "fixed" bias is built for one map) keeps height and width, says why,
    and the file refuses another size."""
    torch.manual_seed(0)
    model = DeformableAttention2d(16, 4, offset_groups=2, stride=2, q_size=12, pos_bias="fixed").eval()
    result = export_model(model, "onnx", img_size=12, dynamic=True, output=tmp_path / "fixed.onnx")
    assert result.dynamic_batch and not result.dynamic_spatial
    assert result.spatial_note.startswith("fixed: ") and len(result.spatial_note) > 10
    assert _input_dims(tmp_path / "fixed.onnx")[2:] == [12, 12]
    session = _ort_session(tmp_path / "fixed.onnx")
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _ort_run(session, torch.randn(1, 16, 14, 14))


def test_export_progress_lines(tmp_path):
    """progress=callable receives the steps (capture, translate, optimize, verify) with elapsed times; the result
    carries the step times."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.GELU()).eval()
    lines: list[str] = []
    result = export_model(model, "onnx", img_size=10, in_chans=3, dynamic=True, output=tmp_path / "p.onnx",
                          progress=lines.append)
    steps = [re.match(r"\[\s*[\d.]+ s\] (\w+)", line).group(1) for line in lines]
    assert steps[:3] == ["capture", "translate", "optimize"] and "verify" in steps, lines
    assert 0 < result.optimize_seconds < result.export_seconds and result.translate_seconds > 0
    lines.clear()
    export_model(model, "torchscript", img_size=10, in_chans=3, output=tmp_path / "p.pt", progress=lines.append)
    assert [ln.split("] ")[1].split(":")[0] for ln in lines][:2] == ["capture", "verify"]


def test_onnx_dynamic_spatial_where_the_model_allows(tmp_path):
    """A plain conv model gets a dynamic height and width, verified at three other sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.GELU(), nn.Conv2d(8, 4, 3, 1, 1)).eval()
    result = export_model(model, "onnx", img_size=16, in_chans=3, dynamic=True, output=tmp_path / "conv.onnx")
    assert result.dynamic_batch and result.dynamic_spatial, result.spatial_note
    assert len(result.checks) == 6 and result.checks[-1]["shape"][2:] != [16, 16]
    dims = _input_dims(tmp_path / "conv.onnx")
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # symbolic B, H, W
    session = _ort_session(tmp_path / "conv.onnx")
    _check_against_pytorch(lambda x: _ort_run(session, x), model, [(1, 3, 21, 30), (3, 3, 40, 17)])


def test_onnx_dynamic_batch_only(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.GELU()).eval()
    result = export_model(model, "onnx", img_size=(10, 14), in_chans=3, dynamic="batch", output=tmp_path / "b.onnx")
    assert result.dynamic_batch and not result.dynamic_spatial and "dynamic='batch'" in result.spatial_note
    assert _input_dims(tmp_path / "b.onnx") == ["batch", 3, 10, 14]
    session = _ort_session(tmp_path / "b.onnx")
    _check_against_pytorch(lambda x: _ort_run(session, x), model, [(1, 3, 10, 14), (5, 3, 10, 14)])
    with pytest.raises(TypeError, match="dynamic"):
        export_model(model, "onnx", img_size=10, in_chans=3, dynamic="spatial", output=tmp_path / "c.onnx")


def test_onnx_missing_extra_names_the_pip_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'deformattn[export]'")):
        export_model(_module(), "onnx", img_size=12, output=tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_model_argument_errors(tmp_path):
    m = _module()
    with pytest.raises(ValueError, match="fmt"):
        export_model(m, "tflite", img_size=12, output=tmp_path / "x")
    with pytest.raises(ValueError, match="opset"):
        export_model(m, "onnx", img_size=12, output=tmp_path / "x", opset=15)
    with pytest.raises(ValueError, match="directory"):
        export_model(m, "onnx", img_size=12, output=tmp_path)
    with pytest.raises(ValueError, match="minimum input size"):
        export_model(_tiny("pp"), "torchscript", img_size=8, output=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# the gather sampler: equal to grid_sample, forward and gradients, in the module
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version,pos_bias", [("pp", "table"), ("v1", "table"), ("pp", "log_cpb")])
def test_gather_sampler_module_forward_and_gradients(version, pos_bias):
    """(tests/test_attention.py checks the functional sampler's values and gradients against grid_sample; this
    checks the whole module, inputs and every parameter, with the bias table sampled too.)"""
    torch.manual_seed(0)
    kw = dict(offset_groups=2, stride=2, q_size=(9, 11), pos_bias=pos_bias, version=version,
              offset_range_factor=2.0 if version == "v1" else -1.0, backend="reference")
    if version == "v1":
        kw["kv_size"] = (9, 11)
    a = DeformableAttention2d(16, 4, **kw).double()
    _randomize_tables(a)
    b = DeformableAttention2d(16, 4, **kw, sampler="gather").double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-10)
    grads = {n: p.grad for n, p in a.named_parameters() if p.grad is not None}
    assert "conv_offset.0.weight" in grads  # gradients reach the offset network through the sampled positions
    for n, p in b.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-9, atol=1e-10, msg=n)


def test_set_sampler_returns_previous_and_rejects_unknown():
    model = _tiny("v1")
    previous = set_sampler(model, "gather")
    assert set(previous.values()) == {"grid_sample"} and set(_samplers(model)) == {"gather"}
    set_sampler(model, "grid_sample")
    assert set(_samplers(model)) == {"grid_sample"}
    with pytest.raises(ValueError, match="sampler"):
        set_sampler(model, "nearest")


# ---------------------------------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["module", "v1", "pp"])
def test_torchscript_round_trip(tmp_path, name):
    """A trace records the size arithmetic (sizes are tensors while tracing): the file takes any batch, height and
    width, checked by the export at three other sizes and here at three more (odd, non-square)."""
    model = _module() if name == "module" else _tiny(name)
    S, C = (12, 16) if name == "module" else (32, 3)
    path = tmp_path / f"{name}.pt"
    result = export_model(model, "torchscript", img_size=S, dynamic=True, output=path)
    assert result.method == "torch.jit.trace" and result.dynamic_batch and result.dynamic_spatial, result.spatial_note
    assert [c["shape"][0] for c in result.checks] == [2, 1, 3, 1, 2, 1]
    assert len({tuple(c["shape"][2:]) for c in result.checks}) == 4
    assert set(_samplers(model)) == {"grid_sample"} and model.training
    loaded = _jit_load(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    model.eval()
    _check_against_pytorch(lambda x: loaded(x), model,
                           [(1, C, S, S), (4, C, S, S), (1, C, S + 5, S + 5), (2, C, S + 3, S + 21)])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


class _SizeBranch(nn.Module):
    """Runs at any size, but branches on the width in Python: a trace is right at its own width only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[-1] > 9 else x - 1


def test_trace_that_fixes_a_size_is_detected(tmp_path):
    """Code that turns a traced size into a Python value fixes it (the tracer warns): the TorchScript file and an
    explicit exporter="torchscript" ONNX file keep the export size and name the line."""
    model = _SizeBranch()
    for fmt, path, kwargs in [("torchscript", tmp_path / "b.pt", {}),
                              ("onnx", tmp_path / "b.onnx", {"exporter": "torchscript"})]:
        result = export_model(model, fmt, img_size=8, in_chans=3, dynamic=True, output=path, **kwargs)
        assert result.dynamic_batch and not result.dynamic_spatial, result.spatial_note
        assert "turns the traced size into Python values at test_export.py:" in result.spatial_note
        assert [c["shape"] for c in result.checks] == [[2, 3, 8, 8], [1, 3, 8, 8], [3, 3, 8, 8]]
    assert _input_dims(tmp_path / "b.onnx") == ["batch", 3, 8, 8]


def test_model_that_refuses_other_sizes(tmp_path):
    """pos_bias="fixed" refuses other sizes: the trace at the generic size fails, TorchScript keeps the export size
    and says why; the default ONNX exporter falls back to torch.export (which keeps the size too)."""
    torch.manual_seed(0)
    model = DeformableAttention2d(16, 4, offset_groups=2, stride=2, q_size=12, pos_bias="fixed").eval()
    ts = export_model(model, "torchscript", img_size=12, dynamic=True, output=tmp_path / "fixed.pt")
    assert ts.dynamic_batch and not ts.dynamic_spatial
    assert "does not run at" in ts.spatial_note and "pos_bias='fixed'" in ts.spatial_note, ts.spatial_note
    lines: list[str] = []
    auto = export_model(model, "onnx", img_size=12, dynamic=True, output=tmp_path / "a.onnx", progress=lines.append)
    assert auto.method.startswith("torch.export") and not auto.dynamic_spatial
    assert any("falling back to torch.export" in ln for ln in lines), lines
    with pytest.raises(ValueError, match="exporter must be None or one of"):
        export_model(model, "onnx", img_size=12, output=tmp_path / "x.onnx", exporter="legacy")


# ---------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph breaks (fullgraph raises on one)
# ---------------------------------------------------------------------------------------------------------------
# backend="aot_eager" runs Dynamo (where graph breaks are decided) and AOTAutograd, without Inductor's C++ code
# generation, which takes ~1 min per graph on two cores; the Inductor run is the slow test below.
@pytest.mark.parametrize("name", ["module", "pp", "v1"])
def test_torch_compile_fullgraph(name):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = (_module() if name == "module" else _tiny(name)).eval()
    S, C = (12, 16) if name == "module" else (32, 3)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(2, C, S, S)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1 and counter.op_count > 0  # one graph, really compiled
    if name == "module":  # training mode with gradients (the fast backend's autograd function) too
        model.train()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        compiled(xa).square().sum().backward()
        model(xb).square().sum().backward()
        assert counter.frame_count == 2  # recompiled once for training mode, still one graph
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph():
    import torch._dynamo

    torch._dynamo.reset()
    model = _tiny("pp").eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["dat_tiny", "dat_pp_tiny"])
def test_onnx_released_models(tmp_path, name, exporter):
    """The released v1 and DAT++ models export with a dynamic batch, height and width (seconds with the
    TorchScript-based exporter, minutes with torch.export, on two cores)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    result = export_model(model, "onnx", img_size=224, dynamic=True, output=tmp_path / f"{name}.onnx",
                          exporter=exporter)
    assert result.op_counts.get("GridSample", 0) == 0 and result.dynamic_spatial, result.spatial_note
    session = _ort_session(tmp_path / f"{name}.onnx")
    gen = torch.Generator().manual_seed(3)
    for shape in [(1, 3, 224, 224), (2, 3, 257, 319), (1, 3, 161, 97)]:
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            ref = model(x)
        got = _ort_run(session, x)
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-6


# ---------------------------------------------------------------------------------------------------------------
# deformattn export
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    """A training checkpoint as ``deformattn train`` writes it (format, model_name, model_kwargs, ...) of a tiny
    DAT++ model: ``create_model(name, checkpoint_path=...)`` rebuilds it from its model_kwargs."""
    from deformattn.train.checkpoint import save_checkpoint

    kwargs = {**TINY, "img_size": 32}
    torch.manual_seed(1)
    model = create_model("dat_nano", **kwargs)
    _randomize_tables(model)
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_name": "dat_nano", "model_kwargs": kwargs,
                           "epoch": 1, "config": {}, "class_names": [str(i) for i in range(5)],
                           "data": {"img_size": 32}})
    return path


def _cli(argv, capsys):
    from deformattn.cli import main

    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_cli_torchscript_from_training_checkpoint(tmp_path, checkpoint, capsys):
    out = tmp_path / "export" / "model.pt"
    status, stdout, stderr = _cli(["export", "--checkpoint", checkpoint, "--format", "torchscript", "--dynamic",
                                   "--output", out], capsys)
    assert status == 0, stderr
    assert "dat_nano (weights from" in stdout
    diffs = [float(d) for d in re.findall(r"max abs diff ([0-9.e+-]+)", stdout)]
    assert len(diffs) == 6 and max(diffs) <= 1e-4  # batches 2, 1, 3 and three other sizes
    assert "size dynamic" in stdout
    model = create_model("dat_nano", checkpoint_path=checkpoint).eval()  # the checkpoint's model, its weights
    loaded = _jit_load(out)
    _check_against_pytorch(lambda x: loaded(x), model, [(3, 3, 32, 32), (1, 3, 45, 38)])
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"]


def test_cli_onnx_json(tmp_path, checkpoint, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    status, stdout, stderr = _cli(["export", "--checkpoint", checkpoint, "--model", "dat_nano", "--format", "onnx",
                                   "--img-size", "32", "48", "--output", out, "--json"], capsys)
    assert status == 0, stderr
    report = json.loads(stdout)
    assert report["model"] == "dat_nano" and report["input_shape"] == [2, 3, 32, 48]
    assert report["op_counts"].get("GridSample", 0) == 0 and report["max_abs_diff"] <= 1e-4
    model = create_model("dat_nano", checkpoint_path=checkpoint).eval()
    session = _ort_session(out)
    _check_against_pytorch(lambda x: _ort_run(session, x), model, [(2, 3, 32, 48)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "run"]


def test_cli_failed_verification_keeps_the_existing_output(tmp_path, checkpoint, capsys):
    """A file whose outputs differ is never written: the previous --output stays, no temporary file is left.
    onnxruntime's kernels round differently from PyTorch's, so a zero tolerance fails the verification."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    status, stdout, stderr = _cli(["export", "--checkpoint", checkpoint, "--format", "onnx", "--atol", "0",
                                   "--rtol", "0", "--output", out, "--quiet"], capsys)
    assert status == 1
    assert "does not match the PyTorch model" in stderr and "max abs diff" in stderr
    diff = float(re.search(r"max abs diff ([0-9.e+-]+) >", stderr).group(1))
    assert 0 < diff < 1e-4  # rounding, measured
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "run"]


def test_export_model_verification_error_raises(tmp_path):
    """``reference``: a file that differs from it by 1% fails the verification, and nothing is written."""
    model = _module().eval()
    with pytest.raises(ExportVerificationError, match="tolerance"):
        export_model(model, "torchscript", img_size=12, output=tmp_path / "m.pt", reference=lambda x: model(x) * 1.01)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------------------------
def test_onnx_fp16_verified_against_the_float32_model(tmp_path):
    model = _module()
    path = tmp_path / "m16.onnx"
    result = export_model(model, "onnx", img_size=12, dynamic=True, output=path, precision="fp16")
    assert result.precision == "fp16" and result.dynamic_spatial
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is not converted
    session = _ort_session(path)
    assert session.get_inputs()[0].type == "tensor(float16)"
    x = torch.randn(1, 16, 13, 17, generator=torch.Generator().manual_seed(3))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.half().numpy()})[0])
    with torch.no_grad():
        ref = model.eval()(x)
    atol, rtol = DEFAULT_TOLERANCES["fp16"]
    err = float((got.float() - ref).abs().max())
    assert got.dtype == torch.float16 and 0 < err <= atol + rtol * float(ref.abs().max())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torchscript_low_precision(tmp_path, precision):
    model = _module()
    path = tmp_path / f"m_{precision}.pt"
    result = export_model(model, "torchscript", img_size=12, dynamic=True, output=path, precision=precision)
    atol, rtol = DEFAULT_TOLERANCES[precision]
    assert result.precision == precision and all(c["tolerance"] >= atol for c in result.checks)
    loaded = _jit_load(path)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    x = torch.randn(2, 16, 12, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert loaded(x.to(dtype)).dtype == dtype


def test_onnx_bf16_is_refused_with_the_reason(tmp_path, capsys):
    with pytest.raises(ValueError, match="no bfloat16 Conv kernel"):
        export_model(_module(), "onnx", img_size=12, output=tmp_path / "m.onnx", precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        export_model(_module(), "onnx", img_size=12, output=tmp_path / "m.onnx", precision="int8")
    status, _, stderr = _cli(["export", "--model", "dat_nano", "--format", "onnx", "--precision", "bf16",
                              "--output", tmp_path / "m.onnx"], capsys)
    assert status == 2 and "--precision bf16 is not available with --format onnx" in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["--model", "dat_nano", "--format", "tflite", "--output", "x"], "invalid choice: 'tflite'"),
    (["--model", "dat_tinny", "--format", "onnx", "--output", "x"], "--model: unknown model 'dat_tinny'. Did you "
                                                                    "mean 'dat_tiny'"),
    (["--checkpoint", "missing.pt", "--format", "torchscript", "--output", "x"], "--checkpoint missing.pt: no such "
                                                                                 "file"),
    (["--model", "dat_nano", "--output", "x"], "--format is required"),
    (["--model", "dat_nano", "--format", "torchscript"], "--output FILE is required"),
    (["--format", "torchscript", "--output", "x"], "--model is required"),
    (["--model", "dat_nano", "--format", "torchscript", "--img-size", "8", "--output", "x"], "--img-size 8 8"),
    (["--model", "dat_nano", "--format", "torchscript", "--img-size", "32", "32", "32", "--output", "x"],
     "--img-size takes H W"),
    (["--model", "dat_nano", "--format", "torchscript", "--ema", "--output", "x"], "--ema needs --checkpoint"),
])
def test_cli_errors_name_the_option(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    from deformattn.cli import main

    try:
        status, from_argparse = main(["export", *argv]), False
    except SystemExit as exc:  # argparse's own errors (bad choice): usage, then the error line
        status, from_argparse = exc.code, True
    err = capsys.readouterr().err
    assert status == 2 and message in err
    if not from_argparse:
        assert err.startswith("deformattn export: error: ") and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_checkpoint_of_another_model(tmp_path, checkpoint, capsys):
    status, _, err = _cli(["export", "--checkpoint", checkpoint, "--model", "dat_v1_nano", "--format",
                           "torchscript", "--output", tmp_path / "x.pt"], capsys)
    assert status == 2 and "holds a dat_nano" in err and not (tmp_path / "x.pt").exists()


def test_cli_help_lists_export(capsys):
    from deformattn.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--checkpoint", "--format", "--img-size", "--dynamic", "--output", "--sampler"):
        assert option in text
