"""Sampling-point recording and drawing: the recorder changes nothing and records what the layers did, the
coordinate conversion is right on non-square maps, and the drawn points are the sampled points."""
from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deformattn import DeformableAttention2d
from deformattn.models import create_model
from deformattn.viz import (
    feature_to_image,
    image_to_relative,
    normalized_to_feature,
    normalized_to_image,
    record_sampling,
    relative_to_feature_index,
)

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed (pip install 'deformattn[viz]')")


# ---------------------------------------------------------------------------------------------------------------
# coordinates
# ---------------------------------------------------------------------------------------------------------------
def test_normalized_to_image_worked_example_non_square():
    # 64 x 96 image, stride 8 -> 8 x 12 map (the module docstring's example)
    c = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [-1.0, 1.0]])
    px = normalized_to_image(c, (8, 12), 8)
    expected = torch.tensor([[3.5, 3.5], [59.5, 91.5], [31.5, 47.5], [3.5, 91.5]])
    torch.testing.assert_close(px, expected)
    # y uses the map's height, x its width: swapping them must give a different answer
    assert not torch.allclose(normalized_to_image(c, (12, 8), 8), expected)
    # per-axis strides
    torch.testing.assert_close(
        feature_to_image(torch.tensor([[0.0, 0.0], [2.0, 3.0]]), (4, 8)), torch.tensor([[1.5, 3.5], [9.5, 27.5]])
    )


def test_normalized_to_feature_matches_grid_sample():
    # the conversion agrees with where grid_sample(align_corners=True) reads: sample an index map
    H, W = 5, 9
    rows = torch.arange(H, dtype=torch.float64).reshape(1, 1, H, 1).expand(1, 1, H, W)
    cols = torch.arange(W, dtype=torch.float64).reshape(1, 1, 1, W).expand(1, 1, H, W)
    pts = torch.rand(1, 7, 1, 2, dtype=torch.float64) * 2 - 1  # (y, x)
    ry = F.grid_sample(rows, pts.flip(-1), align_corners=True).reshape(-1)
    rx = F.grid_sample(cols, pts.flip(-1), align_corners=True).reshape(-1)
    f = normalized_to_feature(pts.reshape(-1, 2), (H, W))
    torch.testing.assert_close(f[:, 0], ry)
    torch.testing.assert_close(f[:, 1], rx)


@pytest.mark.parametrize("image_size,stride", [((48, 80), 16), ((32, 96), 8), ((7, 3), 1)])
def test_relative_query_lands_in_the_feature_pixel_covering_it(image_size, stride):
    H, W = image_size
    h, w = H // stride, W // stride
    for y in range(H):
        for x in range(0, W, 5):
            i, j = relative_to_feature_index(image_to_relative((y, x), (H, W)), (h, w))
            centre = feature_to_image(torch.tensor([[float(i), float(j)]]), stride)[0]
            assert abs(centre[0] - y) <= stride / 2 and abs(centre[1] - x) <= stride / 2


def test_coordinate_errors():
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        normalized_to_image(torch.zeros(3, 3), (4, 4), 2)
    with pytest.raises(ValueError, match="outside"):
        image_to_relative((40, 0), (32, 32))
    with pytest.raises(ValueError, match="stride"):
        feature_to_image(torch.zeros(1, 2), 0)


# ---------------------------------------------------------------------------------------------------------------
# recorder on one module
# ---------------------------------------------------------------------------------------------------------------
MODULE_CASES = [
    dict(version="pp", pos_bias="table", offset_groups=2, stride=2, offset_range_factor=-1.0),
    dict(version="pp", pos_bias="log_cpb", offset_groups=4, stride=1, offset_range_factor=2.0),
    dict(version="pp", pos_bias="dwc", offset_groups=1, stride=2, offset_range_factor=-1.0),
    dict(version="v1", pos_bias="table", offset_groups=2, stride=1, offset_range_factor=2.0),
    dict(version="pp", pos_bias="none", offset_groups=2, stride=3, offset_range_factor=-1.0, no_off=True),
]


