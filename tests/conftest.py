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


def quantized_var_tiny(device: str = "cpu", samples: int = 4, **recipe_options):
    """var_tiny quantized with ptq4arvg (W8A8 unless recipe_options say otherwise) on `samples` sequences it
    generated itself. Returns (var, vae, calibration set)."""
    from quant import quantize, recipe
    from VAR.adapter import var_adapter
    from VAR.calibrate import draw_labels, generate_raw_set
    from VAR.presets import create

    var, vae = create("var_tiny", device=device, seed=0)
    labels = draw_labels(samples, var.num_classes, seed=0, official=False)
    raw = generate_raw_set(var, vae, labels, batch_size=samples, seed=0, top_p=0.96, official_reseed=False,
                           progress=False)
    options = {"w_bits": 8, "a_bits": 8, "batch_size": 8, **recipe_options}
    quantize(var, var_adapter(var), recipe("ptq4arvg", **options), raw, progress=False)
    return var, vae, raw
