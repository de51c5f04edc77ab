"""Fine-tuning vs training from scratch on built-in data: what ``deformattn train --initial-checkpoint`` buys.

    python benchmarks/finetune.py                 # ~3-4 min on 2 cores
    python benchmarks/finetune.py --quick         # a smoke run (seconds), not for RESULTS.md

scikit-learn's 8x8 digits (upscaled to 32x32 PNGs in an ImageFolder tree, split stratified 75/25 as
``deformattn train`` does) are divided by class: ``dat_nano`` is pretrained on the digits 0-5, then trained on a
small set of the digits 6-9 (``--per-class`` images per class) either from those weights (``--initial-checkpoint``:
the 6-class classifier is dropped and re-initialised for 4 classes; also with ``--layer-decay 0.75``) or from
scratch, with the same epochs and seeds, at each learning rate of ``--lrs`` (scratch and fine-tuning prefer
different ones: each start is shown at every rate); all are evaluated on every test image of 6-9. Augmentation is off (a flipped digit is
another digit). Every run is ``deformattn.train.train`` (the CLI's code path), one thread each.

Output: a markdown table on stdout and JSON at ``--json`` (default ``benchmarks/results/finetune.json``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PRETRAIN_CLASSES = (0, 1, 2, 3, 4, 5)
FINETUNE_CLASSES = (6, 7, 8, 9)


def write_digits(root: Path, classes: tuple[int, ...], *, per_class: int | None, seed: int, size: int = 32) -> dict:
    """``root/{train,val}/<digit>/<i>.png`` for ``classes``; at most ``per_class`` training images per class (the
    first ones of the library's seeded stratified split). Returns the image counts."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from deformattn.train.data import load_digits_split

    x_tr, y_tr, x_te, y_te = load_digits_split(0.25, seed)
    counts = {"train": 0, "val": 0}
    for split, x, y in (("train", x_tr, y_tr), ("val", x_te, y_te)):
        big = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # N, 1, S, S in [0, 1]
        pixels = (big.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
        for c in classes:
            idx = (y == c).nonzero().flatten().tolist()
            if split == "train" and per_class is not None:
                idx = idx[:per_class]
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(pixels[i], mode="L").save(folder / f"{i}.png")
            counts[split] += len(idx)
    return counts


def run(out: Path, data: Path, *, epochs: int, seed: int, lr: float, initial: Path | None = None,
        layer_decay: float | None = None) -> dict[str, Any]:
    from deformattn.train import TrainConfig, train

    config = TrainConfig(model="dat_nano", data=str(data), output_dir=str(out), epochs=epochs, batch_size=32,
                         lr=lr, warmup_epochs=1.0, augment=False, workers=0, threads=1, seed=seed,
                         progress="none", device="cpu",
                         initial_checkpoint=None if initial is None else str(initial), layer_decay=layer_decay)
    start = time.perf_counter()
    summary = train(config)
    return {"test_accuracy": summary["test_accuracy"], "best_test_accuracy": summary["best_test_accuracy"],
            "test_loss": summary["test_loss"], "seconds": time.perf_counter() - start,
            "initial_checkpoint": summary["initial_checkpoint"], "num_train": summary["num_train"],
            "num_eval": summary["num_eval"]}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| start | lr | seeds | test accuracy (mean) | per seed | seconds per run |",
             "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        accs = ", ".join(f"{a:.1%}" for a in r["accuracies"])
        lines.append(f"| {r['label']} | {r['lr']:g} | {len(r['accuracies'])} | {r['mean_accuracy']:.1%} | {accs} | "
                     f"{r['mean_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning / scratch epochs")
    p.add_argument("--per-class", type=int, default=10, help="training images per class of the fine-tuning task")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="peak learning rates to compare at")
    p.add_argument("--quick", action="store_true", help="1 epoch each, 1 seed (smoke run)")
    p.add_argument("--json", default=str(HERE / "results" / "finetune.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.epochs, args.seeds, args.lrs = 1, 1, 1, args.lrs[:1]

    sys.path.insert(0, str(HERE))
    from _common import atomic_write_json, machine_info, machine_limits

    limits = machine_limits(1, quick=True)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="deformattn_finetune_") as tmp:
        tmp_path = Path(tmp)
        pre_counts = write_digits(tmp_path / "digits_0_5", PRETRAIN_CLASSES, per_class=None, seed=0)
        ft_counts = write_digits(tmp_path / "digits_6_9", FINETUNE_CLASSES, per_class=args.per_class, seed=0)
        print(f"pretraining on digits {PRETRAIN_CLASSES} ({pre_counts['train']} images), "
              f"{args.pretrain_epochs} epochs", file=sys.stderr, flush=True)
        pre = run(tmp_path / "pretrain", tmp_path / "digits_0_5", epochs=args.pretrain_epochs, seed=0, lr=2e-3)
        starts = [("from scratch", None, None),
                  ("--initial-checkpoint (pretrained on 0-5)", tmp_path / "pretrain" / "last.pt", None),
                  ("--initial-checkpoint --layer-decay 0.75", tmp_path / "pretrain" / "last.pt", 0.75)]
        rows = []
        for (label, initial, decay), lr in ((start, lr) for lr in args.lrs for start in starts):
            results = [run(tmp_path / f"run_{len(rows)}_{seed}", tmp_path / "digits_6_9", epochs=args.epochs,
                           seed=seed, lr=lr, initial=initial, layer_decay=decay) for seed in range(args.seeds)]
            accs = [r["test_accuracy"] for r in results]
            rows.append({"label": label, "lr": lr, "layer_decay": decay, "accuracies": accs,
                         "mean_accuracy": statistics.fmean(accs),
                         "mean_seconds": statistics.fmean(r["seconds"] for r in results),
                         "initial_checkpoint": results[0]["initial_checkpoint"]})
            print(f"{label}, lr {lr:g}: {statistics.fmean(accs):.1%}", file=sys.stderr, flush=True)
    info = machine_info()
    header = (f"Fine-tuning vs scratch (benchmarks/finetune.py), {created}, dat_nano, torch {info['torch']}, "
              f"{info['cpu']} ({info['cores']} cores shared with other jobs, float32 matmul {limits['matmul_gflops']:.0f} GFLOP/s on 1 "
              f"thread): pretrained {args.pretrain_epochs} epochs on digits 0-5 ({pre_counts['train']} images, "
              f"test accuracy {pre['test_accuracy']:.1%}); then {args.epochs} epochs on {ft_counts['train']} "
              f"images of digits 6-9 ({args.per_class} per class), evaluated on their {ft_counts['val']} test images")
    table = markdown(rows)
    print(header)
    print()
    print(table)
    # the gain at each learning rate, and best rate against best rate
    scratch = {r["lr"]: r["mean_accuracy"] for r in rows if r["label"] == starts[0][0]}
    tuned = {r["lr"]: r["mean_accuracy"] for r in rows if r["label"] == starts[1][0]}
    gain = {"per_lr": {f"{lr:g}": tuned[lr] - scratch[lr] for lr in args.lrs},
            "best_vs_best": max(tuned.values()) - max(scratch.values())}
    print(f"\ngain of --initial-checkpoint over scratch: "
          + ", ".join(f"{v * 100:+.1f} points at lr {k}" for k, v in gain["per_lr"].items())
          + f"; best lr vs best lr {gain['best_vs_best'] * 100:+.1f} points")
    atomic_write_json(args.json, {
        "created": created, "machine": {**info, **limits}, "quick": args.quick, "model": "dat_nano",
        "pretrain": {"classes": list(PRETRAIN_CLASSES), "epochs": args.pretrain_epochs, **pre_counts,
                     "test_accuracy": pre["test_accuracy"], "seconds": pre["seconds"]},
        "finetune": {"classes": list(FINETUNE_CLASSES), "epochs": args.epochs, "per_class": args.per_class,
                     "lrs": args.lrs, "seeds": args.seeds, **ft_counts},
        "rows": rows, "gain_over_scratch": gain, "table_markdown": table,
    })
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
