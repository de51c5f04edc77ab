"""Fine-tuning: ``--initial-checkpoint`` in every accepted format (official names, v1 and DAT++), its refusals (all or
nothing), the summary it leaves, layer-wise lr decay against timm's, and the augmentation flags."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("sklearn")
from deformattn.models import create_model
from deformattn.train import CheckpointError, TrainConfig, param_groups, train
from deformattn.train.augment import BatchAugment
from deformattn.train.initial import (
    guess_architecture,
    load_initial_checkpoint,
    load_initial_weights,
    select_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")
VARIANTS = ["dat_nano", "dat_v1_nano"]  # one DAT++ and one DAT v1 layout (official key names)
TINY = dict(max_train_samples=64, max_eval_samples=32, batch_size=32, progress="none", device="cpu", threads=1)


def _source(name: str, num_classes: int = 1000, **kwargs) -> dict[str, torch.Tensor]:
    """Weights of a 'pretrained' model with values unlike a fresh initialisation (so a load is visible)."""
    torch.manual_seed(123)
    model = create_model(name, num_classes=num_classes, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.state_dict()


def _formats(name: str) -> dict[str, tuple[object, dict[str, torch.Tensor]]]:
    """Every accepted checkpoint layout -> (the loaded object, the weights it should yield)."""
    sd, ema = _source(name), _source(name, num_classes=1000, drop_path_rate=0.0)
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in ema.items()}
    backbone = {k: v for k, v in sd.items() if not k.startswith(("cls_head.", "cls_norm."))}
    train_ckpt = {"format": "deformattn-train-v1", "model": sd, "model_ema": ema, "model_name": name,
                  "model_kwargs": {"num_classes": 1000}, "epoch": 3}
    return {
        "official": ({"model": sd, "optimizer": {}, "epoch": 299, "max_accuracy": 83.9}, sd),
        "bare": (sd, sd),
        "train_ema": (train_ckpt, ema),
        "train_no_ema_flag": (train_ckpt, sd),
        "train_without_ema": ({**train_ckpt, "model_ema": None}, sd),
        "timm_ema": ({"state_dict": sd, "state_dict_ema": ema, "epoch": 10}, ema),
        "mmdet": ({"state_dict": {**{f"backbone.{k}": v for k, v in backbone.items()},
                                  "neck.lateral_convs.0.conv.weight": torch.randn(8, 8, 1, 1),
                                  "rpn_head.rpn_cls.weight": torch.randn(3, 8, 1, 1)},
                   "meta": {"mmdet_version": "2.28.1"}}, backbone),
    }


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("fmt", ["official", "bare", "train_ema", "train_no_ema_flag", "train_without_ema",
                                 "timm_ema", "mmdet"])
def test_every_format_loads(name, fmt):
    obj, expected = _formats(name)[fmt]
    weights = select_weights(obj, ema=fmt != "train_no_ema_flag")
    assert set(weights.state_dict) == set(expected)
    model = create_model(name, num_classes=7)
    fresh_head = model.cls_head.weight.clone()
    report = load_initial_weights(model, weights, path="x.pth")
    own = model.state_dict()
    # derived buffers (attention masks, index tables) are always the model's own
    body = [k for k in expected if not k.startswith(("cls_head.", "cls_norm."))
            and not k.endswith(("attn_mask", "relative_position_index"))]
    for k in body:
        torch.testing.assert_close(own[k], expected[k], msg=k)
    # 1000 -> 7 classes: the classifier is re-initialised (not copied, not half-copied)
    torch.testing.assert_close(model.cls_head.weight, fresh_head)
    assert {"cls_head.weight", "cls_head.bias"} <= set(report["reinitialised_keys"])
    if fmt == "mmdet":  # a backbone: no cls_norm either; the neck and heads are ignored
        assert {"cls_norm.norm.weight", "cls_norm.norm.bias"} <= set(report["reinitialised_keys"])
        assert report["ignored"] == 2 and "neck.lateral_convs.0.conv.weight" in report["ignored_keys"]
    else:
        assert report["ignored"] == 0 and report["reinitialised"] == 2
        torch.testing.assert_close(own["cls_norm.norm.weight"], expected["cls_norm.norm.weight"])
    assert report["loaded"] == len(expected) - (0 if fmt == "mmdet" else 2)


@pytest.mark.parametrize("fixture", ["backbone_v1_tiny.pt", "backbone_pp_tiny.pt"])
def test_official_code_state_dicts_as_mmdet_backbones(fixture):
    """State dicts written by the official code itself (v1 and DAT++ fixtures), wrapped as an mmdet checkpoint."""
    from conftest import fixture_dir, load_fixture

    from deformattn.compat import backbone_from_official

    fx = load_fixture(fixture_dir() / fixture)
    official = fx["state_dict"]
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in official.items() if not k.startswith("cls_")},
            "meta": {"mmseg_version": "0.30.0"}}
    model = backbone_from_official({**fx["config"], "num_classes": 3}, fx["version"]).double().eval()
    report = load_initial_weights(model, select_weights(ckpt))
    reference = backbone_from_official(fx["config"], fx["version"], official).double().eval()
    own, ref = model.state_dict(), reference.state_dict()
    for k in own:
        if not k.startswith(("cls_head.", "cls_norm.")):
            torch.testing.assert_close(own[k], ref[k], msg=k)
    assert report["reinitialised"] == 4 and report["ignored"] == 0  # cls_head and cls_norm weight + bias
    with torch.no_grad():  # the backbone computes what the official weights compute
        ours = model.forward_intermediates(fx["input"], intermediates_only=True)
        theirs = reference.forward_intermediates(fx["input"], intermediates_only=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", VARIANTS)
def test_same_class_count_keeps_the_classifier_and_img_size_resizes_tables(name):
    from deformattn.models.dat import checkpoint_filter_fn

    sd = _source(name, num_classes=10, img_size=64)  # made at 64, fine-tuned at the variant's 32
    model = create_model(name, num_classes=10)
    report = load_initial_weights(model, select_weights({"model": sd}))
    assert report["reinitialised"] == 0
    torch.testing.assert_close(model.cls_head.weight, sd["cls_head.weight"])
    assert report["resized"] and all(k.endswith(("rpe_table", "relative_position_bias_table"))
                                     for k in report["resized"])
    expected = checkpoint_filter_fn(sd, model)  # the library's filter did the resizing
    for k in report["resized"]:
        torch.testing.assert_close(model.state_dict()[k], expected[k])
        assert model.state_dict()[k].shape != sd[k].shape


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_another_architecture_is_refused_naming_it_and_nothing_is_loaded():
    model = create_model("dat_nano", num_classes=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"--initial-checkpoint: .*does not fit --model dat_nano: it looks "
                                              r"like dat_v1_nano; .*Nothing was loaded"):
        load_initial_weights(model, select_weights({"model": _source("dat_v1_nano")}))
    assert _unchanged(model, before)
    # a released layout is told from its shapes alone (no model_name in an official file)
    big = create_model("dat_pp_tiny", num_classes=0).state_dict()
    assert guess_architecture(big) == "dat_pp_tiny"
    assert guess_architecture({f"module.{k}": v for k, v in big.items()}) == "dat_pp_tiny"
    # a library checkpoint says what it was saved from
    with pytest.raises(CheckpointError, match="it looks like dat_pp_tiny"):
        load_initial_weights(model, select_weights({"format": "deformattn-train-v1", "model": big,
                                                    "model_name": "dat_pp_tiny"}))
    # not DAT at all, and a truncated body (missing blocks)
    with pytest.raises(CheckpointError, match="does not look like a DAT checkpoint"):
        load_initial_weights(model, select_weights({"conv1.weight": torch.randn(64, 3, 7, 7),
                                                    "fc.weight": torch.randn(1000, 512)}))
    partial = {k: v for k, v in _source("dat_nano").items() if not k.startswith("stages.3.")}
    with pytest.raises(CheckpointError, match=r"model key\(s\) absent, e.g. stages\.3\."):
        load_initial_weights(model, select_weights(partial))
    assert _unchanged(model, before)


def test_files_that_are_not_checkpoints(tmp_path):
    model = create_model("dat_nano")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    good = tmp_path / "good.pth"
    torch.save({"model": _source("dat_nano")}, good)
    good.write_bytes(good.read_bytes()[:2000])  # truncated
    cases = {"empty.pth": "empty", "text.pth": "not a PyTorch checkpoint", "list.pth": "holds a list, not a checkpoint dict",
             "meta.pth": "not a model checkpoint", "good.pth": "truncated or damaged"}
    for file, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_initial_checkpoint(model, tmp_path / file)
        text = str(info.value)
        assert "\n" not in text and "weights_only=False" not in text and text.startswith("--initial-checkpoint:")
    with pytest.raises(FileNotFoundError, match="--initial-checkpoint"):
        load_initial_checkpoint(model, tmp_path / "missing.pth")


def test_train_from_a_training_checkpoint_summary_and_resume(tmp_path, capsys):
    pre = tmp_path / "pre"
    train(TrainConfig(output_dir=str(pre), epochs=1, ema=True, **TINY))
    capsys.readouterr()
    out = tmp_path / "ft"
    summary = train(TrainConfig(output_dir=str(out), epochs=1, initial_checkpoint=str(pre / "last.pt"),
                                layer_decay=0.8, **TINY))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("initial checkpoint")]
    assert len(lines) == 1 and "deformattn training checkpoint (model_ema)" in lines[0], lines
    info = summary["initial_checkpoint"]
    assert info["path"] == str(pre / "last.pt") and info["reinitialised"] == 0 and info["ignored"] == 0
    assert info["loaded"] == len(create_model("dat_nano").state_dict())
    assert json.loads((out / "summary.json").read_text())["initial_checkpoint"] == info
    # --no-initial-checkpoint-ema takes the raw weights
    raw = train(TrainConfig(output_dir=str(tmp_path / "raw"), epochs=1, initial_checkpoint=str(pre / "last.pt"),
                            initial_checkpoint_ema=False, **TINY))
    assert raw["initial_checkpoint"]["format"] == "deformattn training checkpoint (model)"
    # the fine-tuning run resumes (its config names the initial checkpoint) and keeps the record
    resumed = train(TrainConfig(output_dir=str(out), resume="auto", epochs=2, **TINY), explicit={"resume", "epochs"})
    assert resumed["epochs"] == 2 and resumed["initial_checkpoint"] == info
    with pytest.raises(ValueError, match="--resume and --initial-checkpoint both set"):
        train(TrainConfig(output_dir=str(out), resume="auto", initial_checkpoint=str(pre / "last.pt"), **TINY))


def test_wrong_checkpoint_stops_the_run_before_training(tmp_path):
    ckpt = tmp_path / "v1.pth"
    torch.save({"model": _source("dat_v1_nano")}, ckpt)
    with pytest.raises(CheckpointError, match="it looks like dat_v1_nano"):
        train(TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, initial_checkpoint=str(ckpt), **TINY))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_layer_decay_matches_timm():
    timm_optim = pytest.importorskip("timm.optim")
    model = create_model("dat_nano", num_classes=5)
    ours = param_groups(model, 0.05, layer_decay=0.7, lr=1e-3)
    theirs = timm_optim.param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.7,
                                                 no_weight_decay_list=model.no_weight_decay())
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in ours for p in g["params"]}
    ref = {id(p): (g["lr_scale"], g["weight_decay"]) for g in theirs for p in g["params"]}
    assert scale.keys() == ref.keys()
    for k in ref:
        assert scale[k][0] == pytest.approx(ref[k][0]) and scale[k][1] == ref[k][1]
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in ours)
    assert min(g["lr_scale"] for g in ours) == pytest.approx(0.7 ** 12)  # 13 layers: stem ... classifier
    # without layer decay: the two groups of old
    assert [g["weight_decay"] for g in param_groups(model, 0.05)] == [0.05, 0.0]


def test_batch_augment_mixup_cutmix_and_erasing():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 16, 16) + 0.5  # odd batch: torchvision's MixUp / CutMix take any size
    y = torch.tensor([0, 1, 2, 3, 4])
    images, target = BatchAugment(mixup=0.8, cutmix=1.0, reprob=0.0, num_classes=6)(x, y)
    assert images.shape == x.shape and target.shape == (5, 6)
    torch.testing.assert_close(target.sum(1), torch.ones(5))
    assert (target[:, 5] == 0).all() and not torch.equal(images, x)
    erased, labels = BatchAugment(mixup=0.0, cutmix=0.0, reprob=0.999, num_classes=6)(x, y)
    assert torch.equal(labels, y) and not torch.equal(erased, x) and torch.equal(x, x.clone())
    assert not BatchAugment(mixup=0.0, cutmix=0.0, reprob=0.0, num_classes=6).active


def test_augmentation_flags_parse_validate_and_build(tmp_path):
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    args = parser.parse_args(["--smoothing", "0.2", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25",
                              "--aa", "rand-m9-mstd0.5-inc1", "--color-jitter", "0.4", "--data", str(tmp_path),
                              "--layer-decay", "0.75", "--initial-checkpoint", "w.pth", "--no-initial-checkpoint-ema"])
    config = TrainConfig(**vars(args)).validate()
    assert config.label_smoothing == 0.2 and config.layer_decay == 0.75 and not config.initial_checkpoint_ema
    with pytest.raises(ValueError, match="--aa and --color-jitter apply to ImageFolder"):
        TrainConfig(aa="rand-m9-mstd0.5-inc1").validate()
    with pytest.raises(ValueError, match="--layer-decay"):
        TrainConfig(layer_decay=1.5).validate()
    with pytest.raises(ValueError, match="--aa must be a timm auto-augment policy"):
        TrainConfig(aa="sharpen", data=str(tmp_path)).validate()
    pytest.importorskip("timm")
    from deformattn.train.data import DataSpec, build_transform

    spec = DataSpec(kind="imagefolder", img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    recipe = repr(build_transform(spec, train=True, aa="rand-m9-mstd0.5-inc1", reprob=0.25, color_jitter=0.4))
    assert "RandAugment" in recipe and "RandomErasing(p=0.25" in recipe
    assert "RandAugment" not in repr(build_transform(spec, train=True))


def test_digits_run_with_the_batch_recipe(tmp_path):
    summary = train(TrainConfig(output_dir=str(tmp_path), epochs=1, mixup=0.8, cutmix=1.0, reprob=0.25, **TINY))
    assert summary["epochs"] == 1 and summary["train_loss"] == summary["train_loss"]  # finite, not NaN
    assert summary["initial_checkpoint"] is None
