"""Multi-scale deformable attention exports to ONNX with the gather sampler (no GridSample node) and runs in
onnxruntime, matching PyTorch for other batch sizes, numbers of queries and level sizes than the export's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deformattn import MultiScaleDeformableAttention

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

NAMES = ["query", "reference_points", "input_flatten", "input_spatial_shapes", "input_level_start_index"]


def _inputs(N, Lq, shapes, ref_dim=2, d_model=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    sizes = [h * w for h, w in shapes]
    start = torch.tensor([sum(sizes[:i]) for i in range(len(shapes))])
    ref = torch.rand(N, Lq, len(shapes), ref_dim, generator=g) * 1.2 - 0.1  # some points leave the maps
    return (torch.randn(N, Lq, d_model, generator=g), ref, torch.randn(N, S, d_model, generator=g),
            torch.tensor(shapes), start)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(d_model=32, n_levels=2, n_heads=4, n_points=3).eval()
    with torch.no_grad():  # offsets and weights that depend on the query, as after training
        m.sampling_offsets.weight.normal_(0, 0.2)
        m.attention_weights.weight.normal_(0, 0.2)
    N, Lq, S = torch.export.Dim("N"), torch.export.Dim("Lq"), torch.export.Dim("S")
    program = torch.onnx.export(
        m, _inputs(2, 7, [(6, 5), (3, 3)]), dynamo=True, input_names=NAMES, opset_version=18, verbose=False,
        dynamic_shapes=({0: N, 1: Lq}, {0: N, 1: Lq}, {0: N, 1: S}, None, None),
    )
    path = tmp_path_factory.mktemp("msda_onnx") / "msda.onnx"
    program.save(str(path))
    return m, path


def test_no_grid_sample_node(exported):
    _, path = exported
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "GridSample" not in ops and "Gather" in ops


@pytest.mark.parametrize("N, Lq, shapes", [
    (2, 7, [(6, 5), (3, 3)]),  # the export's sizes
    (1, 13, [(4, 9), (2, 5)]),  # other queries and level sizes
    (3, 2, [(8, 8), (1, 1)]),
])
def test_onnxruntime_matches_pytorch(exported, N, Lq, shapes):
    m, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args = _inputs(N, Lq, shapes, seed=N * 100 + Lq)
    feed = dict(zip(NAMES, (a.numpy() for a in args)))
    out = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]
    with torch.no_grad():
        expected = m(*args).numpy()
    assert out.shape == expected.shape == (N, Lq, 32)
    assert np.abs(out - expected).max() < 1e-5
