"""The ``deformattn`` command: ``train``, ``eval``, ``predict``, ``info``, and the commands of the modules listed in
``EXTENSION_MODULES`` (``viz``, ``flops``, ``complexity``, ``export``).

A subcommand is a function registered with :func:`register_command`, which receives the parsed options::

    def _configure(parser):                      # add the subcommand's options
        parser.add_argument("--checkpoint", ...)

    @register_command("flops", help="count FLOPs of a model", configure=_configure)
    def _flops(args, explicit):                  # explicit: the option names the user gave
        ...
        return 0                                 # exit status

Every subcommand accepts ``--config FILE`` (YAML or JSON, keys as the long option names with dashes or
underscores); values given on the command line override the file, the file overrides the defaults. Errors a user
can fix (bad value, missing file, unreadable checkpoint) print one line naming the option and exit with status 2;
``DEFORMATTN_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COMMANDS", "build_parser", "main", "register_command"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, set[str]], int | None]


COMMANDS: dict[str, Command] = {}


def register_command(name: str, *, help: str, configure: Callable[[argparse.ArgumentParser], None],
                     description: str | None = None) -> Callable:
    """Register ``run(args, explicit) -> exit status`` as ``deformattn NAME`` (see the module docstring)."""

    def decorator(run: Callable[[argparse.Namespace, set[str]], int | None]) -> Callable:
        if name in COMMANDS:
            raise ValueError(f"register_command: a command named {name!r} is already registered")
        COMMANDS[name] = Command(name, help, description or help, configure, run)
        return run

    return decorator


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="deformattn",
        description="Deformable attention for vision (DAT, DAT++): train, evaluate and use models.",
        epilog="Run 'deformattn COMMAND --help' for a command's options. The first run: 'deformattn train "
               "--output-dir runs/digits' trains dat_nano on scikit-learn's digits on the CPU.",
    )
    parser.add_argument("--version", action="version", version=f"deformattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        # a description with line breaks is laid out as written, others are wrapped
        formatter = argparse.RawDescriptionHelpFormatter if "\n" in cmd.description else argparse.HelpFormatter
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description, formatter_class=formatter)
        p.add_argument("--config", metavar="FILE", default=None,
                       help="YAML or JSON file of option values (keys: the long option names); command-line "
                            "options override it")
        cmd.configure(p)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _explicit_options(argv: Sequence[str], command: str) -> set[str]:
    """The option names given on the command line (a second parse with every default suppressed)."""
    parser = build_parser()
    sub = _subparser(parser, command)
    for action in sub._actions:
        if action.dest not in ("help", "config"):
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv)))) - {"command", "config"}


def _from_config_file(path: str, sub: argparse.ArgumentParser, command: str) -> dict[str, Any]:
    """Values of a ``--config`` file, checked and converted like command-line values."""
    from .train.config import load_config_file

    raw = load_config_file(path)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in actions:
            import difflib

            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--config {path}: unknown option {key!r} for 'deformattn {command}'{hint}")
        action = actions[key]
        where = f"--config {path}: {key}"
        if isinstance(action, argparse.BooleanOptionalAction):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
                value = value.lower() in ("true", "yes", "on")
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
        elif value is not None and callable(action.type):
            items = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
            converted = []
            for item in items:
                if isinstance(item, dict) and action.type.__name__ == "_json_object":
                    converted.append(item)
                    continue
                try:
                    converted.append(action.type(item if isinstance(item, str) else
                                                 (json.dumps(item) if isinstance(item, (dict, list)) else str(item))))
                except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                    raise ValueError(f"{where}: invalid value {item!r} ({exc})") from None
            value = converted if isinstance(value, list) and action.nargs in ("+", "*") else converted[0]
        if action.choices is not None and value is not None:
            for item in value if isinstance(value, list) else [value]:
                if item not in action.choices:
                    raise ValueError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {item!r}")
        values[key] = value
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deformattn`` console script and ``python -m deformattn``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    try:
        explicit = _explicit_options(argv, args.command)
        values = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        if args.config is not None:
            from_file = _from_config_file(args.config, _subparser(parser, args.command), args.command)
            values.update({k: v for k, v in from_file.items() if k not in explicit})
            explicit |= set(from_file)
        status = command.run(argparse.Namespace(**values), explicit)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as exc:
        if os.environ.get("DEFORMATTN_DEBUG"):
            raise
        message = user_message(exc, args.command, _subparser(parser, args.command))
        print(f"deformattn {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(status or 0)


# library argument names whose option has another name
_ARGUMENT_ALIASES = {"checkpoint_path": "checkpoint", "model_name": "model"}


def user_message(exc: BaseException, command: str, sub: argparse.ArgumentParser) -> str:
    """The one-line message of a library error in the CLI's terms: a leading argument name (``checkpoint_path:``,
    ``resume:``) becomes the option's flag (``--checkpoint:``, ``--resume:``), and a prefix that repeats the command
    (``deformattn train: ``) is dropped, since the caller prints ``deformattn COMMAND: error:`` once."""
    import re

    message = str(exc).strip()
    if isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror is not None:
        message = f"{exc.strerror}: {exc.filename}"
    for prefix in (f"deformattn {command}: ", f"{command}: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    flags: dict[str, str] = {}
    for action in sub._actions:
        longest = max(action.option_strings, key=len) if action.option_strings else action.metavar or action.dest
        flags[action.dest] = longest if isinstance(longest, str) else action.dest.upper()
    if getattr(exc, "pickled_objects", ()):  # the library's remedy is a Python argument: give the CLI's
        message = (f"{exc.argument}: checkpoint {exc.path!r} is intact but pickles Python objects besides tensors "
                   f"({', '.join(exc.pickled_objects)}), which the command line never unpickles. Unpickling runs "
                   "code named in the file: only if you trust it, convert it once in Python - torch.save("
                   f"deformattn.models.read_checkpoint({exc.path!r}, weights_only=False)[0], 'weights.pt') - and "
                   "pass weights.pt")
    match = re.match(r"(\w+): ", message)
    if match:
        name = _ARGUMENT_ALIASES.get(match.group(1), match.group(1))
        if name in flags and name not in ("help", "config"):
            message = flags[name] + message[match.end() - 2:]
    return message


# ------------------------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------------------------
def _configure_train(parser: argparse.ArgumentParser) -> None:
    from .train.config import TrainConfig

    TrainConfig.add_arguments(parser)


@register_command(
    "train", help="train a model (default: dat_nano on scikit-learn's digits, on the CPU)", configure=_configure_train,
    description=(
        "Train a registered model on scikit-learn's handwritten digits (default) or an ImageFolder tree (--data).\n\n"
        "Writes to --output-dir: last.pt (every epoch, atomically), best.pt, metrics.csv, metrics.json, curves.png,\n"
        "config.json (the resolved options; usable as --config) and summary.json.\n"
        "Interrupted? Run the same command with --resume auto.\n"
        "Several processes: torchrun --nproc_per_node N -m deformattn train ... (--batch-size is per process)."
    ),
)
def _train(args: argparse.Namespace, explicit: set[str]) -> int:
    from .train import TrainConfig, train

    config = TrainConfig.from_dict(vars(args), source="deformattn train")
    train(config, explicit=explicit)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------------------------
def _add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", "-c", metavar="PATH", help="a training checkpoint (OUTPUT_DIR/last.pt)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                        help="use the EMA weights (runs trained with --ema)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast precision of the forward pass, CPU or GPU (default: fp32)")


def _require_checkpoint(args: argparse.Namespace) -> str:
    if not args.checkpoint:
        raise ValueError("--checkpoint is required (a training checkpoint such as runs/digits/last.pt)")
    return args.checkpoint


def _configure_eval(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_options(parser)
    parser.add_argument("--split", default=None,
                        help="split to evaluate: digits 'train'/'test', ImageFolder a subfolder name "
                             "(default: the split evaluated during training)")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="evaluate on another ImageFolder root with the same classes (default: the training data)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    parser.add_argument("--workers", type=int, default=2, help="ImageFolder loading processes (default: 2)")
    parser.add_argument("--max-samples", type=int, default=None, metavar="N", help="evaluate on N images only")


@register_command("eval", help="top-1 / top-5 accuracy and loss of a checkpoint on a split", configure=_configure_eval)
def _eval(args: argparse.Namespace, explicit: set[str]) -> int:
    from .train import evaluate_checkpoint

    r = evaluate_checkpoint(_require_checkpoint(args), split=args.split, data=args.data, batch_size=args.batch_size,
                            ema=args.ema, device=args.device, workers=args.workers, max_samples=args.max_samples,
                            precision=args.precision)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        weights = " (EMA weights)" if r["ema"] else ""
        print(f"{r['model']} from {r['checkpoint']} (epoch {r['epoch']}){weights} on {r['dataset']} {r['split']} "
              f"({r['count']} images)")
        print(f"top-1 {r['acc']:.2%}  top-5 {r['top5']:.2%}  loss {r['loss']:.4f}")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------------------------
def _configure_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files (digits checkpoints: a light digit "
                        "on a dark background, any size)")
    _add_checkpoint_options(parser)
    parser.add_argument("--topk", type=int, default=5, help="classes to show per image (default: 5)")


@register_command("predict", help="most likely classes of image files, with probabilities",
                  configure=_configure_predict)
def _predict(args: argparse.Namespace, explicit: set[str]) -> int:
    from .train import predict_images

    results = predict_images(_require_checkpoint(args), args.images, topk=args.topk, ema=args.ema, device=args.device,
                             precision=args.precision)
    for r in results:
        if r.get("warning"):
            print(f"deformattn predict: warning: {r['warning']}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"image": r["image"], "top": [{"class": c, "probability": p} for c, p in r["top"]]}
                          for r in results], indent=1))
        return 0
    for r in results:
        print(r["image"])
        width = max(len(c) for c, _ in r["top"])
        for c, p in r["top"]:
            print(f"  {c:<{width}}  {p:7.2%}")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------------------------
def _configure_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", "-c", metavar="PATH", default=None,
                        help="describe a checkpoint instead: a training checkpoint (model, epoch, classes, metrics, "
                             "options) or an official / bare state_dict (tensors, parameters, the variants it fits)")
    parser.add_argument("--models", action="store_true", help="list the registered models only, one per line")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _package_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for dist in ("torchvision", "scikit-learn", "matplotlib", "tqdm", "PyYAML", "timm"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _checkpoint_info(path: str) -> dict[str, Any]:
    """What a checkpoint holds: a training checkpoint's run, or an official / bare state_dict's tensors and the
    registered variants whose parameters it fits (read weights-only by the package's one reader)."""
    import torch

    from .models import default_cfgs, list_models, model_entrypoint
    from .layers.window_attention import DERIVED_BUFFERS
    from .models._helpers import clean_key, safe_load, unwrap_state_dict
    from .train.checkpoint import FORMAT, load_checkpoint_file

    obj = safe_load(path, argument="checkpoint")
    if isinstance(obj, dict) and "format" in obj:
        if obj["format"] != FORMAT:
            raise ValueError(f"--checkpoint: {path!r} has format {obj['format']!r}; this version reads {FORMAT!r} "
                             "and plain state_dicts")
        ckpt = load_checkpoint_file(path, argument="checkpoint")
        last = ckpt.get("history", [])[-1:] or [{}]
        return {"checkpoint": path, "format": ckpt["format"], "model": ckpt["model_name"],
                "model_kwargs": ckpt["model_kwargs"], "epoch": ckpt["epoch"],
                "params": sum(t.numel() for k, t in ckpt["model"].items() if not k.endswith(DERIVED_BUFFERS)),
                "class_names": ckpt["class_names"], "resumable": all(ckpt.get(k) is not None for k in
                                                                    ("optimizer", "scheduler", "rng")),
                "has_ema": ckpt.get("model_ema") is not None, "last_epoch_metrics": last[0], "config": ckpt["config"]}
    inner = unwrap_state_dict(obj) if isinstance(obj, dict) else obj
    tensors = {clean_key(k): v for k, v in inner.items() if torch.is_tensor(v)} if isinstance(inner, dict) else {}
    if not tensors:
        raise ValueError(f"--checkpoint: {path!r} holds no tensors: not a model checkpoint")
    head = tensors.get("cls_head.weight")
    params = sum(t.numel() for k, t in tensors.items() if not k.endswith(DERIVED_BUFFERS))
    fits = []
    for name in list_models():
        published = default_cfgs[name].get("params_m")  # rounded: only rules out variants of another size
        if published is not None and abs(params / 1e6 - published) > 0.1 * published:
            continue
        own = model_entrypoint(name)(num_classes=int(head.shape[0]) if head is not None else 0).state_dict()
        keys = {k for k in own if not k.endswith(DERIVED_BUFFERS)}
        if keys == {k for k in tensors if not k.endswith(DERIVED_BUFFERS)} and all(
                tensors[k].shape == own[k].shape or k.endswith("_table") for k in keys):  # tables are resized
            fits.append(name)
    return {"checkpoint": path,
            "format": "official checkpoint ({'model': state_dict})" if inner is not obj else "bare state_dict",
            "tensors": len(tensors),
            "params": params,
            "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
            "num_classes": int(head.shape[0]) if head is not None else None,
            "fits": fits or "no registered variant (see 'deformattn info --models')",
            "other_entries": sorted(str(k) for k in obj if obj[k] is not inner) if inner is not obj else []}


@register_command("info", help="versions, devices, registered models, or a checkpoint's description",
                  configure=_configure_info)
def _info(args: argparse.Namespace, explicit: set[str]) -> int:
    import torch

    from . import __version__
    from .models import default_cfgs, list_models

    if args.checkpoint:
        info = _checkpoint_info(args.checkpoint)
        if args.json:
            print(json.dumps(info, indent=1, default=str))
        else:
            for k, v in info.items():
                print(f"{k}: {v}")
        return 0
    models = list_models()
    if args.models:
        print("\n".join(models))
        return 0
    info = {
        "deformattn": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "optional_packages": _package_versions(),
        "commands": sorted(COMMANDS),
        "models": {m: {k: default_cfgs[m].get(k) for k in ("input_size", "params_m", "top1")} for m in models},
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"deformattn {info['deformattn']}  torch {info['torch']}  python {info['python']}")
    print(f"devices: cpu ({info['cpu_threads']} threads)"
          + (f", cuda: {', '.join(info['cuda'])}" if info["cuda"] else ", cuda: not available"))
    pkgs = info["optional_packages"]
    print("optional packages: " + ", ".join(f"{k} {v}" if v else f"{k} (missing)" for k, v in pkgs.items()))
    print(f"commands: {', '.join(info['commands'])}")
    print(f"models ({len(models)}):")
    for m, cfg in info["models"].items():
        size = cfg["input_size"][-1]
        extra = f"  {cfg['params_m']}M params, ImageNet top-1 {cfg['top1']}" if cfg["top1"] else ""
        print(f"  {m:<18} input {size}x{size}{extra}")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# samples
# ------------------------------------------------------------------------------------------------------------------
def _configure_samples(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", metavar="DIR", default=".", help="where to write them (default: here)")


@register_command("samples", help="write the sample images that ship with the package (digit.png, photo.jpg)",
                  configure=_configure_samples,
                  description="Write the package's sample images into --output-dir: digit.png (a scikit-learn test "
                              "digit, light on dark, for 'deformattn predict') and photo.jpg (for 'deformattn viz').")
def _samples(args: argparse.Namespace, explicit: set[str]) -> int:
    from . import samples

    for path in samples.copy_to(args.output_dir):
        print(path)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# commands defined in other modules: each offers ``register_commands(register_command)``
# ------------------------------------------------------------------------------------------------------------------
EXTENSION_MODULES = ("deformattn.viz.cli", "deformattn.export.cli")  # viz, flops, complexity; export


def _load_extensions() -> None:
    import importlib

    for name in EXTENSION_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # the module is not part of this installation
                continue
            raise
        module.register_commands(register_command)


_load_extensions()

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
