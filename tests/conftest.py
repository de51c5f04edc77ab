"""Shared test helpers: where the official reference fixtures live."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = REPO.parent / "shared" / "fixtures" / "official_dat"


def fixture_dir() -> Path:
    """The folder of official-code fixtures: $DEFORMATTN_FIXTURES, else ../shared/fixtures/official_dat.

    Outside CI a missing folder skips the test; with CI=true it fails, never silently skips.
    """
    path = Path(os.environ.get("DEFORMATTN_FIXTURES", DEFAULT_FIXTURES))
    if not path.is_dir():
        msg = f"official fixture folder not found: {path} (set DEFORMATTN_FIXTURES)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def fixture_files(prefixes: tuple[str, ...], kind: str | None = None) -> list[Path]:
    """Fixture files whose name starts with one of ``prefixes`` (checked lazily inside tests)."""
    path = Path(os.environ.get("DEFORMATTN_FIXTURES", DEFAULT_FIXTURES))
    if not path.is_dir():
        return []
    return sorted(p for p in path.glob("*.pt") if p.name.startswith(prefixes))


def load_fixture(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with ``DEFORMATTN_SLOW=1`` (declared in pyproject's markers)."""
    if os.environ.get("DEFORMATTN_SLOW", "") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set DEFORMATTN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread_module():
    """Run a module's tests on one thread: tiny problems run several times faster than with a team that spins on a
    shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
