"""Whole backbones against the official code: every ``backbone_*`` fixture reproduced in float64 through
``deformattn.compat.backbone_from_official``, and the released configurations against their manifests (parameter
counts, state_dict keys and shapes, official-format checkpoints)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import fixture_dir, fixture_files, load_fixture

from deformattn.attention import DeformableAttention2d
from deformattn.compat import backbone_from_official
from deformattn.layers import NeighborhoodAttention2d
from deformattn.models import create_model, load_checkpoint
from deformattn.models._official import dat_kwargs_from_official

TOL = 1e-9  # max abs error, float64
BACKBONES = fixture_files(("backbone_",))
MANIFEST_NAMES = ["dat_tiny", "dat_small", "dat_base", "dat_pp_tiny", "dat_pp_small", "dat_pp_base"]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_backbone_fixtures_present():
    assert len(list(fixture_dir().glob("backbone_*.pt"))) >= 5


@pytest.mark.parametrize("path", BACKBONES, ids=[p.stem for p in BACKBONES])
def test_backbone_fixture(path):
    fx = load_fixture(path)
    model = backbone_from_official(fx["config"], fx["version"], fx["state_dict"])
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == fx["num_params"]
    assert set(model.state_dict()) == set(fx["state_dict"])  # official names, nothing renamed or dropped

    # capture every D / N module's input to replay it with return_sampling=True
    inputs: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (DeformableAttention2d, NeighborhoodAttention2d)):
            mod.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
    x = fx["input"]
    with torch.no_grad():
        logits = model(x)
        final, stages = model.forward_intermediates(x)
        stem = model.patch_proj(x)
        assert _max_err(logits, fx["output"]) <= TOL
        assert _max_err(stem, fx["patch_embed_output"]) <= TOL
        assert len(stages) == len(fx["stage_outputs"]) == 4
        for ours, theirs in zip(stages, fx["stage_outputs"]):
            assert _max_err(ours, theirs) <= TOL
        torch.testing.assert_close(model.forward_head(final), logits, rtol=0, atol=1e-12)

        deform = {n for n, m in model.named_modules() if isinstance(m, DeformableAttention2d)}
        assert deform == set(fx["deform_pos"]) == set(fx["deform_ref"])
        for name in deform:
            _, pos, ref = model.get_submodule(name)(inputs[name], return_sampling=True)
            assert _max_err(pos, fx["deform_pos"][name]) <= TOL
            assert _max_err(ref, fx["deform_ref"][name]) <= TOL
        for name, expected in fx.get("nat_outputs", {}).items():
            assert _max_err(model.get_submodule(name)(inputs[name]), expected) <= TOL


def test_backbone_from_official_rejects_bad_configs():
    fx = load_fixture(fixture_dir() / "backbone_v1_tiny.pt")
    with pytest.raises(ValueError, match="version"):
        backbone_from_official(fx["config"], "v2")
    with pytest.raises(ValueError, match="does not take"):
        backbone_from_official(dict(fx["config"], not_an_arg=1), "v1")
    with pytest.raises(ValueError, match="only in the DAT\\+\\+ code"):
        backbone_from_official(dict(fx["config"], use_lpus=[True] * 4), "v1")
    bad = dict(fx["config"], stage_spec=[["L"], ["S"], ["L", "P"], ["D"]])
    with pytest.raises(ValueError, match="block kinds"):
        backbone_from_official(bad, "v1")
    sd = dict(fx["state_dict"])
    sd.pop("cls_head.bias")
    with pytest.raises(ValueError, match="1 missing key"):
        backbone_from_official(fx["config"], "v1", sd)


# ---------------------------------------------------------------------------------------------------------------
# released configurations vs the manifests
# ---------------------------------------------------------------------------------------------------------------
def _manifest(name: str) -> dict:
    return json.loads((fixture_dir() / f"manifest_{name}.json").read_text())


def _official_checkpoint(manifest: dict) -> dict[str, torch.Tensor]:
    """An official-format state_dict from a manifest: every listed key with its shape; value i for key i."""
    sd = {}
    for i, entry in enumerate(manifest["state_dict"]):
        dtype = getattr(torch, entry["dtype"])
        sd[entry["key"]] = torch.full(entry["shape"], i % 1000, dtype=dtype)
    return sd


@pytest.mark.parametrize("name", MANIFEST_NAMES)
def test_released_variant_matches_manifest(name):
    manifest = _manifest(name)
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        e["key"]: tuple(e["shape"]) for e in manifest["state_dict"]
    }
    # the registered config is the official yaml config
    official = backbone_from_official(manifest["constructor_kwargs"], "pp" if "pp" in name else "v1")
    assert repr(official) == repr(model)
    report = load_checkpoint(model, {"model": _official_checkpoint(manifest)})
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    sd = model.state_dict()
    for i, entry in enumerate(manifest["state_dict"]):
        if entry["kind"] == "parameter":
            assert sd[entry["key"]].flatten()[0].item() == i % 1000, entry["key"]


@pytest.mark.parametrize("name", ["dat_tiny", "dat_pp_tiny"])
def test_official_checkpoint_file_loads_through_create_model(name, tmp_path):
    manifest = _manifest(name)
    sd = _official_checkpoint(manifest)
    path = tmp_path / "official.pth"
    torch.save({"model": sd, "epoch": 299, "max_accuracy": 82.0}, path)
    model = create_model(name, checkpoint_path=path)
    for key in ("cls_head.bias", "stages.2.attns.1.proj_q.weight"):
        torch.testing.assert_close(model.state_dict()[key], sd[key])
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    model = create_model(name, pretrained=True, checkpoint_path=bare)
    torch.testing.assert_close(model.cls_head.weight, sd["cls_head.weight"])


def test_checkpoint_of_another_variant_is_refused_and_nothing_loads():
    sd = _official_checkpoint(_manifest("dat_pp_tiny"))
    model = create_model("dat_pp_small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_checkpoint(model, {"model": sd})
    msg = str(info.value)
    assert "mismatched" in msg and "patch_proj.0.weight" in msg and "nothing was loaded" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    v1 = _official_checkpoint(_manifest("dat_tiny"))
    model = create_model("dat_small")
    with pytest.raises(ValueError, match="missing key"):  # stage 3 of DAT-S has 12 more blocks
        load_checkpoint(model, v1)


def test_384_variants():
    # DAT++ 384: built at 224, so the DAT-B++ checkpoint shapes load unchanged
    manifest = _manifest("dat_pp_base")
    model = create_model("dat_pp_base_384")
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    assert model.pretrained_cfg["input_size"] == (3, 384, 384)
    assert load_checkpoint(model, _official_checkpoint(manifest))["mismatched"] == []

    # DAT v1 384: window 12 and tables built for 384; the 224 checkpoint loads with its tables resized
    model = create_model("dat_base_384")
    assert model.stages[0].attns[0].window_size == 12
    assert model.stages[0].attns[1].attn_mask.shape == (64, 144, 144)  # 96x96 map, 12x12 windows
    assert model.stages[3].attns[1].rpe_table.shape == (32, 23, 23)  # v1 table sized by the 12x12 map
    base = _official_checkpoint(_manifest("dat_base"))
    report = load_checkpoint(model, base)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    table = model.stages[2].attns[1].rpe_table
    key = "stages.2.attns.1.rpe_table"
    assert table.shape == (16, 47, 47) and base[key].shape == (16, 27, 27)
    torch.testing.assert_close(table, torch.full_like(table, base[key].flatten()[0].item()))  # constant stays


def test_dat_kwargs_from_official_defaults_and_depth_truncation():
    cfg = dict(load_fixture(fixture_dir() / "backbone_pp_tiny.pt")["config"])
    cfg["stage_spec"] = [["L", "D", "N"], ["D"], ["S", "D"], ["D"]]  # the official stage reads depths[i] letters
    kwargs = dat_kwargs_from_official(cfg, "pp")
    assert kwargs["stage_spec"] == ("LD", "D", "SD", "D")
    assert kwargs["layer_scale_inits"] == (None,) * 4 and kwargs["pos_biases"] == ("table",) * 4
    with pytest.raises(ValueError, match="letters for depths"):
        dat_kwargs_from_official(dict(cfg, depths=[3, 1, 2, 1], stage_spec=[["L"], ["D"], ["S", "D"], ["D"]]), "pp")
