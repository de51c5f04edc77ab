"""Generic suite over every registered variant (timm-style), the timm model API, create_model and checkpoints.

The small CPU variants get the full treatment (gradients, grad checkpointing, odd sizes); the large released
variants only cheap checks (a forward pass at a small size)."""
from __future__ import annotations

import argparse
import importlib.util
import math

import pytest
import torch

import deformattn.models as models
from deformattn.models import DAT, create_model, list_models, load_checkpoint
from deformattn.models.registry import PretrainedWeightsUnavailableError

SMALL = ["dat_nano", "dat_v1_nano"]
RELEASED = ["dat_tiny", "dat_small", "dat_base", "dat_base_384", "dat_pp_tiny", "dat_pp_small", "dat_pp_base",
            "dat_pp_base_384"]
HAS_TIMM = importlib.util.find_spec("timm") is not None


def test_list_models():
    names = list_models()
    assert set(RELEASED + SMALL) <= set(names)
    assert list_models("dat_pp_*") == sorted(n for n in names if n.startswith("dat_pp_"))
    with pytest.raises(ValueError, match="Did you mean 'dat_pp_tiny'"):
        create_model("dat_pp_tiy")


def test_top_level_entry_points():
    import deformattn

    assert deformattn.list_models() == list_models()
    model = deformattn.create_model("dat_nano", num_classes=3)
    assert isinstance(model, DAT) and model.num_classes == 3
    with pytest.raises(AttributeError, match="no_such_name"):
        deformattn.no_such_name  # noqa: B018


# ---------------------------------------------------------------------------------------------------------------
# small variants: the full generic suite
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL)
def test_forward_backward_every_parameter_gets_gradient(name):
    model = create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not no_grad


@pytest.mark.parametrize("name", SMALL)
def test_grad_checkpointing_same_output_and_gradients(name):
    model = create_model(name)  # drop_path > 0: the checkpoint must replay the same random draws
    model.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("size", [(32, 32), (37, 50), (21, 16), (64, 40)])
def test_odd_and_non_square_sizes(name, size):
    model = create_model(name).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        out = model(x)
    assert torch.isfinite(out).all()
    expected = model._stage_sizes(*size)
    assert [tuple(f.shape[-2:]) for f in feats] == expected
    h = size[0] // 2  # patchify stride-2 stem, then 2x2/2 down-sampling: every stage floors
    for f in feats:
        assert f.shape[-2] == h
        h //= 2


@pytest.mark.parametrize("name", SMALL)
def test_forward_intermediates_matches_forward_features(name):
    model = create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        feats = model.forward_features(x)
        torch.testing.assert_close(final, feats)
        assert [f.shape[1] for f in inter] == [i["num_chs"] for i in model.feature_info]
        assert [32 // f.shape[-1] for f in inter] == [i["reduction"] for i in model.feature_info]
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], feats)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last2[0], inter[2])
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[1], inter[1])
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])


def test_prune_intermediate_layers():
    model = create_model("dat_nano").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1])
        assert kept == [0, 1] and len(model.stages) == 2 and len(model.down_projs) == 1
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    torch.testing.assert_close(pruned[1], full[1])
    assert isinstance(model.cls_head, torch.nn.Identity)


def test_reset_classifier_and_pooling():
    model = create_model("dat_nano").eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0, global_pool="max")
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model(x), feats.amax(dim=(2, 3)))
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")


def test_no_weight_decay_names_the_position_tables():
    for name in SMALL:
        model = create_model(name)
        nwd = model.no_weight_decay()
        params = dict(model.named_parameters())
        assert nwd and nwd <= set(params)
        assert {n.rsplit(".", 1)[-1] for n in nwd} <= {"rpe_table", "rpb", "relative_position_bias_table"}
        expected = {n for n in params if n.endswith(("rpe_table", ".rpb", "relative_position_bias_table"))}
        assert nwd == expected


def test_input_validation():
    model = create_model("dat_nano")
    with pytest.raises(ValueError, match="x must have 3 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"too small.*H, W >= 16"):
        model(torch.randn(1, 3, 15, 32))
    with pytest.raises(ValueError, match="4 dims"):
        model(torch.randn(3, 32, 32))
    assert model.min_input_size() == 16 and create_model("dat_pp_tiny").min_input_size() == 32
    with pytest.raises(ValueError, match="H, W >= 32"):
        create_model("dat_pp_tiny")(torch.randn(1, 3, 64, 31))
    with pytest.raises(ValueError, match="stage_spec"):
        DAT(stage_spec=("NX", "D", "D", "D"))
    with pytest.raises(ValueError, match="num_heads"):
        DAT(dims=(30, 64, 128, 256), num_heads=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="img_size"):
        create_model("dat_tiny", img_size=16)
    with pytest.raises(ValueError, match="dims must have 4 entries"):
        DAT(dims=(8, 16, 32))


# ---------------------------------------------------------------------------------------------------------------
# released variants: cheap checks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RELEASED)
def test_released_variant_small_forward(name):
    model = create_model(name, num_classes=3).eval()
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and cfg["num_classes"] == 3 and cfg["top1"] > 80
    assert cfg["input_size"] == ((3, 384, 384) if name.endswith("384") else (3, 224, 224))
    x = torch.randn(1, 3, 64, 72)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_window_sizes_and_shift_of_released_configs():
    tiny = create_model("dat_tiny")
    s = tiny.stages[0].attns[1]
    assert s.window_size == 7 and s.shift_size == 4  # official shift: ceil(7 / 2)
    assert tuple(tiny.stage_spec[2]) == ("L", "D") * 3
    pp = create_model("dat_pp_tiny")
    assert [st.attns[1].stride for st in pp.stages] == [8, 4, 2, 1]
    assert pp.stages[0].attns[0].kernel_size == 7


# ---------------------------------------------------------------------------------------------------------------
# create_model and checkpoints in the library's own formats
# ---------------------------------------------------------------------------------------------------------------
def test_pretrained_without_checkpoint_raises():
    with pytest.raises(PretrainedWeightsUnavailableError, match="never downloads") as info:
        create_model("dat_pp_tiny", pretrained=True)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)


