"""The ``viz``, ``flops`` and ``complexity`` subcommands of ``deformattn``.

Two ways to wire them into a command-line parser:

* ``register_commands(register_command)``: through :func:`deformattn.cli.register_command` (each command's
  ``run(args, explicit)`` returns an exit code);
* ``register(subparsers)``: plain argparse (``parser.add_subparsers()``); each subparser sets ``func``, called with
  the parsed namespace.

``python -m deformattn.viz.cli`` runs them on their own.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["register", "register_commands", "build_parser", "main", "make_viz", "cmd_viz", "cmd_flops",
           "cmd_complexity", "COMMAND_SPECS"]

from .._utils import atomic_write_text, format_elapsed

DEFAULT_VIZ_MODEL = "dat_nano"


# ---------------------------------------------------------------------------------------------------------------
# viz
# ---------------------------------------------------------------------------------------------------------------
def _load_model(args: argparse.Namespace):
    """``(model, name, weights description, checkpoint metadata)`` from ``--checkpoint`` or ``--model``."""
    from ..models import CheckpointError, create_model, read_checkpoint

    if args.checkpoint:
        _, meta = read_checkpoint(args.checkpoint, argument="checkpoint")
        name = meta.get("model_name")
        if not name:
            raise CheckpointError(
                "checkpoint", f"{args.checkpoint!r} does not say which model it holds (no 'model_name'; checkpoints "
                "of `deformattn train` do). Build the model with create_model(name, checkpoint_path=...) and call "
                "deformattn.viz.visualize instead"
            )
        model = create_model(name, checkpoint_path=args.checkpoint)
        return model, name, f"weights from {Path(args.checkpoint).name}", meta
    name = args.model or DEFAULT_VIZ_MODEL
    return create_model(name), name, "randomly initialised weights (no checkpoint)", {}


def _prediction(output, class_names: Sequence[str] | None) -> tuple[str, float] | None:
    """``(label, probability)`` of the most likely class, or None for outputs that are not logits."""
    import torch

    if output.dim() != 2 or output.shape[-1] < 2:
        return None
    p = torch.softmax(output[0].float(), -1)
    k = int(p.argmax())
    return (class_names[k] if class_names and k < len(class_names) else str(k)), float(p[k])


def make_viz(args: argparse.Namespace):
    """The figure of ``deformattn viz``: ``(VizResult, title)`` (the title is set on the figure)."""
    import torch

    from .images import default_image, load_image
    from .plot import set_title
    from .figure import visualize

    torch.manual_seed(args.seed)
    model, name, weights, meta = _load_model(args)
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    if args.image:
        image, image_desc = load_image(args.image), Path(args.image).name
    else:
        image, image_desc = default_image(name, data)
    query = tuple(args.query) if args.query else None
    img_size = args.img_size or data.get("img_size")
    result = visualize(model, image, img_size=img_size, query=query, layers=args.layers,
                       mean=data.get("mean"), std=data.get("std"))
    h, w = result.image.shape[:2]
    pred = _prediction(result.output, meta.get("class_names"))
    result.summary = {"model": name, "weights": weights, "image": image_desc, "size": [h, w],
                      "query_yx": list(result.query), "layers": [r.name for r in result.records],
                      "predicted": pred[0] if pred else None, "probability": round(pred[1], 4) if pred else None}
    title = (
        f"{name}: {weights}{f', predicted {pred[0]} ({pred[1]:.1%})' if pred else ''}\n"
        f"{image_desc} at {h}x{w} px; per deformable layer: where its keys are sampled, and the attention of the "
        f"query requested at (x, y) = ({result.query[1]:.1f}, {result.query[0]:.1f}) px"
    )
    set_title(result.figure, title)
    return result, title


def cmd_viz(args: argparse.Namespace) -> int:
    from .plot import save_figure

    result, title = make_viz(args)
    path = save_figure(result.figure, args.output, dpi=args.dpi)
    if args.json:
        atomic_write_text(args.json, json.dumps({**result.summary, "figure": str(args.output)}, indent=1) + "\n")
    print(f"wrote {path} ({len(result.records)} deformable layers): {title.splitlines()[0]}")
    return 0


def _configure_viz(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", default=None,
                     help="a checkpoint of `deformattn train` (its model is built and loaded)")
    src.add_argument("--model", metavar="NAME", default=None,
                     help=f"a registered variant, randomly initialised (default {DEFAULT_VIZ_MODEL}, the digits model)")
    p.add_argument("--image", metavar="PATH", default=None,
                   help="image file (default: a scikit-learn test digit for the digits models, the package's "
                        "sample photo otherwise)")
    p.add_argument("--output", metavar="FILE.png", required=True, help="where to write the PNG")
    p.add_argument("--query", nargs=2, type=float, metavar=("Y", "X"), default=None,
                   help="the query, in pixels of the drawn (resized) image (default: its centre)")
    p.add_argument("--img-size", type=_positive_int, metavar="S", default=None,
                   help="model input: shorter side S, aspect kept, sides rounded to the model's total stride "
                        "(default: the checkpoint's / model's input size)")
    p.add_argument("--layers", nargs="+", metavar="PATTERN", default=None,
                   help="only these deformable layers (fnmatch patterns, e.g. 'stages.3.*')")
    p.add_argument("--dpi", type=_positive_int, default=100, help="PNG resolution")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write what the figure shows as JSON (image, prediction, query, layers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")


# ---------------------------------------------------------------------------------------------------------------
# flops
# ---------------------------------------------------------------------------------------------------------------
def cmd_flops(args: argparse.Namespace) -> int:
    from ..models import create_model
    from ..analysis.flops import format_cost_report, model_cost

    model = create_model(args.model)
    size = args.img_size or int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])
    report = model_cost(model, size, name=args.model)
    print(format_cost_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report.as_dict(), indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _configure_flops(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME", required=True, help="a registered variant")
    p.add_argument("--img-size", type=_positive_int, metavar="S", default=None,
                   help="input size (default: the variant's)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON")


# ---------------------------------------------------------------------------------------------------------------
# complexity
# ---------------------------------------------------------------------------------------------------------------
def cmd_complexity(args: argparse.Namespace) -> int:
    import torch

    from ..analysis import complexity as C
    from .complexity_plot import write_complexity

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.quick:  # (quick runs, e.g. in a test process, leave the allocator alone)
        C.keep_freed_memory()  # stable timings: calls reuse their pages (see the function)
    sides = args.sides or (C.QUICK_SIDES if args.quick else C.DEFAULT_SIDES)
    repeats = 1 if args.quick else args.repeats
    start = time.perf_counter()
    rows = C.run_complexity(
        sides, args.kinds or C.KINDS, dim=args.dim, num_heads=args.heads, repeats=repeats,
        budget_s=0.2 if args.quick else 2.0, device=args.device,
        log=lambda s: print(f"[{format_elapsed(time.perf_counter() - start)}] {s}", flush=True),
    )
    threads = torch.get_num_threads()
    for r in rows:
        r["threads"] = threads
    title = (f"one attention layer, C={args.dim}, {args.heads} heads, batch 1, forward on {args.device}"
             + (f" ({threads} threads)" if args.device == "cpu" else ""))
    paths = write_complexity(rows, args.output_dir, title=title)
    print()
    print(C.format_complexity_table(rows))
    print(f"\nwrote {paths['json']}, {paths['md']} and {paths['png']}")
    return 0


def _configure_complexity(p: argparse.ArgumentParser) -> None:
    from ..analysis.complexity import KINDS

    p.add_argument("--output-dir", metavar="DIR", required=True, help="where complexity.{json,md,png} go")
    p.add_argument("--quick", action="store_true", help="two small sizes, one timing repeat (for tests)")
    p.add_argument("--sides", nargs="+", type=_positive_int, metavar="S", default=None,
                   help="map sides (default 14 28 56 84 112)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None, help="which attention kinds (default all)")
    p.add_argument("--dim", type=_positive_int, default=128, help="channels C")
    p.add_argument("--heads", type=_positive_int, default=4, help="attention heads")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats (the median is reported)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


# ---------------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# (name, help, description, configure, run)
COMMAND_SPECS: list[tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    (
        "viz",
        "draw where the deformable layers sample, over an image (PNG)",
        "Draw, per deformable layer, the reference grid and the deformed sampling points (arrows colored by "
        "offset group) and one query's attention over its sampled keys, over the input image, in image pixels. "
        "Without --checkpoint the model is randomly initialised, and the figure says so.",
        _configure_viz,
        cmd_viz,
    ),
    (
        "flops",
        "parameters and FLOPs per stage and block kind (offset networks apart)",
        "Parameters and multiply-adds (FLOPs / 2 of torch.utils.flop_counter.FlopCounterMode, which counts matrix "
        "products, convolutions and SDPA; not grid_sample, softmax, norms, activations) per stage, per block kind "
        "and per deformable layer, with the offset network's share.",
        _configure_flops,
        cmd_flops,
    ),
    (
        "complexity",
        "one attention layer of each kind at growing map sizes: FLOPs, time, peak memory",
        "Dense (ViT), window (Swin), spatial-reduction (PVT), neighborhood and deformable attention of the same "
        "width and heads at growing map sizes: FLOPs counted, time and peak memory measured on this machine. "
        "Writes DIR/complexity.json, DIR/complexity.md and DIR/complexity.png (log scale).",
        _configure_complexity,
        cmd_complexity,
    ),
]


def register_commands(register_command: Callable) -> None:
    """Register the commands with :func:`deformattn.cli.register_command` (``run(args, explicit)``)."""
    for name, help_, description, configure, run in COMMAND_SPECS:
        register_command(name, help=help_, configure=configure, description=description)(
            lambda args, explicit, run=run: run(args)
        )


def register(subparsers: Any) -> None:
    """Add ``viz``, ``flops`` and ``complexity`` to ``subparsers`` (from ``parser.add_subparsers()``)."""
    for name, help_, description, configure, run in COMMAND_SPECS:
        p = subparsers.add_parser(name, help=help_, description=description)
        configure(p)
        p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deformattn", description="deformattn visualisation and cost tools")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as exc:  # bad arguments / files / missing extras
        print(f"deformattn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
