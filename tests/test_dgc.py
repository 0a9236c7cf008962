"""DGC: the released code's degenerate behaviour, the chunked ratio selection, and the entropy selector."""
import logging

import pytest
import torch

from quant.dgc import (DGCResult, cfg_chunk_mask, dgc_select, ledoit_wolf_covariance, official_mahalanobis,
                       select_by_ratio, shrinkage_mahalanobis)


def generic_features(rows: int, channels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    channel_scale = torch.exp(torch.randn(channels, generator=g))    # anisotropic, like real features
    return torch.randn(rows, channels, generator=g) * channel_scale + torch.randn(channels, generator=g)


# ----------------------------------------------------------------------------------------------
# the released code ("official")

@pytest.mark.parametrize("n, channels", [(16, 16), (64, 96)])
def test_official_distances_are_constant_when_n_le_c(n, channels):
    d = official_mahalanobis(generic_features(n, channels))
    assert d.dtype == torch.float32
    assert torch.allclose(d, torch.full_like(d, (n - 1) / n ** 0.5), atol=1e-3)


def test_official_distances_vary_when_n_gt_c():
    d = official_mahalanobis(generic_features(64, 4))
    assert d.std() > 0.2


def test_official_both_branches_generic_gives_half_and_first_rows_per_chunk():
    n, chunk, channels = 32, 8, 48
    is_cond = cfg_chunk_mask(2 * n, chunk)
    result = dgc_select(generic_features(2 * n, channels), is_cond, mode="official", chunk=chunk)
    assert result.mode == "official" and result.pct_cond == result.pct_decided == 0.5
    expected = [block * 16 + i for block in range(4) for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert result.indices.tolist() == expected
    assert result.indices.dtype == torch.long


def test_official_identical_uncond_rows_give_cond_only():
    # causal models: every uncond sequence starts with the null-class token, so token 0 is identical
    n, chunk, channels = 32, 8, 48
    is_cond = cfg_chunk_mask(2 * n, chunk)
    features = generic_features(2 * n, channels)
    features[~is_cond] = features[~is_cond][0]
    result = dgc_select(features, is_cond, mode="official", chunk=chunk)
    assert result.pct_cond == 1.0
    assert bool(is_cond[result.indices].all())
    assert result.indices.tolist() == [block * 16 + i for block in range(4) for i in range(8)]
    assert result.pct_decided == 1.0
    assert result.distances_uncond.max() < 2 < result.distances_cond.min()


def test_official_single_chunk_layout():
    # RAR/MAR: [cond N, uncond N], chunk None
    n = 12
    features = generic_features(2 * n, 32)
    features[n:] = features[n]
    result = dgc_select(features, cfg_chunk_mask(2 * n), mode="official")
    assert result.indices.tolist() == list(range(n))


# ----------------------------------------------------------------------------------------------
# chunked ratio selection

@pytest.mark.parametrize("pct, expected", [
    (0.75, [0, 1, 2, 4, 8, 9, 10, 12]),
    (0.5, [0, 1, 4, 5, 8, 9, 12, 13]),
    (0.625, [0, 1, 4, 5, 8, 9, 12, 13]),     # round(2.5) = 2: Python rounds half to even, as released
    (1.0, [0, 1, 2, 3, 8, 9, 10, 11]),
    (0.0, [4, 5, 6, 7, 12, 13, 14, 15]),
])
def test_ratio_selection_takes_first_rows_of_each_half_per_chunk(pct, expected):
    is_cond = cfg_chunk_mask(16, 4)
    assert is_cond.tolist() == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4
    assert select_by_ratio(is_cond, 4, pct).tolist() == expected


def test_ratio_selection_follows_the_mask_inside_a_chunk():
    # a chunk stored uncond-first: still the first cond rows and the first uncond rows of that chunk
    is_cond = torch.tensor([False, False, False, True, True, True])
    assert select_by_ratio(is_cond, 3, 2 / 3).tolist() == [0, 3, 4]


def test_pct_override():
    is_cond = cfg_chunk_mask(16, 4)
    result = dgc_select(generic_features(16, 8), is_cond, mode="official", chunk=4, pct=0.75)
    assert result.mode == "pct_override"
    assert result.indices.tolist() == [0, 1, 2, 4, 8, 9, 10, 12]
    assert result.pct_cond == 0.75
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        dgc_select(generic_features(16, 8), is_cond, chunk=4, pct=1.5)


# ----------------------------------------------------------------------------------------------
# per-sample modes

def test_topk_keeps_the_rows_with_the_largest_official_distances():
    n, channels = 24, 4        # n > C so the official distances are informative
    is_cond = cfg_chunk_mask(2 * n, 6)
    features = generic_features(2 * n, channels)
    result = dgc_select(features, is_cond, mode="topk", chunk=6)
    distances = torch.empty(2 * n)
    distances[is_cond], distances[~is_cond] = result.distances_cond, result.distances_uncond
    assert torch.equal(result.distances_cond, official_mahalanobis(features[is_cond]))
    expected = sorted(torch.argsort(distances, descending=True)[:n].tolist())
    assert result.indices.tolist() == expected
    assert result.pct_cond == pytest.approx(is_cond[expected].float().mean().item())


@pytest.mark.parametrize("pooled", [True, False])
def test_entropy_ranks_a_planted_outlier_first_when_n_le_c(pooled):
    n, channels, outlier = 16, 96, 5
    is_cond = cfg_chunk_mask(2 * n)
    features = generic_features(2 * n, channels).double()
    mean = features[is_cond].mean(dim=0)
    features[outlier] = mean + 3 * (features[outlier] - mean)      # same shape, three times as far out
    degenerate = torch.tensor((n - 1) / n ** 0.5)
    assert torch.allclose(official_mahalanobis(features[is_cond]), degenerate, atol=1e-3)  # pinv is blind

    result = dgc_select(features, is_cond, pooled=pooled)
    assert result.mode == "entropy" and result.pct_decided is None
    assert result.distances_cond.dtype == torch.float64
    assert int(result.distances_cond.argmax()) == outlier
    assert result.distances_cond.std() > 0.05 * result.distances_cond.mean()   # not constant
    # per-sample selection: exactly the N rows with the largest distances
    distances = torch.empty(2 * n, dtype=torch.float64)
    distances[is_cond], distances[~is_cond] = result.distances_cond, result.distances_uncond
    assert result.indices.tolist() == sorted(torch.argsort(distances, descending=True)[:n].tolist())
    assert outlier in result.indices.tolist()


def test_entropy_prefers_spread_rows_over_a_tight_uncond_cluster():
    # cond rows spread out, uncond rows tightly clustered: the spread rows carry the information
    n, channels = 16, 64
    is_cond = cfg_chunk_mask(2 * n, 8)
    features = generic_features(2 * n, channels)
    features[~is_cond] = features[~is_cond][0] + 0.01 * features[~is_cond]
    result = dgc_select(features, is_cond, chunk=8)
    assert result.pct_cond == 1.0
    assert result.indices.tolist() == is_cond.nonzero().squeeze(1).tolist()


def test_entropy_per_branch_identical_rows_have_zero_distance():
    n = 8
    is_cond = cfg_chunk_mask(2 * n)
    features = generic_features(2 * n, 32)
    features[n:] = features[n]
    result = dgc_select(features, is_cond, pooled=False)
    assert torch.equal(result.distances_uncond, torch.zeros(n, dtype=torch.float64))
    assert result.pct_cond == 1.0


# ----------------------------------------------------------------------------------------------
# the shrinkage estimator

def test_ledoit_wolf_is_well_conditioned_when_n_lt_c():
    features = generic_features(20, 64)
    cov, rho = ledoit_wolf_covariance(features)
    eigenvalues = torch.linalg.eigvalsh(cov)
    assert cov.dtype == torch.float64 and torch.isfinite(cov).all()
    assert torch.allclose(cov, cov.T)
    assert 0 < rho <= 1
    assert eigenvalues.min() > 0 and eigenvalues.max() / eigenvalues.min() < 1e4
    centred = features.double() - features.double().mean(dim=0)
    sample_eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / 20)
    assert sample_eigenvalues.min() < 1e-10 * sample_eigenvalues.max()    # what the shrinkage repairs


@pytest.mark.parametrize("n, channels", [(12, 7), (6, 10)])
def test_ledoit_wolf_intensity_matches_its_definition(n, channels):
    x = generic_features(n, channels, seed=3).double()
    centred = x - x.mean(dim=0)
    sample_cov = centred.T @ centred / n
    mu = sample_cov.trace() / channels
    eye = torch.eye(channels, dtype=torch.float64)
    delta2 = ((sample_cov - mu * eye) ** 2).sum() / channels
    outer = centred[:, :, None] * centred[:, None, :]                   # x_k x_kᵀ, [n, C, C]
    beta_bar2 = ((outer - sample_cov) ** 2).sum() / channels / n ** 2
    rho = (min(beta_bar2, delta2) / delta2).item()
    cov, got_rho = ledoit_wolf_covariance(x)
    assert got_rho == pytest.approx(rho, rel=1e-12)
    assert torch.allclose(cov, (1 - rho) * sample_cov + rho * mu * eye, rtol=1e-12, atol=0)
    # the SVD form of the distances agrees with solving against the explicit covariance
    explicit = ((centred @ torch.linalg.inv(cov)) * centred).sum(dim=1).sqrt()
    assert torch.allclose(shrinkage_mahalanobis(x), explicit, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------------------------
# logging and errors

def test_logs_ratio_and_selected_rows(caplog):
    is_cond = cfg_chunk_mask(16, 4)
    with caplog.at_level(logging.INFO, logger="quant.dgc"):
        result = dgc_select(generic_features(16, 32), is_cond, mode="official", chunk=4)
    text = caplog.text
    assert "pct 0.5000" in text and f"selected rows: {result.indices.tolist()}" in text


def test_bad_inputs_are_rejected():
    features, is_cond = generic_features(16, 8), cfg_chunk_mask(16, 4)
    with pytest.raises(ValueError, match=r"features must be \[2N, C\]"):
        dgc_select(features[:, None], is_cond)
    with pytest.raises(ValueError, match="one entry per feature row"):
        dgc_select(features, is_cond[:-2])
    with pytest.raises(ValueError, match="one entry per feature row"):
        dgc_select(features, is_cond.int())
    with pytest.raises(ValueError, match="odd or empty count: 15"):
        dgc_select(features[:15], is_cond[:15])
    unbalanced = is_cond.clone()
    unbalanced[4] = True
    with pytest.raises(ValueError, match="marks 9 of 16 rows"):
        dgc_select(features, unbalanced)
    with pytest.raises(ValueError, match="chunks of 3 cond"):
        dgc_select(features, is_cond, chunk=3)
    with pytest.raises(ValueError, match="does not match chunk=2"):
        dgc_select(features, is_cond, chunk=2)
    with pytest.raises(ValueError, match="unknown DGC mode 'ratio'"):
        dgc_select(features, is_cond, mode="ratio")
    with pytest.raises(ValueError, match="positive even"):
        cfg_chunk_mask(7)


def test_result_type():
    result = dgc_select(generic_features(8, 4), cfg_chunk_mask(8))
    assert isinstance(result, DGCResult)
    assert result.distances_cond.shape == result.distances_uncond.shape == (4,)