def _module(case, H=9, W=13, dtype=torch.float32):
    kv = (H, W) if case["version"] == "v1" else None
    m = DeformableAttention2d(32, 4, q_size=(H, W), kv_size=kv, **case).to(dtype)
    if not case.get("no_off"):
        with torch.no_grad():  # visible offsets
            m.conv_offset[-1].weight.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: f"{c['version']}-{c['pos_bias']}-g{c['offset_groups']}")
def test_recording_leaves_outputs_bitwise_and_records_what_the_module_sampled(case):
    m = _module(case).eval()
    x = torch.randn(2, 32, 9, 13)
    y_plain = m(x)
    with record_sampling(m, queries=[(0.5, 0.5), (0.0, 1.0)]) as rec:
        y_rec = m(x)
    assert torch.equal(y_plain, y_rec)
    assert not m._forward_hooks, "hooks must be removed on exit"
    (r,) = rec.records
    y, pos, ref = m(x, return_sampling=True)
    assert torch.equal(r.pos, pos)
    assert torch.equal(r.reference, ref[0, 0])
    assert r.input_size == (9, 13) and r.offset_groups == case["offset_groups"]
    assert r.queries == [(4, 6), (0, 12)]
    assert r.attn.shape == (2, 4, 2, pos.shape[2] * pos.shape[3])
    torch.testing.assert_close(r.attn.sum(-1), torch.ones(2, 4, 2))
    assert r.group_attn().shape == (2, case["offset_groups"], 2, pos.shape[2] * pos.shape[3])


@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: f"{c['version']}-{c['pos_bias']}-g{c['offset_groups']}")
def test_recorded_attention_weights_reproduce_the_output_at_the_query(case):
    """proj_out(sum_n attn[h, n] v[h, :, n]) at the query pixel is the module's output there."""
    m = _module(case, dtype=torch.float64).eval()
    x = torch.randn(2, 32, 9, 13, dtype=torch.float64)
    with torch.no_grad(), record_sampling(m, queries=[(0.3, 0.8), (1.0, 0.0)]) as rec:
        y = m(x)
    r = rec.records[0]
    B, C, H, W = x.shape
    nH, hc = m.num_heads, m.head_dim
    with torch.no_grad():
        pos = r.pos.reshape(B * m.offset_groups, *r.pos.shape[2:])
        xs = m.sample_kv_input(x, pos)  # B, C, Ns
        v = m.proj_v(xs.unsqueeze(2)).reshape(B, nH, hc, -1)
        q = m.proj_q(x)
        extra = m.rpe_table(q) if case["pos_bias"] == "dwc" else None
        for n, (i, j) in enumerate(r.queries):
            out = torch.einsum("bhn,bhcn->bhc", r.attn[:, :, n], v).reshape(B, C, 1, 1)
            if extra is not None:
                out = out + extra[:, :, i : i + 1, j : j + 1]
            torch.testing.assert_close(m.proj_out(out)[:, :, 0, 0], y[:, :, i, j], rtol=1e-10, atol=1e-10)


def test_recorder_errors():
    with pytest.raises(ValueError, match="no DeformableAttention2d"):
        record_sampling(nn.Linear(3, 3))
    m = _module(MODULE_CASES[0])
    with pytest.raises(ValueError, match=r"relative \(y, x\) in \[0, 1\]"):
        record_sampling(m, queries=[(3, 4)])
    with pytest.raises(TypeError, match="pair"):
        record_sampling(m, queries=[(0.5,)])
    with pytest.raises(ValueError, match="no deformable layer matches"):
        record_sampling(m, layers="stages.9.*")


# ---------------------------------------------------------------------------------------------------------------
# recorder on a model
# ---------------------------------------------------------------------------------------------------------------
def _capture_inputs(model):
    """The input of every deformable layer, captured independently of the recorder."""
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, DeformableAttention2d):
            handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0])))
    return seen, handles


