"""Datasets for training and evaluation: scikit-learn's handwritten digits (the default, in memory) and ImageFolder
trees. Both return ``(image, label)`` batches; :meth:`DataSpec.prepare` finishes a batch on the training device
(for the digits: upscale, augment, normalise; ImageFolder images arrive finished from torchvision's transforms).

The ``DataSpec`` goes into every checkpoint so that ``eval`` and ``predict`` preprocess exactly as training did.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from .._utils import optional_import

__all__ = ["DIGITS", "DataSpec", "Splits", "build_splits", "load_digits_split", "load_images"]

DIGITS = "digits"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataSpec:
    """How images become model inputs: ``kind`` is ``"digits"`` or ``"imagefolder"``."""

    kind: str
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    root: str | None = None
    test_fraction: float = 0.25
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def prepare(self, images: Tensor, *, train: bool = False, augment: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
        """A loaded batch -> normalised model input ``Tensor[B, 3, img_size, img_size]`` on ``images.device``."""
        if self.kind != DIGITS:
            return images
        x = images.float()  # B, 1, 8, 8 in [0, 1], ink = 1
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > self.img_size)
        if train and augment:
            x = random_affine(x, generator)
        x = x.expand(-1, 3, -1, -1)  # B, 3, S, S
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def random_affine(x: Tensor, generator: torch.Generator | None, *, degrees: float = 12.0,
                  scale: tuple[float, float] = (0.9, 1.1), translate: float = 0.1) -> Tensor:
    """Per-image rotation, scaling and shift of ``Tensor[B, C, H, W]`` (zeros fill the border). Parameters are drawn
    on the CPU from ``generator`` so the augmentation of an epoch is reproducible whatever the device."""
    B = x.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return torch.rand(B, generator=generator) * (hi - lo) + lo

    angle = uniform(-degrees, degrees) * (math.pi / 180)
    s = uniform(*scale)
    tx, ty = uniform(-translate, translate) * 2, uniform(-translate, translate) * 2  # in [-1, 1] units
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # B, 2, 3
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass
class Splits:
    train: Dataset
    eval: Dataset
    class_names: list[str]
    spec: DataSpec
    eval_name: str


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits split stratified with ``seed``:
    ``(x_train, y_train, x_test, y_test)`` with ``x: Tensor[N, 1, 8, 8]`` in [0, 1] (ink = 1)."""
    datasets = optional_import("sklearn.datasets", "train", "Training on the built-in digits")
    model_selection = optional_import("sklearn.model_selection", "train", "Training on the built-in digits")
    digits = datasets.load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N, 1, 8, 8
    target = torch.as_tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = model_selection.train_test_split(
        list(range(len(target))), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return images[idx_train], target[idx_train], images[idx_test], target[idx_test]


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return dataset
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, sorted(perm.tolist()))


def model_input_defaults(model_name: str) -> dict[str, Any]:
    """The variant's input size, normalisation and crop fraction (its ``default_cfgs`` entry)."""
    from ..models import dat

    cfg = dat.default_cfgs.get(model_name, {})
    return {
        "img_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
        "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }


def build_splits(config: Any, *, eval_split: str | None = None, train: bool = True) -> Splits:
    """Training and evaluation datasets for a :class:`~deformattn.train.TrainConfig` (``eval_split``: another split
    to evaluate on; ``train=False`` skips building the training set's augmentation pipeline)."""
    defaults = model_input_defaults(config.model)
    img_size = config.img_size or defaults["img_size"]
    if config.data is None:
        spec = DataSpec(kind=DIGITS, img_size=img_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                        test_fraction=config.test_fraction, seed=config.seed)
        x_tr, y_tr, x_te, y_te = load_digits_split(config.test_fraction, config.seed)
        name = eval_split or "test"
        if name not in ("train", "test"):
            raise ValueError(f"--split: the digits have the splits 'train' and 'test', got {name!r}")
        train_set = TensorDataset(x_tr, y_tr)
        eval_set = train_set if name == "train" else TensorDataset(x_te, y_te)
        splits = Splits(train_set, eval_set, [str(i) for i in range(10)], spec, name)
    else:
        spec = DataSpec(kind="imagefolder", img_size=img_size, mean=defaults["mean"], std=defaults["std"],
                        crop_pct=config.crop_pct or defaults["crop_pct"], root=str(config.data), seed=config.seed)
        splits = _imagefolder_splits(config, spec, eval_split or config.val_split, train)
    splits.train = _subset(splits.train, config.max_train_samples, config.seed)
    splits.eval = _subset(splits.eval, config.max_eval_samples, config.seed + 1)
    return splits


def _check_split_dir(root: Path, split: str, flag: str) -> Path:
    path = root / split
    if not path.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"--data: {str(root)!r} has no {split!r} subfolder ({flag}); found: "
            f"{', '.join(present) or 'no subfolders'}. "
            "Expected ROOT/train/<class>/<image> and ROOT/val/<class>/<image>"
        )
    return path


