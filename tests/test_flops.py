"""FLOP counting: the counter's convention, the DAT paper's cost model, the per-stage / per-kind report, the
complexity comparison and the scripts that print them."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deformattn import DeformableAttention2d
from deformattn.models import create_model
from deformattn.analysis import complexity as C
from deformattn.analysis import count_flops, dmha_macs, flop_counter, format_cost_report, model_cost

REPO = Path(__file__).resolve().parents[1]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def test_paper_example_swin_t_stage3():
    # DAT paper Sec. 3.3: H = W = 14, Ns = 49, C = 384, k = 5 -> 79.63 M for the attention terms
    t = dmha_macs(14, 14, 384, 49, 5)
    assert round((t["attention"] + t["projections"]) / 1e6, 2) == 79.63
    assert t["offset"] == 27 * 49 * 384  # ~0.51 M, ~0.6 % of the layer


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("H,W,stride,groups,k", [(14, 14, 1, 4, 5), (28, 20, 2, 2, None), (32, 24, 8, 1, 9)])
def test_deformable_layer_counts_exactly_the_paper_cost_model(backend, H, W, stride, groups, k):
    C_ = 64
    m = DeformableAttention2d(C_, 4, offset_groups=groups, stride=stride, offset_kernel_size=k, q_size=(H, W),
                              backend=backend).eval()
    counts = count_flops(m, torch.randn(1, C_, H, W))
    Hk, Wk = m.key_grid_size(H, W)
    want = dmha_macs(H, W, C_, Hk * Wk, m.offset_kernel_size)
    assert counts[""] == 2 * want["total"]
    assert counts["conv_offset"] == 2 * want["offset"]


def test_cpu_flash_attention_kernel_is_counted():
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        pytest.skip("no CPU flash kernel in this torch")
    q, k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with flop_counter() as fc:
        op(q, k, v, 0.0, False)
    assert fc.get_total_flops() == 2 * (2 * 2 * 10 * 6 * 8)  # q k^T and attn v, 2 FLOPs per multiply-add


@pytest.mark.parametrize("groups,needs_input_grad", [(1, True), (16, True), (16, False), (4, True)])
def test_conv_backward_counts_twice_the_forward_whatever_the_groups(groups, needs_input_grad):
    # torch's own formula counts a grouped conv's weight gradient as dense (16x too much for this depthwise conv)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=groups)
    x = torch.randn(2, 16, 9, 7, requires_grad=needs_input_grad)
    with flop_counter() as fwd:
        y = conv(x)
    with flop_counter() as bwd:
        y.sum().backward()
    forward = 2 * 2 * 16 * 9 * 7 * (16 // groups) * 9  # 2 FLOPs x B x C_out x H x W x C_in/groups x k^2
    assert fwd.get_total_flops() == forward
    assert bwd.get_total_flops() == (2 if needs_input_grad else 1) * forward


def test_model_cost_report_adds_up():
    model = create_model("dat_nano")
    report = model_cost(model, 32)
    assert report.params == sum(p.numel() for p in model.parameters())
    assert sum(r["params"] for r in report.parts) == report.params
    assert sum(r["flops"] for r in report.parts) == report.flops
    assert [r["part"] for r in report.parts][:2] == ["patch_proj", "stages.0"]
    kinds = {r["kind"]: r for r in report.kinds}
    d, off = kinds["D deformable attention"], kinds["  of which offset network"]
    assert d["count"] == off["count"] == len(report.deformable) == 4
    assert 0 < off["flops"] < d["flops"]
    assert kinds["N neighborhood attention"]["count"] == 3
    for row in report.deformable:
        m = model.get_submodule(row["layer"])
        Hk, Wk = m.key_grid_size(*row["map"])
        assert row["keys"] == Hk * Wk
        assert row["offset_flops"] == 2 * dmha_macs(*row["map"], m.dim, Hk * Wk, m.offset_kernel_size)["offset"]
        assert 0 < row["offset_share"] < 0.5
    assert [r["map"] for r in report.deformable] == [[16, 16], [8, 8], [4, 4], [2, 2]]
    text = format_cost_report(report)
    assert "of which offset network" in text and "stages.3.attns.0" in text


def test_model_cost_released_variant_near_the_paper():
    # DAT-T++ at 224: 24 M params / 4.3 GMACs published
    report = model_cost(create_model("dat_pp_tiny"), 224)
    assert abs(report.params / 1e6 - 24.0) < 0.1
    assert abs(report.macs / 1e9 - 4.3) / 4.3 < 0.03


def test_cli_flops(tmp_path, capsys):
    from deformattn.viz.cli import main

    assert main(["flops", "--model", "dat_v1_nano", "--img-size", "64", "--json", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    assert "dat_v1_nano at 64x64" in out and "L window attention" in out and "S shifted-window" in out
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["input_size"] == [64, 64] and data["macs"] * 2 == data["flops"]


def test_flops_table_script(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "flops_table.py"), "--models", "dat_nano",
                           "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| model | input |" in proc.stdout and "`dat_nano`" in proc.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["model"] == "dat_nano" and row["deformable_layers"] == 4 and row["offset_macs"] > 0


# ---------------------------------------------------------------------------------------------------------------
# complexity
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", C.KINDS)
@pytest.mark.parametrize("side", [14, 28])
def test_complexity_counted_flops_equal_the_formulas(kind, side):
    layer = C.build_layer(kind, dim=32, num_heads=2, side=side).eval()
    x = torch.randn(1, 32, side, side)
    assert layer(x).shape == x.shape
    assert count_flops(layer, x)[""] == 2 * C.formula_macs(kind, side, dim=32)


def test_dense_grows_quadratically_the_local_kinds_linearly():
    f = {k: [C.formula_macs(k, s) for s in (28, 56)] for k in C.KINDS}
    assert f["dense"][1] / f["dense"][0] > 10  # 4x tokens -> ~16x attention
    for k in ("window", "neighborhood"):
        assert f[k][1] / f[k][0] == pytest.approx(4.0)
    for k in ("spatial_reduction", "deformable"):  # stride 8: N^2 / 64, far below dense
        assert f[k][1] < f["dense"][1] / 10


def test_spatial_reduction_ratio_one_is_dense_attention():
    torch.manual_seed(0)
    sra = C.SpatialReductionAttention(16, 2, sr_ratio=1)
    dense = C.DenseAttention(16, 2)
    with torch.no_grad():
        dense.qkv.weight.copy_(torch.cat([sra.q.weight, sra.kv.weight]))
        dense.qkv.bias.copy_(torch.cat([sra.q.bias, sra.kv.bias]))
        dense.proj.load_state_dict(sra.proj.state_dict())
    x = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(sra(x), dense(x))


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_cli_complexity_quick(tmp_path, capsys):
    from deformattn.viz.cli import main

    assert main(["complexity", "--output-dir", str(tmp_path), "--quick"]) == 0
    rows = json.loads((tmp_path / "complexity.json").read_text())
    assert {(r["kind"], r["side"]) for r in rows} == {(k, s) for k in C.KINDS for s in C.QUICK_SIDES}
    for r in rows:
        assert {"kind", "side", "tokens", "flops", "ms", "peak_mib"} <= set(r)
        assert r["tokens"] == r["side"] ** 2 and r["flops"] == 2 * r["formula_macs"] and r["ms"] > 0
        assert r["peak_mib"] is None or r["peak_mib"] >= 0
    from PIL import Image

    with Image.open(tmp_path / "complexity.png") as im:
        assert im.size == (1500, 460)
    assert "| map | tokens | kind |" in capsys.readouterr().out


def test_neighborhood_attention_counted_as_its_own_work():
    """k*k keys per query (the reference path's count), whichever backend the layer runs; backends restored."""
    from deformattn.layers import NeighborhoodAttention2d

    B, C, H, W, k, nH = 2, 16, 15, 12, 5, 2
    x = torch.randn(B, C, H, W)
    expected = 2 * (B * H * W * C * 3 * C + 2 * B * H * W * k * k * C + B * H * W * C * C)  # qkv, qk + av, proj
    for backend in (None, "fast", "reference"):
        m = NeighborhoodAttention2d(C, k, nH, backend=backend)
        assert count_flops(m, x)[""] == expected
        assert m.backend == backend
    with flop_counter() as counter:  # the fast tiles do more (masked) multiply-adds: why the count pins reference
        NeighborhoodAttention2d(C, k, nH, backend="fast")(x)
    assert counter.get_total_flops() > expected