def test_own_state_dict_and_training_checkpoint_roundtrip(tmp_path):
    model = create_model("dat_nano", num_classes=4, img_size=48).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    loaded = create_model("dat_nano", checkpoint_path=tmp_path / "bare.pt", img_size=48).eval()
    assert loaded.num_classes == 4  # taken from the checkpoint's classifier
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)

    train_ckpt = {"model": model.state_dict(), "model_name": "dat_nano",
                  "model_kwargs": {"num_classes": 4, "img_size": 48}, "epoch": 3, "optimizer": {}}
    torch.save(train_ckpt, tmp_path / "train.pt")
    loaded = create_model("dat_nano", checkpoint_path=tmp_path / "train.pt").eval()
    assert loaded.img_size == (48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)

    compiled_keys = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    report = load_checkpoint(create_model("dat_nano", num_classes=4, img_size=48), compiled_keys)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}


def test_finetune_head_and_wrong_variant(tmp_path):
    model = create_model("dat_nano", num_classes=4)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pt")
    with pytest.warns(UserWarning, match="cls_head keeps its initialisation"):
        tuned = create_model("dat_nano", num_classes=9, checkpoint_path=tmp_path / "ckpt.pt")
    assert tuned.cls_head.out_features == 9
    torch.testing.assert_close(tuned.patch_proj[0].weight, model.patch_proj[0].weight)
    with pytest.raises(ValueError, match="does not fit model 'dat_v1_nano'"):
        create_model("dat_v1_nano", checkpoint_path=tmp_path / "ckpt.pt")
    # a pickled object, like the yacs config the official training script saves into its checkpoints
    torch.save({"model": model.state_dict(), "config": argparse.Namespace(lr=1e-3)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="checkpoint_weights_only=False"):
        create_model("dat_nano", checkpoint_path=tmp_path / "pickled.pt")
    trusted = create_model("dat_nano", checkpoint_path=tmp_path / "pickled.pt", checkpoint_weights_only=False)
    torch.testing.assert_close(trusted.cls_head.weight, model.cls_head.weight)
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        create_model("dat_nano", checkpoint_path=tmp_path / "missing.pt")


def test_window_table_resized_when_window_changes():
    small = create_model("dat_v1_nano", window_sizes=(4, 4, 4, 2))
    big = create_model("dat_v1_nano", window_sizes=(6, 6, 4, 2))
    with torch.no_grad():
        small.stages[0].attns[0].relative_position_bias_table.fill_(0.25)
    report = load_checkpoint(big, small.state_dict())
    assert report["mismatched"] == []
    table = big.stages[0].attns[0].relative_position_bias_table
    assert table.shape == (121, 1)
    torch.testing.assert_close(table, torch.full_like(table, 0.25))


# ---------------------------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_TIMM, reason="timm not installed (optional)")
def test_timm_registration_and_features_only(tmp_path):
    import timm

    assert models.timm_register()
    assert models.timm_register()  # idempotent
    feat = timm.create_model("dat_nano", features_only=True)
    assert feat.feature_info.channels() == [24, 48, 96, 192]
    assert feat.feature_info.reduction() == [2, 4, 8, 16]
    outs = feat(torch.randn(2, 3, 40, 48))
    assert [tuple(o.shape) for o in outs] == [(2, 24, 20, 24), (2, 48, 10, 12), (2, 96, 5, 6), (2, 192, 2, 3)]
    feat = timm.create_model("dat_pp_tiny", features_only=True, out_indices=(1, 3))
    assert feat.feature_info.channels() == [128, 512]

    model = timm.create_model("dat_nano", num_classes=6)
    assert isinstance(model, DAT) and model.num_classes == 6
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    with pytest.raises(RuntimeError, match="never downloads"):
        timm.create_model("dat_nano", pretrained=True)
    # local official-format weights through timm's pretrained path (filter fn unwraps {"model": ...})
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    loaded = timm.create_model("dat_nano", num_classes=6, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    torch.testing.assert_close(loaded.patch_proj[0].weight, model.patch_proj[0].weight)
    torch.testing.assert_close(loaded.stages[2].attns[1].rpe_table, model.stages[2].attns[1].rpe_table)
    # timm re-initialises a classifier whose size differs from the pretrained cfg's (10 classes here)
    torch.save({"model": timm.create_model("dat_nano").state_dict()}, tmp_path / "w10.pth")
    ten = timm.create_model("dat_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w10.pth")))
    torch.testing.assert_close(ten.cls_head.weight, torch.load(tmp_path / "w10.pth")["model"]["cls_head.weight"])


def test_works_without_timm():
    import subprocess
    import sys

    # sys.modules["timm"] = None makes any `import timm` fail, as if it were not installed
    code = ("import sys; sys.modules['timm'] = None; import deformattn.models as m; "
            "print(m.timm_register(), m.create_model('dat_nano').num_classes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "10"


def test_drop_path_schedule_and_eval_determinism():
    model = create_model("dat_nano", drop_path_rate=0.3)
    rates = [dp.drop_prob for st in model.stages for dp in st.drop_path if hasattr(dp, "drop_prob")]
    assert rates == sorted(rates) and math.isclose(rates[-1], 0.3, rel_tol=1e-6)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