@pytest.mark.parametrize("name", ["dat_nano", "dat_v1_nano"])
@pytest.mark.parametrize("train", [False, True])
def test_model_outputs_bitwise_identical_with_recording(name, train):
    model = create_model(name, num_classes=5).train(train)
    x = torch.randn(2, 3, 32, 64)  # non-square
    torch.manual_seed(1)
    y_plain = model(x)
    torch.manual_seed(1)  # drop path draws random numbers in training mode: the recorder must not
    with record_sampling(model, queries=[(0.5, 0.25)]) as rec:
        y_rec = model(x)
    assert torch.equal(y_plain, y_rec)
    names = [n for n, m in model.named_modules() if isinstance(m, DeformableAttention2d)]
    assert [r.name for r in rec.records] == names
    # and the recorded positions are those of the layer's own return_sampling on its real input
    model.eval()
    seen, handles = _capture_inputs(model)
    with torch.no_grad(), record_sampling(model) as rec:
        model(x)
    for h in handles:
        h.remove()
    for r in rec.records:
        _, pos, ref = model.get_submodule(r.name)(seen[r.name], return_sampling=True)
        assert torch.equal(r.pos, pos) and torch.equal(r.reference, ref[0, 0])
        assert r.input_size == tuple(seen[r.name].shape[-2:])


