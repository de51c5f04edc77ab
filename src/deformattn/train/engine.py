"""The training loop: ``train(config)`` runs a whole (possibly resumed, possibly multi-process) training and returns
the summary that it also writes to ``OUTPUT_DIR/summary.json``.

Per epoch, in order: shuffle (``DistributedSampler``, seeded by seed + epoch), train, evaluate (sharded over the
ranks without padding, metrics summed over ranks), then rank 0 writes ``last.pt`` atomically, ``best.pt`` when the
evaluation accuracy improved, and ``metrics.csv`` / ``metrics.json``. A run killed at any point restarts with
``--resume auto`` from the last completed epoch and, as data order and augmentation are functions of (seed, epoch,
rank) and the RNG states are restored, continues as if it had not been interrupted.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from .._utils import atomic_write_text
from ..models.registry import check_model_name
from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint_file,
    restore_rng_state,
    save_checkpoint,
)
from .config import RESUMABLE_CHANGES, TrainConfig
from .data import DataSpec, build_splits
from .distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    choose_threads,
    cleanup_distributed,
    init_distributed,
)
from .precision import autocast, grad_scaler, resolve_precision
from .progress import Progress, format_seconds

__all__ = ["ModelEma", "ShardSampler", "cosine_schedule", "evaluate", "param_groups", "train"]

METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc", "eval_top5", "ema_eval_loss",
                 "ema_eval_acc", "ema_eval_top5", "epoch_seconds", "images_per_second", "elapsed")


# -- building blocks -------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float, *, layer_decay: float | None = None,
                 lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices / kernels only, never on biases, norm scales (1-D) or the names
    the model lists in ``no_weight_decay()`` (relative position-bias tables).

    With ``layer_decay`` (BEiT's layer-wise decay, timm's ``param_groups_layer_decay``): the model's
    ``group_matcher()`` orders its parameters into layers (stem, blocks, ..., classifier), and layer ``i`` of ``L``
    gets ``lr_scale = layer_decay ** (L - 1 - i)`` (the classifier 1), so that the ``"lr"`` of each group is
    ``lr * lr_scale`` (``lr`` needed then).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    layer_of: dict[str, int] = {}
    if layer_decay is not None:
        if lr is None:
            raise ValueError("param_groups: layer_decay needs lr (the peak learning rate the scales multiply)")
        if not hasattr(model, "group_matcher"):
            raise ValueError(f"param_groups: layer_decay needs a model with group_matcher(), "
                             f"{type(model).__name__} has none")
        matcher = model.group_matcher(coarse=False)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        ordinals = {n: tuple(matcher(n)) for n in names}
        rank = {o: i for i, o in enumerate(sorted(set(ordinals.values())))}  # as timm: sorted ordinals -> layers
        layer_of = {n: rank[o] for n, o in ordinals.items()}
    num_layers = max(layer_of.values(), default=0) + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        layer = layer_of.get(name, 0)
        group = groups.get((layer, no_decay))
        if group is None:
            group = groups[(layer, no_decay)] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay}
            if layer_decay is not None:
                group["lr_scale"] = layer_decay ** (num_layers - 1 - layer)
                group["lr"] = lr * group["lr_scale"]
        group["params"].append(p)
    if layer_decay is None:  # the two groups of old, decay first (checkpoints keep their optimizer state order)
        return [groups.get((0, False), {"params": [], "weight_decay": weight_decay}),
                groups.get((0, True), {"params": [], "weight_decay": 0.0})]
    return [groups[k] for k in sorted(groups)]


def cosine_schedule(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Learning-rate multiplier of ``step`` (0-based): linear warmup to 1, then cosine to ``min_lr / lr``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ModelEma:
    """Exponential moving average of a model's weights (buffers copied), with timm's warmup of the decay so that
    short runs average recent weights rather than the initialisation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1.0 - d)
            else:
                e.copy_(m)


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` takes items ``r, r + w, ...``: every item evaluated exactly once over all ranks (a
    ``DistributedSampler`` pads with repeats, which would bias the metrics)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, spec: DataSpec, env: DistEnv, *, amp: bool = False,
             progress: Progress | None = None, precision: str = "auto") -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy over ``loader`` (summed over ranks); ``precision`` as
    :func:`.precision.resolve_precision` (``auto`` follows ``amp``)."""
    was_training = model.training
    model.eval()
    precision = resolve_precision(precision, env.device, amp=amp)
    loss_sum = correct1 = correct5 = count = 0.0
    for images, target in loader:
        images, target = images.to(env.device, non_blocking=True), target.to(env.device, non_blocking=True)
        with autocast(env.device, precision):
            logits = model(spec.prepare(images))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # B, k
        hits = top.eq(target[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += target.numel()
        if progress is not None:
            progress.update(target.numel())
    model.train(was_training)
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], env)
    if count == 0:
        raise ValueError("evaluate: the evaluation set is empty")
    return {"loss": loss_sum / count, "acc": correct1 / count, "top5": correct5 / count, "count": int(count)}


def _weights_checksum(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- resume ------------------------------------------------------------------------------------------------------
def _resolve_resume(config: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, dict | None, Path | None]:
    """The config to run with and the checkpoint to continue from (None: fresh start)."""
    if config.resume is None:
        return config, None, None
    if config.resume == "auto":
        path = Path(config.output_dir) / "last.pt"
        if not path.exists():
            return config, None, None
    else:
        path = Path(config.resume)
    ckpt = load_checkpoint_file(path, argument="resume", training_state=True)
    try:
        saved = TrainConfig.from_dict(ckpt["config"], source=f"--resume {str(path)!r}: config")
    except (TypeError, ValueError) as exc:
        raise CheckpointError("resume", f"checkpoint {str(path)!r} holds an unusable config ({exc})") from None
    conflicts = [
        f"--{k.replace('_', '-')} {getattr(config, k)!r} (checkpoint: {getattr(saved, k)!r})"
        for k in sorted(explicit)
        if k not in RESUMABLE_CHANGES and getattr(config, k) != getattr(saved, k)
        and not (k == "img_size" and config.img_size is None)
    ]
    if conflicts:
        raise CheckpointError(
            "resume", f"checkpoint {str(path)!r} belongs to another run: {'; '.join(conflicts)}. Only "
            f"{', '.join('--' + k.replace('_', '-') for k in sorted(RESUMABLE_CHANGES))} may change when resuming"
        )
    merged = saved.to_dict()
    for key in ("device", "workers", "threads", "progress", "log_interval"):
        merged[key] = getattr(config, key)
    for key in ("epochs", "data", "precision"):
        if key in explicit:
            merged[key] = getattr(config, key)
    keep_dir = "output_dir" in explicit or config.resume == "auto"
    merged["output_dir"] = config.output_dir if keep_dir else str(path.parent)
    merged["resume"] = str(path)
    merged["initial_checkpoint"] = None  # the weights come from the checkpoint being resumed
    return TrainConfig.from_dict(merged), ckpt, path


# -- outputs -----------------------------------------------------------------------------------------------------
def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
    atomic_write_text(out / "metrics.csv", buf.getvalue())
    atomic_write_text(out / "metrics.json", json.dumps(history, indent=1) + "\n")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _print(env: DistEnv, *args: Any) -> None:
    if env.is_main:
        print(*args, flush=True)


# -- the run -------------------------------------------------------------------------------------------------------
def train(config: TrainConfig, *, explicit: set[str] | None = None) -> dict[str, Any]:
    """Run a training (see the module docstring) and return the summary written to ``summary.json``.

    Args:
        config: the run's settings; ``config.resume`` continues a checkpoint.
        explicit: the settings the user gave (command line or config file). On resume they must agree with the
            checkpoint's, except the ones in ``RESUMABLE_CHANGES``; the rest comes from the checkpoint. Default:
            the settings that differ from the ``TrainConfig`` defaults.
    """
    session_start = time.perf_counter()
    config = copy.deepcopy(config).validate()
    if explicit is None:
        default = TrainConfig()
        explicit = {k for k in TrainConfig.field_names() if getattr(config, k) != getattr(default, k)}
    check_model_name(config.model, argument="--model")  # TrainConfig names its fields by their flags
    env = init_distributed(config.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(choose_threads(config.threads, env, small_model=config.data is None))
    try:
        return _train(config, explicit, env, session_start)
    finally:
        torch.set_num_threads(threads_before)  # train() called from Python leaves the process as it found it
        cleanup_distributed(env)


@dataclass
class _Run:
    """Everything one training run holds between its steps (built by :func:`_setup`)."""

    config: TrainConfig
    env: DistEnv
    out: Path
    splits: Any
    model: nn.Module
    model_kwargs: dict[str, Any]
    num_params: int
    initial: dict[str, Any] | None
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any
    precision: str
    criterion: nn.Module
    batch_augment: Any
    train_sampler: DistributedSampler
    loader_gen: torch.Generator
    train_loader: DataLoader
    eval_loader: DataLoader
    steps_per_epoch: int
    ddp_model: nn.Module  # the model, or its DistributedDataParallel wrapper (set by _start)
    resolved: dict[str, Any] = field(default_factory=dict)
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_before: float = 0.0

    @property
    def spec(self) -> DataSpec:
        return self.splits.spec

    def checkpoint_dict(self, epoch: int, rng: list[Any], *, full: bool) -> dict[str, Any]:
        ema = self.ema
        d: dict[str, Any] = {
            "model": self.model.state_dict(), "model_name": self.config.model, "model_kwargs": self.model_kwargs,
            "class_names": self.splits.class_names, "config": self.resolved, "data": self.spec.to_dict(),
            "epoch": epoch, "history": self.history, "model_ema": ema.module.state_dict() if ema is not None else None,
            "ema_updates": ema.updates if ema is not None else 0, "initial_checkpoint": self.initial,
        }
        if full:
            d.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                     scaler=self.scaler.state_dict(), rng=rng)
        return d


def _train(config: TrainConfig, explicit: set[str], env: DistEnv, session_start: float) -> dict[str, Any]:
    config, ckpt, resume_path = _resolve_resume(config, explicit)
    run = _setup(config, env, ckpt, resume_path)
    if ckpt is not None:
        _restore(run, ckpt, resume_path)
    _start(run, ckpt, resume_path)
    best_acc = max((row["eval_acc"] for row in run.history), default=-1.0)
    for epoch in range(run.start_epoch, config.epochs):
        best_acc = _run_epoch(run, epoch, best_acc, session_start)
    return _summary(run, session_start)


def _setup(config: TrainConfig, env: DistEnv, ckpt: dict | None, resume_path: Path | None) -> _Run:
    """Data, model (with its initial or resumed weights), optimizer, schedule, loaders: the same on every rank."""
    from ..models import create_model

    # data, then the model built the same on every rank (DDP also broadcasts rank 0's weights)
    splits = build_splits(config)
    spec = splits.spec
    config.img_size = spec.img_size
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model_kwargs: dict[str, Any] = {"num_classes": len(splits.class_names), "img_size": spec.img_size,
                                    **config.model_kwargs}
    if config.drop_path is not None:
        model_kwargs["drop_path_rate"] = config.drop_path
    try:
        model = create_model(config.model, **model_kwargs)
    except TypeError as exc:
        raise ValueError(f"--model-kwargs: {config.model} does not accept {config.model_kwargs} ({exc})") from None
    initial = None
    if config.initial_checkpoint is not None:
        from .initial import load_initial_checkpoint

        initial = load_initial_checkpoint(model, config.initial_checkpoint, ema=config.initial_checkpoint_ema)
    if ckpt is not None:
        initial = ckpt.get("initial_checkpoint")
        _restore_weights(model, ckpt, resume_path, config.model, splits.class_names)
    model.to(env.device)
    num_params = sum(p.numel() for p in model.parameters())
    # per-rank randomness (stochastic depth, worker seeds) after the shared initialisation
    random.seed(config.seed + env.rank)
    torch.manual_seed(config.seed + env.rank)
    try:
        import numpy as np

        np.random.seed(config.seed + env.rank)
    except ImportError:
        pass

    ema = ModelEma(model, config.ema_decay) if config.ema else None
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, layer_decay=config.layer_decay,
                                               lr=config.lr), lr=config.lr, betas=(0.9, 0.999))
    train_sampler = DistributedSampler(splits.train, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                       seed=config.seed, drop_last=False)
    loader_gen = torch.Generator()
    use_workers = config.workers if spec.kind != "digits" else 0
    train_loader = DataLoader(splits.train, batch_size=config.batch_size, sampler=train_sampler,
                              num_workers=use_workers, generator=loader_gen, pin_memory=env.device.type == "cuda",
                              drop_last=False)
    eval_loader = DataLoader(splits.eval, batch_size=config.batch_size * 2,
                             sampler=ShardSampler(len(splits.eval), env.rank, env.world_size),  # type: ignore[arg-type]
                             num_workers=use_workers, pin_memory=env.device.type == "cuda")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("train: the training set is empty")
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_schedule(step, total_steps=total_steps, warmup_steps=warmup_steps,
                                                lr=config.lr, min_lr=config.min_lr))
    precision = resolve_precision(config.precision, env.device, amp=config.amp)
    scaler = grad_scaler(env.device, precision)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)  # also takes mixup's soft targets
    from .augment import BatchAugment

    batch_augment = BatchAugment(mixup=config.mixup, cutmix=config.cutmix,
                                 reprob=config.reprob if spec.kind == "digits" else 0.0,  # ImageFolder: per image
                                 num_classes=len(splits.class_names))
    return _Run(config=config, env=env, out=Path(config.output_dir), splits=splits, model=model,
                model_kwargs=model_kwargs, num_params=num_params, initial=initial, ema=ema, optimizer=optimizer,
                scheduler=scheduler, scaler=scaler, precision=precision, criterion=criterion,
                batch_augment=batch_augment, train_sampler=train_sampler, loader_gen=loader_gen,
                train_loader=train_loader, eval_loader=eval_loader, steps_per_epoch=steps_per_epoch, ddp_model=model)


def _restore_weights(model: nn.Module, ckpt: dict, resume_path: Path | None, model_name: str,
                     class_names: list[str]) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError("resume", f"the weights in {str(resume_path)!r} do not fit {model_name} "
                              f"({str(exc).splitlines()[0]})") from None
    if ckpt.get("class_names") != class_names:
        raise CheckpointError("resume", f"checkpoint {str(resume_path)!r} was trained on classes "
                              f"{ckpt.get('class_names')}, the data has {class_names}")


def _restore(run: _Run, ckpt: dict, resume_path: Path | None) -> None:
    """Optimizer, schedule, scaler, EMA, history and this rank's RNG from a resumed checkpoint."""
    env = run.env
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and run.scaler.is_enabled():  # a run may resume in another --precision
            run.scaler.load_state_dict(ckpt["scaler"])
        if run.ema is not None:
            if ckpt.get("model_ema") is None:
                raise CheckpointError("resume", "ema is on but the checkpoint has no EMA weights")
            run.ema.module.load_state_dict(ckpt["model_ema"])
            run.ema.updates = int(ckpt.get("ema_updates", 0))
    except (RuntimeError, ValueError, KeyError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError("resume", f"cannot restore the training state from {str(resume_path)!r} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    run.start_epoch = start_epoch = int(ckpt["epoch"])
    run.history = list(ckpt.get("history", []))[:start_epoch]
    run.elapsed_before = float(run.history[-1]["elapsed"]) if run.history else 0.0
    rng = ckpt["rng"]
    if env.rank < len(rng):
        restore_rng_state(rng[env.rank])
    elif env.is_main:
        print(f"warning: the checkpoint has RNG states of {len(rng)} process(es), this run has "
              f"{env.world_size}: rank >= {len(rng)} start from fresh seeds", file=sys.stderr)
    steps = run.steps_per_epoch
    if start_epoch > 0 and run.scheduler.last_epoch != start_epoch * steps and env.is_main:
        print(f"note: the checkpoint stopped at step {run.scheduler.last_epoch}, epoch {start_epoch} starts at step "
              f"{start_epoch * steps} with this data / batch size / world size", file=sys.stderr)


def _start(run: _Run, ckpt: dict | None, resume_path: Path | None) -> None:
    """Wrap the model for DDP; rank 0 writes ``config.json`` and prints what the run is about to do."""
    config, env, out, splits, spec = run.config, run.env, run.out, run.splits, run.spec
    if env.distributed:
        # depthwise kernels (C, 1, k, k) get gradients whose stride differs only on the size-1 dimension: the same
        # memory layout, but DDP warns on every process
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        run.ddp_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    run.resolved = config.to_dict()
    if not env.is_main:
        return
    if ckpt is None and (out / "last.pt").exists():
        print(f"note: starting afresh in {out}: its last.pt will be overwritten (--resume auto would continue it)",
              file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(run.resolved, indent=1) + "\n")
    where = "digits (scikit-learn)" if spec.kind == "digits" else str(config.data)
    action = f"resuming after epoch {run.start_epoch} from {resume_path}" if ckpt is not None else "training"
    threads = f" x {_plural(torch.get_num_threads(), 'thread')}" if env.device.type == "cpu" else ""
    _print(env, f"deformattn train: {action}: {config.model} ({run.num_params / 1e6:.2f}M params) on {where}: "
                f"{len(splits.train)} train / {len(splits.eval)} {splits.eval_name} images, "
                f"{len(splits.class_names)} classes, {spec.img_size}x{spec.img_size}, {env.device.type} x "
                f"{_plural(env.world_size, 'process', 'processes')}{threads}, "
                f"{_plural(config.epochs, 'epoch')} of {_plural(run.steps_per_epoch, 'step')} "
                f"-> {out}")
    initial = run.initial
    if initial is not None:
        resized = f", {len(initial['resized'])} position table(s) resized" if initial["resized"] else ""
        reinit = (f" ({', '.join(sorted({k.rsplit('.', 1)[0] for k in initial['reinitialised_keys']}))})"
                  if initial["reinitialised"] else "")
        _print(env, f"initial checkpoint {initial['path']} [{initial['format']}]: loaded "
                    f"{_plural(initial['loaded'], 'tensor')}{resized}, re-initialised "
                    f"{initial['reinitialised']}{reinit}, ignored {initial['ignored']}")


def _run_epoch(run: _Run, epoch: int, best_acc: float, session_start: float) -> float:
    """Train one epoch, evaluate, write the checkpoints and metrics (rank 0); the best score so far."""
    config, env, spec, model, ema = run.config, run.env, run.spec, run.model, run.ema
    optimizer, scaler = run.optimizer, run.scaler
    epoch_start = time.perf_counter()
    run.train_sampler.set_epoch(epoch)
    run.loader_gen.manual_seed(config.seed * 1_000_003 + epoch)  # worker seeds of this epoch
    aug_gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 1_009 + env.rank)
    desc = f"epoch {epoch + 1}/{config.epochs}"
    progress = Progress(run.steps_per_epoch, f"{desc} train", mode=config.progress,
                        log_interval=config.log_interval, enabled=env.is_main)
    run.ddp_model.train()
    loss_sum = correct = count = 0.0
    for images, target in run.train_loader:
        images, target = images.to(env.device, non_blocking=True), target.to(env.device, non_blocking=True)
        x = spec.prepare(images, train=True, augment=config.augment, generator=aug_gen)
        x, soft_target = run.batch_augment(x, target) if run.batch_augment.active else (x, target)
        with autocast(env.device, run.precision):
            logits = run.ddp_model(x)
            loss = run.criterion(logits.float(), soft_target)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"train: loss is {loss_value} at epoch {epoch + 1}, step "
                                     f"{progress.step + 1}: lower --lr or set --clip-grad")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        run.scheduler.step()
        if ema is not None:
            ema.update(model)
        n = target.numel()
        loss_sum += loss_value * n
        correct += (logits.argmax(1) == target).sum().item()
        count += n
        progress.update(n * env.world_size, loss=loss_sum / count, acc=correct / count)
    progress.close()
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], env)
    train_seconds = time.perf_counter() - epoch_start

    eval_progress = Progress(len(run.eval_loader), f"{desc} eval", mode=config.progress, enabled=env.is_main,
                             plain=False)
    metrics = evaluate(model, run.eval_loader, spec, env, precision=run.precision, progress=eval_progress)
    eval_progress.close()
    ema_metrics = (evaluate(ema.module, run.eval_loader, spec, env, precision=run.precision)
                   if ema is not None else None)
    row = {
        "epoch": epoch + 1, "lr": max(g["lr"] for g in optimizer.param_groups),  # the peak group's
        "train_loss": loss_sum / count, "train_acc": correct / count,
        "eval_loss": metrics["loss"], "eval_acc": metrics["acc"], "eval_top5": metrics["top5"],
        "ema_eval_loss": ema_metrics["loss"] if ema_metrics else None,
        "ema_eval_acc": ema_metrics["acc"] if ema_metrics else None,
        "ema_eval_top5": ema_metrics["top5"] if ema_metrics else None,
        "epoch_seconds": time.perf_counter() - epoch_start,
        "images_per_second": count / train_seconds,
        "elapsed": run.elapsed_before + time.perf_counter() - session_start,
    }
    run.history.append(row)
    rng_states = all_gather_objects(capture_rng_state(), env)
    if env.is_main:
        save_checkpoint(run.out / "last.pt", run.checkpoint_dict(epoch + 1, rng_states, full=True))
        score = row["ema_eval_acc"] if ema_metrics else row["eval_acc"]
        if score > best_acc:
            best_acc = score
            save_checkpoint(run.out / "best.pt", run.checkpoint_dict(epoch + 1, rng_states, full=False))
        _write_metrics(run.out, run.history)
        ema_text = f" | EMA {row['ema_eval_acc']:.2%}" if ema_metrics else ""
        print(f"{desc}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%} | {run.splits.eval_name} "
              f"loss {row['eval_loss']:.4f} top-1 {row['eval_acc']:.2%} top-5 {row['eval_top5']:.2%}{ema_text}"
              f" | lr {row['lr']:.2e} | {row['images_per_second']:.0f} img/s | {row['epoch_seconds']:.1f}s "
              f"(total {format_seconds(row['elapsed'])})", flush=True)
    barrier(env)
    return best_acc


def _summary(run: _Run, session_start: float) -> dict[str, Any]:
    """The run's summary (every rank); rank 0 also plots the curves and writes ``summary.json``."""
    config, env, out, splits, spec, history = run.config, run.env, run.out, run.splits, run.spec, run.history
    checksums = all_gather_objects(_weights_checksum(run.model), env)
    seconds = run.elapsed_before + time.perf_counter() - session_start
    last = history[-1] if history else {}
    summary = {
        "model": config.model,
        "test_accuracy": last.get("eval_acc"),
        "test_top5": last.get("eval_top5"),
        "test_loss": last.get("eval_loss"),
        "ema_test_accuracy": last.get("ema_eval_acc"),
        "eval_split": splits.eval_name,
        "best_test_accuracy": max((r["eval_acc"] for r in history), default=None),
        "epochs": len(history),
        "seconds": seconds,
        "train_accuracy": last.get("train_acc"),
        "train_loss": last.get("train_loss"),
        "dataset": "digits" if spec.kind == "digits" else str(config.data),
        "num_train": len(splits.train),
        "num_eval": len(splits.eval),
        "num_classes": len(splits.class_names),
        "img_size": spec.img_size,
        "params": run.num_params,
        "device": str(env.device),
        "world_size": env.world_size,
        "threads": torch.get_num_threads(),
        "precision": run.precision,
        "replica_checksums": checksums,
        "replicas_identical": len(set(checksums)) == 1,
        "checkpoint": str(out / "last.pt"),
        "initial_checkpoint": None if run.initial is None else {
            k: (v[:20] if isinstance(v, list) else v) for k, v in run.initial.items()},
        "torch": torch.__version__,
    }
    if env.is_main:
        if not summary["replicas_identical"]:
            print(f"warning: the {env.world_size} processes ended with different weights: {checksums}", file=sys.stderr)
        if history:
            try:
                from .plots import plot_history

                summary["plot"] = str(plot_history(history, out / "curves.png", title=f"{config.model} on "
                                                   f"{summary['dataset']}"))
            except ImportError as exc:
                print(f"note: no training-curve plot ({exc})", file=sys.stderr)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        if history:
            print(f"done: {config.model} {splits.eval_name} accuracy {last['eval_acc']:.2%} (top-5 "
                  f"{last['eval_top5']:.2%}) after {_plural(len(history), 'epoch')} in {format_seconds(seconds)} "
                  f"({seconds:.0f}s); outputs in {out}", flush=True)
    barrier(env)
    return summary
