"""The export package's exceptions and the helpers its steps share for reporting failures."""
from __future__ import annotations

import contextlib
import io
from typing import Iterator

__all__ = ["ExportError", "ExportVerificationError"]

_OWNER = "export_model"


class ExportError(RuntimeError):
    """The model could not be exported (the message says which step failed and why)."""


class ExportVerificationError(ExportError):
    """The exported file runs, but its outputs differ from the PyTorch model's above the tolerance."""


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Hide the exporters' progress prints (``[torch.onnx] ...``) unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()
