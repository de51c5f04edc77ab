"""timm's generic model contract, checked for every registered variant the way timm tests its own models
(``tests/test_models.py`` of timm): pretrained cfg fields that are true of the model, forward_features / forward_head /
num_features / head_hidden_size agreeing, every global_pool value of timm's ``SelectAdaptivePool2d``,
``features_only`` == ``forward_intermediates``, and a group_matcher that timm's optimizer factory can use.

The released variants are built at a small ``img_size`` (64; same layer structure, smaller position tables) and
run on 64x64 inputs, so the whole file stays a few seconds per variant on one thread.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deformattn.models import list_models
from deformattn.models.dat import POOL_TYPES

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed (optional)"),
    pytest.mark.usefixtures("one_thread_module"),
]

VARIANTS = list_models()
CFG_FIELDS = ("num_classes", "input_size", "pool_size", "crop_pct", "crop_mode", "interpolation", "mean", "std",
              "first_conv", "classifier", "license", "paper_ids", "origin_url", "architecture")


def _size(name: str) -> int:
    return 32 if name.endswith("nano") else 64


def _build(name: str, **kwargs):
    import timm

    from deformattn.models import timm_register

    timm_register()
    torch.manual_seed(0)
    return timm.create_model(name, img_size=_size(name), **kwargs).eval()


@pytest.fixture(scope="module")
def built():
    """One model per variant (3 classes) and its final features of a batch of 2 images, shared by the tests."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model = _build(name, num_classes=3)
            x = torch.randn(2, 3, _size(name), _size(name))
            with torch.no_grad():
                cache[name] = (model, x, model.forward_features(x))
        return cache[name]

    return get


@pytest.mark.parametrize("name", VARIANTS)
def test_pretrained_cfg_is_true(name):
    import timm
    from timm.data import resolve_data_config

    model = _build(name)
    cfg = model.pretrained_cfg
    missing = [f for f in CFG_FIELDS if f not in cfg]
    assert not missing, f"{name}: pretrained_cfg lacks {missing}"
    assert dict(model.default_cfg) == dict(cfg)
    assert cfg["architecture"] == name
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, nn.Conv2d) and first.in_channels == cfg["input_size"][0] == model.in_chans
    head = model.get_submodule(cfg["classifier"])
    assert head is model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == cfg["num_classes"] == model.num_classes
    reduction = model.feature_info[-1]["reduction"]
    assert tuple(cfg["pool_size"]) == tuple(s // reduction for s in cfg["input_size"][1:])
    assert cfg["crop_mode"] == ("center" if cfg["crop_pct"] < 1.0 else "squash")
    assert len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0]
    # what timm's data pipeline reads from the model
    data = resolve_data_config(model=model)
    assert tuple(data["input_size"]) == tuple(cfg["input_size"]) and data["crop_pct"] == cfg["crop_pct"]
    assert tuple(data["mean"]) == tuple(cfg["mean"]) and data["interpolation"] == cfg["interpolation"]
    assert timm.models.get_pretrained_cfg(name).input_size == tuple(cfg["input_size"])
    # the final map at the cfg's input size has pool_size (run at full size only where it is cheap)
    if name.endswith("nano"):
        with torch.no_grad():
            feats = model.forward_features(torch.randn(1, *cfg["input_size"]))
        assert tuple(feats.shape[-2:]) == tuple(cfg["pool_size"])


