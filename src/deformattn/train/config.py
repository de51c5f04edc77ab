"""The training configuration: one dataclass is the single source of defaults, help texts, command-line flags
(``--batch-size`` for ``batch_size``), config-file keys and validation."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RESUMABLE_CHANGES", "TrainConfig", "load_config_file"]

# What a resumed run may change; anything else must match the checkpoint (else the run would not be a continuation).
RESUMABLE_CHANGES = frozenset(
    {"epochs", "output_dir", "workers", "threads", "device", "progress", "log_interval", "resume", "data",
     "precision"}
)


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything a training run depends on. The defaults train ``dat_nano`` on scikit-learn's digits to >= 97% test
    accuracy in a few CPU minutes."""

    model: str = _opt("dat_nano", "registered model variant (see `deformattn info --models`)")
    data: str | None = _opt(
        None, "ImageFolder root with train/ and val/ subfolders (one folder per class); "
        "default: scikit-learn's 8x8 handwritten digits, upscaled to --img-size", metavar="PATH")
    output_dir: str = _opt("runs/train", "where checkpoints, metrics, plots and summary.json go", metavar="DIR")
    img_size: int | None = _opt(None, "model input size (default: the variant's, 32 for dat_nano)", metavar="N")
    epochs: int = _opt(15, "number of epochs")
    batch_size: int = _opt(64, "images per step and process")
    lr: float = _opt(2e-3, "peak learning rate (AdamW), reached after the warmup")
    min_lr: float = _opt(1e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = _opt(0.05, "AdamW weight decay (never applied to biases, norms and position-bias tables)")
    warmup_epochs: float = _opt(2.0, "linear warmup length in epochs (fractions allowed)")
    label_smoothing: float = _opt(0.1, "label smoothing of the training loss (DAT papers: 0.1)",
                                  aliases=("--smoothing",))
    clip_grad: float = _opt(5.0, "clip the gradient norm to this value (0: no clipping)")
    drop_path: float | None = _opt(None, "stochastic-depth rate (default: the variant's)", metavar="RATE")
    model_kwargs: dict = _opt({}, "other model arguments as a JSON object, e.g. '{\"dims\": [16, 32, 64, 128]}'",
                              metavar="JSON")
    augment: bool = _opt(True, "training augmentation (digits: small random affine; ImageFolder: "
                               "RandomResizedCrop + horizontal flip)")
    min_crop_scale: float = _opt(0.08, "ImageFolder: smallest RandomResizedCrop area fraction")
    crop_pct: float | None = _opt(None, "ImageFolder evaluation: resize to img_size / crop_pct, then center-crop "
                                        "(default: the variant's)", metavar="PCT")
    mixup: float = _opt(0.0, "mixup alpha, 0: off (torchvision's MixUp on the batch; DAT papers on ImageNet: 0.8)")
    cutmix: float = _opt(0.0, "cutmix alpha, 0: off (torchvision's CutMix; with --mixup each batch takes one of the "
                              "two at random, as timm; DAT papers on ImageNet: 1.0)")
    aa: str | None = _opt(None, "ImageFolder: timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1' (RandAugment, "
                                "DAT papers on ImageNet)", metavar="POLICY")
    reprob: float = _opt(0.0, "random-erasing probability per image, 0: off (timm's RandomErasing, pixel mode; DAT "
                              "papers on ImageNet: 0.25)")
    color_jitter: float = _opt(0.0, "ImageFolder: color-jitter strength, 0: off (timm applies it only without "
                                    "--aa; DAT papers on ImageNet: 0.4)")
    initial_checkpoint: str | None = _opt(
        None, "start a new run (epoch 0, fresh optimizer and schedule) from the weights in PATH: an official DAT "
        "checkpoint, a deformattn training checkpoint, a bare state dict, or the backbone of an mmdet / mmseg "
        "checkpoint; a classifier of another class count is re-initialised, position tables are resized to "
        "--img-size", metavar="PATH")
    initial_checkpoint_ema: bool = _opt(True, "--initial-checkpoint: take a training checkpoint's EMA weights when "
                                              "it has them")
    layer_decay: float | None = _opt(None, "layer-wise learning-rate decay (BEiT / timm): the layer k groups below "
                                           "the classifier gets lr * LAYER_DECAY^k (e.g. 0.75 when fine-tuning)",
                                     metavar="DECAY")
    ema: bool = _opt(False, "keep an exponential moving average of the weights (evaluated and saved alongside)")
    ema_decay: float = _opt(0.999, "EMA decay per step")
    amp: bool = _opt(True, "mixed precision on GPU (bfloat16 where supported, else float16 with loss scaling); "
                           "ignored on CPU; what --precision auto follows")
    precision: str = _opt("auto", "autocast precision: fp32 (none), bf16 (no loss scaling), fp16 (with a "
                                  "GradScaler), on CPU and GPU; auto: --amp's rule", choices=("auto", "fp32", "bf16",
                                                                                               "fp16"))
    test_fraction: float = _opt(0.25, "digits: fraction held out as the test split (stratified, fixed seed)")
    train_split: str = _opt("train", "ImageFolder: training subfolder")
    val_split: str = _opt("val", "ImageFolder: evaluation subfolder")
    max_train_samples: int | None = _opt(None, "use only this many training images (quick runs)", metavar="N")
    max_eval_samples: int | None = _opt(None, "use only this many evaluation images (quick runs)", metavar="N")
    workers: int = _opt(2, "ImageFolder data-loading processes per training process")
    threads: int = _opt(0, "CPU threads per process (0: 1 for the built-in digits, whose tiny model gains little "
                           "from more and slows down when it competes with other programs for cores; else one per "
                           "core left idle by other programs)")
    seed: int = _opt(0, "random seed (data split, initialisation, augmentation, shuffling)")
    device: str = _opt("auto", "'auto' (GPU if available), 'cpu', 'cuda' or 'cuda:N'")
    resume: str | None = _opt(None, "continue from a checkpoint: a path, or 'auto' for OUTPUT_DIR/last.pt when it "
                                    "exists", metavar="PATH|auto")
    progress: str = _opt("auto", "progress display: bar (tqdm), plain (lines), none, or auto (bar on a terminal)",
                         choices=("auto", "bar", "plain", "none"))
    log_interval: int = _opt(0, "plain progress: a line every N steps (0: about 10 per epoch)")

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "TrainConfig") -> TrainConfig:
        """Build from a mapping (config file, checkpoint); unknown keys raise a ``ValueError`` naming them."""
        names = cls.field_names()
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"{source}: unknown key(s) {', '.join(hints)}; known keys: {', '.join(names)}")
        config = cls(**dict(values))
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- validation ----------------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every value; errors name the command-line flag."""

        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            optional = "None" in str(f.type)
            if v is None:
                if not optional:
                    raise ValueError(f"{flag(f.name)} must be set (got None)")
                continue
            kind = str(f.type).split("|")[0].strip()
            ok = {"int": is_int, "float": is_num, "str": lambda x: isinstance(x, str),
                  "bool": lambda x: isinstance(x, bool), "dict": lambda x: isinstance(x, dict)}[kind](v)
            if not ok:
                article = "an" if kind == "int" else "a"
                raise TypeError(f"{flag(f.name)} must be {article} {kind}, got {type(v).__name__} {v!r}")
            if kind == "float":
                setattr(self, f.name, float(v))
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                raise ValueError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {v!r}")

        def positive(name: str, *, zero: bool = False) -> None:
            v = getattr(self, name)
            if v is not None and (v < 0 or (v == 0 and not zero)):
                raise ValueError(f"{flag(name)} must be {'>= 0' if zero else '> 0'}, got {v}")

        for name in ("epochs", "batch_size", "lr", "img_size", "max_train_samples", "max_eval_samples"):
            positive(name)
        for name in ("min_lr", "weight_decay", "warmup_epochs", "clip_grad", "workers", "threads", "log_interval"):
            positive(name, zero=True)
        for name, lo, hi in (("label_smoothing", 0.0, 1.0), ("drop_path", 0.0, 1.0), ("ema_decay", 0.0, 1.0)):
            v = getattr(self, name)
            if v is not None and not lo <= v < hi:
                raise ValueError(f"{flag(name)} must be in [{lo}, {hi}), got {v}")
        for name in ("min_crop_scale", "crop_pct"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"{flag(name)} must be in (0, 1], got {v}")
        for name in ("mixup", "cutmix", "color_jitter"):
            positive(name, zero=True)
        if not 0.0 <= self.reprob < 1.0:
            raise ValueError(f"--reprob must be in [0, 1), got {self.reprob}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.data is None and (self.aa or self.color_jitter):
            raise ValueError("--aa and --color-jitter apply to ImageFolder data (--data); the built-in digits are "
                             "augmented on tensors (--mixup, --cutmix, --reprob work on both)")
        if self.aa is not None and not self.aa.startswith(("rand", "augmix", "trivial", "original", "v0", "3a")):
            raise ValueError(f"--aa must be a timm auto-augment policy such as 'rand-m9-mstd0.5-inc1', "
                             f"'augmix-m5-w4-d2', 'trivialaugment' or 'original', got {self.aa!r}")
        if self.resume is not None and self.initial_checkpoint is not None:
            raise ValueError("--resume and --initial-checkpoint both set: --resume continues a run (its weights, "
                             "optimizer and epoch), --initial-checkpoint starts a new one from weights; give one")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        reserved = {"num_classes", "img_size", "pretrained", "checkpoint_path"}
        clash = sorted(reserved & set(self.model_kwargs))
        if clash:
            raise ValueError(f"--model-kwargs must not set {', '.join(clash)} (use --img-size; the classes come from "
                             "the data)")
        if self.drop_path is not None and "drop_path_rate" in self.model_kwargs:
            raise ValueError("--drop-path and --model-kwargs drop_path_rate both set; give one")
        return self

    # -- command line ------------------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field (``--batch-size`` for ``batch_size``, ``--ema/--no-ema`` for booleans)."""
        for f in dataclasses.fields(cls):
            kind = str(f.type).split("|")[0].strip()
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            kwargs: dict[str, Any] = {"dest": f.name, "default": default}
            help_text = f.metadata["help"]
            if kind == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
                kwargs["help"] = f"{help_text} (default: {'on' if default else 'off'})"
            else:
                kwargs["type"] = {"int": int, "float": float, "str": str, "dict": _json_object}[kind]
                if "choices" in f.metadata:
                    kwargs["choices"] = f.metadata["choices"]
                if "metavar" in f.metadata:
                    kwargs["metavar"] = f.metadata["metavar"]
                shown = "" if default in (None, {}) else f" (default: {default})"
                kwargs["help"] = help_text + shown
            parser.add_argument("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()), **kwargs)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at char {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping (by extension: .json is JSON, .yaml/.yml YAML; others are tried as JSON, then YAML).
    Keys may use dashes or underscores (``batch-size`` or ``batch_size``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    data: Any
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config: {str(path)!r} is not valid JSON: {exc}") from None
    else:
        try:
            data = json.loads(text) if suffix not in (".yaml", ".yml") else None
        except json.JSONDecodeError:
            data = None
        if data is None:
            from .._utils import optional_import

            yaml = optional_import("yaml", "train", "Reading a YAML --config file")
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"--config: {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {str(path)!r} must hold a mapping of option names to values, got "
                         f"{type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
