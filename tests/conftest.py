"""Shared fixtures. Data from ../shared is read at test time, never copied into the repo; a test that needs it
fails (never skips) when it is missing."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.fail(f"{what} not found at {path}: these tests need the shared reference data beside the repo "
                    f"(../shared), or FISHLAB_GOLDEN pointing at a golden set")
    return path


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return _need(SHARED / "spec", "the S2 Pro spec folder")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _need(Path(os.environ.get("FISHLAB_GOLDEN", SHARED / "golden" / "A")).resolve(), "the golden set")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_thread():
    """Tiny demo models run faster on one torch thread (thread hand-offs dominate); restored afterwards."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
