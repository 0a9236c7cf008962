"""CUDA-graph sampling of VAR (VAR.graphs) gives the eager sampler's tokens, batch after batch."""
import numpy as np
import pytest
import torch

from VAR.presets import create
from VAR.sampling import make_sample_fn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graphed_sampling_equals_eager():
    var, vae = create("var_tiny", device="cuda", seed=0)
    eager = make_sample_fn(var, vae, dtype="bf16")
    graphed = make_sample_fn(var, vae, dtype="bf16", cuda_graphs=True)
    # first call captures, the second replays; then another batch size captures again
    for labels, seed in ((np.arange(4), 1), (np.arange(4) + 7, 2), (np.arange(6), 3)):
        expected, got = eager(labels, seed), graphed(labels, seed)
        assert np.array_equal(expected["idx_BL"], got["idx_BL"])
        assert np.abs(expected["images"].astype(int) - got["images"].astype(int)).max() <= 1
    assert len(graphed.forward_scale.graphs) == len(var.patch_nums)


def test_graphs_refuse_the_autocast_weight_cache():
    from VAR.graphs import ScaleGraphs
    from VAR.sampling import autoregressive_infer_cfg
    var, vae = create("var_tiny", device="cuda", seed=0)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16), \
            pytest.raises(RuntimeError, match="cache_enabled=False"):
        autoregressive_infer_cfg(var, vae, torch.arange(2, device="cuda"), forward_scale=ScaleGraphs(var))
