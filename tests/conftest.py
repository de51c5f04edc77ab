"""Shared test helpers: where the official reference fixtures live (one helper for every kind)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ROOT_VAR = "DEFORMATTN_FIXTURES_ROOT"
DEFAULT_ROOT = REPO.parent / "shared" / "fixtures"
# a kind's own folder variable, kept from before the shared root (it wins over the root for that kind)
KIND_VARS = {"official_dat": "DEFORMATTN_FIXTURES"}


def fixtures_path(kind: str = "official_dat") -> Path:
    """Where fixtures of ``kind`` (``"official_dat"``, ``"msda"``; each folder's README says the format) live:
    ``$DEFORMATTN_FIXTURES_ROOT/<kind>`` (default ``../shared/fixtures/<kind>``), or the kind's own variable
    (``$DEFORMATTN_FIXTURES`` for ``official_dat``) when set. Does not check that it exists."""
    own = KIND_VARS.get(kind)
    if own and os.environ.get(own):
        return Path(os.environ[own])
    return Path(os.environ.get(ROOT_VAR) or DEFAULT_ROOT) / kind


def fixtures_dir(kind: str = "official_dat", pattern: str = "*.pt") -> Path:
    """The fixture folder of ``kind`` (see :func:`fixtures_path`), holding at least one ``pattern`` file.

    Outside CI a missing (or empty) folder skips the test; with CI=true it fails, never silently skips.
    """
    path = fixtures_path(kind)
    if not path.is_dir() or not any(path.glob(pattern)):
        own = KIND_VARS.get(kind)
        how = f"set {ROOT_VAR}" + (f" or {own}" if own else "")
        msg = f"{kind} fixture folder not found or without {pattern} files: {path} ({how})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def fixture_dir() -> Path:
    """The official DAT fixtures' folder (:func:`fixtures_dir` of ``"official_dat"``)."""
    return fixtures_dir("official_dat")


def fixture_files(prefixes: tuple[str, ...], kind: str = "official_dat") -> list[Path]:
    """Fixture files of ``kind`` whose name starts with one of ``prefixes``, for parametrize at collection (an
    absent folder gives ``[]``: tests then call :func:`fixtures_dir`, which skips or, under CI, fails)."""
    path = fixtures_path(kind)
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
