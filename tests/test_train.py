"""Training engine: loss goes down, outputs and checkpoint format, kill-and-resume, corrupt / mismatched checkpoints,
ImageFolder data, EMA. Runs are tiny (a few hundred digit images, dat_nano) to stay fast on 2 CPU cores."""
from __future__ import annotations


import itertools
import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
from deformattn.models import create_model
from deformattn.train import (
    FORMAT,
    CheckpointError,
    TrainConfig,
    evaluate_checkpoint,
    load_checkpoint_file,
    param_groups,
    predict_images,
    train,
)
from deformattn.train.distributed import DistEnv, choose_threads
from deformattn.train.engine import ShardSampler, cosine_schedule

TINY = dict(max_train_samples=96, max_eval_samples=64, batch_size=32, progress="none", device="cpu")


def run_cli(*args: str, timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-m", "deformattn", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=env, **popen)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One 2-epoch run on 96 digits, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("tiny_run")
    train(TrainConfig(output_dir=str(out), epochs=2, lr=3e-3, warmup_epochs=0.5, **TINY))
    return out


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = create_model("dat_nano", num_classes=10)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_train_outputs_and_checkpoint_format(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["model"] == "dat_nano" and summary["epochs"] == 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["seconds"] > 0
    assert summary["replicas_identical"] and summary["world_size"] == 1
    history = json.loads((tiny_run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert summary["test_accuracy"] == history[-1]["eval_acc"]
    csv_lines = (tiny_run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,lr,train_loss") and len(csv_lines) == 3
    assert (tiny_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((tiny_run / "config.json").read_text())
    assert TrainConfig.from_dict(config).img_size == 32  # resolved, and loadable as a config again
    assert not [p for p in tiny_run.iterdir() if ".tmp-" in p.name]  # atomic writes left no temporaries

    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)  # plain tensors and containers only
    assert ckpt["format"] == FORMAT and ckpt["epoch"] == 2 and ckpt["model_name"] == "dat_nano"
    assert ckpt["model_kwargs"] == {"num_classes": 10, "img_size": 32}
    assert ckpt["class_names"] == [str(i) for i in range(10)]
    for key in ("optimizer", "scheduler", "scaler", "rng", "config"):
        assert key in ckpt
    assert ckpt["scheduler"]["last_epoch"] == 2 * 3  # 96 images / 32 per step
    assert {"torch", "python", "numpy"} <= set(ckpt["rng"][0])


def test_create_model_accepts_the_checkpoint(tiny_run):
    ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
    model = create_model("dat_nano", checkpoint_path=tiny_run / "last.pt").eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_evaluate_checkpoint_matches_training_metrics(tiny_run):
    history = json.loads((tiny_run / "metrics.json").read_text())
    r = evaluate_checkpoint(tiny_run / "last.pt", device="cpu", max_samples=64)
    assert r["count"] == 64 and r["split"] == "test"
    assert r["acc"] == pytest.approx(history[-1]["eval_acc"])
    assert r["loss"] == pytest.approx(history[-1]["eval_loss"], rel=1e-5)


def test_param_groups_skip_bias_tables_and_1d():
    model = create_model("dat_nano", num_classes=10)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert model.no_weight_decay() and model.no_weight_decay() <= skipped
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(names[id(p)] not in model.no_weight_decay() for p in decay["params"])
    assert any(n.endswith(".bias") for n in skipped)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_cosine_schedule_warmup_and_floor():
    kw = dict(total_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert cosine_schedule(0, **kw) == pytest.approx(0.1)
    assert cosine_schedule(9, **kw) == pytest.approx(1.0)
    assert cosine_schedule(10, **kw) == pytest.approx(1.0)
    assert cosine_schedule(55, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    assert cosine_schedule(100, **kw) == pytest.approx(0.01)
    values = [cosine_schedule(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_shard_sampler_covers_every_item_once():
    parts = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


def test_choose_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env, cores = DistEnv(), torch.get_num_threads()
    assert choose_threads(3, env) == 3
    assert choose_threads(0, env, small_model=True) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert choose_threads(0, env) == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))
    assert choose_threads(0, env) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads(0, env, small_model=True) == cores  # the environment's choice stands
    assert torch.get_num_threads() == cores


def test_train_restores_the_thread_count(tiny_run, tmp_path):
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = torch.get_num_threads()
    summary = train(TrainConfig(output_dir=str(run), resume="auto", epochs=2, threads=1, **TINY))  # nothing to do
    assert summary["epochs"] == 2 and summary["threads"] == 1
    assert torch.get_num_threads() == before


def test_kill_mid_epoch_and_resume_is_exact(tmp_path):
    """SIGKILL during epoch 2, resume: 2 epochs in the end, epoch 1 kept, same weights as an uninterrupted run."""
    common = ["train", "--epochs", "2", "--max-train-samples", "256", "--max-eval-samples", "32",
              "--batch-size", "8", "--img-size", "16", "--device", "cpu", "--threads", "1",
              "--progress", "plain", "--log-interval", "1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    # the interrupted run: kill it a few steps into epoch 2
    proc = subprocess.Popen([sys.executable, "-m", "deformattn", *common, "--output-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    killed_at = None
    for line in proc.stdout:
        if line.startswith("epoch 2/2 train step 3/"):
            proc.send_signal(signal.SIGKILL)
            killed_at = line
            break
        assert time.time() < deadline, "the training run did not reach epoch 2"
    proc.wait(timeout=30)
    proc.stdout.close()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["epoch"] == 1, "the run was meant to be killed mid-epoch 2"
    epoch1 = json.loads((run / "metrics.json").read_text())
    assert len(epoch1) == 1 and not (run / "summary.json").exists()

    resumed = run_cli(*common, "--output-dir", str(run), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout
    reference = run_cli(*common, "--output-dir", str(ref))
    assert reference.returncode == 0, reference.stderr

    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2
    history = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and history[0] == epoch1[0]
    ref_history = json.loads((ref / "metrics.json").read_text())
    # same thread count, same order of operations: bit-identical to the uninterrupted run
    for a, b in zip(history, ref_history, strict=True):
        for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr"):
            assert a[key] == b[key], (a["epoch"], key)
    final, expected = (torch.load(d / "last.pt", weights_only=True) for d in (run, ref))
    assert final["epoch"] == expected["epoch"] == 2
    assert final["scheduler"]["last_epoch"] == expected["scheduler"]["last_epoch"]
    for k, v in expected["model"].items():
        assert torch.equal(final["model"][k], v), k
    for a, b in zip(final["optimizer"]["state"].values(), expected["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_gives_a_clear_error(tiny_run, tmp_path, damage):
    data = (tiny_run / "last.pt").read_bytes()
    bad = tmp_path / "last.pt"
    bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 100, "empty": b""}[damage])
    diagnosis = "(truncated|damaged|not a PyTorch checkpoint)"
    with pytest.raises(CheckpointError, match=f"^resume: .*{diagnosis}") as info:
        load_checkpoint_file(bad, argument="resume")
    assert "weights_only" not in str(info.value) and info.value.pickled_objects == ()
    r = run_cli("train", "--resume", str(bad), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "deformattn train: error: --resume:" in r.stderr
    assert re.search(diagnosis, r.stderr) and "weights_only" not in r.stderr


def test_checkpoint_of_another_kind_is_refused(tmp_path):
    state = tmp_path / "state_dict.pt"
    torch.save(create_model("dat_nano", num_classes=10).state_dict(), state)
    with pytest.raises(CheckpointError, match="not a deformattn training checkpoint"):
        load_checkpoint_file(state)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.pt")


def test_resume_with_another_model_is_refused(tiny_run, tmp_path):
    with pytest.raises(CheckpointError, match=r"--model 'dat_v1_nano' \(checkpoint: 'dat_nano'\)"):
        train(TrainConfig(model="dat_v1_nano", resume=str(tiny_run / "last.pt"), output_dir=str(tmp_path), **TINY),
              explicit={"model", "resume"})
    best = tiny_run / "best.pt"  # weights-only export: usable for eval, not for resuming
    with pytest.raises(CheckpointError, match="lacks optimizer"):
        train(TrainConfig(resume=str(best), output_dir=str(tmp_path), **TINY))


def test_resume_of_a_finished_run_extends_it(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    summary = train(TrainConfig(output_dir=str(run), resume="auto", epochs=3, **TINY), explicit={"epochs", "resume"})
    assert summary["epochs"] == 3
    history = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[:2] == json.loads((tiny_run / "metrics.json").read_text())


def _write_imagefolder(root: Path) -> None:
    """Two classes a model can tell apart quickly: bright red squares and dark blue ones, with noise."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    colours = {"blue": (20, 30, 200), "red": (220, 30, 20)}
    for split, n in (("train", 12), ("val", 4)):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                noise = torch.randint(-20, 21, (40, 36, 3), generator=g)
                pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")


def test_imagefolder_train_eval_predict(tmp_path):
    pytest.importorskip("torchvision")
    data, out = tmp_path / "data", tmp_path / "out"
    _write_imagefolder(data)
    summary = train(TrainConfig(data=str(data), output_dir=str(out), epochs=3, batch_size=8, lr=2e-3, workers=0,
                                min_crop_scale=0.5, warmup_epochs=0.5, ema=True, ema_decay=0.9, progress="none",
                                device="cpu"))
    assert summary["num_train"] == 24 and summary["num_eval"] == 8 and summary["eval_split"] == "val"
    assert summary["ema_test_accuracy"] is not None
    ckpt = load_checkpoint_file(out / "last.pt")
    assert ckpt["class_names"] == ["blue", "red"] and ckpt["data"]["kind"] == "imagefolder"
    assert ckpt["model_ema"] is not None
    r = evaluate_checkpoint(out / "last.pt", device="cpu", workers=0)
    assert r["count"] == 8 and r["top5"] == 1.0  # two classes: top-5 is everything
    r_ema = evaluate_checkpoint(out / "last.pt", device="cpu", workers=0, ema=True)
    assert r_ema["acc"] == pytest.approx(summary["ema_test_accuracy"])
    preds = predict_images(out / "last.pt", [data / "val" / "red" / "0.png", data / "val" / "blue" / "0.png"],
                           device="cpu")
    for p in preds:
        assert [c for c, _ in p["top"]] in (["red", "blue"], ["blue", "red"])
        assert sum(prob for _, prob in p["top"]) == pytest.approx(1.0, abs=1e-5)


def test_imagefolder_errors_name_the_argument(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match="--data: .* is not a folder"):
        train(TrainConfig(data=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "o"), **TINY))
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="--data: .* has no 'val' subfolder"):
        train(TrainConfig(data=str(tmp_path / "d"), output_dir=str(tmp_path / "o"), **TINY))


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--lr must be > 0"):
        TrainConfig(lr=-1.0).validate()
    with pytest.raises(TypeError, match="--epochs must be an int"):
        TrainConfig(epochs="3").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown key.*'lrr' \\(did you mean 'lr'\\?\\)"):
        TrainConfig.from_dict({"lrr": 1.0})
    with pytest.raises(ValueError, match="--model-kwargs must not set num_classes"):
        TrainConfig(model_kwargs={"num_classes": 3}).validate()
    with pytest.raises(ValueError, match="--model: unknown model 'dat_nanoo'. Did you mean 'dat_nano'"):
        train(TrainConfig(model="dat_nanoo"))
    assert math.isclose(TrainConfig(lr=1).validate().lr, 1.0)