@pytest.mark.parametrize("name", VARIANTS)
def test_features_head_and_widths_agree(name, built):
    model, x, feats = built(name)
    S = _size(name)
    reduction = model.feature_info[-1]["reduction"]
    assert feats.shape == (2, model.num_features, S // reduction, S // reduction)
    assert model.num_features == model.feature_info[-1]["num_chs"] == model.head_hidden_size
    with torch.no_grad():
        logits = model(x)
        pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(model.forward_head(feats), logits)
    torch.testing.assert_close(model.get_classifier()(pre), logits)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_reset_classifier_every_pool(name, built):
    from timm.layers import SelectAdaptivePool2d

    model, _, feats = built(name)
    C = model.num_features
    try:
        for pool in POOL_TYPES:
            # the pooled values are timm's own (SelectAdaptivePool2d), widths follow its feat_mult
            ref = SelectAdaptivePool2d(pool_type=pool, flatten=bool(pool))
            model.reset_classifier(5, global_pool=pool)
            assert model.num_features == C and model.head_hidden_size == C * ref.feat_mult(), pool
            with torch.no_grad():
                pre = model.forward_head(feats, pre_logits=True)
                out = model.forward_head(feats)
            torch.testing.assert_close(pre, ref(feats))
            if pool == "":
                # unpooled: pre-logits is the final map, the classifier runs at every position
                assert out.shape == (2, 5, *feats.shape[-2:])
                torch.testing.assert_close(out, torch.einsum("bchw,kc->bkhw", feats, model.cls_head.weight)
                                           + model.cls_head.bias.view(1, 5, 1, 1))
            else:
                assert out.shape == (2, 5)
            model.reset_classifier(0, global_pool=pool)
            with torch.no_grad():
                torch.testing.assert_close(model.forward_head(feats), pre)
        # timm's test_model_default_cfgs: no classifier -> pooled num_features; '' -> the map of forward_features
        model.reset_classifier(0, "avg")
        with torch.no_grad():
            assert model.forward_head(feats).shape == (2, C)
        model.reset_classifier(0, "")
        with torch.no_grad():
            torch.testing.assert_close(model.forward_head(feats), feats)
        with pytest.raises(ValueError, match="global_pool"):
            model.reset_classifier(3, global_pool="token")
    finally:
        model.reset_classifier(3, global_pool="avg")


@pytest.mark.parametrize("name", VARIANTS)
def test_features_only_matches_forward_intermediates(name, built):
    model, x, feats = built(name)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        wrapped = _build(name, features_only=True, out_indices=(0, 1, 2, 3))
        wrapped.load_state_dict(model.state_dict(), strict=False)  # the head is gone in the wrapper
        outs = wrapped(x)
    assert len(outs) == len(inter) == 4
    for a, b in zip(outs, inter, strict=True):
        torch.testing.assert_close(a, b)
    assert wrapped.feature_info.channels() == [t.shape[1] for t in outs] == list(model.dims)
    assert wrapped.feature_info.reduction() == [x.shape[-1] // t.shape[-1] for t in outs]
    # a subset, and pruning keeps num_features true
    with torch.no_grad():
        two = _build(name, features_only=True, out_indices=(1, 2))
        two.load_state_dict(model.state_dict(), strict=False)
        sub = two(x)
    for a, b in zip(sub, inter[1:3], strict=True):
        torch.testing.assert_close(a, b)
    pruned = _build(name, num_classes=3)
    pruned.prune_intermediate_layers(indices=(1,), prune_head=True)
    assert pruned.num_features == pruned.head_hidden_size == model.dims[1]


@pytest.mark.parametrize("name", VARIANTS)
def test_group_matcher_with_timm_optimizer_factory(name, built):
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    model, _, _ = built(name)
    blocks = sum(len(s) for s in model.stage_spec)
    fine = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    stage0_proj = int(not isinstance(model.stages[0].proj, nn.Identity))
    # stem, one group per block, 3 down-sampling layers, the stage-0 projection if any, cls_norm, head
    assert max(fine.values()) + 1 == 1 + blocks + 3 + stage0_proj + 1 + 1
    names = [n for n, _ in model.named_parameters()]
    layer = {n: fine[n] for n in names}
    assert set(layer) == set(names)
    assert layer["patch_proj.0.weight"] == 0 and layer["cls_head.weight"] == max(fine.values())
    # one block = one group: its attention, norms, MLP (and LPU / LayerScale) together; order follows depth
    last = model.stages[-1]
    d = last.depth - 1
    prefix = f"stages.{len(model.stages) - 1}"
    block = {layer[n] for n in names if n.startswith((f"{prefix}.attns.{d}.", f"{prefix}.mlps.{d}.",
                                                      f"{prefix}.layer_norms.{2 * d}.",
                                                      f"{prefix}.layer_norms.{2 * d + 1}."))}
    assert len(block) == 1 and layer["cls_norm.norm.weight"] == block.pop() + 1
    for i in range(3):  # a down-sampling layer opens the stage it feeds
        before = max(v for n, v in layer.items() if n.startswith(f"stages.{i}."))
        after = min(v for n, v in layer.items() if n.startswith(f"stages.{i + 1}."))
        assert before < layer[f"down_projs.{i}.0.weight"] < after
    coarse = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert max(coarse.values()) + 1 == 1 + 4 + 1 + 1  # stem, stages (with their down-sampling), norm, head
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scales = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert scales[id(params["cls_head.weight"])] == 1.0
    top = max(fine.values())
    assert scales[id(params["patch_proj.0.weight"])] == pytest.approx(0.5 ** top)


def test_timm_bridge_uses_public_api_only():
    """The timm bridge imports from ``timm``'s public packages, never a private module (``timm.models._x``)."""
    import deformattn.models._timm as bridge

    tree = ast.parse(Path(bridge.__file__).read_text(encoding="utf-8"))
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    timm_modules = [m for m in modules if m.split(".")[0] == "timm"]
    assert timm_modules
    private = [m for m in timm_modules if any(part.startswith("_") for part in m.split("."))]
    assert not private, f"private timm modules imported: {private}"
