"""``--precision`` for train / eval / predict: the autocast + GradScaler code (what GPUs run) forced on the CPU, and
bfloat16 training reaching float32's accuracy on the digits."""
from __future__ import annotations

import pytest
import torch

from deformattn.cli import build_parser
from deformattn.train import TrainConfig, evaluate_checkpoint, predict_images, train
from deformattn.train.precision import autocast, grad_scaler, resolve_precision

TINY = dict(max_train_samples=64, max_eval_samples=32, batch_size=32, progress="none", device="cpu", threads=1)


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"  # --amp's rule: mixed precision on GPU only
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", torch.device("cuda"), amp=False) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", cpu)
    with pytest.raises(ValueError, match="--precision must be one of"):
        TrainConfig(precision="half").validate()


def test_autocast_and_scaler_per_precision():
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    for precision, dtype, scaled in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                     ("fp16", torch.float16, True)):
        with autocast(cpu, precision):
            assert (a @ b).dtype == dtype
        assert grad_scaler(cpu, precision).is_enabled() == scaled


def test_precision_flag_on_train_eval_predict():
    parser = build_parser()
    assert parser.parse_args(["train", "--precision", "bf16"]).precision == "bf16"
    assert parser.parse_args(["eval", "--precision", "fp16"]).precision == "fp16"
    assert parser.parse_args(["predict", "x.png", "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--precision", "fp8"])


def test_fp16_training_runs_autocast_and_the_grad_scaler_on_cpu(tmp_path):
    """The mixed-precision training step GPUs run (autocast + loss scaling + unscale before clipping), on the CPU."""
    out = tmp_path / "run"
    summary = train(TrainConfig(output_dir=str(out), epochs=1, lr=3e-3, warmup_epochs=0.5, precision="fp16",
                                **TINY))
    assert summary["precision"] == "fp16" and summary["train_loss"] == summary["train_loss"]  # finite, not NaN
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["scaler"]["_growth_tracker"] >= 1  # the scaler stepped
    r = evaluate_checkpoint(out / "last.pt", device="cpu", workers=0, precision="bf16")
    assert r["precision"] == "bf16" and 0.0 <= r["acc"] <= 1.0
    # resuming in another precision works (the empty scaler state of a bf16 run is not loaded into fp16's)
    summary = train(TrainConfig(output_dir=str(out), resume="auto", epochs=2, precision="bf16", **TINY),
                    explicit={"epochs", "resume", "precision"})
    assert summary["epochs"] == 2 and summary["precision"] == "bf16"


def test_predict_in_bf16_matches_fp32(tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    train(TrainConfig(output_dir=str(out), epochs=1, **TINY))
    img = tmp_path / "digit.png"
    Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy()).save(img)
    p32 = predict_images(out / "last.pt", [img], device="cpu")[0]["top"]
    p16 = predict_images(out / "last.pt", [img], device="cpu", precision="bf16")[0]["top"]
    assert abs(p32[0][1] - dict(p16)[p32[0][0]]) < 0.05


@pytest.mark.slow
def test_bf16_training_reaches_fp32_accuracy(tmp_path):
    """A few epochs on the digits in bfloat16 autocast: the same accuracy as float32 (within 4 points)."""
    acc = {}
    for precision in ("fp32", "bf16"):
        summary = train(TrainConfig(output_dir=str(tmp_path / precision), epochs=4, lr=3e-3, warmup_epochs=0.5,
                                    batch_size=32, max_train_samples=640, max_eval_samples=300, progress="none",
                                    device="cpu", threads=1, precision=precision))
        acc[precision] = summary["test_accuracy"]
    assert acc["fp32"] >= 0.85, acc
    assert acc["bf16"] >= acc["fp32"] - 0.04, acc