def test_layer_filter_and_repeated_calls():
    model = create_model("dat_nano").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), record_sampling(model, layers="stages.3.*") as rec:
        model(x)
        model(x)
    assert [r.name for r in rec.records] == ["stages.3.attns.0"] * 2
    assert [r.name for r in rec.last()] == ["stages.3.attns.0"]
    assert len(rec.by_name()["stages.3.attns.0"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------------------------
def _offsets(ax, gid):
    """Offsets (x, y) of the scatters of ``ax`` whose gid is ``gid`` (or starts with it, for ``"…/"``)."""
    match = (lambda g: g and g.startswith(gid)) if gid.endswith("/") else (lambda g: g == gid)
    return [np.asarray(c.get_offsets(), dtype=np.float64) for c in ax.collections if match(c.get_gid())]


@needs_mpl
def test_drawn_points_are_the_sampled_points_non_square():
    from deformattn.viz import visualize

    torch.manual_seed(0)
    model = create_model("dat_nano")
    image = np.random.default_rng(0).random((48, 96, 3)).astype(np.float32)
    res = visualize(model, image, img_size=(32, 64), query=(20.0, 50.0))
    try:
        assert res.image.shape == (32, 64, 3)
        # the layers' real inputs, captured independently; their own return_sampling positions
        seen, handles = _capture_inputs(model)
        from deformattn.viz.images import prepare_input

        _, x = prepare_input(image, (32, 64), model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
        with torch.no_grad():
            model.eval()(x)
        for h in handles:
            h.remove()
        axes_off = res.figure.axes[0::2]
        axes_att = res.figure.axes[1::2]
        reductions = [info["reduction"] for info in model.feature_info]
        assert len(res.drawn) == 4
        for k, (drawn, rec) in enumerate(zip(res.drawn, res.records)):
            stage = int(rec.name.split(".")[1])
            s = reductions[stage]
            assert res.strides[k] == (s, s)
            fmap = tuple(seen[rec.name].shape[-2:])
            assert fmap == (32 // s, 64 // s)
            with torch.no_grad():
                _, pos, ref = model.get_submodule(rec.name)(seen[rec.name], return_sampling=True)
            G = pos.shape[1]
            assert len(_offsets(axes_off[k], "deformed/")) == G and len(_offsets(axes_att[k], "keys/")) == G
            for g in range(G):
                want = normalized_to_image(pos[0, g].double(), fmap, s).reshape(-1, 2).flip(-1).numpy()  # x, y
                np.testing.assert_allclose(_offsets(axes_off[k], f"deformed/{g}")[0], want, atol=1e-5)
                np.testing.assert_allclose(_offsets(axes_att[k], f"keys/{g}")[0], want, atol=1e-5)
                np.testing.assert_allclose(drawn["deformed_xy"][g], want, atol=1e-9)
            ref_want = normalized_to_image(ref[0, 0].double(), fmap, s).reshape(-1, 2).flip(-1).numpy()
            finite = np.isfinite(ref_want).all(1)
            np.testing.assert_allclose(_offsets(axes_off[k], "reference")[0], ref_want[finite], atol=1e-5)
            # the query star sits on the centre of the feature pixel containing image pixel (20, 50)
            star = _offsets(axes_att[k], "query")[0][0]
            i, j = 20 // s, 50 // s
            np.testing.assert_allclose(star, [(j + 0.5) * s - 0.5, (i + 0.5) * s - 0.5])
            assert abs(star[0] - 50) <= s / 2 and abs(star[1] - 20) <= s / 2
    finally:
        import matplotlib.pyplot as plt

        plt.close(res.figure)


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _assert_not_blank(img):
    assert img.std() > 0.05
    assert (img.min(-1) < 0.9).mean() > 0.05  # a good share of non-white pixels


@needs_mpl
@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn not installed (the default digits image)")
def test_cli_viz_default_digits_random_init(tmp_path, capsys):
    from deformattn.viz.cli import build_parser, main, make_viz

    out = tmp_path / "viz.png"
    assert main(["viz", "--output", str(out)]) == 0
    assert "randomly initialised" in capsys.readouterr().out
    img = _png(out)
    # dat_nano has 4 deformable layers: 2 rows of 2 layers x 2 panels of 3.2 in (rows 0.85 x 3.2 in high), plus a
    # 0.8 in title band and a 0.45 in note band, 100 dpi
    assert img.shape == (round((2 * 0.85 * 3.2 + 0.8 + 0.45) * 100), round(4 * 3.2 * 100), 3)
    _assert_not_blank(img)
    result, title = make_viz(build_parser().parse_args(["viz", "--output", str(out)]))
    assert "randomly initialised" in title and "digit" in title
    assert any("randomly initialised" in t.get_text() for t in result.figure.texts)
    assert result.image.shape == (32, 32, 3)


@needs_mpl
def test_cli_viz_checkpoint_and_image_file(tmp_path):
    from PIL import Image

    from deformattn.viz.cli import build_parser, main, make_viz

    model = create_model("dat_nano", num_classes=3)
    names = ["cat", "dog", "owl"]
    ckpt = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "model_name": "dat_nano",
                "model_kwargs": {"num_classes": 3, "img_size": 32}, "class_names": names}, ckpt)
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((40, 90, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    args = ["viz", "--checkpoint", str(ckpt), "--image", str(tmp_path / "in.png"), "--output",
            str(tmp_path / "o.png"), "--query", "5", "70", "--img-size", "32", "--layers", "stages.0.*", "stages.3.*"]
    result, title = make_viz(build_parser().parse_args(args))
    assert "weights from last.pt" in title and "random" not in title
    assert any(n in title for n in names)
    assert result.image.shape == (32, 80, 3)  # shorter side 32, aspect (2.25) kept, multiples of 16
    assert [r.name for r in result.records] == ["stages.0.attns.1", "stages.3.attns.0"]
    # the checkpoint's weights were loaded
    loaded = create_model("dat_nano", checkpoint_path=ckpt)
    assert torch.equal(loaded.stages[0].attns[1].conv_offset[0].weight, model.stages[0].attns[1].conv_offset[0].weight)
    with pytest.raises(ValueError, match="outside the 32x80 image"):
        make_viz(build_parser().parse_args([a if a != "70" else "90" for a in args]))
    assert main(args) == 0
    img = _png(tmp_path / "o.png")
    assert img.shape == (round((0.85 * 3.2 + 0.8 + 0.45) * 100), round(4 * 3.2 * 100), 3)
    _assert_not_blank(img)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    from deformattn.viz import plot

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match=r"pip install 'deformattn\[viz\]'"):
        plot._pyplot()


@needs_mpl
@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn not installed (the default digits image)")
def test_train_checkpoint_on_digits_uses_a_test_digit_preprocessed_like_training(tmp_path):
    from deformattn.viz.cli import build_parser, make_viz
    from deformattn.viz.images import digits_image, prepare_input

    data = {"kind": "digits", "img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "root": None,
            "test_fraction": 0.25, "seed": 0}
    model = create_model("dat_nano", num_classes=10)
    ckpt = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "model_name": "dat_nano", "model_kwargs": {"num_classes": 10,
                "img_size": 32}, "class_names": [str(i) for i in range(10)], "data": data, "epoch": 1}, ckpt)
    result, title = make_viz(build_parser().parse_args(["viz", "--checkpoint", str(ckpt), "--output",
                                                        str(tmp_path / "o.png")]))
    assert "test digit" in title and "weights from last.pt" in title
    assert result.image.shape == (32, 32, 3)
    torch.testing.assert_close(result.output, model.eval()(prepare_input(digits_image()[0], (32, 32), data["mean"],
                                                                        data["std"])[1]))
    try:
        from deformattn.train.data import DataSpec, load_digits_split
    except ImportError:  # pragma: no cover - the training tools are not there
        return
    x_test = load_digits_split(0.25, 0)[2]
    spec = DataSpec(kind="digits", img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    ours = prepare_input(digits_image()[0], (32, 32), spec.mean, spec.std)[1]
    torch.testing.assert_close(ours, spec.prepare(x_test[:1]))


@needs_mpl
def test_commands_register_with_the_main_cli(tmp_path, monkeypatch, capsys):
    cli = pytest.importorskip("deformattn.cli")
    if not hasattr(cli, "register_command"):
        pytest.skip("deformattn.cli has no register_command hook")
    from deformattn.viz.cli import register_commands

    if "flops" not in cli.COMMANDS:  # not wired yet: wire a copy of the registry for this test
        monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
        register_commands(cli.register_command)
    assert {"viz", "flops", "complexity"} <= set(cli.COMMANDS)
    assert cli.main(["flops", "--model", "dat_nano"]) == 0
    assert "dat_nano at 32x32" in capsys.readouterr().out
    assert cli.main(["viz", "--model", "dat_nano", "--output", str(tmp_path / "v.png"), "--query", "99", "0"]) == 2
    assert "outside" in capsys.readouterr().err


def test_default_images_and_fit_size():
    from deformattn.viz.images import default_image, fit_size

    assert fit_size((300, 451), 224, 32) == (224, 352)  # shorter side 224, aspect ~1.5, multiples of 32
    assert fit_size((8, 8), 32, 16) == (32, 32)
    if HAS_SKLEARN:
        img, desc = default_image("dat_nano")
        assert img.shape == (8, 8, 3) and 0.0 <= img.min() and img.max() <= 1.0 and "digit" in desc
    img, desc = default_image("dat_pp_tiny")  # the photo that ships with the package: no extra needed
    assert img.shape == (214, 320, 3) and img.std() > 0.1 and "sample photo" in desc


@needs_mpl
def test_figure_reads_like_a_paper_figure():
    """Pixel ticks, readable titles, a colour bar per attention panel, group legends wherever there are several
    groups, the requested query beside the cell centre it snaps to, and the note on points outside the image."""
    from deformattn.viz import visualize
    from deformattn.viz.plot import panel_name

    assert panel_name("stages.0.attns.1") == "stage 1 / block 2" and panel_name("attn") == "attn"
    torch.manual_seed(0)
    res = visualize(create_model("dat_nano"), np.random.default_rng(0).random((32, 32, 3)).astype(np.float32),
                    query=(10.0, 20.0))
    try:
        fig = res.figure
        panels = fig.axes[:8]
        for k, rec in enumerate(res.records):
            off, att = panels[2 * k], panels[2 * k + 1]
            name = panel_name(rec.name)
            assert off.get_title().startswith(name) and att.get_title().startswith(name)
            for ax in (off, att):
                ticks = list(ax.get_xticks()) + list(ax.get_yticks())
                assert len(ticks) >= 4 and all(0 <= t <= 31 for t in ticks)
                assert any(p.get_gid() == "image-frame" for p in ax.patches)
            G = rec.pos.shape[1]
            legend_labels = [t.get_text() for t in off.get_legend().get_texts()]
            assert "reference point" in legend_labels
            if G > 1:
                assert [f"group {g + 1}" for g in range(G)] == [t.get_text() for t in att.get_legend().get_texts()]
                assert all(f"group {g + 1}" in legend_labels for g in range(G))
            plus = _offsets(att, "query-requested")[0][0]
            np.testing.assert_allclose(plus, [20.0, 10.0])  # (x, y): the requested point, the same in every panel
        bars = [c for ax in panels[1::2] for c in ax.child_axes if c.get_ylabel() == "attention weight"]
        assert len(bars) == 4  # one colour bar per attention panel (each layer has its own weight range)
        note = [t.get_text() for t in fig.texts if t.get_gid() == "note"][0]
        assert "moves between stages" in note and "outside the map" in note  # dat_nano's DAT++ grid pokes out
    finally:
        import matplotlib.pyplot as plt

        plt.close(res.figure)
