"""Shared test fixtures.

Tests that need the reference fixtures in ../shared skip with a clear reason when the folder is
absent (a user's clone), but fail when the CI variable is set, so CI always runs them.
"""
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("PTQ4ARVG_SHARED", REPO_ROOT.parent / "shared"))


def require_shared(*parts: str) -> Path:
    """Path inside ../shared, or skip (fail under CI) when it is missing."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        message = (f"{path} not found: the reference fixtures live in ../shared beside the checkout "
                   f"(or set PTQ4ARVG_SHARED)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def shared_dir() -> Path:
    return require_shared()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks run fastest on one thread, and it avoids oversubscribing shared CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