def _imagefolder(path: Path, transform: Any) -> Dataset:
    datasets = optional_import("torchvision.datasets", "train", "Training on an ImageFolder tree")
    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise FileNotFoundError(f"--data: cannot read the image folder {str(path)!r}: {exc}") from None


def _imagefolder_splits(config: Any, spec: DataSpec, eval_split: str, train: bool) -> Splits:
    root = Path(config.data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data: {str(root)!r} is not a folder (expected an ImageFolder root with "
                                f"{config.train_split}/ and {config.val_split}/ subfolders)")
    train_dir = _check_split_dir(root, config.train_split, "--train-split")
    eval_dir = _check_split_dir(root, eval_split, "--val-split" if eval_split == config.val_split else "--split")
    recipe = {k: getattr(config, k, None) for k in ("aa", "reprob", "color_jitter")}
    train_set = _imagefolder(train_dir, build_transform(spec, train=True, augment=config.augment,
                                                        min_crop_scale=config.min_crop_scale, **recipe)
                             if train else None)
    eval_set = _imagefolder(eval_dir, build_transform(spec, train=False))
    if eval_set.classes != train_set.classes:  # type: ignore[attr-defined]
        a, b = set(train_set.classes), set(eval_set.classes)  # type: ignore[attr-defined]
        raise ValueError(
            f"--data: the class folders of {eval_split!r} differ from those of {config.train_split!r} (only in "
            f"{config.train_split}: {sorted(a - b)}; only in {eval_split}: {sorted(b - a)}): labels would not match"
        )
    return Splits(train_set, eval_set, list(train_set.classes), spec, eval_split)  # type: ignore[attr-defined]


def build_transform(spec: DataSpec, *, train: bool, augment: bool = True, min_crop_scale: float = 0.08,
                    aa: str | None = None, reprob: float | None = None, color_jitter: float | None = None) -> Any:
    """torchvision transforms of an ImageFolder image: RandomResizedCrop + flip for training, resize to
    ``img_size / crop_pct`` + center crop for evaluation; then tensor and normalisation.

    With the papers' recipe (``aa``: a timm auto-augment policy, ``reprob``: random erasing, ``color_jitter``) the
    training pipeline is timm's ``create_transform`` (the same crop and flip, then those, as in timm's train script).
    """
    T = optional_import("torchvision.transforms", "train", "Training on an ImageFolder tree")
    size = spec.img_size
    if train and augment and (aa or reprob or color_jitter):
        timm_data = optional_import("timm.data", "train", "--aa / --reprob / --color-jitter")
        try:
            return timm_data.create_transform(
                size, is_training=True, scale=(min_crop_scale, 1.0), hflip=0.5, color_jitter=color_jitter or None,
                auto_augment=aa, interpolation="bicubic", mean=spec.mean, std=spec.std, re_prob=reprob or 0.0,
                re_mode="pixel", re_count=1)
        except (AssertionError, ValueError, KeyError) as exc:  # timm asserts on policy strings it cannot parse
            raise ValueError(f"--aa: timm cannot build the auto-augment policy {aa!r} ({exc})") from None
    if train and augment:
        ops = [T.RandomResizedCrop(size, scale=(min_crop_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
               T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(int(math.floor(size / spec.crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
               T.CenterCrop(size)]
    ops += [T.Lambda(_to_rgb), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(ops)


def _to_rgb(image: Any) -> Any:
    return image if image.mode == "RGB" else image.convert("RGB")


def load_images(paths: Sequence[str | Path], spec: DataSpec) -> Tensor:
    """Image files -> the normalised batch ``Tensor[B, 3, S, S]`` the checkpoint's model was trained on.

    Digits checkpoints expect a light digit on a dark background (as scikit-learn's digits); images of any size are
    converted to grayscale and resized to the model input.
    """
    Image = optional_import("PIL.Image", "train", "Reading images for predict")
    batch = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"predict: image {str(path)!r} does not exist")
        try:
            with Image.open(path) as img:
                img.load()
                if spec.kind == DIGITS:
                    gray = img.convert("L")
                    data = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8)
                    x = data.view(1, 1, gray.height, gray.width).float() / 255.0
                    batch.append(spec.prepare(x)[0])
                else:
                    batch.append(build_transform(spec, train=False)(img))
        except (OSError, ValueError) as exc:
            raise ValueError(f"predict: cannot read image {str(path)!r}: {exc}") from None
    return torch.stack(batch)
