"""The ``export`` subcommand of ``deformattn``::

    deformattn export --model dat_pp_tiny --format onnx --img-size 224 224 --dynamic --output dat_pp_tiny.onnx
    deformattn export --checkpoint runs/digits/last.pt --format torchscript --output digits.pt

The model is built by name (``--model``, randomly initialised) or from a checkpoint (``--checkpoint``: anything
``create_model(name, checkpoint_path=...)`` accepts; a training checkpoint of ``deformattn train`` also names its
model, so ``--model`` may be left out). :func:`deformattn.export.export_model` writes the file atomically, loads it
back, runs it on random batches and compares it with the PyTorch model; the command prints the largest absolute
difference per batch and exits with status 1 (leaving any previous ``--output`` untouched) when it is above the
tolerance, 2 on a bad option.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["register_commands", "cmd_export", "load_export_model"]

DESCRIPTION = (
    "Export a model to ONNX (torch.export + torch.onnx.export(dynamo=True), verified with onnxruntime's CPU\n"
    "execution provider) or TorchScript (torch.jit.trace, verified with torch.jit.load).\n\n"
    "The file is written atomically: only a file whose outputs match the PyTorch model on random batches (max abs\n"
    "difference <= --atol + --rtol * max|output|) replaces --output; otherwise the command exits with status 1.\n"
    "--sampler gather (default) samples with gather and arithmetic only: the ONNX graph has no GridSample node.\n"
    "ONNX needs: pip install 'deformattn[export]'."
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _configure_export(p: argparse.ArgumentParser) -> None:
    from .core import FORMATS
    from .onnx import DEFAULT_OPSET, EXPORTERS, MIN_OPSET

    # --format and --output are required, but may come from --config: checked after parsing, shown as required here
    p.usage = (f"deformattn export [-h] (--model NAME | --checkpoint PATH) --format {{{','.join(FORMATS)}}} "
               "--output FILE [options]")

    p.add_argument("--model", metavar="NAME", default=None,
                   help="a registered variant (see 'deformattn info'); optional with a checkpoint of "
                        "'deformattn train', which names its model")
    p.add_argument("--checkpoint", "-c", metavar="PATH", default=None,
                   help="weights: a training checkpoint (OUTPUT_DIR/last.pt), an official checkpoint or a state_dict "
                        "(default: random initialisation)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                   help="export the EMA weights of a training checkpoint (runs trained with --ema)")
    p.add_argument("--format", choices=FORMATS, default=None, help="onnx or torchscript (required)")
    p.add_argument("--img-size", nargs="+", type=_positive_int, metavar="S", default=None,
                   help="input height and width ('H W', or one value for both; default: the checkpoint's training "
                        "size, else the variant's input size)")
    p.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=False,
                   help="dynamic batch, height and width, ONNX and TorchScript (any size >= the model's minimum; "
                        "verified at three other sizes; the summary says if a model fixes them)")
    p.add_argument("--output", "-o", metavar="FILE", default=None, help="the file to write (required)")
    p.add_argument("--batch-size", type=int, default=2,
                   help="batch of the example input, >= 2 (default 2; verification also runs 1 and B+1 with "
                        "--dynamic)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    p.add_argument("--onnx-exporter", choices=("auto", *EXPORTERS), default="auto",
                   help="ONNX: torchscript (torch.jit.trace + torch.onnx.export(dynamo=False): seconds), dynamo "
                        "(torch.export + torch.onnx.export(dynamo=True): minutes for a dynamic DAT), or auto "
                        "(default: torchscript, dynamo where the trace would fix a dynamic size)")
    p.add_argument("--sampler", choices=("gather", "grid_sample", "as-built"), default="gather",
                   help="bilinear sampler of the deformable layers in the exported file: gather (default: no "
                        "GridSample node), grid_sample, or as-built (keep the model's)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the exported file (default fp32); fp16 and bf16 are verified against the float32 "
                        "model with a looser default tolerance (fp16: atol 1e-3, rtol 1e-2; bf16: 1e-2, 5e-2). ONNX: "
                        "fp32 or fp16 (onnxruntime's CPU provider has no bfloat16 Conv); TorchScript: all three")
    p.add_argument("--atol", type=_non_negative_float, default=None,
                   help="absolute tolerance (default 1e-4; see --precision)")
    p.add_argument("--rtol", type=_non_negative_float, default=None,
                   help="tolerance relative to max|output| (default 1e-4; see --precision)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and verification batches")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--verbose", action="store_true", help="show the exporters' messages")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress lines (the steps capture, translate, optimize, verify with elapsed times, on stderr)")


def load_export_model(model: str | None, checkpoint: str | None, *, ema: bool = False,
                      seed: int = 0) -> tuple[Any, str, dict[str, Any]]:
    """``(model in eval mode, model name, checkpoint metadata)`` for ``--model`` / ``--checkpoint``.

    Errors a user can fix are ``ValueError`` s naming the option.
    """
    import torch

    from ..models import create_model, is_model, read_checkpoint
    from ..models.registry import check_model_name

    if model is not None:
        check_model_name(model, argument="model")
    meta: dict[str, Any] = {}
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ValueError(f"--checkpoint {checkpoint}: no such file")
        state, meta = read_checkpoint(path, argument="checkpoint")
        saved = meta.get("model_name")
        if model is None:
            if not saved:
                raise ValueError(f"--checkpoint {checkpoint}: the file does not say which model it holds (no "
                                 "'model_name': only checkpoints of 'deformattn train' do); give --model NAME")
            if not is_model(saved):
                raise ValueError(f"--checkpoint {checkpoint}: it holds an unknown model {saved!r}")
            model = saved
        elif saved and saved != model:
            raise ValueError(f"--model {model} but --checkpoint {checkpoint} holds a {saved}; leave --model out "
                             "to export the checkpoint's model")
        try:
            net = create_model(model, checkpoint_path=path)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--checkpoint {checkpoint}: {exc}") from None
        if ema:
            ema_state = meta.get("model_ema")
            if ema_state is None:
                raise ValueError(f"--ema: checkpoint {checkpoint} has no EMA weights (trained without --ema)")
            try:
                net.load_state_dict(ema_state)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(f"--ema: the EMA weights of {checkpoint} do not fit {model} "
                                 f"({str(exc).splitlines()[0]})") from None
        del state
    else:
        if model is None:
            raise ValueError("--model is required (a registered variant, see 'deformattn info'), or --checkpoint "
                             "of 'deformattn train'")
        if ema:
            raise ValueError("--ema needs --checkpoint (a training checkpoint with EMA weights)")
        torch.manual_seed(seed)
        net = create_model(model)
    return net.eval(), model, meta


def _input_size(args: argparse.Namespace, net: Any, meta: dict[str, Any]) -> tuple[int, int]:
    if args.img_size is not None:
        if len(args.img_size) not in (1, 2):
            raise ValueError(f"--img-size takes H W (or one value for both), got {len(args.img_size)} values")
        H, W = (args.img_size * 2)[:2]
    else:
        data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
        kwargs = meta.get("model_kwargs") if isinstance(meta.get("model_kwargs"), dict) else {}
        size = data.get("img_size") or kwargs.get("img_size")
        if size is None:
            size = tuple(net.pretrained_cfg["input_size"][-2:])
        H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    min_size = getattr(net, "min_input_size", None)
    if callable(min_size) and min(H, W) < min_size():
        raise ValueError(f"--img-size {H} {W}: this model reduces the image {min_size()}x, so it needs H, W >= "
                         f"{min_size()}")
    return H, W


def cmd_export(args: argparse.Namespace) -> int:
    from .core import export_model
    from .errors import ExportError
    from .onnx import MIN_OPSET

    if args.format is None:
        raise ValueError("--format is required: onnx or torchscript")
    if not args.output:
        raise ValueError("--output FILE is required")
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"--output {args.output} is a directory; give a file name")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2 (a batch of 1 would be exported as a constant), "
                         f"got {args.batch_size}")
    if args.format == "onnx" and args.opset < MIN_OPSET:
        raise ValueError(f"--opset must be >= {MIN_OPSET}, got {args.opset}")
    if args.format == "onnx" and args.precision == "bf16":
        raise ValueError("--precision bf16 is not available with --format onnx: onnxruntime's CPU execution provider "
                         "has no bfloat16 Conv kernel, so the file could not be verified; use --precision fp16, or "
                         "--format torchscript for bfloat16")
    net, name, meta = load_export_model(args.model, args.checkpoint, ema=args.ema, seed=args.seed)
    img_size = _input_size(args, net, meta)
    sampler = None if args.sampler == "as-built" else args.sampler
    try:
        result = export_model(net, args.format, img_size=img_size, dynamic=args.dynamic, output=output,
                              batch_size=args.batch_size, opset=args.opset, sampler=sampler,
                              exporter=None if args.onnx_exporter == "auto" else args.onnx_exporter,
                              precision=args.precision, atol=args.atol, rtol=args.rtol, seed=args.seed,
                              verbose=args.verbose, progress=not args.quiet)
    except ExportError as exc:
        print(f"deformattn export: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"model": name, "checkpoint": args.checkpoint, **result.as_dict()}, indent=1))
    else:
        weights = f"weights from {args.checkpoint}" + (" (EMA)" if args.ema else "") if args.checkpoint \
            else "random weights"
        print(f"{name} ({weights})")
        print(result.summary())
    return 0


def register_commands(register_command: Callable) -> None:
    """Register ``export`` with :func:`deformattn.cli.register_command`."""
    register_command("export", help="export a model to ONNX or TorchScript, verified against PyTorch",
                     configure=_configure_export, description=DESCRIPTION)(lambda args, explicit: cmd_export(args))
