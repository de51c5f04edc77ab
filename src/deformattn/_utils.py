"""Small shared helpers: argument normalisation and validation with clear messages, atomic file writes."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ._shapes import concrete


class InvalidArgumentError(ValueError):
    """A bad value of a named argument. ``str(exc)`` is ``"argument: message"`` in the library's terms; the CLI
    prints ``message`` after the matching option's flag (``checkpoint_path`` -> ``--checkpoint``)."""

    def __init__(self, argument: str, message: str):
        super().__init__(argument, message)
        self.argument = argument
        self.message = message

    def __str__(self) -> str:
        return f"{self.argument}: {self.message}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file next to ``path`` to write; it replaces ``path`` (``os.replace``) when the block succeeds and
    is removed otherwise, so a reader - or a run killed half-way - sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions of a file opened normally (0666 & ~umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` atomically through ``write(tmp)`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def to_2tuple(value: Any, name: str, owner: str) -> tuple[int, int]:
    """Normalise an int-or-pair argument to ``(int, int)``; raise a clear error otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int or a pair of ints, got bool {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")


def check_int(value: Any, name: str, owner: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return value


def check_float(value: Any, name: str, owner: str, *, minimum: float | None = None,
                maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value:
        raise ValueError(f"{owner}: {name} must not be NaN")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}: {name} must be <= {maximum}, got {value}")
    return value


def check_image_tensor(x: Any, name: str, owner: str, channels: int | None = None) -> None:
    """Validate a ``Tensor[B, C, H, W]`` floating-point input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{owner}: {name} must have shape (B, C, H, W) (4 dims), got {x.dim()} dims with shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    shape = tuple(concrete(s) for s in x.shape)  # example values while torch.jit.trace records (nothing fixed)
    if channels is not None and shape[1] != channels:
        raise ValueError(f"{owner}: {name} must have {channels} channels (dim 1), got shape {shape}")
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"{owner}: {name} must have H >= 1 and W >= 1, got shape {shape}")


def optional_import(module: str, extra: str, feature: str):
    """Import an optional dependency or raise an ImportError naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{feature} needs the optional package '{module}'. Install it with: pip install 'deformattn[{extra}]'"
        ) from exc


def format_elapsed(seconds: float) -> str:
    """``"42.0 s"`` below a minute, ``"3 min 05 s"`` above."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s"


@contextlib.contextmanager
def elapsed_progress(what: str, *, every_s: float = 10.0, stream: Any = None) -> Iterator[None]:
    """Progress of a long step on ``stream`` (stderr): ``what ...`` at the start, the elapsed time every ``every_s``
    seconds while it runs, and ``what: done in T`` (or ``failed after T``) at the end."""
    import sys
    import threading
    import time

    stream = stream or sys.stderr
    start = time.perf_counter()
    stop = threading.Event()
    print(f"{what} ...", file=stream, flush=True)

    def beat() -> None:
        while not stop.wait(every_s):
            print(f"  {what}: {format_elapsed(time.perf_counter() - start)} elapsed", file=stream, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join()
        status = "done in" if ok else "failed after"
        print(f"{what}: {status} {format_elapsed(time.perf_counter() - start)}", file=stream, flush=True)
