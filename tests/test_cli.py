"""The ``deformattn`` command: help texts, config files with command-line overrides, eval / predict / info on a
saved checkpoint, and one-line errors that name the argument."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
from deformattn.cli import COMMANDS, main, register_command
from deformattn.train import TrainConfig, train
from deformattn.train.data import load_digits_split

TINY = ["--max-train-samples", "64", "--max-eval-samples", "32", "--batch-size", "32", "--progress", "none",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_run")
    train(TrainConfig(output_dir=str(out), epochs=1, max_train_samples=64, max_eval_samples=32, batch_size=32,
                      progress="none", device="cpu"))
    return out


def _digit_png(path: Path, image: torch.Tensor) -> Path:
    from PIL import Image

    Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy(), mode="L").resize((32, 32)).save(path)
    return path


@pytest.mark.parametrize("args", [[], ["train"], ["eval"], ["predict"], ["info"]])
def test_help_everywhere(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*args, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: deformattn" in text
    if args == ["train"]:
        for flag in ("--config", "--data", "--resume", "--ema", "--output-dir", "--model"):
            assert flag in text


def test_python_dash_m_and_version():
    r = subprocess.run([sys.executable, "-m", "deformattn", "--version"], check=False, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("deformattn ")


def test_config_file_with_command_line_overrides(tmp_path, capsys):
    pytest.importorskip("yaml")
    cfg = tmp_path / "run.yaml"
    # YAML reads 3e-3 as a string: values go through the same conversion as command-line values
    cfg.write_text("epochs: 3\nlr: 3e-3\nbatch-size: 16\nmax_train_samples: 32\nmax-eval-samples: 16\n"
                   "warmup_epochs: 0\nprogress: none\ndevice: cpu\nema: true\n")
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--output-dir", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1  # the command line wins over the file
    assert saved["lr"] == 3e-3 and saved["batch_size"] == 16 and saved["ema"] is True  # the file over defaults
    assert saved["weight_decay"] == TrainConfig().weight_decay  # defaults otherwise
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    # the saved config reproduces the run's settings as a JSON --config file
    out2 = tmp_path / "out2"
    assert main(["train", "--config", str(out / "config.json"), "--output-dir", str(out2), "--epochs", "1"]) == 0
    again = json.loads((out2 / "config.json").read_text())
    again.pop("output_dir"), saved.pop("output_dir")
    assert again == saved


@pytest.mark.parametrize(
    "content, message",
    [
        ("lrr: 0.1\n", "unknown option 'lrr' for 'deformattn train' (did you mean 'lr'?)"),
        ("epochs: many\n", "epochs: invalid value 'many'"),
        ("progress: fancy\n", "progress must be one of auto, bar, plain, none"),
        ("ema: 3\n", "ema must be true or false"),
        ("- a list\n", "must hold a mapping"),
    ],
)
def test_bad_config_file(tmp_path, capsys, content, message):
    pytest.importorskip("yaml")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deformattn train: error: --config") and message in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model", "dat_nan"], "--model: unknown model 'dat_nan'. Did you mean 'dat_nano'"),
        (["train", "--data", "/no/such/folder"], "--data: '/no/such/folder' is not a folder"),
        (["train", "--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["train", "--model-kwargs", '{"num_classes": 3}'], "--model-kwargs must not set num_classes"),
        (["train", "--resume", "/no/such/last.pt"], "--resume: checkpoint '/no/such/last.pt' does not exist"),
        (["eval"], "--checkpoint is required"),
        (["eval", "-c", "/no/such.pt"], "--checkpoint: checkpoint '/no/such.pt' does not exist"),
        (["predict", "-c", "/no/such.pt", "x.png"], "--checkpoint: checkpoint '/no/such.pt' does not exist"),
        (["info", "-c", "/no/such.pt"], "--checkpoint: checkpoint '/no/such.pt' does not exist"),
    ],
)
def test_errors_are_one_line_and_name_the_argument(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_argparse_type_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "three"])
    assert exc.value.code == 2 and "--epochs: invalid int value" in capsys.readouterr().err


def test_eval_prints_top1_top5_and_loss(trained, capsys):
    assert main(["eval", "-c", str(trained / "last.pt"), "--device", "cpu", "--max-samples", "32"]) == 0
    out = capsys.readouterr().out
    assert "dat_nano" in out and "digits test (32 images)" in out
    assert "top-1" in out and "top-5" in out and "loss" in out
    assert main(["eval", "-c", str(trained / "last.pt"), "--device", "cpu", "--split", "train", "--json",
                 "--max-samples", "64"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["split"] == "train" and r["count"] == 64 and 0 <= r["acc"] <= r["top5"] <= 1
    assert main(["eval", "-c", str(trained / "last.pt"), "--split", "val"]) == 2
    assert "--split: the digits have the splits 'train' and 'test'" in capsys.readouterr().err
    assert main(["eval", "-c", str(trained / "last.pt"), "--ema"]) == 2
    assert "has no EMA weights" in capsys.readouterr().err


def test_predict_prints_classes_with_probabilities(trained, tmp_path, capsys):
    _, _, x_test, y_test = load_digits_split(0.25, 0)
    images = [_digit_png(tmp_path / f"digit{i}.png", x_test[i]) for i in range(3)]
    assert main(["predict", "-c", str(trained / "last.pt"), *map(str, images), "--topk", "3", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 4 and lines[0] == str(images[0])
    probs = [float(line.split()[1].rstrip("%")) for line in lines[1:4]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 100 for p in probs)
    assert lines[1].split()[0] in [str(i) for i in range(10)]
    assert main(["predict", "-c", str(trained / "last.pt"), str(images[0]), "--json", "--topk", "20"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r[0]["top"]) == 10  # capped at the number of classes
    assert sum(t["probability"] for t in r[0]["top"]) == pytest.approx(1.0, abs=1e-5)
    assert main(["predict", "-c", str(trained / "last.pt"), str(tmp_path / "missing.png")]) == 2
    assert "deformattn predict: error: image" in capsys.readouterr().err  # the command is named once
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    assert main(["predict", "-c", str(trained / "last.pt"), str(tmp_path / "broken.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_info(trained, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "dat_nano" in out and "commands:" in out and "torch" in out
    assert main(["info", "-c", str(trained / "last.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "dat_nano" and info["epoch"] == 1 and info["resumable"] is True


def test_register_command_adds_a_subcommand(capsys):
    def configure(parser):
        parser.add_argument("--times", type=int, default=1)

    @register_command("echo-test", help="test command", configure=configure)
    def run(args, explicit):
        print(f"echo {args.times} {sorted(explicit)}")
        return 3

    try:
        assert main(["echo-test", "--times", "2"]) == 3
        assert capsys.readouterr().out == "echo 2 ['times']\n"
        with pytest.raises(ValueError, match="already registered"):
            register_command("echo-test", help="again", configure=configure)(run)
    finally:
        COMMANDS.pop("echo-test")


def test_resume_from_the_command_line(trained, tmp_path, capsys):
    ckpt = str(trained / "last.pt")
    # a setting given on the command line that contradicts the checkpoint is refused, naming the flag
    assert main(["train", "--resume", ckpt, "--lr", "0.5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another run: --lr 0.5 (checkpoint: 0.002)" in err and "--epochs" in err
    # --resume auto without a last.pt starts afresh
    out = tmp_path / "fresh"
    assert main(["train", "--resume", "auto", "--output-dir", str(out), "--epochs", "1", *TINY]) == 0
    assert "deformattn train: training:" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_info_reads_official_and_bare_state_dicts(tmp_path, capsys):
    from deformattn.models import create_model

    model = create_model("dat_nano", num_classes=10)
    torch.save({"model": model.state_dict()}, tmp_path / "official.pth")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "bare.pth")
    for name, kind in (("official.pth", "official checkpoint"), ("bare.pth", "bare state_dict")):
        assert main(["info", "--checkpoint", str(tmp_path / name), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"].startswith(kind) and info["fits"] == ["dat_nano"] and info["num_classes"] == 10
        assert info["params"] == sum(p.numel() for p in model.parameters())
    torch.save({"model": {"a": torch.zeros(2)}}, tmp_path / "other.pth")
    assert main(["info", "--checkpoint", str(tmp_path / "other.pth"), "--json"]) == 0
    assert "no registered variant" in json.loads(capsys.readouterr().out)["fits"]
    assert main(["info", "--models"]) == 0
    from deformattn.models import list_models

    assert capsys.readouterr().out.split() == list_models()


def test_help_texts_name_only_commands_and_options_that_exist(capsys):
    """Every 'deformattn COMMAND --option' a help text mentions parses (train --help once named 'info --models')."""
    import re

    from deformattn.cli import build_parser

    texts = []
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        texts.append(capsys.readouterr().out)
    mentioned = {m.group(1).strip() for t in texts for m in re.finditer(r"deformattn ((?:[a-z][\w-]*)(?: --[\w-]+)*)",
                                                                        " ".join(t.split()))}
    mentioned = {m for m in mentioned if m.split()[0] in COMMANDS}
    assert "info --models" in mentioned
    for cmd in mentioned:
        argv = cmd.split()
        parser = build_parser()
        known = {s for a in parser._subparsers._group_actions[0].choices[argv[0]]._actions for s in a.option_strings}
        assert all(a in known for a in argv[1:] if a.startswith("--")), cmd


def test_export_usage_shows_required_flags(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "--format {onnx,torchscript} --output FILE" in usage and "[--format" not in usage.split("options:")[0]


def test_library_errors_become_flag_errors(tmp_path, capsys):
    """The library names its arguments (checkpoint, model_name); the CLI prints the flags, and the command once."""
    from deformattn.models import CheckpointError, create_model

    (tmp_path / "junk.pt").write_bytes(b"junk" * 100)
    with pytest.raises(CheckpointError, match=r"^checkpoint_path: cannot read checkpoint") as info:
        create_model("dat_nano", checkpoint_path=tmp_path / "junk.pt")
    assert info.value.argument == "checkpoint_path"
    with pytest.raises(ValueError, match=r"^model_name: unknown model 'dat_nanoo'. Did you mean 'dat_nano'"):
        create_model("dat_nanoo")
    assert main(["viz", "--model", "dat_nanoo", "--output", str(tmp_path / "v.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deformattn viz: error: --model: unknown model 'dat_nanoo'") and "Registered models:" in err
    assert main(["eval", "--checkpoint", str(tmp_path / "junk.pt")]) == 2
    assert capsys.readouterr().err.startswith("deformattn eval: error: --checkpoint: cannot read checkpoint")


def test_samples_and_inverted_digit_warning(trained, tmp_path, capsys):
    from PIL import Image, ImageOps

    assert main(["samples", "--output-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digit.png", "photo.jpg"]
    capsys.readouterr()
    ckpt = str(trained / "last.pt")
    assert main(["predict", "-c", ckpt, str(tmp_path / "digit.png")]) == 0
    assert "warning" not in capsys.readouterr().err  # the sample is light on dark, as the digits model expects
    ImageOps.invert(Image.open(tmp_path / "digit.png").convert("L")).save(tmp_path / "inverted.png")
    assert main(["predict", "-c", ckpt, str(tmp_path / "inverted.png")]) == 0
    err = capsys.readouterr().err
    assert "deformattn predict: warning:" in err and "light digit on a dark background" in err
